"""InstructPix2Pix (8-channel UNets) in StableDiffusion against diffusers'
StableDiffusionInstructPix2PixPipeline on the same tiny folder (every parameter randomized).

Three UNet rows per image with both guidances ([text+image, image, neither]), one row when
guidance_scale <= 1 or image_guidance_scale < 1; the edited image enters as the unscaled mode of
the VAE posterior, so a seed draws only the initial latents (and a stochastic sampler's noise).
"""

import numpy as np
import pytest
from pipelines import build
from refharness import assert_rel
from test_pipeline import PROMPTS, TOL, _CountingUNet, _image, _mask, _run_ref

import minisd
from minisd.errors import InputError


@pytest.fixture(scope="module")
def pix_folder(tmp_path_factory):
    """An InstructPix2Pix tiny folder and diffusers' pipeline loaded from it."""
    folder = tmp_path_factory.mktemp("pipes") / "pix2pix"
    return folder, build("pix2pix", folder)


@pytest.fixture(scope="module")
def pix_pair(pix_folder):
    """(diffusers pipeline, minisd pipeline) over the same folder."""
    return pix_folder[1], minisd.StableDiffusion.from_pretrained(pix_folder[0])


@pytest.mark.parametrize(
    "scales", [(7.5, 1.5), (3.0, 1.0), (1.0, 1.5), (4.0, 0.5)], ids=["both", "s_I=1", "no", "s_I<1"]
)
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_same_latents_same_result(pix_pair, scheduler, scales):
    """Non-square image (80 x 64): the output takes the image's size, as in diffusers."""
    ref, ours = pix_pair
    latents = np.random.default_rng(0).standard_normal((2, 4, 10, 8)).astype(np.float32)
    kw = dict(prompt=PROMPTS, negative_prompt=["blurry", ""], image=_image(80, 64),
              num_inference_steps=4, guidance_scale=scales[0], image_guidance_scale=scales[1],
              latents=latents, output_type="latent")  # fmt: skip
    expect = _run_ref(ref, scheduler, **kw).numpy()
    got = ours(**{**kw, "scheduler": scheduler, "progress": False})
    assert got.shape == (2, 4, 10, 8)
    assert_rel(got, expect, TOL, f"pix2pix {scheduler}, scales {scales}")


def test_same_seed_stochastic_sampler_and_images(pix_pair):
    """Seeded euler_a, one image for two prompts, two images per prompt; decoded to [0, 1]."""
    ref, ours = pix_pair
    kw = dict(prompt=PROMPTS, image=_image(seed=3), num_inference_steps=3, guidance_scale=6.0,
              image_guidance_scale=1.3, num_images_per_prompt=2, output_type="np")  # fmt: skip
    expect = _run_ref(ref, "euler_a", seed=11, **kw)
    got = ours(**kw, seed=11, scheduler="euler_a", progress=False)
    assert got.shape == expect.shape == (4, 64, 64, 3)
    assert_rel(got, expect, TOL, "pix2pix euler_a seeded")


def test_one_image_per_prompt(pix_pair):
    ref, ours = pix_pair
    images = [_image(seed=1), _image(seed=2)]
    kw = dict(prompt=PROMPTS, image=images, num_inference_steps=3, output_type="latent")
    expect = _run_ref(ref, "ddim", seed=2, **kw).numpy()
    got = ours(**kw, seed=2, scheduler="ddim", progress=False)
    assert_rel(got, expect, TOL, "pix2pix, one image per prompt")
    assert np.abs(got[0] - got[1]).max() > 1e-3 * np.abs(got).max()


@pytest.mark.parametrize("scales,rows", [((7.5, 1.5), 3), ((1.0, 1.5), 1), ((7.5, 0.9), 1)])
def test_unet_rows_and_channels(pix_pair, scales, rows):
    """[z; z; z] with [E, E, 0] beside it when both guidances are on, else one row."""
    _, ours = pix_pair
    shapes, saved = [], ours.unet

    class Recording(_CountingUNet):
        def __call__(self, x, t, ctx, *args, **kw):
            shapes.append((x.shape, ctx.shape))
            return self.unet(x, t, ctx, *args, **kw)

    try:
        ours.unet = Recording(ours.unet)
        ours("make it snowy", image=_image(), num_inference_steps=2, guidance_scale=scales[0],
             image_guidance_scale=scales[1], scheduler="ddim", output_type="latent",
             progress=False)  # fmt: skip
    finally:
        ours.unet = saved
    assert [s for s, _ in shapes] == [(rows, 8, 8, 8)] * 2
    assert all(c[0] == rows for _, c in shapes)


def test_image_guidance_changes_the_result(pix_pair):
    _, ours = pix_pair
    kw = dict(image=_image(), num_inference_steps=2, output_type="latent", progress=False, seed=4)
    a = ours("make it snowy", image_guidance_scale=1.5, **kw)
    b = ours("make it snowy", image_guidance_scale=2.5, **kw)
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(), "image: an InstructPix2Pix UNet edits an image"),
        (dict(image=1, mask_image=1), "mask_image: not supported"),
        (dict(image=1, guidance_rescale=0.5), "guidance_rescale: not supported"),
        (dict(image=1, image_guidance_scale=-1.0), r"image_guidance_scale=-1\.0"),
        (dict(image=1, image_guidance_scale=float("nan")), "image_guidance_scale=nan"),
        (dict(image=1, adapter_image=1), "adapter_image: not supported"),
        (dict(image=1, ip_adapter_image=1), "ip_adapter_image: not supported"),
    ],
)
def test_bad_arguments_are_refused_up_front(pix_pair, kw, match):
    _, ours = pix_pair
    for name in ("image", "mask_image", "adapter_image", "ip_adapter_image"):
        if name in kw:
            kw[name] = _mask() if name == "mask_image" else _image()
    with pytest.raises(InputError, match=match):
        ours("make it snowy", num_inference_steps=1, progress=False, **kw)


def test_image_guidance_scale_needs_an_instruct_pix2pix_unet(tiny_sd1_files):
    pipe = minisd.StableDiffusion.from_pretrained(tiny_sd1_files[0])  # a 4-channel SD1 UNet
    with pytest.raises(InputError, match="image_guidance_scale=1.5: only InstructPix2Pix UNets"):
        pipe("a cat", image_guidance_scale=1.5, num_inference_steps=1, progress=False)


def test_cli_edits_the_init_image(pix_folder, pix_pair, tmp_path):
    """``minisd generate --init-image X --image-guidance S`` on an InstructPix2Pix folder is the
    API's result, and the PNG's parameters say so."""
    from PIL import Image

    from minisd.cli import main

    _, ours = pix_pair
    init = tmp_path / "in.png"
    _image(seed=5).save(init)
    kw = dict(num_inference_steps=2, seed=0, scheduler="ddim", output_type="np", progress=False)
    expect = ours("make it snowy", image=Image.open(init), image_guidance_scale=1.2, **kw)
    out = tmp_path / "edit.png"
    args = ["generate", "make it snowy", "--model", str(pix_folder[0]), "--steps", "2"]
    args += ["--scheduler", "ddim", "--init-image", str(init), "--image-guidance", "1.2"]
    assert main([*args, "--seed", "0", "--out", str(out)]) == 0
    img = Image.open(out)
    assert np.abs(np.asarray(img) / 255 - expect[0]).max() <= 1 / 255 + 1e-6
    assert "Image CFG scale: 1.2" in img.info["parameters"]
