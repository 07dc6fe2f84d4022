"""Inpaint only the masked area of a big image at the model's resolution (``padding_mask_crop``).

A1111's "inpaint only masked": find the box around the mask's nonzero pixels, grow it by ``pad``
pixels of context, widen it to the aspect ratio of the model's (width, height), crop image and
mask to it and resize them to (width, height). The model then works at full resolution on the
small area; afterwards the generated image is scaled back to the box, pasted into the original
and blended through the mask, so everything outside the mask keeps its original pixels.

    region = crop_region(mask, width, height, pad)                 # (x1, y1, x2, y2) in the image
    image_in = crop_and_resize(image, region, width, height)      # PIL, (width, height)
    mask_in = crop_and_resize(mask, region, width, height)        # PIL, (width, height)
    ... inpaint image_in / mask_in as usual, get PIL `out` of (width, height) ...
    final = apply_overlay(mask, image, out, region)               # PIL RGB of the image's size

These are diffusers' ``VaeImageProcessor.get_crop_region``, ``preprocess(crops_coords=...,
resize_mode="fill")`` and ``apply_overlay``, with the same PIL calls in the same order, so the
results are identical pixel for pixel (tests/test_mask_crop.py). :func:`crop_inputs` runs the
first three lines the way StableDiffusion(XL)InpaintPipeline does.

Two refusals where diffusers goes on: a mask with no nonzero pixel (diffusers returns an inverted
or arbitrary box; PIL then fails with "Coordinate 'right' is less than 'left'" or, for a large
pad, a box around the centre of the image is inpainted) and a negative or non-integer ``pad``.
"""

from __future__ import annotations

import operator

import numpy as np
from PIL import Image, ImageOps

from .errors import InputError
from .image import ImageProcessor


def crop_region(mask, width, height, pad=0):
    """The box (x1, y1, x2, y2) to inpaint, as diffusers' ``VaeImageProcessor.get_crop_region``.

    ``mask``: PIL image; every pixel that is nonzero in its "L" conversion counts (not only the
    ones >= 128 that the binarized mask keeps). ``width``, ``height``: the size the crop will be
    resized to (the model's). The bounding box of the mask grows by ``pad`` pixels on each side
    (clamped to the image), then its shorter side (relative to width / height) grows, evenly on
    both ends, to reach that aspect ratio; a box that would leave the image is shifted back in
    and, if still too big, clamped (its aspect ratio then differs; the "fill" resize of
    :func:`crop_and_resize` absorbs the difference). x2 and y2 are exclusive, as PIL's crop.
    """
    _check_pil(mask, "mask")
    _check_size(width, height)
    pad = _check_pad(pad)
    m = np.array(mask.convert("L"))  # (H, W) uint8
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    if cols.size == 0:
        raise InputError(
            f"mask: no nonzero pixel in the {mask.width}x{mask.height} mask, so there is no "
            "region to crop for padding_mask_crop; give a mask with a white (masked) area"
        )
    w, h = mask.width, mask.height
    x1, x2 = max(int(cols[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, w)
    y1, y2 = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, h)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:  # too wide: grow the height
        y1, y2 = _grow(y1, y2, (x2 - x1) / ratio, h)
    else:  # too tall (or exact): grow the width
        x1, x2 = _grow(x1, x2, (y2 - y1) * ratio, w)
    return x1, y1, x2, y2


def _grow(lo, hi, desired, size):
    """Widen [lo, hi) to ``desired`` (truncated to int; the odd pixel goes to ``hi``), shift it
    back inside [0, size), clamp it if it is still too long. diffusers' step 3, one axis."""
    diff = int(desired - (hi - lo))
    lo, hi = lo - diff // 2, hi + diff - diff // 2
    if hi >= size:  # past the end: shift back
        lo, hi = lo - (hi - size), size
    if lo < 0:  # past the start: shift forward
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def crop_and_resize(image, region, width, height, *, mode="fill", resample="lanczos"):
    """``image.crop(region)`` resized to (width, height): PIL -> PIL of size (width, height).

    What diffusers' ``preprocess(image, height, width, crops_coords=region, resize_mode=mode)``
    does before converting to an array; the inpaint pipelines use ``mode="fill"`` for the image
    and the mask alike (fit inside keeping the aspect ratio, fill the borders by stretching the
    edge rows / columns) with the processors' Lanczos filter. "fill" / "crop" return an RGB
    image (an "L" mask becomes gray RGB, which the mask processor turns back into "L" exactly);
    "default" (a plain stretch) keeps the mode. ``width`` and ``height`` are used as given (the
    pipelines pass multiples of 8; diffusers' preprocess would round others down).
    """
    _check_pil(image, "image")
    _check_size(width, height)
    x1, y1, x2, y2 = _check_region(region, image.size)
    resizer = ImageProcessor(resample=resample)
    return resizer.resize(image.crop((x1, y1, x2, y2)), height, width, mode)


def crop_inputs(image, mask, width, height, pad, *, resample="lanczos"):
    """Step 5 of StableDiffusion(XL)InpaintPipeline with ``padding_mask_crop=pad``: the region
    from the mask, then image and mask cropped to it and resized "fill" to (width, height).
    -> (image_crop, mask_crop, region); feed the crops to the usual image / mask processors
    (a same-size resize is a copy in PIL, so the arrays equal diffusers') and keep ``region``,
    ``image`` and ``mask`` for :func:`apply_overlay`."""
    _check_pil(image, "image")
    _check_pil(mask, "mask")
    if image.size != mask.size:
        raise InputError(f"mask: size {mask.size} differs from image size {image.size} (w, h)")
    region = crop_region(mask, width, height, pad)
    crops = [crop_and_resize(im, region, width, height, resample=resample) for im in (image, mask)]
    return crops[0], crops[1], region


def apply_overlay(mask, init_image, image, crop_coords=None, *, resample="lanczos"):
    """Put the generated ``image`` back into ``init_image`` through ``mask``, as diffusers'
    ``VaeImageProcessor.apply_overlay`` -> PIL RGB of init_image's size.

    ``mask`` and ``init_image``: the caller's full-size originals (the mask not binarized: gray
    pixels blend). ``image``: a generated PIL image. With ``crop_coords`` (x1, y1, x2, y2) it is
    resized "crop" (cover, centred, excess cut) to the box and pasted there onto black; without,
    it must already have init_image's size. The original, with alpha = 255 - mask (premultiplied
    through PIL's "RGBa", as diffusers), is then alpha-composited on top: unmasked pixels come
    back from the original, masked ones from the generated image.
    """
    for name, im in (("mask", mask), ("init_image", init_image), ("image", image)):
        _check_pil(im, name)
    size = init_image.size  # (W, H)
    if mask.size != size:
        raise InputError(f"mask: size {mask.size} differs from init_image size {size} (w, h)")
    keep = Image.new("RGBa", size)
    keep.paste(init_image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    keep = keep.convert("RGBA")
    if crop_coords is not None:
        x1, y1, x2, y2 = _check_region(crop_coords, size, "crop_coords")
        base = Image.new("RGBA", size)  # transparent black
        resizer = ImageProcessor(resample=resample)
        base.paste(resizer.resize(image, y2 - y1, x2 - x1, "crop"), (x1, y1))
        image = base.convert("RGB")
    elif image.size != size:
        raise InputError(
            f"image: size {image.size} differs from init_image size {size} (w, h); give "
            "crop_coords to paste a crop back"
        )
    image = image.convert("RGBA")
    image.alpha_composite(keep)
    return image.convert("RGB")


# --------------------------------------------------------------------------- checks


def _check_pil(im, name):
    if not isinstance(im, Image.Image):
        raise InputError(
            f"{name}: padding_mask_crop works on PIL images (as diffusers), got {type(im).__name__}"
        )


def _check_size(width, height):
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
            raise InputError(f"{name}={v!r}: must be a positive integer")


def _check_pad(pad):
    try:
        value = operator.index(pad)
    except TypeError:
        raise InputError(f"pad={pad!r}: must be an integer >= 0 (pixels)") from None
    if value < 0 or isinstance(pad, bool):
        raise InputError(f"pad={pad!r}: must be an integer >= 0 (pixels)")
    return value


def _check_region(region, size, name="region"):
    """A box (x1, y1, x2, y2) of ints with 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H."""
    try:
        x1, y1, x2, y2 = (operator.index(v) for v in region)
    except (TypeError, ValueError):
        raise InputError(f"{name}={region!r}: expected four integers (x1, y1, x2, y2)") from None
    w, h = size
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise InputError(f"{name}={region!r}: not a non-empty box inside the {w}x{h} image")
    return x1, y1, x2, y2
