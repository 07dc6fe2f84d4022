"""ControlNet in the sampling loop (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to
Text-to-Image Diffusion Models"), as diffusers' StableDiffusionControlNet(Img2Img / Inpaint)
pipelines run it.

At every step the ControlNet (minisd/controlnet.py: a copy of the UNet's encoder that also
sees the control image) turns the latents, the timestep, the prompt and the control image into
one residual per UNet skip state and one for the mid block; the UNet adds them:

    down, mid = controlnet(x_in, t, ctx, control, conditioning_scale = scale * keep_i)
    eps = unet(x_in, t, ctx, down_block_additional_residuals=down, mid_...=mid)

keep_i = 0 outside the fraction [control_guidance_start, control_guidance_end] of the steps
(diffusers: 1 - float(i / n < start or (i + 1) / n > end)); there the ControlNet is not run at
all (its residuals would be exact zeros). Guess mode (and ControlNets whose config sets
``global_pool_conditions``): the ControlNet sees only the prompt half of the CFG batch and the
unconditional half gets zero residuals; its residuals are scaled from 0.1 (shallowest) to 1
(mid block) in log space, inside the ControlNet.

The control image is preprocessed as diffusers' ``control_image_processor``: RGB, resized to
the output size, in [0, 1] (not normalized to [-1, 1]); one image is used for the whole batch,
else one per prompt, repeated for ``num_images_per_prompt``.
"""

from __future__ import annotations

import math

from . import image as imageproc
from .config import is_number
from .errors import InputError


def load(controlnet, dtype, device, weights):
    """A ControlNetModel from a diffusers ControlNet folder or an original single-file
    .safetensors ControlNet; a loaded one is used as it is."""
    from .controlnet import ControlNetModel

    if isinstance(controlnet, ControlNetModel):
        return controlnet
    return ControlNetModel.from_pretrained(controlnet, dtype=dtype, device=device, weights=weights)


def default_scale(scale, image, mask_image):
    """``controlnet_conditioning_scale=None``: diffusers' default of the matching pipeline,
    1.0 (txt2img), 0.8 (img2img), 0.5 (inpainting)."""
    if scale is not None:
        return scale
    return 1.0 if image is None else 0.8 if mask_image is None else 0.5


def check(pipe, control_image, scale, guess_mode, start, end):
    """Refuse bad ControlNet arguments up front (InputError naming the argument)."""
    if control_image is None:
        return
    if getattr(pipe, "controlnet", None) is None:
        raise InputError(
            "control_image: this pipeline has no ControlNet; load one with "
            "StableDiffusion.from_pretrained(..., controlnet=FOLDER) or set pipe.controlnet"
        )
    if not (is_number(scale) and math.isfinite(scale)):
        raise InputError(f"controlnet_conditioning_scale={scale!r}: expected a finite number")
    if not isinstance(guess_mode, bool):
        raise InputError(f"guess_mode={guess_mode!r}: expected True or False")
    ok = is_number(start) and is_number(end) and 0 <= start < end <= 1
    if not ok:
        raise InputError(
            f"control_guidance_start={start!r}, control_guidance_end={end!r}: expected "
            "0 <= start < end <= 1"
        )


def prepare(pipe, control_image, *, scale, guess_mode, start, end, batch, nipp, size, cfg):
    """The per-run ControlNet state: the preprocessed control image, batched as the latents
    (and doubled for CFG unless in guess mode), and the scale / guess mode / step window."""
    if control_image is None:
        return None
    cn = pipe.controlnet
    proc = imageproc.ImageProcessor(pipe.vae_scale_factor, do_normalize=False, do_convert_rgb=True)
    img = proc.preprocess(control_image, height=size[0], width=size[1])  # (n, 3, H, W) in [0, 1]
    prompts = batch // nipp
    if img.shape[0] == 1:
        img = img.repeat(batch, axis=0)  # (B, 3, H, W)
    elif img.shape[0] == prompts:
        img = img.repeat(nipp, axis=0)  # each prompt's image for each of its images
    else:
        raise InputError(
            f"control_image: {img.shape[0]} images for {prompts} prompt(s); give one image, "
            "or one per prompt"
        )
    cn.attention_chunk_size = pipe.unet.attention_chunk_size  # the pipeline's memory policy
    guess = bool(guess_mode or cn.config.global_pool_conditions)
    xp = pipe.xp
    img = xp.asarray(img).astype(cn.dtype)
    if cfg and not guess:
        img = xp.concatenate([img, img])  # (2B, 3, H, W): [uncond; text]
    return {"image": img, "scale": float(scale), "guess": guess, "start": start, "end": end}


def keep(i, n, start, end) -> float:
    """1.0 where step i of n lies in the [start, end] fraction of the run, else 0.0."""
    return 1.0 - float(i / n < start or (i + 1) / n > end)


def residuals(pipe, control, sched, x, x_in, t, i, n, ctx, cfg):
    """(down residuals, mid residual) for the UNet call at step i of n, or (None, None).

    x: the latents (B, 4, h, w); x_in: the scaled UNet input (2B or B, 4, h, w), before an
    inpainting UNet's extra channels; ctx: the prompt embeddings (2B or B, 77, D)."""
    if control is None:
        return None, None
    scale = control["scale"] * keep(i, n, control["start"], control["end"])
    if scale == 0:
        return None, None  # the residuals would be zeros: adding them changes nothing
    guess_cfg = control["guess"] and cfg
    cx = sched.scale_model_input(x, t) if guess_cfg else x_in  # prompt half only
    cctx = ctx[ctx.shape[0] // 2 :] if guess_cfg else ctx
    down, mid = pipe.controlnet(
        cx, t, cctx, control["image"], conditioning_scale=scale, guess_mode=control["guess"]
    )
    if guess_cfg:  # the unconditional half gets no control
        xp = pipe.xp
        down = [xp.concatenate([xp.zeros_like(d), d]) for d in down]
        mid = xp.concatenate([xp.zeros_like(mid), mid])
    return down, mid
