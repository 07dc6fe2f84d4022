"""minisd.mask_crop against diffusers' VaeImageProcessor (get_crop_region, preprocess with
crops_coords / resize_mode="fill", apply_overlay): identical boxes and identical pixels."""

import numpy as np
import pytest
from PIL import Image
from refharness import need

from minisd.errors import InputError
from minisd.image import ImageProcessor, mask_processor
from minisd.mask_crop import apply_overlay, crop_and_resize, crop_inputs, crop_region

# (image W, H), mask box (x1, y1, x2, y2) or None for scattered pixels, target (width, height)
CASES = [
    ((200, 150), (80, 60, 110, 75), (64, 64)),  # wide box, square target: grow the height
    ((200, 150), (80, 20, 95, 120), (64, 64)),  # tall box: grow the width
    ((200, 150), (0, 0, 30, 10), (64, 32)),  # touching the top-left corner
    ((200, 150), (170, 140, 200, 150), (32, 64)),  # bottom-right corner, tall target
    ((200, 150), (100, 70, 101, 71), (64, 64)),  # one pixel
    ((120, 90), (5, 40, 115, 50), (48, 96)),  # expansion past the image: shift, then clamp
    ((90, 160), (30, 0, 60, 160), (96, 40)),  # full height, wide target: clamp, "fill" pads
    ((64, 64), (0, 0, 64, 64), (64, 64)),  # the whole image
    ((333, 217), None, (72, 56)),  # scattered pixels, odd sizes
    ((257, 129), None, (40, 88)),
]


def ref_processor(**kw):
    need("torch")
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(**kw)


def ref_mask_processor():
    return ref_processor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def make_mask(size, box, seed, mode="L"):
    """A mask with soft values: 255 inside ``box`` with some gray, or scattered pixels."""
    rng = np.random.default_rng(seed)
    w, h = size
    m = np.zeros((h, w), np.uint8)
    if box is None:
        ys, xs = rng.integers(0, h, 6), rng.integers(0, w, 6)
        m[ys, xs] = rng.integers(1, 256, 6)
    else:
        x1, y1, x2, y2 = box
        m[y1:y2, x1:x2] = rng.choice([255, 255, 200, 90, 1], (y2 - y1, x2 - x1))
    mask = Image.fromarray(m)
    return mask if mode == "L" else mask.convert(mode)


def make_image(size, seed, mode="RGB"):
    w, h = size
    a = np.random.default_rng(seed + 100).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a).convert(mode)


def same_pil(ours, ref):
    assert ours.mode == ref.mode and ours.size == ref.size, (ours, ref)
    assert np.array_equal(np.array(ours), np.array(ref))


def same_array(ours, ref):
    ref = ref.numpy()
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (ours.shape, ref.shape)
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("pad", [0, 32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_crop_region(case, pad):
    size, box, (width, height) = CASES[case]
    for seed, mode in ((0, "L"), (1, "RGB")):
        mask = make_mask(size, box, seed, mode)
        region = crop_region(mask, width, height, pad)
        assert region == ref_processor().get_crop_region(mask, width, height, pad=pad)
        x1, y1, x2, y2 = region
        assert all(type(v) is int for v in region)
        assert 0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]


def test_crop_region_random_masks():
    """Many random boxes, targets and pads, including odd ones (pad 7, 3:1 targets)."""
    rng = np.random.default_rng(0)
    ref = ref_processor()
    for i in range(300):
        w, h = (int(v) for v in rng.integers(1, 120, 2))
        x1, y1 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x2, y2 = int(rng.integers(x1 + 1, w + 1)), int(rng.integers(y1 + 1, h + 1))
        width, height = (int(v) for v in rng.integers(1, 12, 2) * 8)
        pad = int(rng.choice([0, 1, 7, 32, 500]))
        mask = make_mask((w, h), (x1, y1, x2, y2), i)
        got = crop_region(mask, width, height, pad)
        assert got == ref.get_crop_region(mask, width, height, pad=pad), (i, w, h, pad)


@pytest.mark.parametrize("case", [0, 3, 5, 6, 8, 9])
@pytest.mark.parametrize("pad,mask_mode", [(0, "RGB"), (32, "L")])
def test_crop_inputs_match_pipeline_preprocessing(case, pad, mask_mode):
    """The crops equal diffusers' resize of the crop, and through the usual processors (minisd's
    or diffusers', default mode) give the arrays the inpaint pipeline's step 5 gives."""
    size, box, (width, height) = CASES[case]
    image, mask = make_image(size, case), make_mask(size, box, case, mask_mode)
    ref, ref_mask = ref_processor(), ref_mask_processor()
    image_crop, mask_crop, region = crop_inputs(image, mask, width, height, pad)
    same_pil(image_crop, ref.resize(image.crop(region), height, width, resize_mode="fill"))
    same_pil(mask_crop, ref_mask.resize(mask.crop(region), height, width, resize_mode="fill"))
    kw = dict(height=height, width=width, crops_coords=region, resize_mode="fill")
    want_image, want_mask = ref.preprocess(image, **kw), ref_mask.preprocess(mask, **kw)
    same_array(ImageProcessor().preprocess(image_crop, height, width), want_image)
    same_array(mask_processor().preprocess(mask_crop, height, width), want_mask)
    same_array(ref.preprocess(image_crop, height, width).numpy(), want_image)


@pytest.mark.parametrize("mode", ["fill", "crop", "default"])
def test_crop_and_resize_modes(mode):
    image = make_image((150, 100), 3, "RGBA")
    region = (10, 20, 130, 60)
    for width, height in ((64, 64), (96, 32), (40, 80)):
        want = ref_processor().resize(image.crop(region), height, width, resize_mode=mode)
        same_pil(crop_and_resize(image, region, width, height, mode=mode), want)
    want = ref_processor(resample="bicubic").resize(image.crop(region), 48, 48, "fill")
    same_pil(crop_and_resize(image, region, 48, 48, resample="bicubic"), want)


@pytest.mark.parametrize("case", [0, 2, 5, 6, 8])
def test_apply_overlay(case):
    size, box, (width, height) = CASES[case]
    init = make_image(size, case)
    mask = make_mask(size, box, case)  # soft values: gray pixels blend
    region = crop_region(mask, width, height, 16)
    generated = make_image((width, height), case + 50)
    want = ref_processor().apply_overlay(mask, init, generated, region)
    got = apply_overlay(mask, init, generated, region)
    same_pil(got, want)
    outside = np.array(mask) == 0
    assert np.array_equal(np.array(got)[outside], np.array(init)[outside])
    full = make_image(size, case + 60, "RGBA")  # no crop: a full-size result
    same_pil(apply_overlay(mask, init, full), ref_processor().apply_overlay(mask, init, full))


def test_all_black_mask_is_refused():
    """diffusers returns an inverted box (PIL then fails) or, with a pad of half the image, a
    box around the centre; minisd refuses, naming the mask."""
    mask = Image.new("L", (100, 60))
    assert ref_processor().get_crop_region(mask, 64, 64, pad=0) == (100, 80, 0, -20)
    for pad in (0, 32):
        with pytest.raises(InputError, match="mask: no nonzero pixel"):
            crop_region(mask, 64, 64, pad)
    with pytest.raises(InputError, match="mask: no nonzero pixel"):
        crop_inputs(Image.new("RGB", (100, 60)), mask, 64, 64, 8)


def test_argument_errors():
    mask, image = make_mask((50, 40), (10, 10, 20, 20), 0), make_image((50, 40), 0)
    for pad in (-1, 2.5, "8", True):
        with pytest.raises(InputError, match="pad="):
            crop_region(mask, 64, 64, pad)
    assert crop_region(mask, 64, 64, np.int64(4)) == crop_region(mask, 64, 64, 4)
    for bad in (dict(width=0), dict(height=-8), dict(width=64.0)):
        args = {"width": 64, "height": 64, **bad}
        with pytest.raises(InputError, match=next(iter(bad))):
            crop_region(mask, args["width"], args["height"], 0)
    with pytest.raises(InputError, match="mask: padding_mask_crop works on PIL"):
        crop_region(np.array(mask), 64, 64, 0)
    with pytest.raises(InputError, match="region="):
        crop_and_resize(image, (20, 10, 10, 30), 64, 64)  # x2 < x1
    with pytest.raises(InputError, match="region="):
        crop_and_resize(image, (0, 0, 51, 40), 64, 64)  # past the right edge
    with pytest.raises(InputError, match="mask: size"):
        crop_inputs(image, make_mask((40, 50), None, 0), 64, 64, 0)
    with pytest.raises(InputError, match="mask: size"):
        apply_overlay(make_mask((40, 50), None, 0), image, image)
    with pytest.raises(InputError, match="image: size"):
        apply_overlay(mask, image, make_image((64, 64), 1))
    with pytest.raises(InputError, match="crop_coords="):
        apply_overlay(mask, image, make_image((64, 64), 1), (0, 0, 60, 40))
