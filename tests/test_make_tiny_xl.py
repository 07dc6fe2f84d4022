"""weights_tools.make_tiny for SDXL: deterministic folders that load in minisd and in diffusers
(StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline) and give the same latents
(float32, rel. error <= 1e-4); `minisd demo --family sdxl` runs on one."""

import json

import numpy as np
import pytest
from PIL import Image
from refharness import assert_rel, need

import minisd
from minisd.cli import main
from minisd.pipeline_xl import StableDiffusionXL
from minisd.weights import load_file
from weights_tools import make_tiny
from weights_tools.__main__ import main as wt_main
from weights_tools.make_tiny import tiny_configs

TOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{family: folder} of the tiny SDXL base and refiner (seed 0)."""
    root = tmp_path_factory.mktemp("tiny-xl")
    for family in ("sdxl", "sdxl-refiner"):
        make_tiny(root / family, family=family, seed=0)
    return {f: root / f for f in ("sdxl", "sdxl-refiner")}


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_configs_follow_sdxl_topology():
    cfg = tiny_configs("sdxl")
    unet, te1, te2 = cfg["unet"], cfg["text_encoder"], cfg["text_encoder_2"]
    assert (
        unet["down_block_types"][0] == "DownBlock2D" and unet["addition_embed_type"] == "text_time"
    )
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    n_ids = (unet["projection_class_embeddings_input_dim"] - te2["projection_dim"]) / 8
    assert n_ids == 6 and unet["addition_time_embed_dim"] == 8
    assert cfg["vae"]["scaling_factor"] == 0.13025 and cfg["vae"]["force_upcast"]
    assert cfg["scheduler"]["_class_name"] == "EulerDiscreteScheduler"
    ref = tiny_configs("sdxl-refiner")
    assert ref["text_encoder"] is None and ref["tokenizer"] is None
    assert ref["unet"]["projection_class_embeddings_input_dim"] == te2["projection_dim"] + 5 * 8
    assert ref["model_index"]["requires_aesthetics_score"]


def test_deterministic_by_seed(folders, tmp_path):
    make_tiny(tmp_path / "again", family="sdxl", seed=0)
    assert _files(tmp_path / "again") == _files(folders["sdxl"])
    make_tiny(tmp_path / "other", family="sdxl", seed=1)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        name = "model" if sub.startswith("text") else "diffusion_pytorch_model"
        a = load_file(folders["sdxl"] / sub / f"{name}.safetensors")
        b = load_file(tmp_path / "other" / sub / f"{name}.safetensors")
        assert a.keys() == b.keys() and not any(np.array_equal(a[k], b[k]) for k in a)


def test_cli_make_tiny_sdxl(folders, tmp_path, capsys):
    out = tmp_path / "cli"
    assert wt_main(["make-tiny", str(out), "--family", "sdxl"]) == 0
    assert _files(out) == _files(folders["sdxl"]) and "sdxl, seed 0" in capsys.readouterr().out


def test_folder_layout(folders):
    base = folders["sdxl"]
    index = json.loads((base / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"]
    keys = load_file(base / "text_encoder_2" / "model.safetensors").keys()
    assert "text_projection.weight" in keys
    assert all(k.startswith("text_model.") for k in keys if k != "text_projection.weight")
    refiner = folders["sdxl-refiner"]
    assert not (refiner / "text_encoder").exists() and not (refiner / "tokenizer").exists()


def test_loads_in_minisd(folders):
    base = minisd.StableDiffusion.from_pretrained(folders["sdxl"])
    assert type(base) is StableDiffusionXL and base.force_zeros_for_empty_prompt
    assert base.scheduler_name == "euler" and base.tokenizer_2.pad_token == "!"
    refiner = minisd.StableDiffusion.from_pretrained(folders["sdxl-refiner"])
    assert type(refiner) is StableDiffusionXL and refiner.requires_aesthetics_score


def _ref(diffusers, cls, folder):
    pipe = getattr(diffusers, cls).from_pretrained(
        str(folder), local_files_only=True, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "family,cls,extra",
    [
        ("sdxl", "StableDiffusionXLPipeline", {}),
        ("sdxl-refiner", "StableDiffusionXLImg2ImgPipeline", {"strength": 0.6}),
    ],
)
def test_same_latents_as_diffusers(folders, family, cls, extra):
    torch, diffusers = need("torch", "diffusers")
    ref = _ref(diffusers, cls, folders[family])
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    kw = dict(prompt=["a watercolor painting of a lighthouse", "a cat"],
              negative_prompt=["blurry", ""], num_inference_steps=2, guidance_scale=6.0,
              output_type="latent", **extra)  # fmt: skip
    if family == "sdxl":
        kw.update(height=64, width=64)
        ref_kw, our_kw = {"latents": torch.from_numpy(latents)}, {"latents": latents}
    else:  # img2img from a fixed picture, the same seeded noise
        image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), np.uint8))
        ref_kw = {"image": image, "generator": torch.Generator().manual_seed(3)}
        our_kw = {"image": image, "seed": 3}
    with torch.no_grad():
        expect = ref(**kw, **ref_kw).images.numpy()
    ours = minisd.StableDiffusion.from_pretrained(folders[family])
    got = np.asarray(ours(**kw, **our_kw, progress=False))
    err = assert_rel(got, expect, TOL, f"{family} latents")
    print(f"{family}: relative error {err:.2e}")


def test_demo_sdxl(tmp_path, capsys):
    out = tmp_path / "demo.png"
    args = ["demo", "--family", "sdxl", "--cache", str(tmp_path / "cache"), "--out", str(out)]
    assert main([*args, "--steps", "2", "--size", "64x64"]) == 0
    img = Image.open(out)
    assert img.size == (64, 64) and "Sampler: euler" in img.text["parameters"]
    assert (tmp_path / "cache" / "demo-sdxl" / "text_encoder_2" / "model.safetensors").is_file()
    assert "RANDOM-WEIGHT DEMO" in capsys.readouterr().out
