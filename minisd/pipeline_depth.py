"""Depth-conditioned image-to-image ("depth2img", Stability AI's stable-diffusion-2-depth), as
diffusers' StableDiffusionDepth2ImgPipeline runs it.

A depth UNet takes one extra input channel (latent channels + 1 = 5): the noisy latents z_t and
a depth map d of the image, resized to the latent grid and scaled to [-1, 1] per image:

    d' = bicubic(d, (H/8, W/8))                         (N, 1, h, w)
    d_hat = 2 (d' - min d') / (max d' - min d') - 1      per image

The rest is img2img (``strength`` cuts the schedule, z_t = add_noise(E(x), eps, t_start)), with
d_hat concatenated after the latents in every UNet row: x_in = [scale_model_input(z_t); d_hat].
The depth map keeps the image's layout while the prompt restyles it.

diffusers estimates d with a DPT-Hybrid network (MiDaS, Ranftl et al. 2021) when no depth map is
given. minisd has no depth estimator: pass ``depth_map`` (any relative depth or disparity map:
only its shape of values matters, since it is rescaled to [-1, 1]; larger = nearer, as MiDaS).
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .pipeline_steps import tile_to

#: Keys' cubic convolution parameter, as PyTorch's (and OpenCV's) bicubic interpolation.
CUBIC_A = -0.75


def is_depth_model(pipe) -> bool:
    """A depth2img UNet: the latents and one depth channel (5 input channels for SD2)."""
    return pipe.unet.config.in_channels == pipe.vae.config.latent_channels + 1


def check(pipe, a):
    """``depth_map`` is for depth UNets, which need it and an ``image``, and take no mask and no
    other image add-on (diffusers' depth2img pipeline has none). -> the depth map as checked
    float64 (N, H, W) (None for other UNets)."""
    depth_map = getattr(a, "depth_map", None)
    if not is_depth_model(pipe):
        if depth_map is not None:
            raise InputError(
                f"depth_map: only depth UNets (in_channels = latent channels + 1) take it; this "
                f"UNet has {pipe.unet.config.in_channels}"
            )
        return None
    if a.image is None:
        raise InputError("image: a depth UNet (depth2img) restyles an image; give `image`")
    if depth_map is None:
        raise InputError(
            "depth_map: a depth UNet needs a depth map of `image` (minisd has no depth "
            "estimator; compute one with a monocular depth model such as MiDaS/DPT and pass it "
            "as an array (H, W) or (N, H, W), or a grayscale image)"
        )
    refused = ("mask_image", "control_image", "adapter_image", "ip_adapter_image")
    refused += ("ip_adapter_image_embeds",)
    for name in refused:
        if getattr(a, name, None) is not None:
            raise InputError(f"{name}: not supported with a depth UNet (depth2img)")
    return as_array(depth_map)


def as_array(depth_map):
    """A depth map as float64 (N, H, W): an array (H, W), (N, H, W) or (N, 1, H, W), a PIL image
    (any single-channel mode: L, I;16, I, F), or a list of 2-D arrays / images of one size."""
    from PIL import Image

    items = depth_map if isinstance(depth_map, (list, tuple)) else [depth_map]
    if not items:
        raise InputError("depth_map: empty list")
    maps = []
    for item in items:
        if isinstance(item, Image.Image):
            if len(item.getbands()) != 1:
                raise InputError(f"depth_map: a {item.mode} image; give a single-channel one")
            item = np.asarray(item)
        if not (hasattr(item, "shape") and hasattr(item, "dtype")) or item.dtype.kind not in "uif":
            raise InputError(
                f"depth_map: expected a numeric array or a grayscale PIL image, got "
                f"{type(item).__name__}"
            )
        maps.append(np.asarray(item, dtype=np.float64))
    d = maps[0] if len(maps) == 1 else _stack(maps)
    if d.ndim == 4 and d.shape[1] == 1:
        d = d[:, 0]  # (N, H, W)
    if d.ndim == 2:
        d = d[None]  # (1, H, W)
    if d.ndim != 3 or 0 in d.shape:
        raise InputError(f"depth_map: shape {d.shape}; expected (H, W), (N, H, W) or (N, 1, H, W)")
    if not np.isfinite(d).all():
        raise InputError("depth_map: has NaN or infinite values")
    return d


def _stack(maps):
    if any(m.ndim != 2 for m in maps) or len({m.shape for m in maps}) != 1:
        raise InputError("depth_map: a list must hold 2-D maps of one size")
    return np.stack(maps)  # (N, H, W)


def conditioning(pipe, depth_map, shape, rows):
    """The depth channel for the UNet rows: (rows x B, 1, h, w) in the pipeline dtype, one map
    per latent (one for all, or one per prompt, repeated as diffusers repeats it)."""
    d = resize_bicubic(as_array(depth_map), shape[2:])  # (N, h, w)
    lo = d.min(axis=(1, 2), keepdims=True)
    hi = d.max(axis=(1, 2), keepdims=True)
    if (hi == lo).any():
        raise InputError("depth_map: constant (no depth differences), it cannot be scaled")
    d = 2.0 * (d - lo) / (hi - lo) - 1.0  # in [-1, 1]
    d = pipe.xp.asarray(d[:, None]).astype(pipe.dtype)  # (N, 1, h, w)
    d = tile_to(d, shape[0], "depth_map")  # (B, 1, h, w)
    return pipe.xp.concatenate([d] * rows) if rows > 1 else d  # (rows B, 1, h, w)


def resize_bicubic(x, size):
    """Bicubic resampling of (N, H, W) to (N, *size), exactly as PyTorch's
    ``interpolate(mode="bicubic", align_corners=False)`` (no antialiasing): separable cubic
    convolution (Keys 1981, a = -0.75) with edge pixels repeated."""
    wy = _cubic_weights(x.shape[1], size[0])  # (h, H)
    wx = _cubic_weights(x.shape[2], size[1])  # (w, W)
    return wy @ x @ wx.T  # (N, h, w)


def _cubic_weights(n_in, n_out):
    """The (n_out, n_in) matrix of one axis' bicubic resampling. Output pixel j samples the input
    at s = (j + 1/2) n_in / n_out - 1/2 from the four pixels floor(s) - 1 .. floor(s) + 2
    (clamped to the edge), weighted by the cubic kernel at their distances from s."""
    s = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5  # (n_out,)
    base = np.floor(s)
    t = s - base  # (n_out,) in [0, 1)
    dist = np.stack([t + 1, t, 1 - t, 2 - t], axis=1)  # (n_out, 4)
    taps = np.clip(base[:, None].astype(int) + np.arange(-1, 3), 0, n_in - 1)  # (n_out, 4)
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out)[:, None].repeat(4, 1), taps), _cubic(dist))
    return w


def _cubic(d, a=CUBIC_A):
    """Keys' cubic convolution kernel at distances 0 <= d < 2."""
    near = ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
    return np.where(d <= 1, near, far)
