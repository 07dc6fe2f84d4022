"""`minisd parity` and the layer table behind it: every component compared, divergence named."""

import numpy as np
import pytest
from refharness import need

from minisd.cli import main
from minisd_parity.compare import layer_table, text_model_names


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from weights_tools import make_tiny

    folder = tmp_path_factory.mktemp("parity") / "sd1"
    make_tiny(folder, family="sd1", seed=0)
    return folder


def test_layer_table_names_the_first_divergence_and_skips_untraced():
    ref = {f"l{i}": np.full((2, 3), float(i + 1)) for i in range(4)}
    ours = {k: v.copy() for k, v in ref.items() if k != "l1"}  # l1: not traced by minisd
    ours["l2"] = ours["l2"] * (1 + 1e-3)
    ours["l3"] = ours["l3"] * (1 + 1e-2)
    rows, first = layer_table(ours, ref, tol=1e-4)
    assert first == "l2"
    assert [ok for *_, ok in rows] == [True, None, False, False]
    assert np.isnan(rows[1][3]) and rows[2][3] == pytest.approx(1e-3)


def test_text_model_names_adds_the_checkpoint_level():
    acts = {"embeddings": 1, "text_model.final_layer_norm": 2}
    assert text_model_names(acts) == {"text_model.embeddings": 1, "text_model.final_layer_norm": 2}


def test_parity_command_compares_every_component(tiny_folder, capsys):
    need("torch", "diffusers", "transformers")
    assert main(["parity", "--model", str(tiny_folder)]) == 0
    out = capsys.readouterr().out
    for title in ("text encoder", "UNet", "VAE decode", "VAE encode"):
        line = next(s for s in out.splitlines() if s.startswith(f"== {title}"))
        compared, total = (int(w) for w in line.split(":")[1].split()[:3:2])
        assert 0.7 * total <= compared <= total, line  # the rest: dropouts, shared activations
    assert "<-- over" not in out
    assert "summary: all components within the bound" in out


def test_parity_command_reports_a_divergence(tiny_folder, capsys):
    """A bound below float32 round-off must produce a named first diverging layer and exit 1."""
    need("torch", "diffusers", "transformers")
    assert main(["parity", "--model", str(tiny_folder), "--tol", "1e-12"]) == 1
    out = capsys.readouterr().out
    assert "<-- over" in out and "first diverging layer" in out.split("summary:")[1]


@pytest.mark.parametrize(
    "target, expect",
    [
        ("time_proj", "unet: first diverging layer time_proj"),  # the float32 island
        ("encoder", "vae encode: first diverging layer encoder.conv_in"),
    ],
)
def test_parity_command_finds_an_injected_bug(tiny_folder, capsys, monkeypatch, target, expect):
    """A wrong time embedding used to pass (the reference was fed minisd's own before its
    output was recorded), and the VAE encoder was never run; a 1e-3 error in either is found."""
    need("torch", "diffusers", "transformers")
    from minisd import ops, vae

    if target == "time_proj":
        real = ops.timestep_embedding
        monkeypatch.setattr(ops, "timestep_embedding", lambda *a, **k: real(*a, **k) * 1.001)
    else:
        real_encoder = vae.encoder
        monkeypatch.setattr(vae, "encoder", lambda x, p, cfg: real_encoder(x * 1.001, p, cfg))
    assert main(["parity", "--model", str(tiny_folder)]) == 1
    assert expect in capsys.readouterr().out.split("summary:")[1]


def test_parity_command_compares_an_lcm_unet_s_cond_proj(tiny_folder, tmp_path, capsys):
    """LCM-distilled UNets get the guidance embedding, so cond_proj is compared too."""
    need("torch", "diffusers", "transformers")
    import json
    import shutil

    from minisd.weights import load_file, save_file

    folder = tmp_path / "lcm"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "unet/config.json").read_text())
    (folder / "unet/config.json").write_text(json.dumps({**config, "time_cond_proj_dim": 8}))
    weights = folder / "unet/diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    c0 = config["block_out_channels"][0]
    w = np.random.default_rng(0).standard_normal((c0, 8)).astype(np.float32)
    save_file({**tensors, "time_embedding.cond_proj.weight": w}, weights)
    assert main(["parity", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    row = next(s for s in out.splitlines() if s.strip().startswith("time_embedding.cond_proj"))
    assert "<-- over" not in row and "summary: all components within the bound" in out


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    from pipelines_xl import build

    folder = tmp_path_factory.mktemp("parity") / "sdxl"
    build("base", folder)
    return folder


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_parity_command_on_sdxl(xl_folder, capsys, dtype):
    """SDXL: both text encoders (text_projection included), the UNet with its micro-
    conditioning (add_time_proj island, add_embedding compared), the VAE."""
    need("torch", "diffusers", "transformers")
    assert main(["parity", "--model", str(xl_folder), "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    titles = [s.split(":")[0] for s in out.splitlines() if s.startswith("== ")]
    assert titles[:3] == ["== text encoder", "== text encoder 2", "== UNet (8x8 latents, t=500)"]
    for name in ("text_projection", "add_time_proj", "add_embedding.linear_2"):
        row = next(s for s in out.splitlines() if s.strip().startswith(name + " "))
        assert "not traced" not in row and "<-- over" not in row, row
    assert "summary: all components within the bound" in out


def test_trace_command_on_sdxl(xl_folder, tmp_path):
    npy = tmp_path / "add.npy"
    args = ["trace", "--model", str(xl_folder), "--module", "add_embedding", "--out", str(npy)]
    assert main([*args, "--size", "64x64"]) == 0
    assert np.load(npy).shape == (1, 32)  # the time embedding width: 4 x 8 channels
