"""minisd.image against diffusers' VaeImageProcessor: bit for bit on uint8 / PIL images
(including resizes), float arrays, masks, postprocessing; latent visualization helpers."""

import numpy as np
import pytest
from PIL import Image
from refharness import need, to_np, to_torch

from minisd.errors import InputError
from minisd.image import (
    ImageProcessor,
    latent_channels_grid,
    latents_to_rgb,
    latents_to_rgba,
    mask_processor,
    numpy_to_pil,
    resize_nearest,
)


def ref_processor(**kw):
    need("torch")
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(**kw)


def pixels(h, w, c=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w) if c is None else (h, w, c)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def same(ours, ref):
    """Bit-for-bit equality, dtype included."""
    ref = to_np(ref) if hasattr(ref, "detach") else np.asarray(ref)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (ours.shape, ref.shape)
    assert np.array_equal(ours, ref), f"max difference {np.abs(ours - ref).max()}"


@pytest.mark.parametrize(
    "size,height,width",
    [
        ((45, 37), None, None),  # rounded down to 40 x 32: a Lanczos resize
        ((64, 48), None, None),  # already a multiple of 8: same size
        ((45, 37), 64, 48),  # explicit upscale
        ((80, 120), 52, 33),  # explicit size, rounded down to 48 x 32
    ],
)
def test_preprocess_pil_and_uint8(size, height, width):
    a = pixels(*size)
    ref = ref_processor().preprocess(Image.fromarray(a), height=height, width=width)
    ours = ImageProcessor().preprocess(Image.fromarray(a), height=height, width=width)
    same(ours, ref)
    same(ImageProcessor().preprocess(a, height=height, width=width), ref)  # uint8 array
    batch = [Image.fromarray(a), Image.fromarray(pixels(*size, seed=1))]
    same(
        ImageProcessor().preprocess(batch, height, width),
        ref_processor().preprocess(batch, height, width),
    )


@pytest.mark.parametrize("mode", ["fill", "crop"])
def test_preprocess_resize_modes_and_crop(mode):
    im = Image.fromarray(pixels(50, 90))
    for h, w in ((64, 64), (32, 96)):
        ref = ref_processor().preprocess(im, h, w, resize_mode=mode)
        same(ImageProcessor().preprocess(im, h, w, resize_mode=mode), ref)
    box = (5, 3, 70, 43)
    ref = ref_processor().preprocess(im, crops_coords=box)
    same(ImageProcessor().preprocess(im, crops_coords=box), ref)


def test_preprocess_options():
    im = Image.fromarray(pixels(30, 20, c=4))  # RGBA
    for kw in (dict(do_convert_rgb=True), dict(resample="bicubic"), dict(do_normalize=False)):
        same(ImageProcessor(**kw).preprocess(im), ref_processor(**kw).preprocess(im))
    same(
        ImageProcessor(do_resize=False).preprocess(im),
        ref_processor(do_resize=False).preprocess(im),
    )
    with pytest.raises(InputError, match="resample"):
        ImageProcessor(resample="box")
    with pytest.raises(InputError, match="int64"):
        ImageProcessor().preprocess(np.zeros((8, 8, 3), np.int64))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,hw", [((2, 20, 27, 3), None), ((21, 35, 3), (40, 24))])
def test_preprocess_float_arrays(shape, hw, dtype):
    a = np.random.default_rng(2).uniform(0, 1, shape).astype(dtype)
    h, w = hw or (None, None)
    same(ImageProcessor().preprocess(a, h, w), ref_processor().preprocess(a, h, w))
    neg = a * 2 - 1  # already in [-1, 1]: kept as is, with a warning (as diffusers)
    with pytest.warns(UserWarning, match="not normalized"):
        ours = ImageProcessor().preprocess(neg, h, w)
    with pytest.warns(FutureWarning):
        same(ours, ref_processor().preprocess(neg, h, w))


def test_resize_nearest_matches_torch():
    torch = need("torch")
    x = np.random.default_rng(3).standard_normal((1, 2, 37, 23)).astype(np.float32)
    for size in [(37, 23), (74, 46), (5, 7), (64, 40), (100, 99), (12, 61), (111, 69)]:
        ref = torch.nn.functional.interpolate(to_torch(x), size=size)
        same(resize_nearest(x, size), ref)
    small = np.arange(6, dtype=np.float32).reshape(1, 1, 3, 2)
    for n in (123, 141, 249):  # float32 index arithmetic differs from exact floor(i * 3 / n)
        exact = np.floor(np.arange(n) * 3 / n).astype(int)
        ref = torch.nn.functional.interpolate(to_torch(small), size=(n, 2))
        assert not np.array_equal(to_np(ref)[0, 0, :, 0] // 2, exact)
        same(resize_nearest(small, (n, 2)), ref)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.fromarray(pixels(45, 37)),  # RGB mask image -> grayscale
        lambda: Image.fromarray(pixels(45, 37, c=None)),  # "L"
        lambda: np.random.default_rng(4).uniform(0, 1, (40, 24)).astype(np.float32),  # (H, W)
        lambda: np.random.default_rng(5).uniform(0, 1, (2, 40, 24)).astype(np.float32),  # (B, H, W)
        lambda: np.random.default_rng(6).uniform(0, 1, (40, 24, 1)).astype(np.float32),  # (H, W, 1)
    ],
)
def test_mask_processor(make):
    kw = dict(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    for h, w in ((None, None), (64, 32)):
        ours = mask_processor().preprocess(make(), h, w)
        same(ours, ref_processor(**kw).preprocess(make(), h, w))
        assert ours.shape[1] == 1 and set(np.unique(ours)) <= {0.0, 1.0}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_postprocess(dtype):
    torch = need("torch")
    x = 1.2 * np.random.default_rng(7).standard_normal((2, 3, 16, 24)).astype(dtype)
    x[0, 0, 0, :4] = [-1, 1, 0.5 / 127.5 - 1, 1.5 / 127.5 - 1]  # exact .5 roundings
    ref, ours = ref_processor(), ImageProcessor()
    same(ours.postprocess(x, "np"), ref.postprocess(torch.from_numpy(x), "np"))
    same(ours.postprocess(x, "pt"), ref.postprocess(torch.from_numpy(x), "pt"))
    for a, b in zip(ours.postprocess(x), ref.postprocess(torch.from_numpy(x))):
        assert a.mode == b.mode == "RGB"
        same(np.array(a), np.array(b))
    keep = [True, False]
    same(ours.postprocess(x, "np", keep), ref.postprocess(torch.from_numpy(x), "np", keep))
    assert ours.postprocess(x, "latent") is x
    gray = numpy_to_pil(np.full((4, 5, 1), 0.5, np.float32))[0]
    assert gray.mode == "L" and np.array(gray)[0, 0] == 128  # 127.5 rounds half to even
    with pytest.raises(InputError, match="output_type"):
        ours.postprocess(x, "jpeg")


def test_round_trip_uint8_is_lossless():
    a = pixels(16, 24)
    x = ImageProcessor().preprocess(a)
    assert x.shape == (1, 3, 16, 24) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(np.array(ImageProcessor().postprocess(x)[0]), a)


def test_latent_visualization():
    z = np.random.default_rng(8).standard_normal((2, 4, 6, 9))
    rgb = latents_to_rgb(z)
    assert rgb.shape == (2, 6, 9, 3) and rgb.dtype == np.uint8
    zero = latents_to_rgb(np.zeros((1, 4, 2, 2)))
    assert np.all(zero == 128)  # 0 -> mid gray
    rgba = latents_to_rgba(z)
    assert rgba.shape == (2, 6, 9, 4)
    assert rgba[0, 0, 0, 1] == np.uint8(np.clip(z[0, 1, 0, 0] * 127.5 + 127.5, 0, 255))
    assert latents_to_rgba(np.full((1, 4, 1, 1), 5.0)).max() == 255  # clipped, no wrap-around
    grid = latent_channels_grid(z, gap=2)
    assert grid.shape == (2, 6, 4 * 9 + 3 * 2) and grid.dtype == np.uint8
    panel = grid[1, :, 11:20]  # channel 1 of image 1
    assert panel.min() == 0 and panel.max() == 255
    assert np.all(grid[:, :, 9:11] == 255)
    assert np.argmax(panel) == np.argmax(z[1, 1])
