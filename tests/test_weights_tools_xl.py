"""weights_tools on SDXL (base and refiner) single files in Stability's original layout.

Tiny SDXL pipelines written by diffusers (tests/pipelines_xl.py) go through to_original; the
file is judged by diffusers itself (its single-file loader and its single_file_utils converters
must give back every tensor bit for bit), then converted back by to_diffusers / load_single_file
(bit-identical tensors, the folder's configs) and run in diffusers and minisd. The full-size
SDXL 1.0 base / refiner key tables are checked on shapes only (meta tensors), against diffusers'
converters and models built from Stability's published configs.
"""

import importlib
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from pipelines_xl import build
from refharness import assert_rel, need

import minisd
import weights_tools as wt
from minisd.errors import ConfigError, MinisdError
from minisd.weights import load_file, read_header
from weights_tools.configs_xl import STRUCTURE_XL
from weights_tools.folders import pad_token_of
from weights_tools.stream import tag_of, write_tensors

PARTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}
PIPELINES = {"base": "StableDiffusionXLPipeline", "refiner": "StableDiffusionXLImg2ImgPipeline"}
OPENCLIP = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}
CLIP = "conditioner.embedders.0.transformer.text_model."
TOL = 1e-5  # minisd vs diffusers, float32 (measured: under 1e-6)


@pytest.fixture(scope="session", params=["base", "refiner"])
def xl(request, ref_cache):
    """(kind, diffusers folder, original single file written by to_original)."""
    kind = request.param
    folder, single = ref_cache / f"wt_xl_{kind}", ref_cache / f"wt_xl_{kind}.safetensors"
    if not folder.exists():
        build(kind, folder)
    if not single.exists():
        wt.to_original(folder, single)
    return kind, folder, single


def _parts(kind):
    return [p for p in PARTS if not (kind == "refiner" and p == "text_encoder")]


def _unprefixed(flat):
    return {k.removeprefix("text_model."): v for k, v in flat.items()}


def _assert_same_tensors(kind, folder, other):
    """Every component of ``folder`` equals ``other`` (a folder or {part: flat}) bit for bit."""
    for part in _parts(kind):
        a = load_file(folder / PARTS[part])
        b = other[part] if isinstance(other, dict) else load_file(other / PARTS[part])
        assert set(a) == set(b), f"{part}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{part}/{k}"
            assert np.array_equal(a[k], b[k]), f"{part}/{k}: values differ"


def _state(module):
    state = {k: v.numpy() for k, v in module.state_dict().items()}
    return {k: v for k, v in state.items() if not k.endswith("position_ids")}  # (a buffer)


# ------------------------------------------------------------------------- the original file


def test_original_file_has_the_sgm_layout(xl):
    """The keys diffusers detects SDXL base / refiner files by, and OpenCLIP's projection
    stored as x @ P: the transpose of transformers' text_projection.weight."""
    sfu = importlib.import_module("diffusers.loaders.single_file_utils")
    kind, folder, single = xl
    keys = read_header(single)[0]
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert OPENCLIP[kind] + "transformer.resblocks.0.attn.in_proj_weight" in keys
    assert (CLIP + "embeddings.token_embedding.weight" in keys) == (kind == "base")
    detect = sfu.is_open_clip_sdxl_model if kind == "base" else sfu.is_open_clip_sdxl_refiner_model
    assert detect(keys) and sfu.is_clip_sdxl_model(keys) == (kind == "base")
    proj = load_file(single)[OPENCLIP[kind] + "text_projection"]
    weight = load_file(folder / PARTS["text_encoder_2"])["text_projection.weight"]
    assert np.array_equal(proj, weight.T)


def test_diffusers_single_file_loader_gives_back_the_folder(xl):
    diffusers = need("diffusers")
    kind, folder, single = xl
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = getattr(diffusers, PIPELINES[kind]).from_single_file(
            str(single), config=str(folder), local_files_only=True
        )
    assert (pipe.text_encoder is None) == (kind == "refiner")
    _assert_same_tensors(kind, folder, {p: _state(getattr(pipe, p)) for p in _parts(kind)})


def test_diffusers_converters_give_back_the_state_dicts(xl):
    """single_file_utils' original -> diffusers functions, run on the file's tensors."""
    torch, transformers = need("torch", "transformers")
    sfu = importlib.import_module("diffusers.loaders.single_file_utils")
    kind, folder, single = xl
    ckpt = {k: torch.from_numpy(np.array(v)) for k, v in load_file(single).items()}
    cls = transformers.CLIPTextModelWithProjection
    model = cls.from_pretrained(str(folder / "text_encoder_2"))  # (its config is read)
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    got = {
        "unet": sfu.convert_ldm_unet_checkpoint(ckpt, unet_cfg),
        "vae": sfu.convert_ldm_vae_checkpoint(ckpt, vae_cfg),
        "text_encoder_2": sfu.convert_open_clip_checkpoint(model, ckpt, prefix=OPENCLIP[kind]),
    }
    if kind == "base":  # CLIPTextModel (transformers >= 5.6) has no text_model. level
        got["text_encoder"] = _unprefixed(sfu.convert_ldm_clip_checkpoint(ckpt))
        got["text_encoder"].pop("embeddings.position_ids", None)
    got = {p: {k: v.numpy() for k, v in flat.items()} for p, flat in got.items()}
    _assert_same_tensors(kind, folder, got)


# ------------------------------------------------------------------------- back to diffusers


def test_to_diffusers_reproduces_the_folder(xl, tmp_path):
    from weights_tools.__main__ import main

    kind, folder, single = xl
    out = tmp_path / "out"
    assert main(["to-diffusers", str(single), str(out)]) == 0
    _assert_same_tensors(kind, folder, out)  # text_encoder_2 keeps transformers' key layout
    rels = [f"{p}/config.json" for p in _parts(kind)]
    for rel in (*rels, "scheduler/scheduler_config.json", "model_index.json"):
        assert json.loads((out / rel).read_text()) == json.loads((folder / rel).read_text()), rel
    assert (out / "tokenizer").is_dir() == (kind == "base")
    assert pad_token_of(out / "tokenizer_2") == "!"
    assert wt.verify(single, out)["same"] and wt.verify(folder, out)["same"]
    again = wt.to_original(out, tmp_path / "again.safetensors")
    assert again.read_bytes() == single.read_bytes()  # round trip: the same bytes


def test_load_single_file_gives_the_pipeline_parts(xl):
    diffusers = need("diffusers")
    kind, folder, single = xl
    parts = wt.load_single_file(single)
    ref = getattr(diffusers, PIPELINES[kind]).from_pretrained(str(folder), local_files_only=True)
    assert parts["family"] == ("sdxl" if kind == "base" else "sdxl-refiner")
    assert (parts["pad_token"], parts["pad_token_2"]) == ("<|endoftext|>", "!")
    assert parts["force_zeros_for_empty_prompt"] == (kind == "base")
    assert parts["requires_aesthetics_score"] == (kind == "refiner")
    assert parts["tokenizer"] is None and parts["tokenizer_2"] is None
    assert (parts["text_encoder"] is None) == (kind == "refiner")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert parts["scheduler"] == sched
    for part in _parts(kind):
        cfg, flat = parts[part]
        module = getattr(ref, part)
        want = module.config if part in ("unet", "vae") else module.config.to_dict()
        for field, value in cfg.items():
            if not field.startswith("_") and field not in ("architectures", "dtype"):
                v = list(want[field]) if isinstance(want[field], tuple) else want[field]
                assert value == v, f"{part}.{field}"
        if part == "text_encoder_2":
            assert "text_projection.weight" in flat
        state = _unprefixed(_state(module))
        assert set(flat) == set(state), f"{part}: {sorted(set(flat) ^ set(state))[:4]}"
        for k, v in flat.items():
            assert v.dtype == state[k].dtype and np.array_equal(v, state[k]), f"{part}/{k}"


def _run_kw(kind):
    from PIL import Image

    kw = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", num_inference_steps=2,
              guidance_scale=6.0, output_type="latent")  # fmt: skip
    if kind == "base":
        lat = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
        return dict(kw, height=64, width=64, latents=lat)
    pixels = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return dict(kw, num_inference_steps=4, strength=0.5, image=Image.fromarray(pixels), seed=5)


def test_converted_model_runs_as_in_diffusers(xl, tmp_path):
    """The to_diffusers folder in diffusers vs in minisd (two denoising steps, latents out), and
    minisd loading the single file itself (converted in memory): the same numbers as from the
    folder."""
    torch, diffusers = need("torch", "diffusers")
    from minisd.pipeline_xl import StableDiffusionXL

    kind, _, single = xl
    out = tmp_path / "out"
    wt.to_diffusers(single, out)
    ref = getattr(diffusers, PIPELINES[kind]).from_pretrained(str(out), local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    kw = _run_kw(kind)
    rkw = {k: v for k, v in kw.items() if k != "seed"}
    if "latents" in kw:
        rkw["latents"] = torch.from_numpy(kw["latents"])
    else:
        rkw["generator"] = torch.Generator().manual_seed(kw["seed"])
    with torch.no_grad():
        expect = ref(**rkw).images.numpy()
    ours = StableDiffusionXL.from_pretrained(out)
    got = ours(**kw, progress=False)
    assert_rel(got, expect, TOL, f"{kind}: minisd vs diffusers on the converted folder")
    in_memory = minisd.StableDiffusion.from_pretrained(single)  # converted in memory
    assert type(in_memory) is StableDiffusionXL
    assert np.array_equal(in_memory(**kw, progress=False), got)
    assert np.array_equal(StableDiffusionXL.from_pretrained(single)(**kw, progress=False), got)


# ------------------------------------------------------------------------- shapes alone


def test_architecture_inferred_from_shapes_alone(xl, tmp_path):
    """Without the stored configs: the tensors and every structural field come from the shapes
    (the tiny model's head counts and group norms are not visible: they are 64-channel heads and
    32 groups in every real SDXL)."""
    kind, folder, single = xl
    bare = tmp_path / "bare.safetensors"
    flat = load_file(single)
    write_tensors(bare, [(k, tag_of(v), v.shape, v) for k, v in sorted(flat.items())])
    cfg = wt.to_diffusers(bare, tmp_path / "out")
    assert cfg["source"] == "inferred" and cfg["family"].startswith("sdxl")
    _assert_same_tensors(kind, folder, tmp_path / "out")
    for part, fields in STRUCTURE_XL.items():
        if part == "text_encoder" and kind == "refiner":
            assert cfg[part] is None
            continue
        want = json.loads((folder / part / "config.json").read_text())
        for f in fields:
            w = list(want[f]) if isinstance(want[f], (list, tuple)) else want[f]
            assert cfg[part][f] == w, f"{part}.{f}"
    unet = json.loads((folder / "unet" / "config.json").read_text())
    for f in ("addition_time_embed_dim", "transformer_layers_per_block", "mid_block_type"):
        assert cfg["unet"][f] == unet[f], f
    index = json.loads((folder / "model_index.json").read_text())
    for f in ("_class_name", "force_zeros_for_empty_prompt", "text_encoder", "tokenizer"):
        assert cfg["model_index"][f] == index[f], f
    assert cfg["model_index"].get("requires_aesthetics_score") == index.get(
        "requires_aesthetics_score"
    )
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    for f in (
        "_class_name",
        "beta_schedule",
        "beta_start",
        "beta_end",
        "steps_offset",
        "timestep_spacing",
        "interpolation_type",
        "prediction_type",
        "use_karras_sigmas",
    ):
        assert cfg["scheduler"][f] == sched[f], f  # fmt: skip
    assert cfg["vae"]["scaling_factor"] == 0.13025 and cfg["vae"]["force_upcast"] is True


def test_real_file_extras_are_recognised(xl, tmp_path):
    """Real SDXL files carry CLIP's position_ids, OpenCLIP's logit_scale and (Turbo) the
    denoiser's sigmas: listed as unused, left out."""
    kind, folder, single = xl
    flat = dict(load_file(single))
    flat[OPENCLIP[kind] + "logit_scale"] = np.array(4.6, np.float32)
    flat["denoiser.sigmas"] = np.linspace(0.03, 14.6, 1000, dtype=np.float32)
    if kind == "base":
        flat[CLIP + "embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    full = tmp_path / "full.safetensors"
    write_tensors(full, [(k, tag_of(v), v.shape, v) for k, v in sorted(flat.items())])
    report = wt.inspect(full)
    assert not report["unknown_keys"] and "denoiser.sigmas" in report["unused_keys"]
    assert report["family"] == ("sdxl" if kind == "base" else "sdxl-refiner")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unknown keys ignored" warning
        wt.to_diffusers(full, tmp_path / "out")
    _assert_same_tensors(kind, folder, tmp_path / "out")


# ------------------------------------------------------------------------- errors


def test_config_folder_of_the_other_kind_is_refused(xl, ref_cache, tmp_path):
    kind, _, single = xl
    other = ref_cache / f"wt_xl_{'refiner' if kind == 'base' else 'base'}"
    if not other.exists():
        build("refiner" if kind == "base" else "base", other)
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        wt.to_diffusers(single, tmp_path / "out", config=other)
    assert not (tmp_path / "out").exists()


def test_config_folder_tokenizers_are_copied(xl, tmp_path):
    kind, folder, single = xl
    cfg = wt.to_diffusers(single, tmp_path / "out", config=folder)
    assert cfg["source"] == "config"
    _assert_same_tensors(kind, folder, tmp_path / "out")
    for sub in ("tokenizer", "tokenizer_2") if kind == "base" else ("tokenizer_2",):
        for f in (folder / sub).iterdir():
            assert (tmp_path / "out" / sub / f.name).read_bytes() == f.read_bytes(), f
    parts = wt.load_single_file(single, config=folder)
    assert parts["tokenizer_2"] == folder / "tokenizer_2"


def test_bad_sdxl_files_name_the_file_and_key(xl, tmp_path):
    kind, _, single = xl
    flat = dict(load_file(single))
    te2 = OPENCLIP[kind]
    cases = {
        "truncated": None,
        "no projection": ({te2 + "text_projection"}, f"missing key '{te2}text_projection'"),
        "no label_emb": (
            {"model.diffusion_model.label_emb.0.0.weight"},
            "missing key 'model.diffusion_model.label_emb.0.0.weight'",
        ),
        "no add_embedding.linear_2": (
            {"model.diffusion_model.label_emb.0.2.bias"},
            "missing key 'add_embedding.linear_2.bias'",
        ),
        "no ln_1": (
            {te2 + "transformer.resblocks.1.ln_1.bias"},
            "encoder.layers.1.layer_norm1.bias'",
        ),
    }
    for case, spec in cases.items():
        path = tmp_path / f"{case}.safetensors"
        if spec is None:
            blob = single.read_bytes()
            path.write_bytes(blob[: len(blob) // 2])
            what = str(path)
        else:
            drop, what = spec
            items = [(k, tag_of(v), v.shape, v) for k, v in flat.items() if k not in drop]
            write_tensors(path, items)
        for run in (
            lambda path=path: wt.to_diffusers(path, tmp_path / "out"),
            lambda path=path: wt.load_single_file(path),
        ):
            with pytest.raises(MinisdError) as err:
                run()
            assert str(path) in str(err.value) and what in str(err.value), (case, err.value)
        assert not (tmp_path / "out").exists()


def test_no_deep_learning_framework_is_imported(xl, tmp_path):
    _, _, single = xl
    code = (
        "import sys, weights_tools as wt\n"
        f"wt.load_single_file({str(single)!r})\n"
        f"wt.to_diffusers({str(single)!r}, {str(tmp_path / 'out')!r})\n"
        f"wt.to_original({str(tmp_path / 'out')!r}, {str(tmp_path / 'm.safetensors')!r})\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
