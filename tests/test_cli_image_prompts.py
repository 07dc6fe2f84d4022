"""``minisd generate`` with image prompts: --adapter (T2I-Adapter) and --ip-adapter give the
Python API's image (within 8-bit rounding), and the PNG's parameters name them; bad flags are
refused with exit code 2 and a message naming the flag, before the model loads.

The model is the tiny SD1 pipeline of tests/pipelines.py (UNet channels 8, 16, 16, cross-
attention width 16); next to it: T2I-Adapters sized to that UNet as in
tests/test_pipeline_adapter.py (a full RGB one, a light grayscale one), and a random base
IP-Adapter in h94's layout with a tiny CLIP image encoder as in tests/test_pipeline_ip.py.
"""

import json

import numpy as np
import pytest
from PIL import Image
from pipelines import build
from refharness import need, randomize_
from test_ip_adapter import adapter_state_dict
from test_ip_adapter_faceid import EMBED, faceid_state_dict
from test_ip_adapter_plus import plus_state_dict
from test_pipeline_adapter import ADAPTERS
from test_pipeline_ip import VISION, WEIGHTS

import minisd
from minisd.cli import main
from minisd.weights import save_file

KW = dict(num_inference_steps=2, height=64, width=64, seed=0, scheduler="ddim",
          output_type="np", progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny SD1 folder with adapters/{full,light_gray}, image_encoder/, ip-adapter.safetensors
    and two condition images (cond.png RGB, gray.png grayscale)."""
    torch, diffusers, transformers = need("torch", "diffusers", "transformers")
    folder = tmp_path_factory.mktemp("cli_image_prompts") / "sd1"
    ref = build("sd1", folder)
    for seed, (name, cfg) in enumerate(ADAPTERS.items()):
        torch.manual_seed(0)
        adapter = randomize_(diffusers.T2IAdapter(**cfg), seed=20 + seed)
        adapter.save_pretrained(str(folder / "adapters" / name), safe_serialization=True)
    torch.manual_seed(0)
    enc = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION))
    randomize_(enc, seed=9).eval().save_pretrained(str(folder / "image_encoder"))
    flat = adapter_state_dict(ref.unet, seed=2, embed_dim=VISION["projection_dim"])
    save_file(flat, folder / WEIGHTS)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(folder / "cond.png")
    Image.fromarray(rng.integers(0, 256, (64, 64), np.uint8)).save(folder / "gray.png")
    return folder


def _cli(model, out, *extra):
    """Runs ``minisd generate`` with the KW settings; returns the written PNG."""
    args = ["generate", "a cat", "--model", str(model), "--steps", "2", "--size", "64x64"]
    args += ["--seed", "0", "--scheduler", "ddim", "--out", str(out), *map(str, extra)]
    assert main(args) == 0
    return Image.open(out)


def _same(img, expect):
    """The PNG is the API's float image up to 8-bit rounding."""
    got = np.asarray(img.convert("RGB")).astype(np.float64) / 255
    assert got.shape == expect.shape
    assert np.abs(got - expect).max() <= 1 / 255 + 1e-6


def _open(path):
    return Image.open(path).convert("RGB")  # as the CLI opens every image


@pytest.fixture(scope="module")
def plain(model):
    """The image without any image prompt."""
    return minisd.StableDiffusion.from_pretrained(model)("a cat", **KW)[0]


def test_adapter_is_the_api_s_result(model, plain, tmp_path):
    adapter = model / "adapters" / "full"
    pipe = minisd.StableDiffusion.from_pretrained(model, adapter=adapter)
    expect = pipe(
        "a cat", adapter_image=_open(model / "cond.png"), adapter_conditioning_scale=0.7,
        adapter_conditioning_factor=0.5, **KW,
    )[0]  # fmt: skip
    assert np.abs(expect - plain).max() > 0.01  # the adapter changes the image
    img = _cli(model, tmp_path / "t2i.png", "--adapter", adapter, "--adapter-image",
               model / "cond.png", "--adapter-scale", "0.7", "--adapter-factor", "0.5")  # fmt: skip
    _same(img, expect)
    assert f"T2I-Adapter: {adapter}:0.7:0.5" in img.info["parameters"]
    assert "Sampler: ddim" in img.info["parameters"]


def test_two_adapters_are_the_api_s_result(model, plain, tmp_path):
    """--adapter twice, one --adapter-image each (the grayscale adapter gets the gray image,
    read as RGB by the CLI and turned to gray by the pipeline): a MultiAdapter."""
    full, gray = model / "adapters" / "full", model / "adapters" / "light_gray"
    pipe = minisd.StableDiffusion.from_pretrained(model, adapter=[full, gray])
    images = [_open(model / "cond.png"), _open(model / "gray.png")]
    expect = pipe("a cat", adapter_image=images, adapter_conditioning_scale=0.8, **KW)[0]
    one = minisd.StableDiffusion.from_pretrained(model, adapter=full)
    alone = one("a cat", adapter_image=images[0], adapter_conditioning_scale=0.8, **KW)[0]
    assert np.abs(expect - alone).max() > 0.005  # the second adapter counts
    img = _cli(model, tmp_path / "two.png", "--adapter", full, "--adapter-image",
               model / "cond.png", "--adapter", gray, "--adapter-image", model / "gray.png",
               "--adapter-scale", "0.8")  # fmt: skip
    _same(img, expect)
    params = img.info["parameters"]
    assert f"T2I-Adapter: {full}:0.8:1.0, T2I-Adapter: {gray}:0.8:1.0" in params


def test_ip_adapter_is_the_api_s_result(model, plain, tmp_path):
    pipe = minisd.StableDiffusion.from_pretrained(model)
    pipe.load_ip_adapter(model / WEIGHTS, model / "image_encoder", scale=0.6)
    expect = pipe("a cat", ip_adapter_image=_open(model / "cond.png"), **KW)[0]
    assert np.abs(expect - plain).max() > 0.01  # the image prompt changes the image
    img = _cli(model, tmp_path / "ip.png", "--ip-adapter", model / WEIGHTS, "--image-encoder",
               model / "image_encoder", "--ip-adapter-image", model / "cond.png",
               "--ip-adapter-scale", "0.6")  # fmt: skip
    _same(img, expect)
    assert f"IP-Adapter: {model / WEIGHTS}:0.6" in img.info["parameters"]


def test_ip_adapter_plus_is_the_api_s_result(model, tmp_path):
    """IP-Adapter Plus through --ip-adapter: its Resampler takes the encoder's hidden states,
    so the encoder's hidden_size (16) is checked, not its projection_dim (12)."""
    diffusers = need("diffusers")
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(model / "unet"))
    plus = tmp_path / "ip-adapter-plus.safetensors"
    save_file(plus_state_dict(unet, seed=6, width=VISION["hidden_size"]), plus)
    pipe = minisd.StableDiffusion.from_pretrained(model)
    pipe.load_ip_adapter(plus, model / "image_encoder", scale=0.6)
    expect = pipe("a cat", ip_adapter_image=_open(model / "cond.png"), **KW)[0]
    img = _cli(model, tmp_path / "ip.png", "--ip-adapter", plus, "--image-encoder",
               model / "image_encoder", "--ip-adapter-image", model / "cond.png",
               "--ip-adapter-scale", "0.6")  # fmt: skip
    _same(img, expect)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [
                "--adapter",
                "{m}/adapters/full",
                "--adapter",
                "{m}/adapters/light_gray",
                "--adapter-image",
                "{m}/cond.png",
            ],
            "--adapter and --adapter-image: one image per model (got 2 model(s) and 1 image(s))",
        ),
        (["--adapter-image", "{m}/cond.png"], "--adapter and --adapter-image"),
        (
            ["--adapter", "{tmp}/none", "--adapter-image", "{m}/cond.png"],
            "--adapter: {tmp}/none: no such model folder",
        ),
        (
            ["--adapter", "{m}/unet", "--adapter-image", "{m}/cond.png"],
            "--adapter: {m}/unet/config.json: _class_name='UNet2DConditionModel'",
        ),
        (
            ["--ip-adapter", "{m}/" + WEIGHTS, "--image-encoder", "{m}/image_encoder"],
            "--ip-adapter, --image-encoder, --ip-adapter-image: give all three",
        ),
        (["--ip-adapter-image", "{m}/cond.png"], "give all three"),
        (
            [
                "--ip-adapter",
                "{tmp}/none.safetensors",
                "--image-encoder",
                "{m}/image_encoder",
                "--ip-adapter-image",
                "{m}/cond.png",
            ],
            "--ip-adapter: {tmp}/none.safetensors: no such IP-Adapter file",
        ),
        (
            [
                "--ip-adapter",
                "{tmp}/ip.bin",
                "--image-encoder",
                "{m}/image_encoder",
                "--ip-adapter-image",
                "{m}/cond.png",
            ],
            "--ip-adapter: {tmp}/ip.bin: pickle files",
        ),
        (
            [
                "--ip-adapter",
                "{m}/cond.png",
                "--image-encoder",
                "{m}/image_encoder",
                "--ip-adapter-image",
                "{m}/cond.png",
            ],
            "--ip-adapter: {m}/cond.png",
        ),
        (
            [
                "--ip-adapter",
                "{m}/" + WEIGHTS,
                "--image-encoder",
                "{tmp}/no_encoder",
                "--ip-adapter-image",
                "{m}/cond.png",
            ],
            "--image-encoder {tmp}/no_encoder: no such",
        ),
        (
            [
                "--ip-adapter",
                "{m}/" + WEIGHTS,
                "--image-encoder",
                "{tmp}/enc8",
                "--ip-adapter-image",
                "{m}/cond.png",
            ],
            "--image-encoder {tmp}/enc8: gives 8-d image embeddings (projection_dim); the "
            "IP-Adapter {m}/" + WEIGHTS + " takes 12-d ones",
        ),
        (
            [
                "--ip-adapter",
                "{m}/" + WEIGHTS,
                "--image-encoder",
                "{m}/image_encoder",
                "--ip-adapter-image",
                "{tmp}/none.png",
            ],
            "{tmp}/none.png: no such image file",
        ),
    ],
)
def test_image_prompt_errors_name_the_flag(model, tmp_path, args, message, capsys, monkeypatch):
    """Refused with exit code 2 before the model loads (from_pretrained is never called)."""
    (tmp_path / "ip.bin").write_bytes(b"not a pickle either")
    (tmp_path / "enc8").mkdir()  # an image encoder config with another projection_dim
    cfg = json.loads((model / "image_encoder" / "config.json").read_text())
    (tmp_path / "enc8" / "config.json").write_text(json.dumps({**cfg, "projection_dim": 8}))

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(minisd.StableDiffusion, "from_pretrained", no_load)
    argv = ["generate", "a cat", "--model", str(model), "--steps", "2", "--size", "64x64"]
    argv += [a.format(m=model, tmp=tmp_path) for a in args]
    argv += ["--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.format(m=model, tmp=tmp_path) in err, err
    assert not (tmp_path / "x.png").exists()


def test_ip_adapter_faceid_embeds_is_the_api_s_result(model, tmp_path, capsys):
    """IP-Adapter FaceID through --ip-adapter-embeds (no --image-encoder): the .npy face
    embedding as the API's ip_adapter_image_embeds; its LoRA merged the same way."""
    faceid = tmp_path / "ip-adapter-faceid.safetensors"
    unet = build("sd1", tmp_path / "ref").unet
    save_file(faceid_state_dict(unet, seed=3), faceid)
    e = np.random.default_rng(0).standard_normal((2, 1, EMBED)).astype(np.float32)
    e[0] = 0
    np.save(tmp_path / "face.npy", e)
    pipe = minisd.StableDiffusion.from_pretrained(model)
    pipe.load_ip_adapter(faceid, None, scale=0.6)
    expect = pipe("a cat", ip_adapter_image_embeds=e, **KW)[0]
    img = _cli(model, tmp_path / "faceid.png", "--ip-adapter", faceid, "--ip-adapter-embeds",
               tmp_path / "face.npy", "--ip-adapter-scale", "0.6")  # fmt: skip
    _same(img, expect)
    args = [
        "generate",
        "a cat",
        "--model",
        str(model),
        "--steps",
        "2",
        "--size",
        "64x64",
        "--ip-adapter",
        str(faceid),
        "--image-encoder",
        str(model / "image_encoder"),
        "--ip-adapter-embeds",
        str(tmp_path / "face.npy"),
        "--out",
        str(tmp_path / "x.png"),
    ]
    assert main(args) == 2
    assert "IP-Adapter FaceID takes no image encoder" in capsys.readouterr().err
    assert main([*args[:8], *args[-4:]]) == 2  # --ip-adapter-embeds without --ip-adapter
    assert "--ip-adapter-embeds: give it with --ip-adapter" in capsys.readouterr().err
