"""Image pre/post-processing as diffusers' VaeImageProcessor, and latent visualization.

    ImageProcessor().preprocess(pil_or_array)          -> (N, C, H, W) float in [-1, 1]
    ImageProcessor().postprocess(decoded, "pil")       -> list of PIL images ("np": (N, H, W, 3))
    mask_processor().preprocess(mask)                  -> (N, 1, H, W) in {0, 1}, for inpainting

Inputs, as diffusers: PIL images (one or a list) and float arrays (H, W, C) / (N, H, W, C) in
[0, 1] (channels last). uint8 arrays are taken as images in [0, 255] and follow the PIL path
exactly (diffusers would treat them as floats in [0, 1]; a uint8 array is almost always meant as
pixels). Sizes are rounded down to a multiple of ``vae_scale_factor``; PIL images are resized with
Lanczos (diffusers' default ``resample``) through the same ``Image.resize`` call, float arrays
with nearest-neighbour sampling exactly as ``torch.nn.functional.interpolate``.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from .backend import to_numpy
from .errors import InputError
from .ops import resize_nearest  # noqa: F401 (part of this module's API)

RESAMPLE = {
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


# --------------------------------------------------------------------------- conversions


def normalize(x):
    """[0, 1] -> [-1, 1]: 2x - 1."""
    return 2.0 * x - 1.0


def denormalize(x):
    """[-1, 1] -> [0, 1]: (x/2 + 1/2) clipped (x * 0.5 is exactly x / 2)."""
    return (x * 0.5 + 0.5).clip(0, 1)


def numpy_to_pil(images):
    """(N, H, W, C) or (H, W, C) floats in [0, 1] -> list of PIL images; x * 255 rounded half to
    even, as diffusers' numpy_to_pil. One channel gives mode "L"."""
    images = to_numpy(images)  # CuPy arrays are copied to the host
    if images.ndim == 3:
        images = images[None]  # (1, H, W, C)
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(im.squeeze(), mode="L") for im in images]
    return [Image.fromarray(im) for im in images]


def pil_to_numpy(images):
    """PIL image(s) -> (N, H, W[, C]) float32 in [0, 1]."""
    if not isinstance(images, list):
        images = [images]
    return np.stack([np.array(im).astype(np.float32) / 255.0 for im in images])


# --------------------------------------------------------------------------- the processor


class ImageProcessor:
    """diffusers' VaeImageProcessor, same options, same numbers."""

    def __init__(
        self,
        vae_scale_factor=8,
        *,
        do_resize=True,
        resample="lanczos",
        reducing_gap=None,
        do_normalize=True,
        do_binarize=False,
        do_convert_rgb=False,
        do_convert_grayscale=False,
        latent_channels=4,
    ):
        if do_convert_rgb and do_convert_grayscale:
            raise InputError("do_convert_rgb and do_convert_grayscale cannot both be True")
        if resample not in RESAMPLE:
            raise InputError(f"resample={resample!r}: expected one of {sorted(RESAMPLE)}")
        self.vae_scale_factor = int(vae_scale_factor)
        self.do_resize, self.resample, self.reducing_gap = do_resize, resample, reducing_gap
        self.do_normalize, self.do_binarize = do_normalize, do_binarize
        self.do_convert_rgb, self.do_convert_grayscale = do_convert_rgb, do_convert_grayscale
        self.latent_channels = latent_channels

    def default_height_width(self, size, height=None, width=None):
        """(height, width) from the arguments or the image ``size`` = (H, W), each rounded down
        to a multiple of vae_scale_factor."""
        height = size[0] if height is None else height
        width = size[1] if width is None else width
        f = self.vae_scale_factor
        return height - height % f, width - width % f

    def resize(self, image, height, width, resize_mode="default"):
        """PIL: ``Image.resize`` with the configured filter ("fill" / "crop" keep the aspect
        ratio). Arrays (N, C, H, W): nearest, as torch's interpolate."""
        if not isinstance(image, Image.Image):
            if resize_mode != "default":
                raise InputError(f"resize_mode={resize_mode!r} needs PIL images")
            return resize_nearest(image, (height, width))
        resample = RESAMPLE[self.resample]
        if resize_mode == "default":
            return image.resize((width, height), resample=resample, reducing_gap=self.reducing_gap)
        if resize_mode == "fill":
            return _resize_and_fill(image, width, height, resample)
        if resize_mode == "crop":
            return _resize_and_crop(image, width, height, resample)
        raise InputError(f"resize_mode={resize_mode!r}: expected 'default', 'fill' or 'crop'")

    def preprocess(
        self, image, height=None, width=None, *, resize_mode="default", crops_coords=None
    ):
        """PIL image(s) / uint8 array(s) / float array(s) in [0, 1] -> (N, C, H, W) in [-1, 1]
        (or [0, 1] without normalize, {0, 1} with binarize); float32, or the float arrays'
        dtype."""
        images = _as_list(image, self.do_convert_grayscale)
        if isinstance(images[0], Image.Image):
            x = self._preprocess_pil(images, height, width, resize_mode, crops_coords)
        else:
            x = self._preprocess_array(images, height, width)
        do_normalize = self.do_normalize
        if do_normalize and x.min() < 0:
            warnings.warn(
                f"preprocess: image values reach {x.min()} < 0; expected [0, 1], so the image is "
                "taken as already in [-1, 1] and not normalized (as diffusers)",
                stacklevel=2,
            )
            do_normalize = False
        if do_normalize:
            x = normalize(x)
        if self.do_binarize:
            x = x.copy()
            x[x < 0.5] = 0
            x[x >= 0.5] = 1
        return x

    def _preprocess_pil(self, images, height, width, resize_mode, crops_coords):
        if crops_coords is not None:
            images = [im.crop(crops_coords) for im in images]
        if self.do_resize:
            h, w = self.default_height_width((images[0].height, images[0].width), height, width)
            images = [self.resize(im, h, w, resize_mode) for im in images]
        if self.do_convert_rgb:
            images = [im.convert("RGB") for im in images]
        elif self.do_convert_grayscale:
            images = [im.convert("L") for im in images]
        x = pil_to_numpy(images)  # (N, H, W[, C])
        if x.ndim == 3:
            x = x[..., None]  # (N, H, W, 1)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (N, C, H, W)

    def _preprocess_array(self, images, height, width):
        if images[0].ndim == 4:
            x = np.concatenate(images, axis=0)  # (N, H, W, C)
        else:
            x = np.stack(images, axis=0)  # (N, H, W[, C])
        if x.ndim == 3:
            x = x[..., None]  # (N, H, W, 1)
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (N, C, H, W)
        if self.do_resize:
            h, w = self.default_height_width(x.shape[2:], height, width)
            x = resize_nearest(x, (h, w))  # (N, C, h, w)
        return x

    def postprocess(self, image, output_type="pil", do_denormalize=None):
        """Decoded images (N, C, H, W) in [-1, 1] -> "pil": list of PIL images; "np": (N, H, W, C)
        float32 in [0, 1]; "pt": (N, C, H, W) in [0, 1]; "latent": unchanged."""
        if output_type not in ("latent", "pt", "np", "pil"):
            raise InputError(f"output_type={output_type!r}: expected 'pil', 'np', 'pt' or 'latent'")
        if output_type == "latent":
            return image
        x = to_numpy(image)
        if x.ndim != 4:
            raise InputError(f"postprocess(image): expected (N, C, H, W), got shape {x.shape}")
        if do_denormalize is None:
            x = denormalize(x) if self.do_normalize else x
        else:
            x = np.stack([denormalize(x[i]) if d else x[i] for i, d in enumerate(do_denormalize)])
        if output_type == "pt":
            return x
        x = x.transpose(0, 2, 3, 1).astype(np.float32)  # (N, H, W, C), as pt_to_numpy's .float()
        return x if output_type == "np" else numpy_to_pil(x)


def mask_processor(vae_scale_factor=8):
    """The inpainting mask processor of diffusers' inpaint pipeline: grayscale, resized like the
    image, not normalized, binarized at 0.5 -> (N, 1, H, W) in {0, 1}."""
    return ImageProcessor(
        vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )


def _as_list(image, grayscale):
    """Normalize the accepted inputs to a list of PIL images or of numpy arrays."""
    if not isinstance(image, list):
        if not isinstance(image, Image.Image):
            image = to_numpy(image)
            if grayscale and image.ndim == 3 and image.dtype != np.uint8:
                # (H, W, 1) -> (1, H, W, 1); (N, H, W) -> (N, H, W, 1), as diffusers
                image = image[None] if image.shape[-1] == 1 else image[..., None]
        image = [image]
    if not image:
        raise InputError("preprocess(image): empty list")
    out = []
    for im in image:
        if isinstance(im, Image.Image):
            out.append(im)
            continue
        a = to_numpy(im)
        if a.dtype == np.uint8:  # pixels in [0, 255]: the PIL path, one image at a time
            out.extend(_uint8_to_pil(a))
            continue
        if a.dtype.kind != "f" or a.ndim not in (2, 3, 4):
            raise InputError(
                f"preprocess(image): expected PIL images or arrays (H, W[, C]) / (N, H, W, C) of "
                f"uint8 or floats in [0, 1], got {a.dtype} array of shape {a.shape}"
            )
        out.append(a)
    if len({isinstance(im, Image.Image) for im in out}) > 1:
        raise InputError("preprocess(image): mixes PIL images / uint8 arrays with float arrays")
    return out


def _uint8_to_pil(a):
    if a.ndim == 4:
        return [im for x in a for im in _uint8_to_pil(x)]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]  # (H, W)
    if a.ndim not in (2, 3):
        raise InputError(f"preprocess(image): uint8 array of shape {a.shape}")
    return [Image.fromarray(np.ascontiguousarray(a))]


def _resize_and_fill(image, width, height, resample):
    """Fit inside (width, height) keeping the aspect ratio; fill the borders by stretching the
    image's edge rows / columns (diffusers' resize_mode="fill")."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=resample)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            bottom = (0, resized.height, width, resized.height)
            res.paste(resized.resize((width, fill), box=bottom), box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            right = (resized.width, 0, resized.width, height)
            res.paste(resized.resize((fill, height), box=right), box=(fill + src_w, 0))
    return res


def _resize_and_crop(image, width, height, resample):
    """Cover (width, height) keeping the aspect ratio, centered, cropping the excess."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=resample)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return res


# --------------------------------------------------------------------------- latents


# Linear map from SD1.x latents (scaled by 0.18215, as the UNet sees them) to RGB, fitted by the
# ComfyUI project for its fast previews (comfy/latent_formats.py, class SD15). Approximate.
SD15_LATENT_RGB = np.array(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)


def latents_to_rgb(latents, factors=SD15_LATENT_RGB):
    """A fast preview without the decoder: (N, 4, h, w) scaled latents -> (N, h, w, 3) uint8,
    rgb = latent @ factors mapped from [-1, 1] to [0, 255]."""
    z = to_numpy(latents).astype(np.float64)
    rgb = np.einsum("nchw,ck->nhwk", z, np.asarray(factors))  # (N, h, w, 3)
    return np.round((rgb + 1) / 2 * 255).clip(0, 255).astype(np.uint8)


def latents_to_rgba(latents):
    """The 4 latent channels shown as one RGBA image each, z * 127.5 + 127.5 clipped to
    [0, 255] (how the blog posts in the VAE tutorials save a latent). -> (N, h, w, 4) uint8."""
    z = to_numpy(latents).astype(np.float64)
    if z.ndim != 4 or z.shape[1] != 4:
        raise InputError(f"latents_to_rgba: expected (N, 4, h, w), got shape {z.shape}")
    return (z * 127.5 + 127.5).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def latent_channels_grid(latents, gap=1):
    """Each latent channel as a grayscale panel, min-max stretched to [0, 255] per channel,
    side by side with ``gap`` white pixels between: (N, C, h, w) -> (N, h, C w + (C-1) gap)."""
    z = to_numpy(latents).astype(np.float64)
    n, c, h, w = z.shape
    lo = z.min(axis=(2, 3), keepdims=True)
    span = z.max(axis=(2, 3), keepdims=True) - lo
    panels = np.round((z - lo) / np.where(span > 0, span, 1) * 255)  # (N, C, h, w)
    grid = np.full((n, h, c * w + (c - 1) * gap), 255, dtype=np.uint8)
    for i in range(c):
        grid[:, :, i * (w + gap) : i * (w + gap) + w] = panels[:, i]
    return grid
