"""weights_tools on files: bad files, cast (bf16 rounding), verify, atomic writes, the CLI.

Numpy only, except the bf16 check against torch's rounding.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from refharness import need

import weights_tools as wt
from minisd.errors import MinisdError
from minisd.weights import load_file, read_header, save_file
from weights_tools.__main__ import main
from weights_tools.stream import float32_to_bf16_bits, write_tensors

UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny(tiny_sd1_files):
    return tiny_sd1_files  # (folder, single file), see conftest.py


def _header_file(path, header, data=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def _bad_files(d, good):
    """{case: path} of malformed files."""
    f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    blob = good.read_bytes()
    cases = {
        "empty": d / "empty.safetensors",
        "truncated": d / "truncated.safetensors",
        "garbage header": d / "garbage.safetensors",
        "header beyond file": d / "long_header.safetensors",
        "offsets outside": d / "outside.safetensors",
        "overlap": d / "overlap.safetensors",
        "unknown dtype": d / "dtype.safetensors",
        "pickle": d / "model.ckpt",
    }
    cases["empty"].write_bytes(b"")
    cases["truncated"].write_bytes(blob[: len(blob) // 2])
    cases["garbage header"].write_bytes((40).to_bytes(8, "little") + bytes(range(200, 240)))
    cases["header beyond file"].write_bytes((10**6).to_bytes(8, "little") + b"{}")
    _header_file(cases["offsets outside"], {"a": {**f32, "data_offsets": [0, 8000]}}, bytes(8))
    _header_file(cases["overlap"], {"a": f32, "b": {**f32, "data_offsets": [4, 12]}}, bytes(12))
    _header_file(cases["unknown dtype"], {"a": {**f32, "dtype": "Q7"}}, bytes(8))
    cases["pickle"].write_bytes(b"\x80\x04K\x01.")  # a pickle: must never be loaded
    return cases


COMMANDS = {
    "inspect": lambda p, d, good: wt.inspect(p),
    "to_diffusers": lambda p, d, good: wt.to_diffusers(p, d / "out"),
    "cast": lambda p, d, good: wt.cast(p, d / "cast.safetensors", "fp16"),
    "verify": lambda p, d, good: wt.verify(good, p),
    "load_single_file": lambda p, d, good: wt.load_single_file(p),
}


def test_bad_files_give_errors_that_name_the_file(tiny, tmp_path):
    _, good = tiny
    for case, path in _bad_files(tmp_path, good).items():
        for command, run in COMMANDS.items():
            with pytest.raises(MinisdError) as err:
                run(path, tmp_path, good)
            assert str(path) in str(err.value), f"{case} via {command}: {err.value}"
        assert not (tmp_path / "cast.safetensors").exists()
        code = main(["inspect", str(path)])
        assert code == 2, f"{case}: the CLI reports errors with exit status 2"


def test_bad_component_file_in_a_folder_is_named(tiny, tmp_path):
    import shutil

    folder, _ = tiny
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    unet = bad / UNET
    unet.write_bytes(unet.read_bytes()[:1000])  # truncated
    for run in (
        lambda: wt.to_original(bad, tmp_path / "x.safetensors"),
        lambda: wt.inspect(bad),
        lambda: wt.verify(folder, bad),
        lambda: wt.cast(bad, tmp_path / "c", "fp16"),
    ):
        with pytest.raises(MinisdError, match=str(unet)):
            run()
    assert not (tmp_path / "x.safetensors").exists()


def test_tensors_that_do_not_fit_the_architecture(tiny, tmp_path):
    _, single = tiny
    flat = dict(load_file(single))
    shape = {**flat, "model.diffusion_model.out.2.bias": np.zeros(3, np.float32)}  # needs 4
    missing = {k: v for k, v in flat.items() if "encoder.down.0.block.0.norm1.bias" not in k}
    arch = {k: v for k, v in flat.items() if not k.endswith("encoder.conv_in.weight")}
    for case, data, what in (
        ("shape", shape, "'conv_out.bias' has shape"),
        ("missing", missing, "missing key 'encoder.down_blocks.0.resnets.0.norm1.bias'"),
        ("arch", arch, "missing key 'first_stage_model.encoder.conv_in.weight'"),
    ):
        path = tmp_path / f"{case}.safetensors"
        write_tensors(path, [(k, "F32", v.shape, v) for k, v in data.items()])
        for run in (
            lambda path=path: wt.to_diffusers(path, tmp_path / "out"),
            lambda path=path: wt.load_single_file(path),
        ):
            with pytest.raises(MinisdError) as err:
                run()
            assert str(path) in str(err.value) and what in str(err.value), case


def test_pickle_is_refused_with_a_way_out(tmp_path):
    path = tmp_path / "x.ckpt"
    path.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(MinisdError, match="pickle"):
        wt.inspect(path)


# ------------------------------------------------------------------------- cast


def test_bf16_rounding_matches_torch():
    torch = need("torch")
    bits = np.array(
        [0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F808001, 0x7F7FFFFF, 0x7F7F7FFF, 0x00000001,
         0x00018000, 0x80008000, 0x7F800000, 0xFF800000, 0x80000000, 0x3F800000],
        dtype=np.uint32,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    x = np.concatenate([bits.view(np.float32), rng.standard_normal(10000).astype(np.float32)])
    with np.errstate(over="ignore"):
        x = np.concatenate([x, x * 1e-39, x * 1e30]).astype(np.float32)  # subnormals, huge
    ours = float32_to_bf16_bits(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, ref)
    nan = np.array([np.nan, -np.nan, np.uint32(0x7FFFFFFF).view(np.float32)], dtype=np.float32)
    widened = (float32_to_bf16_bits(nan).astype(np.uint32) << 16).view(np.float32)
    assert np.isnan(widened).all(), "NaNs stay NaN (no carry into the exponent)"


def test_cast_file(tmp_path):
    src = tmp_path / "a.safetensors"
    vals = np.array([1.0, -2.5, 1e5, 3.14159], dtype=np.float32)
    ids = np.arange(5, dtype=np.int64)
    write_tensors(src, [("w", "F32", (4,), vals), ("ids", "I64", (5,), ids)])
    with pytest.warns(UserWarning, match="'w'.*float16"):
        info = wt.cast(src, tmp_path / "h.safetensors", "fp16")
    assert info == {"tensors": 2, "cast": 1}
    half = load_file(tmp_path / "h.safetensors")
    with np.errstate(over="ignore"):
        want = vals.astype(np.float16)
    assert half["w"].dtype == np.float16 and np.array_equal(half["w"], want)
    assert np.isinf(half["w"][2]) and np.array_equal(half["ids"], ids)
    wt.cast(tmp_path / "h.safetensors", tmp_path / "b.safetensors", "bf16")
    assert read_header(tmp_path / "b.safetensors")[0]["w"][0] == "BF16"
    wt.cast(tmp_path / "b.safetensors", tmp_path / "f.safetensors", "fp32")
    back = load_file(tmp_path / "f.safetensors")["w"]
    assert np.array_equal(back, half["w"].astype(np.float32)), "fp16 -> bf16 is exact here"
    with pytest.raises(MinisdError, match="dtype"):
        wt.cast(src, tmp_path / "x.safetensors", "int4")


def test_cast_folder_and_verify_reports_the_differences(tiny, tmp_path):
    folder, _ = tiny
    wt.cast(folder, tmp_path / "half", "fp16")
    assert (tmp_path / "half" / "tokenizer" / "vocab.json").is_file()
    assert {t[0] for t in read_header(tmp_path / "half" / UNET)[0].values()} == {"F16"}
    report = wt.verify(folder, tmp_path / "half")
    assert not report["same"] and report["compared"] == len(report["dtype_mismatch"])
    assert report["value_mismatch"] and report["value_mismatch"][0]["rel"] < 1e-3


# ------------------------------------------------------------------------- verify


def test_verify_across_layouts(tiny, tmp_path):
    folder, single = tiny
    assert wt.verify(folder, single)["same"]
    flat = dict(load_file(single))
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    flat[key] = flat[key] + 1
    flat.pop("first_stage_model.decoder.conv_out.bias")
    write_tensors(tmp_path / "m.safetensors", [(k, "F32", v.shape, v) for k, v in flat.items()])
    r = wt.verify(folder, tmp_path / "m.safetensors")
    assert not r["same"]
    assert [m["key"] for m in r["value_mismatch"]] == [
        "unet/down_blocks.0.attentions.0.proj_in.weight"
    ]
    assert r["value_mismatch"][0]["max_abs_diff"] == pytest.approx(1.0)
    assert r["only_in_a"] == ["vae/decoder.conv_out.bias"] and not r["only_in_b"]


def test_verify_normalises_older_diffusers_names(tiny, tmp_path):
    """Older diffusers files: VAE attention query/key/value/proj_attn, text_model. prefix."""
    import shutil

    folder, _ = tiny
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    vae = load_file(folder / "vae/diffusion_pytorch_model.safetensors")
    renamed = {}
    for k, v in vae.items():
        for new, was in legacy.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{was}.")
        renamed[k] = v
    write_tensors(
        old / "vae/diffusion_pytorch_model.safetensors",
        [(k, "F32", v.shape, v) for k, v in renamed.items()],
    )
    text = load_file(folder / "text_encoder/model.safetensors")
    items = [("text_model." + k, "F32", v.shape, v) for k, v in text.items()]
    write_tensors(old / "text_encoder/model.safetensors", items)
    assert wt.verify(folder, old)["same"]
    wt.to_original(old, tmp_path / "old.safetensors")
    assert wt.verify(tmp_path / "old.safetensors", folder)["same"]


# ------------------------------------------------------------------------- writing


def test_failed_write_leaves_no_file_under_the_final_name(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"previous")

    def boom():
        raise RuntimeError("disk on fire")

    items = [("a", "F32", (2,), np.zeros(2, np.float32)), ("b", "F32", (2,), boom)]
    with pytest.raises(RuntimeError):
        write_tensors(path, items)
    assert path.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [path]


# ------------------------------------------------------------------------- CLI


def test_cli_round_trip(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["make-tiny", str(out), "--family", "sd2", "--seed", "4"]) == 0
    assert main(["to-original", str(out), str(tmp_path / "m.safetensors")]) == 0
    args = ["to-diffusers", str(tmp_path / "m.safetensors"), str(tmp_path / "back")]
    assert main(args) == 0
    assert main(["verify", str(out), str(tmp_path / "back")]) == 0
    capsys.readouterr()
    assert main(["inspect", "--json", str(tmp_path / "m.safetensors")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "sd2-v" and report["config_source"] == "file metadata"
    assert main(["cast", str(out), str(tmp_path / "bf"), "--dtype", "bf16"]) == 0
    assert main(["verify", str(out), str(tmp_path / "bf")]) == 1


def test_cli_help_explains_every_command():
    res = subprocess.run(
        [sys.executable, "-m", "weights_tools", "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0
    for command in ("inspect", "to-diffusers", "to-original", "cast", "verify", "make-tiny"):
        assert command in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "weights_tools", "to-diffusers", "--help"],
        capture_output=True,
        text=True,
    )
    assert "--prediction-type" in res.stdout and "v_prediction" in res.stdout


def test_no_deep_learning_framework_is_imported(tmp_path):
    code = (
        "import sys, weights_tools as wt\n"
        f"wt.make_tiny({str(tmp_path / 'm')!r}, family='inpaint')\n"
        f"wt.to_original({str(tmp_path / 'm')!r}, {str(tmp_path / 'm.safetensors')!r})\n"
        f"wt.to_diffusers({str(tmp_path / 'm.safetensors')!r}, {str(tmp_path / 'b')!r})\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'jax', 'tensorflow')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------------- add-on files


ADDONS = {
    "kohya": (
        {"lora_unet_a_b.lora_down.weight": (4, 8), "lora_unet_a_b.lora_up.weight": (8, 4),
         "lora_unet_a_b.alpha": (), "lora_te_x.lora_down.weight": (2, 8),
         "lora_te_x.lora_up.weight": (8, 2)},
        ["kind:                lora", "layout:              kohya / A1111",
         "LoRA modules: 1 text_encoder, 1 unet; ranks [2, 4]; alphas: True"],
    ),
    "peft": (
        {"unet.a.lora_A.weight": (3, 8), "unet.a.lora_B.weight": (8, 3)},
        ["layout:              diffusers / peft", "LoRA modules: 1 unet; ranks [3]; alphas: False"],
    ),
    "loha": (
        {"lora_unet_a.hada_w1_a": (8, 4), "lora_unet_a.hada_w1_b": (4, 8)},
        ["kind:                lora", "note: LoHa / LoKr"],
    ),
    "ti_diffusers": ({"<cat-toy>": (1024,)}, ["family:              sd2",
                                             "embeddings: <cat-toy> (1 vectors)"]),
    "ti_a1111": ({"emb_params": (3, 768)},
                 ["family:              sd1", "layout:              A1111",
                  "embeddings: ti_a1111 (3 vectors)"]),
    "ti_sdxl": ({"clip_l": (2, 768), "clip_g": (2, 1280)}, ["family:              sdxl"]),
    "controlnet": (
        {"control_model.input_hint_block.0.weight": (16, 3, 3, 3),
         "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (4, 768)},
        ["family:              sd1", "kind:                controlnet",
         "layout:              original"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ADDONS))
def test_inspect_names_add_on_files(name, tmp_path, capsys):
    """LoRA, textual inversion and ControlNet files are told apart by their key names and
    described (format, modules and ranks, tokens, the model family they fit)."""
    tensors, lines = ADDONS[name]
    path = tmp_path / f"{name}.safetensors"
    save_file({k: np.zeros(s, np.float16) for k, s in tensors.items()}, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for line in lines:
        assert line in out, (line, out)
