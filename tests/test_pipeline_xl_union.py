"""StableDiffusionXL with union ControlNets against diffusers' StableDiffusionXLControlNetUnion
{,Img2Img,Inpaint}Pipeline, float32: the same latents or the same seed -> the same latents /
images (rel. error <= 1e-4). The folder is tests/pipelines_xl.py's tiny SDXL base; the union
ControlNets have its UNet's architecture, every parameter randomized. Also: per-image scales and
windows, several union ControlNets, guess mode, the argument errors and the CLI's --control-mode.
"""

import numpy as np
import pytest
from pipelines_xl import build, build_controlnet, build_union_controlnet, controlnet_pipeline
from refharness import assert_rel
from test_pipeline_xl import run_ref
from test_pipeline_xl_controlnet import _differs, _image, _latents, _mask

import minisd
from minisd.controlnet_union import ControlNetUnionModel
from minisd.errors import InputError

TOL = 1e-4
PROMPTS = ["a watercolor painting of a lighthouse", "a cat, (masterpiece:1.2)"]


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """{"components": diffusers' modules, "cn" / "cn2": two diffusers union ControlNets,
    "folder", "ours": minisd with the first, "multi": minisd with both}."""
    folder = tmp_path_factory.mktemp("xl_union") / "base"
    ref, _ = build("base", folder)
    cn = build_union_controlnet(ref.unet, folder / "union", seed=7)
    cn2 = build_union_controlnet(ref.unet, folder / "union2", seed=8)
    ours = minisd.StableDiffusion.from_pretrained(folder, controlnet=folder / "union")
    multi = minisd.StableDiffusionXL.from_pretrained(
        folder, controlnet=[ours.controlnet, folder / "union2"]
    )
    return dict(components=ref.components, cn=cn, cn2=cn2, folder=folder, ours=ours, multi=multi)


def test_a_union_folder_loads_as_a_union_controlnet(xl):
    assert type(xl["ours"].controlnet) is ControlNetUnionModel
    assert xl["ours"].controlnet.config.num_control_type == 6


@pytest.mark.parametrize(
    "kw",
    [
        dict(control_mode=3),  # one image, as diffusers' single-mode call
        dict(control_mode=[3, 1], controlnet_conditioning_scale=[0.7, 0.4]),
        dict(control_mode=[3, 1], control_guidance_start=[0.0, 0.5],
             control_guidance_end=[0.5, 1.0]),  # the first image's window ends: weighed 0
        dict(control_mode=[0], control_guidance_start=0.5),  # one image, skipped at first
        dict(control_mode=[2, 5, 4], guidance_scale=1.0),  # three images, no CFG
        dict(control_mode=[4], guess_mode=True, guidance_scale=1.0),
    ],
)  # fmt: skip
def test_txt2img_same_latents(xl, kw):
    ref = controlnet_pipeline(xl["components"], xl["cn"], union=True)
    modes = kw["control_mode"]
    images = [_image(4 + k) for k in range(len(modes) if isinstance(modes, list) else 1)]
    args = dict(prompt=PROMPTS, num_inference_steps=4, latents=_latents(), output_type="latent")
    expect = run_ref(ref, "ddim", control_image=images, **args, **kw)
    control = images if isinstance(modes, list) else images[0]
    got = xl["ours"](**args, **kw, control_image=control, scheduler="ddim", progress=False)
    assert_rel(got, expect, TOL, f"SDXL union ControlNet txt2img {kw}")
    plain = xl["ours"](**args, height=64, width=64, scheduler="ddim", progress=False)
    assert _differs(got, plain)


def test_the_mode_matters(xl):
    """The same image under another control type gives another result (the task embedding and
    the control-type embedding reach the residuals)."""
    args = dict(prompt=PROMPTS[0], num_inference_steps=2, latents=_latents(1),
                output_type="latent", control_image=_image(4), scheduler="ddim",
                progress=False)  # fmt: skip
    assert _differs(xl["ours"](**args, control_mode=3), xl["ours"](**args, control_mode=1))


def test_guess_mode_with_cfg_runs_on_the_prompt_rows(xl):
    """diffusers' union pipeline fails here (its control-type rows are doubled for CFG while
    the ControlNet sees the prompt half); minisd gives the flags for the rows it runs."""
    ours = xl["ours"]
    args = dict(prompt=PROMPTS[0], num_inference_steps=2, latents=_latents(1),
                output_type="latent", scheduler="ddim", progress=False, control_mode=3)  # fmt: skip
    guess = ours(**args, control_image=_image(4), guess_mode=True)
    assert np.isfinite(guess).all()
    assert _differs(guess, ours(**args, control_image=_image(4)))


@pytest.mark.parametrize(
    "kw",
    [{}, dict(controlnet_conditioning_scale=[0.7, 0.0]), dict(control_guidance_start=[0.0, 0.5])],
)
def test_several_union_controlnets_same_latents(xl, kw):
    """diffusers' MultiControlNetUnionModel: one image and one mode per ControlNet, each one's
    residuals scaled at its end (from_multi), then summed."""
    ref = controlnet_pipeline(xl["components"], [xl["cn"], xl["cn2"]], union=True)
    images = [_image(4), _image(5)]
    args = dict(prompt=PROMPTS, num_inference_steps=4, latents=_latents(), output_type="latent",
                control_mode=[3, 1], **kw)  # fmt: skip
    expect = run_ref(ref, "ddim", control_image=images, **args)
    got = xl["multi"](**args, control_image=images, scheduler="ddim", progress=False)
    assert_rel(got, expect, TOL, f"SDXL union MultiControlNet {kw}")


def test_img2img_same_seed(xl):
    """diffusers' StableDiffusionXLControlNetUnionImg2ImgPipeline at its defaults (strength and
    conditioning scale 0.8)."""
    ref = controlnet_pipeline(xl["components"], xl["cn"], "img2img", union=True)
    args = dict(prompt=PROMPTS[1], image=_image(7), num_inference_steps=5, output_type="latent",
                control_mode=[1, 3])  # fmt: skip
    controls = [_image(8), _image(9)]
    expect = run_ref(ref, "dpmpp_2m", control_image=controls, seed=3, **args)
    got = xl["ours"](**args, control_image=controls, seed=3, scheduler="dpmpp_2m", progress=False)
    assert_rel(got, expect, TOL, "SDXL union ControlNet img2img")


def test_inpaint_same_seed(xl):
    """diffusers' StableDiffusionXLControlNetUnionInpaintPipeline at its defaults."""
    ref = controlnet_pipeline(xl["components"], xl["cn"], "inpaint", union=True)
    args = dict(prompt=PROMPTS[0], image=_image(9), mask_image=_mask(), num_inference_steps=4,
                height=64, width=64, output_type="np", control_mode=[0])  # fmt: skip
    expect = run_ref(ref, "ddim", control_image=[_image(10)], seed=11, **args)
    got = xl["ours"](**args, control_image=[_image(10)], seed=11, scheduler="ddim", progress=False)
    assert_rel(got, expect, TOL, "SDXL union ControlNet inpaint")


# ------------------------------------------------------------------ errors


ERRORS = [
    (dict(), "control_mode: a union ControlNet needs the control type of each control image"),
    (dict(control_mode=[3, 1]), "control_mode: 2 modes for 1 control images"),
    (dict(control_mode=6), "control_mode: 6 is no control type of this ControlNet"),
    (dict(control_mode=True), "control_mode: True is no control type"),
    (dict(control_mode=3, controlnet_conditioning_scale=[1.0, 0.5]),
     "controlnet_conditioning_scale=.*: expected a number or 1 numbers"),
    (dict(control_mode=3, control_guidance_start=0.8, control_guidance_end=0.2),
     "0 <= start < end <= 1"),
]  # fmt: skip


@pytest.mark.parametrize("kw, message", ERRORS)
def test_argument_errors(xl, kw, message):
    with pytest.raises(InputError, match=message):
        xl["ours"]("a cat", num_inference_steps=1, control_image=_image(1), progress=False, **kw)


def test_union_and_plain_controlnets_are_not_mixed(xl, tmp_path):
    plain = build_controlnet(xl["components"]["unet"], tmp_path / "plain", seed=9)
    assert plain is not None
    pipe = minisd.StableDiffusionXL.from_pretrained(
        xl["folder"], controlnet=[xl["ours"].controlnet, tmp_path / "plain"]
    )
    with pytest.raises(InputError, match="union and plain ControlNets cannot be combined"):
        pipe("a cat", num_inference_steps=1, control_image=[_image(1)] * 2, control_mode=[1, 2],
             progress=False)  # fmt: skip
    pipe.controlnet = pipe.controlnet[1]
    with pytest.raises(InputError, match="control_mode: only union ControlNets"):
        pipe("a cat", num_inference_steps=1, control_image=_image(1), control_mode=1,
             progress=False)  # fmt: skip
    with pytest.raises(InputError, match="control_mode: given without control_image"):
        pipe("a cat", num_inference_steps=1, control_mode=1, progress=False)


def test_cli_generate_with_a_union_controlnet(xl, tmp_path, capsys):
    from PIL import Image

    from minisd.cli import main

    paths = [tmp_path / "pose.png", tmp_path / "depth.png"]
    for k, path in enumerate(paths):
        _image(12 + k).save(path)
    expect = xl["ours"]("a cat", control_image=[_image(12), _image(13)], control_mode=[0, 1],
                        num_inference_steps=2, seed=0, output_type="np",
                        progress=False)  # fmt: skip
    out = tmp_path / "union.png"
    args = ["generate", "a cat", "--model", str(xl["folder"]), "--steps", "2", "--seed", "0"]
    args += ["--controlnet", str(xl["folder"] / "union")]
    args += ["--control-image", str(paths[0]), "--control-mode", "0"]
    args += ["--control-image", str(paths[1]), "--control-mode", "1"]
    assert main([*args, "--out", str(out)]) == 0
    img = Image.open(out)
    assert np.abs(np.asarray(img) / 255 - expect[0]).max() <= 1 / 255 + 1e-6
    assert "Control mode: 0 1" in img.info["parameters"]
    assert main([*args[:-2], "--out", str(tmp_path / "bad.png")]) == 2
    assert "one image per mode (got 2 image(s) and 1 mode(s))" in capsys.readouterr().err
