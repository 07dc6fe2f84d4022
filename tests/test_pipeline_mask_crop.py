"""``padding_mask_crop`` in the inpainting pipelines against diffusers' (SD, SDXL, ControlNet
inpainting): the crop around the mask is inpainted at the model's size and pasted back into the
big image through the mask. Outputs are PIL images on both sides, compared as uint8 pixels (one
level of rounding apart at most); the crop functions themselves: tests/test_mask_crop.py."""

import numpy as np
import pytest
from pipelines import build
from pipelines_xl import build_inpaint
from refharness import need
from test_pipeline import _CountingUNet, _run_ref
from test_pipeline_controlnet import _control, _ref, trio  # noqa: F401  (trio: a fixture)

import minisd
from minisd.errors import InputError


def _big_image(seed=1, h=96, w=136):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _small_mask(h=96, w=136):
    """A 20 x 14 box off-centre, soft-edged (gray pixels blend in the overlay)."""
    from PIL import Image

    m = np.zeros((h, w), np.uint8)
    m[30:50, 80:94] = 255
    m[29, 80:94] = 128
    return Image.fromarray(m)


def _same_pixels(got, expect, what):
    assert len(got) == len(expect), what
    for g, e in zip(got, expect):
        assert g.size == e.size == (136, 96), what
        diff = np.abs(np.asarray(g, np.int16) - np.asarray(e, np.int16))
        assert diff.max() <= 1, f"{what}: {diff.max()} levels apart"


def _kept_outside_the_mask(images, original, mask):
    outside = np.asarray(mask) == 0
    for im in images:
        assert np.array_equal(np.asarray(im)[outside], np.asarray(original)[outside])


@pytest.mark.parametrize("kind,pad", [("inpaint", 8), ("sd1", 0)])
def test_sd_inpaint_crop(kind, pad, tmp_path_factory):
    """A 9-channel UNet and the 4-channel blend; no height / width: the model's 64 x 64."""
    diffusers = need("diffusers")
    folder = tmp_path_factory.mktemp("crop") / kind
    ref = diffusers.StableDiffusionInpaintPipeline(**build(kind, folder).components)
    ref.set_progress_bar_config(disable=True)
    ours = minisd.StableDiffusion.from_pretrained(folder)
    image, mask = _big_image(), _small_mask()
    kw = dict(prompt=["a red sofa", "a cat"], image=image, mask_image=mask, strength=0.8,
              num_inference_steps=3, guidance_scale=4.0, padding_mask_crop=pad)  # fmt: skip
    expect = _run_ref(ref, "ddim", seed=5, **kw)
    got = ours(**kw, seed=5, scheduler="ddim", progress=False)
    _same_pixels(got, expect, f"{kind} padding_mask_crop={pad}")
    _kept_outside_the_mask(got, image, mask)


def test_sdxl_inpaint_crop(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crop_xl") / "inpaint"
    ref = build_inpaint("inpaint", folder)
    ours = minisd.StableDiffusion.from_pretrained(folder)
    kw = dict(prompt="a red sofa", image=_big_image(seed=2), mask_image=_small_mask(),
              num_inference_steps=3, padding_mask_crop=16, height=64, width=64)  # fmt: skip
    expect = _run_ref(ref, None, seed=7, **kw)
    got = ours(**kw, seed=7, progress=False)
    _same_pixels(got, expect, "SDXL padding_mask_crop")


def test_controlnet_inpaint_crops_the_control_image_too(trio):  # noqa: F811
    ref, ours = _ref(trio, "ControlNetInpaint"), trio[2]
    control = _control().resize((136, 96))
    kw = dict(prompt="a red sofa", image=_big_image(seed=3), mask_image=_small_mask(),
              strength=0.75, num_inference_steps=3, guidance_scale=4.0, padding_mask_crop=4,
              control_image=control)  # fmt: skip
    expect = _run_ref(ref, "ddim", seed=11, **kw)
    got = ours(**kw, seed=11, scheduler="ddim", progress=False)
    _same_pixels(got, expect, "ControlNet inpaint padding_mask_crop")


def test_the_crop_is_what_the_model_sees(tmp_path_factory):
    """The UNet gets model-size latents of the crop, not of the whole image."""
    folder = tmp_path_factory.mktemp("crop") / "sd1"
    build("sd1", folder)
    ours = minisd.StableDiffusion.from_pretrained(folder)
    shapes, real = [], ours.unet

    class Recording(_CountingUNet):
        def __call__(self, x, *args, **kw):
            shapes.append(x.shape)
            return self.unet(x, *args, **kw)

    ours.unet = Recording(real)
    try:
        out = ours("a cat", image=_big_image(), mask_image=_small_mask(), padding_mask_crop=2,
                   num_inference_steps=2, height=48, width=80, progress=False)  # fmt: skip
    finally:
        ours.unet = real
    assert shapes and all(s == (2, 4, 6, 10) for s in shapes)
    assert out[0].size == (136, 96)


def _bad_cases():
    image, mask = _big_image(), _small_mask()
    return [
        ({"mask_image": None}, "padding_mask_crop: crops around the mask"),
        ({"image": np.asarray(image)}, "image: padding_mask_crop needs one PIL image"),
        ({"mask_image": [mask]}, "mask_image: padding_mask_crop needs one PIL image"),
        ({"output_type": "np"}, "output_type='np': padding_mask_crop"),
        ({"padding_mask_crop": -1}, "pad=-1"),
        ({"mask_image": mask.point(lambda v: 0)}, "mask: no nonzero pixel"),
    ]


@pytest.mark.parametrize("change,message", _bad_cases())
def test_bad_input_is_named(change, message, tmp_path_factory):
    folder = tmp_path_factory.mktemp("crop") / "inpaint"
    build("inpaint", folder)
    ours = minisd.StableDiffusion.from_pretrained(folder)
    kw = dict(prompt="a cat", image=_big_image(), mask_image=_small_mask(), padding_mask_crop=4,
              num_inference_steps=2, progress=False)  # fmt: skip
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        ours(**{**kw, **change})
