"""The steps of a Stable Diffusion run, as plain functions over the pipeline's components.

Rombach et al. 2022 (latent diffusion) with classifier-free guidance (Ho & Salimans 2022):
    eps = eps_uncond + s * (eps_text - eps_uncond)
The order of random draws is diffusers': initial latents; img2img: the VAE posterior sample, then
the forward-process noise; inpainting: see denoise.py; then one draw per stochastic step.
"""

from __future__ import annotations

import numpy as np

from .backend import array_module
from .config import is_int, is_number
from .errors import InputError
from .schedulers import NAMES

SCHEDULERS = tuple(NAMES)  # the names the pipeline and the CLI take
OUTPUT_TYPES = ("pil", "np", "latent")


def as_prompt_list(prompt, name="prompt"):
    """A str or a list of str -> list of str; an empty list is an error."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        if not prompt:
            raise InputError(f"{name}: empty prompt list")
        return list(prompt)
    raise InputError(f"{name}: expected a string or a list of strings, got {type(prompt).__name__}")


def validate(
    *,
    prompts,
    negative,
    height,
    width,
    steps,
    guidance_scale,
    strength,
    image,
    mask_image,
    scheduler,
    output_type,
    num_images_per_prompt,
    eta=0.0,
    clip_skip=None,
    callback=None,
    guidance_rescale=0.0,
    image_hw=None,
):
    """Check every argument up front, before any heavy work; raise InputError naming it.
    ``image_hw``: the (height, width) in pixels that ``image`` stands for, when it is latents
    (SDXL, :func:`pixel_size`); None: its own size."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, (int, np.integer)) or v <= 0 or v % 8:
            raise InputError(f"{name}={v!r}: must be a positive multiple of 8")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InputError(f"num_inference_steps={steps!r}: must be an integer >= 1")
    g = guidance_scale  # a NaN would pass `g < 0` and give a NaN image
    if not is_number(g) or g < 0:
        raise InputError(f"guidance_scale={guidance_scale!r}: must be a finite number >= 0")
    if image is not None and not (is_number(strength) and 0 < strength <= 1):
        raise InputError(f"strength={strength!r}: must be a number in (0, 1]")
    n = num_images_per_prompt
    if not (is_int(n) and n >= 1):
        raise InputError(f"num_images_per_prompt={n!r}: must be an integer >= 1")
    if not (is_number(eta) and eta >= 0):  # DDIM's and DDPM's noise weight; NaN gives NaN images
        raise InputError(f"eta={eta!r}: must be a finite number >= 0")
    if scheduler == "tcd" and eta > 1:  # TCD's gamma: the share of the step that is re-noised
        raise InputError(f"eta={eta!r}: TCD's gamma must lie in [0, 1]")
    if not (is_number(guidance_rescale) and 0 <= guidance_rescale <= 1):
        raise InputError(f"guidance_rescale={guidance_rescale!r}: must be a number in [0, 1]")
    if clip_skip is not None and (not isinstance(clip_skip, (int, np.integer)) or clip_skip < 0):
        raise InputError(f"clip_skip={clip_skip!r}: must be None or an integer >= 0")
    if callback is not None and not callable(callback):
        raise InputError(f"callback={callback!r}: must be callable as callback(step, t, latents)")
    if negative is not None and len(negative) != len(prompts):
        raise InputError(
            f"negative_prompt: {len(negative)} negative prompt(s) for {len(prompts)} prompt(s); "
            "give one string (used for every prompt) or one per prompt"
        )
    if mask_image is not None and image is None:
        raise InputError("mask_image: inpainting needs `image` too")
    hw = image_size(image) if mask_image is not None and image_hw is None else image_hw
    if mask_image is not None and image_size(mask_image, "mask_image") != hw:
        raise InputError(
            f"mask_image: size {image_size(mask_image, 'mask_image')} differs from image size "
            f"{hw} (height, width); give a mask of the image's size"
        )
    if scheduler not in SCHEDULERS:
        raise InputError(f"scheduler={scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type={output_type!r}: expected one of {OUTPUT_TYPES}")


def image_size(img, name="image"):
    """(height, width) of a PIL image, an HWC / NHWC array or an NCHW array in [-1, 1], or of the
    first of a list of them; anything else is an InputError naming the argument."""
    from PIL import Image

    if isinstance(img, Image.Image):
        return img.size[::-1]
    if isinstance(img, (list, tuple)):
        if not img:
            raise InputError(f"{name}: empty list")
        return image_size(img[0], name)
    a = img
    if not (hasattr(a, "shape") and hasattr(a, "dtype") and 2 <= a.ndim <= 4):
        raise InputError(
            f"{name}: expected a PIL image, an array (H, W[, C]), (N, H, W, C) or (N, C, H, W), "
            f"or a list of them; got {type(img).__name__}"
            + (f" of shape {tuple(a.shape)}" if hasattr(a, "shape") else "")
        )
    if a.dtype.kind not in "uif":
        raise InputError(f"{name}: expected a uint8 or float array, got {a.dtype}")
    if a.ndim == 4 and a.shape[1] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        return a.shape[2], a.shape[3]
    return (a.shape[1], a.shape[2]) if a.ndim == 4 else (a.shape[0], a.shape[1])


def pixel_size(pipe, image):
    """(height, width) in pixels of ``image``; latents (SDXL's img2img and inpainting take them)
    stand for vae_scale_factor pixels each."""
    if is_latents(pipe, image):
        f = pipe.vae_scale_factor
        return image.shape[2] * f, image.shape[3] * f
    return image_size(image)


def check_inpaint(pipe, image, mask_image):
    """An inpainting UNet (9 input channels: latents, mask, masked-image latents, as diffusers'
    inpainting pipelines build them) needs a mask, and pixels to mask: latents given as
    ``image`` (SDXL) can only be blended (4-channel UNets)."""
    if pipe.unet.config.in_channels != 9:
        return
    if mask_image is None:
        raise InputError(
            "mask_image: this UNet is an inpainting UNet (9 input channels); give `image` and "
            "`mask_image`"
        )
    if is_latents(pipe, image):
        raise InputError(
            "image: latents cannot be masked for a 9-channel inpainting UNet (it takes the "
            "masked image's latents); give the image itself"
        )


def encode_prompt(pipe, prompts, negative, nipp, cfg, clip_skip):
    """Text -> conditioning (2N*nipp, 77, D) for CFG as [negative; positive], else (N*nipp, ...).

    As diffusers: ``clip_skip`` applies to the positive prompts only; each embedding is repeated
    ``num_images_per_prompt`` times in place (prompt 0, prompt 0, prompt 1, ...).
    """
    xp = pipe.xp
    ids = pipe.tokenizer(prompts)  # (N, 77)
    emb = pipe.text_encoder.encode(xp.asarray(ids), clip_skip=clip_skip)  # (N, 77, D)
    emb = xp.repeat(emb, nipp, axis=0)  # (N*nipp, 77, D)
    if not cfg:
        return emb
    neg = [""] * len(prompts) if negative is None else negative
    nids = pipe.tokenizer(neg)  # (N, 77)
    nemb = pipe.text_encoder.encode(xp.asarray(nids), clip_skip=None)  # (N, 77, D)
    nemb = xp.repeat(nemb, nipp, axis=0)  # (N*nipp, 77, D)
    return xp.concatenate([nemb, emb], axis=0)  # (2*N*nipp, 77, D)


def draw(pipe, rng, shape):
    """One standard-normal tensor in the model dtype, drawn on the CPU, moved to the device."""
    return pipe.xp.asarray(rng.standard_normal(tuple(shape), dtype=pipe.dtype))


def img2img_timesteps(timesteps, order, steps, strength):
    """diffusers' get_timesteps: skip the first (1 - strength) of the schedule."""
    init = min(int(steps * strength), steps)
    start = max(steps - init, 0)
    return timesteps[start * order :], start * order, steps - start


def is_latents(pipe, image):
    """SDXL's img2img takes latents for ``image`` (an array (N, latent_channels, h, w), e.g. a
    base model's output_type="latent"), as diffusers' image processor passes them through."""
    if not getattr(pipe, "takes_latent_images", False):
        return False
    shape = getattr(image, "shape", ())
    return len(shape) == 4 and shape[1] == pipe.vae.config.latent_channels


def _cutoff(sched, fraction):
    """The timestep where a fraction ``fraction`` of the training schedule has been denoised."""
    n = sched.config.num_train_timesteps
    return int(round(n - fraction * n))


def cut_end(timesteps, sched, fraction):
    """SDXL's ``denoising_end``: keep the timesteps >= the cutoff (diffusers' rule)."""
    keep = int((np.asarray(timesteps) >= _cutoff(sched, fraction)).sum())
    return timesteps[:keep]


def cut_start(sched, state, fraction):
    """SDXL's ``denoising_start``: begin at the first timestep below the cutoff; a second-order
    scheduler with an even count takes one more, so that it starts on a full step (diffusers'
    ``get_timesteps``)."""
    ts = sched.timesteps
    n = int((np.asarray(ts) < _cutoff(sched, fraction)).sum())
    if getattr(sched, "order", 1) == 2 and n % 2 == 0:
        n += 1
    begin = len(ts) - n
    if n == 0:
        raise InputError(f"denoising_start={fraction}: leaves no denoising step")
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(begin)
    state["timesteps"] = ts[begin:]
    state["solver_steps"] = n
    return state["timesteps"]


def tile_to(x, batch, what):
    """Repeat a batch of images/latents to ``batch`` items (diffusers concatenates copies)."""
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise InputError(f"{what}: {x.shape[0]} item(s) do not divide the batch of {batch}")
    return pipe_concat([x] * (batch // x.shape[0]))


def pipe_concat(items):
    return array_module(items[0]).concatenate(items, axis=0)


def guide(eps, cfg, scale, rescale=0.0):
    """Classifier-free guidance: split [uncond; text] and extrapolate; then, when ``rescale``
    > 0, :func:`rescale_guidance`."""
    if not cfg:
        return eps
    n = eps.shape[0] // 2
    uncond, text = eps[:n], eps[n:]
    guided = uncond + scale * (text - uncond)
    return rescale_guidance(guided, text, rescale) if rescale > 0 else guided


def rescale_guidance(guided, text, phi):
    """Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", sec. 3.4, eqs. 15-16): CFG inflates the prediction's spread, which
    over-exposes images of zero-terminal-SNR models; bring it back to the text prediction's,

        x_rescaled = x_cfg * std(x_text) / std(x_cfg),   x = phi x_rescaled + (1 - phi) x_cfg,

    std over each sample's (C, H, W) with Bessel's correction (torch.std's default), as
    diffusers' ``rescale_noise_cfg``. guided, text (B, C, h, w)."""
    xp = array_module(guided)
    axes = tuple(range(1, guided.ndim))
    std_text = xp.sqrt(text.var(axis=axes, keepdims=True, ddof=1))  # (B, 1, 1, 1)
    std_cfg = xp.sqrt(guided.var(axis=axes, keepdims=True, ddof=1))  # (B, 1, 1, 1)
    rescaled = guided * (std_text / std_cfg)
    return phi * rescaled + (1 - phi) * guided


def guidance_scale_embedding(w, dim):
    """Guidance weights (B,) -> (B, dim) float32: the sinusoidal embedding that LCM-distilled
    UNets take as ``timestep_cond`` in place of classifier-free guidance (Luo et al. 2023, eq. 9
    distils guided eps into one call; the embedding is VDM's, Kingma et al. 2021, of 1000 w).

    As diffusers' ``get_guidance_scale_embedding``, in float32: freq_k = exp(-k log(1e4) /
    (half - 1)), emb = [sin(1000 w freq), cos(1000 w freq)], zero-padded to an odd ``dim``;
    exp, sin and cos correctly rounded (see ops.timestep_embedding on torch's 1-ulp misses).
    """
    if not (is_int(dim) and dim >= 4):
        raise InputError(f"time_cond_proj_dim={dim!r}: the guidance embedding needs >= 4")
    w = np.asarray(w, np.float32).reshape(-1) * np.float32(1000.0)  # (B,)
    half = dim // 2
    step = np.float32(np.log(np.float64(10000.0))) / np.float32(half - 1)
    freqs = np.exp((np.arange(half, dtype=np.float32) * -step).astype(np.float64))  # (half,)
    args = w[:, None] * freqs.astype(np.float32)[None, :]  # (B, half) float32
    a64 = args.astype(np.float64)
    emb = np.concatenate([np.sin(a64), np.cos(a64)], axis=1).astype(np.float32)
    return np.pad(emb, ((0, 0), (0, dim % 2)))  # (B, dim)
