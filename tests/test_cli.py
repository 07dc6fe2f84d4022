"""The `minisd` command as a user runs it: demo, generate, trace, errors, help."""

import numpy as np
import pytest
from PIL import Image

from minisd.cli import main


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def demo_model(demo_cache):
    """The demo model folder: the one `minisd demo` cached in the first test of this file, or
    built the same way (make_tiny, sd1, seed 0) when a test runs without it."""
    folder = demo_cache / "demo-sd1"
    if not (folder / "model_index.json").is_file():
        from weights_tools import make_tiny

        make_tiny(folder, family="sd1", seed=0)
    return folder


def test_demo_writes_a_png_with_parameters(demo_cache, tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--cache", str(demo_cache), "--out", str(out), "--steps", "3"]) == 0
    img = Image.open(out)
    assert img.size == (128, 128)
    params = img.text["parameters"]
    assert params.startswith("a watercolor painting of a lighthouse\nSteps: 3, Sampler: pndm")
    text = capsys.readouterr().out
    assert "RANDOM-WEIGHT DEMO" in text and "minisd generate" in text
    assert (demo_cache / "demo-sd1" / "model_index.json").is_file()  # cached for the next run


def test_generate_img2img_and_trace(demo_model, tmp_path):
    model = demo_model
    init = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), np.uint8)).save(init)
    out = tmp_path / "out.png"
    args = ["generate", "a cat", "--model", str(model), "--init-image", str(init)]
    args += ["--strength", "0.5", "--steps", "4", "--scheduler", "ddim", "--n", "2"]
    args += ["--out", str(out), "--weights", "stream"]
    assert main(args) == 0
    for k in (0, 1):
        assert Image.open(tmp_path / f"out-{k}.png").size == (96, 64)
    npy = tmp_path / "t.npy"
    args = ["trace", "--model", str(model), "--module", "mid_block.attentions.0", "--out", str(npy)]
    assert main(args) == 0
    assert np.load(npy).ndim == 4
    args[-1] = str(tmp_path / "no" / "t.npy")
    assert main(args) == 2  # refused before the model runs


@pytest.mark.parametrize(
    "args,message",
    [
        (["--size", "60x64"], "width=60"),
        (["--steps", "0"], "num_inference_steps=0"),
        (["--scheduler", "nope"], "--scheduler 'nope'"),
        (["--init-image", "missing.png"], "missing.png"),
        (["--init-image", "{model}/model_index.json"], "cannot read it as an image"),
        (["--out", "{tmp}"], "is a folder"),
        (["--out", "{tmp}/no/such/x.png"], "does not exist"),
        (["--out", "{tmp}/x.jpgx"], "'.jpgx' is no image format"),
        (["--out", "{tmp}/x.psd"], "'.psd' is no image format"),  # PIL reads PSD only
        (["--prediction-type", "v_prediction"], "apply to single-file checkpoints"),
        (["--lora", "{tmp}/none.safetensors:0.5"], "none.safetensors: no such LoRA file"),
        (["--lora", "{model}/model_index.json"], "model_index.json"),
    ],
)
def test_generate_errors_are_clear(demo_model, tmp_path, args, message, capsys):
    """Refused before the model is loaded or any image generated (a bad --out used to fail
    only when saving, losing the work)."""
    args = [a.format(model=demo_model, tmp=tmp_path) for a in args]
    argv = ["generate", "a cat", "--model", str(demo_model), *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unknown_hub_model_is_a_clear_error(capsys, monkeypatch):
    """A name that is no local path is looked up on the Hugging Face Hub; offline (or unknown)
    that fails with the hub's own exception types, reported as one clear error."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "a cat", "--model", "nobody/no-such-model-xyz"]) == 2
    err = capsys.readouterr().err
    assert "nobody/no-such-model-xyz" in err and "Hugging Face Hub" in err


def test_missing_model_and_pickles(tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path / "none")]) == 2
    assert "no such" in capsys.readouterr().err
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"x")
    assert main(["generate", "x", "--model", str(ckpt)]) == 2
    assert "never loaded" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [[], ["demo"], ["generate"], ["trace"], ["parity"]])
def test_help_explains_every_flag(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for line in text.splitlines():
        if line.strip().startswith("--") and "  " in line.strip():
            assert len(line.strip().split("  ", 1)[1].strip()) > 3, line  # every flag has help


def test_generate_weights_modes_give_the_same_image(demo_model, tmp_path):
    """--weights lazy / stream (memory-mapped float16 files cast per layer to the float32
    model) change memory, not pixels: the same image as eager (all cast at load)."""
    from safetensors import safe_open

    from weights_tools import cast

    model = tmp_path / "demo-fp16"
    assert cast(demo_model, model, "float16")["cast"] > 0
    with safe_open(str(model / "unet" / "diffusion_pytorch_model.safetensors"), "np") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}
    pixels = {}
    for mode in ("eager", "lazy", "stream"):
        out = tmp_path / f"{mode}.png"
        args = ["generate", "a cat", "--model", str(model), "--steps", "2", "--size", "64x64"]
        assert main([*args, "--weights", mode, "--out", str(out)]) == 0
        pixels[mode] = np.asarray(Image.open(out))
    assert pixels["eager"].shape == (64, 64, 3)
    np.testing.assert_array_equal(pixels["eager"], pixels["lazy"])
    np.testing.assert_array_equal(pixels["eager"], pixels["stream"])


def test_unknown_scheduler_refused_before_building_anything(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["demo", "--cache", str(cache), "--scheduler", "dpmpp_3m"]) == 2
    err = capsys.readouterr().err
    assert "--scheduler 'dpmpp_3m': expected one of" in err and "dpmpp_2m_sde" in err
    assert not cache.exists()  # no demo model built


def test_generate_with_loras_is_the_api_s_result(demo_model, tmp_path):
    """--lora PATH[:SCALE] (repeatable) merges as StableDiffusion.load_lora does, and the PNG's
    parameters name each LoRA."""
    from test_lora import kohya, peft, random_lora

    import minisd
    from minisd.weights import save_file

    pipe = minisd.StableDiffusion.from_pretrained(demo_model)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(kohya(random_lora(pipe, seed=1)), a)
    save_file(peft(random_lora(pipe, seed=2, only=lambda c, m: c == "unet")), b)
    kw = dict(num_inference_steps=2, height=64, width=64, seed=0, output_type="np")
    plain = pipe("a cat", **kw, progress=False)
    pipe.load_lora(a, 0.5)
    pipe.load_lora(str(b))
    expect = pipe("a cat", **kw, progress=False)
    pipe.unload_lora()
    np.testing.assert_array_equal(pipe("a cat", **kw, progress=False), plain)
    out = tmp_path / "lora.png"
    args = ["generate", "a cat", "--model", str(demo_model), "--steps", "2", "--size", "64x64"]
    assert (
        main([*args, "--seed", "0", "--lora", f"{a}:0.5", "--lora", str(b), "--out", str(out)]) == 0
    )
    img = Image.open(out)
    got = np.asarray(img).astype(np.float64) / 255
    assert np.abs(got - expect[0]).max() <= 1 / 255 + 1e-6  # the same image, up to 8-bit rounding
    assert np.abs(expect - plain).max() > 0.05  # and the LoRAs changed it
    assert f"LoRA: {a}:0.5, LoRA: {b}" in img.info["parameters"]


def test_generate_with_an_embedding_is_the_api_s_result(demo_model, tmp_path):
    """--embedding PATH[:TOKEN] adds a textual inversion as StableDiffusion.
    load_textual_inversion does."""
    import minisd
    from minisd.weights import save_file

    pipe = minisd.StableDiffusion.from_pretrained(demo_model)
    dim = pipe.text_encoder.config.hidden_size
    emb = tmp_path / "mystyle.safetensors"  # A1111 layout: the token is the file's stem
    save_file({"emb_params": np.random.default_rng(0).standard_normal((2, dim))}, emb)
    kw = dict(num_inference_steps=2, height=64, width=64, seed=0, output_type="np")
    plain = pipe("a cat, <s>", **kw, progress=False)
    assert pipe.load_textual_inversion(emb, token="<s>") == ["<s>", "<s>_1"]
    expect = pipe("a cat, <s>", **kw, progress=False)
    pipe.unload_textual_inversion()
    np.testing.assert_array_equal(pipe("a cat, <s>", **kw, progress=False), plain)
    assert np.abs(expect - plain).max() > 0.02
    out = tmp_path / "emb.png"
    args = ["generate", "a cat, <s>", "--model", str(demo_model), "--steps", "2"]
    args += ["--size", "64x64", "--seed", "0", "--embedding", f"{emb}:<s>", "--out", str(out)]
    assert main(args) == 0
    img = Image.open(out)
    assert np.abs(np.asarray(img) / 255 - expect[0]).max() <= 1 / 255 + 1e-6
    assert f"Embedding: {emb}:<s>" in img.info["parameters"]


def test_generate_with_a_controlnet_is_the_api_s_result(demo_model, tmp_path):
    from refharness import need, randomize_

    import minisd

    diffusers = need("diffusers")
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(demo_model / "unet"))
    cn = randomize_(diffusers.ControlNetModel.from_unet(unet), seed=3)
    cn.save_pretrained(str(tmp_path / "cn"), safe_serialization=True)
    control = tmp_path / "edges.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(control)
    pipe = minisd.StableDiffusion.from_pretrained(demo_model, controlnet=tmp_path / "cn")
    kw = dict(num_inference_steps=2, seed=0, output_type="np", progress=False)
    expect = pipe(
        "a cat", control_image=Image.open(control), controlnet_conditioning_scale=0.5, **kw
    )
    assert np.abs(expect - pipe("a cat", height=64, width=64, **kw)).max() > 0.02
    out = tmp_path / "cn.png"
    args = ["generate", "a cat", "--model", str(demo_model), "--steps", "2", "--seed", "0"]
    args += ["--controlnet", str(tmp_path / "cn"), "--control-image", str(control)]
    assert main([*args, "--control-scale", "0.5", "--out", str(out)]) == 0
    img = Image.open(out)
    assert np.abs(np.asarray(img) / 255 - expect[0]).max() <= 1 / 255 + 1e-6
    assert f"ControlNet: {tmp_path / 'cn'}:0.5" in img.info["parameters"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--controlnet", "{tmp}"], "one image per model (got 1 model(s) and 0"),
        (["--embedding", "{tmp}/no.safetensors"], "no.safetensors"),
        (["--embedding", "{tmp}/x.pt"], "never"),
        (["--freeu", "0.9,0.2,1.5"], "expected four numbers"),
        (["--freeu", "0.9,0.2,1.5,nan"], "b2=nan"),
        (["--adapter", "{tmp}"], "--adapter and --adapter-image: one image per model"),
        (["--ip-adapter", "{tmp}/ip.safetensors"], "give all three"),
        (["--image-guidance", "1.5"], "only InstructPix2Pix UNets"),
    ],
)
def test_addon_errors_come_before_the_model_loads(demo_model, tmp_path, args, message, capsys):
    argv = ["generate", "a cat", "--model", str(demo_model)]
    argv += [a.format(tmp=tmp_path) for a in args]
    if "x.pt" in argv[-1]:
        (tmp_path / "x.pt").write_bytes(b"x")
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_generate_with_freeu_is_the_api_s_result(demo_model, tmp_path):
    import minisd

    pipe = minisd.StableDiffusion.from_pretrained(demo_model)
    kw = dict(num_inference_steps=2, height=64, width=64, seed=0, output_type="np", progress=False)
    plain = pipe("a cat", **kw)
    pipe.enable_freeu(0.9, 0.2, 1.5, 1.6)
    expect = pipe("a cat", **kw)
    assert np.abs(expect - plain).max() > 0.01
    out = tmp_path / "freeu.png"
    args = ["generate", "a cat", "--model", str(demo_model), "--steps", "2", "--size", "64x64"]
    assert main([*args, "--seed", "0", "--freeu", "0.9,0.2,1.5,1.6", "--out", str(out)]) == 0
    img = Image.open(out)
    assert np.abs(np.asarray(img) / 255 - expect[0]).max() <= 1 / 255 + 1e-6
    assert "FreeU: 0.9,0.2,1.5,1.6" in img.info["parameters"]


@pytest.mark.parametrize("family", ["inpaint", "instruct-pix2pix", "sdxl-inpaint", "sd2-depth"])
def test_demo_families_with_image_inputs(family, tmp_path):
    """Inpainting, InstructPix2Pix and depth2img demo models need an input image (and a mask or
    a depth map): the demo makes them up, and its PNG is the API's image for those inputs."""
    from minisd import StableDiffusion
    from minisd.cli_demo import demo_inputs

    out, cache = tmp_path / "demo.png", tmp_path / "cache"
    args = ["demo", "--family", family, "--cache", str(cache), "--out", str(out), "--steps", "2"]
    assert main(args) == 0
    image, mask, depth = demo_inputs(family, (128, 128))
    assert image.size == (128, 128) and (mask is None) == (
        family in ("instruct-pix2pix", "sd2-depth")
    )
    pipe = StableDiffusion.from_pretrained(cache / f"demo-{family}")
    kw = {} if mask is None else {"mask_image": mask}
    if family == "sd2-depth":
        kw["depth_map"] = depth
    want = pipe("a watercolor painting of a lighthouse", num_inference_steps=2, image=image, **kw)
    got = np.asarray(Image.open(out), np.int16)
    assert np.abs(got - np.asarray(want[0], np.int16)).max() <= 1


def test_depth_map_flag(tmp_path):
    """--depth-map reads a 16-bit PNG or a .npy array: the PNG is the API's image for the same
    map; a file that is no image, or a depth map for a model without a depth UNet, is refused
    by flag."""
    from minisd import StableDiffusion
    from minisd.cli_demo import demo_inputs

    cache = tmp_path / "cache"
    common = ["--steps", "2", "--size", "64x64", "--seed", "3"]
    assert main(["demo", "--family", "sd2-depth", "--cache", str(cache), *common,
                 "--out", str(tmp_path / "demo.png")]) == 0  # fmt: skip
    folder = cache / "demo-sd2-depth"
    image, _, _ = demo_inputs("sd2-depth", (64, 64))
    image.save(tmp_path / "in.png")
    depth = (np.random.default_rng(0).random((32, 48)) * 65535).astype(np.uint16)
    Image.fromarray(depth).save(tmp_path / "depth.png")
    np.save(tmp_path / "depth.npy", depth.astype(np.float32))
    pipe = StableDiffusion.from_pretrained(folder)
    want = pipe("a cat", num_inference_steps=2, image=image, depth_map=depth, seed=3)[0]
    for name in ("depth.png", "depth.npy"):
        out = tmp_path / f"out-{name}.png"
        args = ["generate", "a cat", "--model", str(folder), "--init-image",
                str(tmp_path / "in.png"), "--depth-map", str(tmp_path / name), *common,
                "--out", str(out)]  # fmt: skip
        assert main(args) == 0
        got = np.asarray(Image.open(out), np.int16)
        assert np.abs(got - np.asarray(want, np.int16)).max() <= 1, name
        assert f"Depth map: {tmp_path / name}" in Image.open(out).info["parameters"]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    bad = ["generate", "a cat", "--model", str(folder), "--init-image", str(tmp_path / "in.png"),
           *common, "--out", str(tmp_path / "x.png")]  # fmt: skip
    assert main([*bad, "--depth-map", str(tmp_path / "bad.png")]) == 2
    assert main([*bad, "--depth-map", str(tmp_path / "missing.npy")]) == 2
    assert main([*bad]) == 2  # a depth UNet without a depth map


def test_mask_crop_flag(tmp_path):
    """--mask-crop PAD is padding_mask_crop: the PNG is the API's image (the big image's size,
    unmasked pixels unchanged); a bad PAD is refused by argument name."""
    from minisd import StableDiffusion

    cache = tmp_path / "cache"
    assert main(["demo", "--family", "inpaint", "--cache", str(cache), "--steps", "2",
                 "--out", str(tmp_path / "demo.png")]) == 0  # fmt: skip
    folder = cache / "demo-inpaint"
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (96, 136, 3), dtype=np.uint8))
    m = np.zeros((96, 136), np.uint8)
    m[30:50, 80:94] = 255
    image.save(tmp_path / "in.png")
    Image.fromarray(m).save(tmp_path / "mask.png")
    pipe = StableDiffusion.from_pretrained(folder)
    want = pipe("a cat", num_inference_steps=2, image=image, mask_image=Image.fromarray(m),
                padding_mask_crop=6, seed=1)[0]  # fmt: skip
    out = tmp_path / "out.png"
    args = ["generate", "a cat", "--model", str(folder), "--init-image", str(tmp_path / "in.png"),
            "--mask", str(tmp_path / "mask.png"), "--steps", "2", "--seed", "1"]  # fmt: skip
    assert main([*args, "--mask-crop", "6", "--out", str(out)]) == 0
    got = Image.open(out)
    assert got.size == (136, 96)
    assert np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16)).max() <= 1
    assert np.array_equal(np.asarray(got)[m == 0], np.asarray(image)[m == 0])
    assert main([*args, "--mask-crop", "-2", "--out", str(out)]) == 2
