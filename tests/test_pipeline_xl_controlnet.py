"""StableDiffusionXL with ControlNets against diffusers' StableDiffusionXLControlNet{,Img2Img,
Inpaint}Pipeline, float32: the same latents or the same seed -> the same latents / images
(rel. error <= 1e-4). The folder is tests/pipelines_xl.py's tiny SDXL base; the ControlNets are
diffusers' ControlNetModel.from_unet of its UNet (addition_embed_type "text_time"), every
parameter randomized, zero convolutions included. Also: the load-time refusal of ControlNets
that do not fit the UNet (SD and SDXL pipelines), and the CLI's --controlnet for SDXL.

Several prompts are used with the default negative micro-conditioning only: diffusers' txt2img
repeats the [negative, positive] time ids as pairs (see test_pipeline_xl.py), which gives the
same rows as minisd's when the negative ids equal the positive ones.
"""

import dataclasses
import json
import re

import numpy as np
import pytest
from pipelines_xl import build, build_controlnet, controlnet_pipeline
from refharness import assert_rel
from test_pipeline_xl import run_ref

import minisd
from minisd.controlnet import ControlNetModel, param_shapes
from minisd.errors import ConfigError
from minisd.weights import save_file

TOL = 1e-4
PROMPTS = ["a watercolor painting of a lighthouse", "a cat, (masterpiece:1.2)"]


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """{"components": diffusers' modules, "cn" / "cn2": two diffusers ControlNets, "folder",
    "ours": minisd with the first ControlNet, "multi": minisd with both}."""
    folder = tmp_path_factory.mktemp("xl_cn") / "base"
    ref, _ = build("base", folder)
    cn = build_controlnet(ref.unet, folder / "controlnet", seed=7)
    cn2 = build_controlnet(ref.unet, folder / "controlnet2", seed=8)
    ours = minisd.StableDiffusion.from_pretrained(folder, controlnet=folder / "controlnet")
    multi = minisd.StableDiffusionXL.from_pretrained(
        folder, controlnet=[ours.controlnet, folder / "controlnet2"]
    )
    return dict(components=ref.components, cn=cn, cn2=cn2, folder=folder, ours=ours, multi=multi)


def _image(seed, h=64, w=64):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def _mask(h=64, w=64):
    from PIL import Image

    m = np.zeros((h, w), np.uint8)
    m[h // 4 : 3 * h // 4, w // 8 : w // 2] = 255
    return Image.fromarray(m)


def _latents(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 4, 8, 8)).astype(np.float32)


def _differs(a, b):
    """The ControlNet changed the result (a test that its residuals reach the UNet)."""
    return np.abs(a - b).max() > 1e-3 * np.abs(a).max()


@pytest.mark.parametrize(
    "kw",
    [
        {},  # diffusers' defaults: conditioning scale 1.0, guidance 5.0
        dict(controlnet_conditioning_scale=0.7, guidance_scale=6.0),
        dict(guess_mode=True),  # the ControlNet sees the prompt half (time ids included)
        dict(control_guidance_start=0.25, control_guidance_end=0.75),  # steps 2, 3 of 4
        dict(guidance_scale=1.0),  # no CFG
    ],
)
def test_txt2img_same_latents(xl, kw):
    ref, ours = controlnet_pipeline(xl["components"], xl["cn"]), xl["ours"]
    args = dict(prompt=PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=4,
                latents=_latents(), output_type="latent", **kw)  # fmt: skip
    expect = run_ref(ref, "ddim", image=_image(4), **args)
    got = ours(**args, control_image=_image(4), scheduler="ddim", progress=False)
    assert_rel(got, expect, TOL, f"SDXL ControlNet txt2img {kw}")
    assert _differs(got, ours(**args, height=64, width=64, scheduler="ddim", progress=False))


def test_seeded_batches_size_and_images(xl):
    """One control image per prompt, repeated for num_images_per_prompt, a stochastic sampler,
    the output size (and original_size / target_size) from a non-square control image, decoded
    images."""
    ref, ours = controlnet_pipeline(xl["components"], xl["cn"]), xl["ours"]
    controls = [_image(1, 64, 96), _image(2, 64, 96)]
    args = dict(prompt=PROMPTS, num_inference_steps=3, num_images_per_prompt=2, output_type="np")
    expect = run_ref(ref, "euler_a", image=controls, seed=3, **args)
    got = ours(**args, control_image=controls, seed=3, scheduler="euler_a", progress=False)
    assert got.shape == expect.shape == (4, 64, 96, 3)
    assert_rel(got, expect, TOL, "SDXL ControlNet, two control images, seeded, decoded")


def test_windows_count_the_steps_before_denoising_end(xl):
    """With denoising_end (the base's half of the ensemble of experts), diffusers computes the
    ControlNet's step window over all the steps, not the ones that run; its own scheduler."""
    ref, ours = controlnet_pipeline(xl["components"], xl["cn"]), xl["ours"]
    args = dict(prompt=PROMPTS[0], num_inference_steps=6, denoising_end=0.6,
                control_guidance_start=0.4, latents=_latents(1), output_type="latent")  # fmt: skip
    expect = run_ref(ref, None, image=_image(5), **args)
    got = ours(**args, control_image=_image(5), progress=False)
    assert_rel(got, expect, TOL, "SDXL ControlNet with denoising_end")


@pytest.mark.parametrize(
    "kw",
    [
        dict(controlnet_conditioning_scale=[0.7, 0.4]),
        dict(control_guidance_start=[0.0, 0.5], control_guidance_end=[0.5, 1.0]),
        dict(guess_mode=True, controlnet_conditioning_scale=0.6),
    ],
)
def test_multi_controlnet_same_latents(xl, kw):
    ref = controlnet_pipeline(xl["components"], [xl["cn"], xl["cn2"]])
    ours, images = xl["multi"], [_image(5), _image(6)]
    args = dict(prompt=PROMPTS[0], num_inference_steps=4, guidance_scale=5.0,
                latents=_latents(1, seed=2), output_type="latent", **kw)  # fmt: skip
    expect = run_ref(ref, "ddim", image=images, **args)
    got = ours(**args, control_image=images, scheduler="ddim", progress=False)
    assert_rel(got, expect, TOL, f"SDXL MultiControlNet {kw}")
    one = ours(**{**args, "controlnet_conditioning_scale": [0.7, 0.0]}, control_image=images,
               scheduler="ddim", progress=False)  # fmt: skip
    assert _differs(got, one)  # the second one counts


@pytest.mark.parametrize("kw", [{}, dict(guess_mode=True, strength=0.6)])
def test_img2img_same_seed(xl, kw):
    """diffusers' StableDiffusionXLControlNetImg2ImgPipeline; {}: its defaults (strength 0.8,
    conditioning scale 0.8), which differ from SDXL img2img's."""
    ref = controlnet_pipeline(xl["components"], xl["cn"], "img2img")
    args = dict(prompt=PROMPTS[1], image=_image(7), num_inference_steps=5, output_type="latent",
                **kw)  # fmt: skip
    expect = run_ref(ref, "dpmpp_2m", control_image=_image(8), seed=3, **args)
    got = xl["ours"](**args, control_image=_image(8), seed=3, scheduler="dpmpp_2m",
                     progress=False)  # fmt: skip
    assert_rel(got, expect, TOL, f"SDXL ControlNet img2img {kw}")


def test_inpaint_same_seed(xl):
    """diffusers' StableDiffusionXLControlNetInpaintPipeline at its defaults (strength 0.9999,
    guidance 5.0, conditioning scale 1.0): the 4-channel base blends the image in."""
    ref = controlnet_pipeline(xl["components"], xl["cn"], "inpaint")
    args = dict(prompt=PROMPTS[0], image=_image(9), mask_image=_mask(), num_inference_steps=4,
                height=64, width=64, output_type="np")  # fmt: skip
    expect = run_ref(ref, "ddim", control_image=_image(10), seed=11, **args)
    got = xl["ours"](**args, control_image=_image(10), seed=11, scheduler="ddim", progress=False)
    assert_rel(got, expect, TOL, "SDXL ControlNet inpaint")


# ------------------------------------------------------------------ ControlNets that do not fit


def _variant(cn, source="variant", **change):
    """A ControlNetModel with ``cn``'s config changed, zero weights (never run)."""
    cfg = dataclasses.replace(cn.config, source=source, **change)
    return ControlNetModel(cfg, {k: np.zeros(s, np.float32) for k, s in param_shapes(cfg).items()})


MISFITS = {
    "context": (dict(cross_attention_dim=16), "cross_attention_dim=16, the UNet's is 24"),
    "sd_style": (
        dict(
            addition_embed_type=None,
            addition_time_embed_dim=None,
            projection_class_embeddings_input_dim=None,
        ),
        "addition_embed_type=None, the UNet's is 'text_time'",
    ),
    "refiner_ids": (
        dict(projection_class_embeddings_input_dim=12 + 4 * 5),
        "projection_class_embeddings_input_dim=32 (its time ids), the UNet's is 36",
    ),
    "skips": (dict(layers_per_block=2), "its residuals (channels [8, 8, 8, 8, 16"),
    "factor": (dict(conditioning_embedding_out_channels=(4, 8, 8)), "control image is 4x"),
    "inputs": (dict(in_channels=9), "in_channels=9, the latents have 4"),
}


@pytest.mark.parametrize("case", sorted(MISFITS))
def test_misfit_controlnets_are_refused_at_load(xl, case):
    change, message = MISFITS[case]
    bad = _variant(xl["ours"].controlnet, source=f"{case}.json", **change)
    with pytest.raises(ConfigError, match=rf"controlnet \({case}\.json\): .*{re.escape(message)}"):
        minisd.StableDiffusion.from_pretrained(xl["folder"], controlnet=bad)


def test_a_misfit_among_several_is_named_by_index(xl):
    bad = _variant(xl["ours"].controlnet, source="small.json", layers_per_block=2)
    with pytest.raises(ConfigError, match=r"controlnet\[1\] \(small\.json\): .*residuals"):
        minisd.StableDiffusionXL.from_pretrained(
            xl["folder"], controlnet=[xl["ours"].controlnet, bad]
        )


def test_misfit_set_by_hand_is_refused_before_the_run(xl):
    ours, good = xl["ours"], xl["ours"].controlnet
    ours.controlnet = _variant(good, cross_attention_dim=16)
    try:
        with pytest.raises(ConfigError, match="cross_attention_dim=16"):
            ours("a cat", num_inference_steps=2, control_image=_image(1), progress=False)
    finally:
        ours.controlnet = good


def test_sdxl_controlnet_on_an_sd1_pipeline_is_refused_at_load(xl, tmp_path):
    """Before, the SD1 pipeline only failed inside the first ControlNet call."""
    from weights_tools import make_tiny

    make_tiny(tmp_path / "sd1", family="sd1", seed=0)
    with pytest.raises(
        ConfigError, match=r"controlnet \(.*config\.json\): .*cross_attention_dim=24"
    ):
        minisd.StableDiffusion.from_pretrained(
            tmp_path / "sd1", controlnet=xl["folder"] / "controlnet"
        )


# ------------------------------------------------------------------ command line


def _write_controlnet(model, folder):
    """A ControlNet folder (config.json + weights) from a minisd ControlNetModel."""
    folder.mkdir()
    cfg = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "source"}
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", **cfg}))
    flat = {k: np.zeros(s, np.float32) for k, s in param_shapes(model.config).items()}
    save_file(flat, folder / "diffusion_pytorch_model.safetensors")


def test_cli_generate_with_an_sdxl_controlnet(xl, tmp_path, capsys):
    from PIL import Image

    from minisd.cli import main

    control = tmp_path / "edges.png"
    _image(12).save(control)
    expect = xl["ours"]("a cat", control_image=_image(12), num_inference_steps=2, seed=0,
                        output_type="np", progress=False)  # fmt: skip
    out = tmp_path / "cn.png"
    args = ["generate", "a cat", "--model", str(xl["folder"]), "--steps", "2", "--seed", "0"]
    args += ["--controlnet", str(xl["folder"] / "controlnet"), "--control-image", str(control)]
    assert main([*args, "--out", str(out)]) == 0
    img = Image.open(out)
    assert np.abs(np.asarray(img) / 255 - expect[0]).max() <= 1 / 255 + 1e-6
    params = img.info["parameters"]
    assert "CFG scale: 5.0" in params and f"ControlNet: {xl['folder'] / 'controlnet'}:1.0" in params
    _write_controlnet(_variant(xl["ours"].controlnet, cross_attention_dim=16), tmp_path / "bad")
    args[-3] = str(tmp_path / "bad")
    assert main([*args, "--out", str(tmp_path / "bad.png")]) == 2
    assert "cross_attention_dim=16, the UNet's is 24" in capsys.readouterr().err


def test_cli_refuses_what_sdxl_does_not_take(xl, tmp_path, capsys):
    """--image-guidance (InstructPix2Pix, SD1.x only) is an error naming the flag, not a
    TypeError."""
    from minisd.cli import main

    args = ["generate", "a cat", "--model", str(xl["folder"]), "--steps", "1"]
    assert main([*args, "--image-guidance", "1.5", "--out", str(tmp_path / "x.png")]) == 2
    assert "--image-guidance: not supported with StableDiffusionXL" in capsys.readouterr().err
