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

SDXL ControlNets (addition_embed_type "text_time") get the UNet's ``added_cond_kwargs`` rows
(the pooled text embedding and the size / crop numbers), halved with the prompt rows in guess
mode, as diffusers' StableDiffusionXLControlNet pipelines. :func:`check_fit` refuses, when the
pipeline loads and again before a run, a ControlNet whose inputs or residuals do not fit the
pipeline's UNet (an SDXL ControlNet on an SD1.x pipeline, say).
"""

from __future__ import annotations

import math

from . import image as imageproc
from . import pipeline_control_union as union
from .config import is_number
from .errors import ConfigError, InputError


def load(controlnet, dtype, device, weights):
    """A ControlNetModel from a diffusers ControlNet folder or an original single-file
    .safetensors ControlNet (a loaded one is used as it is); a list of them: several."""
    from .controlnet import ControlNetModel

    if isinstance(controlnet, (list, tuple)):
        return [load(c, dtype, device, weights) for c in controlnet]
    if isinstance(controlnet, ControlNetModel):
        return controlnet
    return ControlNetModel.from_pretrained(controlnet, dtype=dtype, device=device, weights=weights)


#: diffusers' default ``controlnet_conditioning_scale`` by task: StableDiffusionControlNet-
#: {,Img2Img,Inpaint}Pipeline's (a pipeline class may set its own ``control_scales``)
SCALES = {"txt2img": 1.0, "img2img": 0.8, "inpaint": 0.5}


def default_scale(scale, image, mask_image, pipe=None):
    """``controlnet_conditioning_scale=None``: diffusers' default of the matching pipeline,
    from ``pipe.control_scales`` (else SCALES: 1.0 txt2img, 0.8 img2img, 0.5 inpainting)."""
    if scale is not None:
        return scale
    task = "txt2img" if image is None else "img2img" if mask_image is None else "inpaint"
    return getattr(pipe, "control_scales", SCALES)[task]


def nets(pipe) -> list:
    """The pipeline's ControlNets: [] / [one] / several (MultiControlNet: residuals summed)."""
    cn = getattr(pipe, "controlnet", None)
    return [] if cn is None else list(cn) if isinstance(cn, (list, tuple)) else [cn]


def per_net(value, n, name):
    """A scalar for every ControlNet, or one value per ControlNet (diffusers' broadcast)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise InputError(f"{name}: {len(values)} values for {n} ControlNets")
    return values


def images_per_net(control_image, n):
    """One control image entry per ControlNet: the image itself for one; for several, the
    list (a list of lists is per prompt, one image per ControlNet, transposed as diffusers)."""
    if n == 1:
        return [control_image]
    if not isinstance(control_image, (list, tuple)) or len(control_image) == 0:
        raise InputError(f"control_image: expected a list of {n} images, one per ControlNet")
    if isinstance(control_image[0], (list, tuple)):
        control_image = [list(t) for t in zip(*control_image)]
    if len(control_image) != n:
        raise InputError(f"control_image: {len(control_image)} images for {n} ControlNets")
    return list(control_image)


def first_image(pipe, control_image):
    """The image whose size sets the output size (the first ControlNet's; a union
    ControlNet's first image)."""
    models = nets(pipe)
    if control_image is None or not models:
        return control_image
    if len(models) == 1:
        many = union.is_union(models[0]) and isinstance(control_image, (list, tuple))
        return control_image[0] if many else control_image
    return images_per_net(control_image, len(nets(pipe)))[0]


#: cross_attention_dim -> the family whose text encoder(s) give contexts that wide
_FAMILIES = {768: "SD1.x", 1024: "SD2.x", 1280: "the SDXL refiner", 2048: "SDXL"}


def _skips(channels, layers):
    """(channels, level) of each UNet skip state: conv_in's, each resnet's, each downsampler's
    (one residual per state); ``layers``: resnets per down block."""
    out, n = [(channels[0], 0)], len(channels)
    for i in range(n):
        out += [(channels[i], i)] * layers[i]
        if i < n - 1:
            out.append((channels[i], i + 1))  # the downsampler halves the size
    return out


def _misfit(pipe, c):
    """Why ControlNet config ``c`` does not fit ``pipe`` (a sentence), or None."""
    u = pipe.unet.config
    width = u.cross_attention_dim[0]
    if c.cross_attention_dim != width:
        hint = ""
        if c.cross_attention_dim in _FAMILIES and width in _FAMILIES:
            hint = f" (a ControlNet for {_FAMILIES[c.cross_attention_dim]} on {_FAMILIES[width]})"
        return f"cross_attention_dim={c.cross_attention_dim}, the UNet's is {width}{hint}"
    for name in ("addition_embed_type", "addition_time_embed_dim"):
        if getattr(c, name) != getattr(u, name):
            return f"{name}={getattr(c, name)!r}, the UNet's is {getattr(u, name)!r}"
    if c.addition_embed_type and (
        c.projection_class_embeddings_input_dim != u.projection_class_embeddings_input_dim
    ):
        return (
            f"projection_class_embeddings_input_dim={c.projection_class_embeddings_input_dim} "
            f"(its time ids), the UNet's is {u.projection_class_embeddings_input_dim}"
        )
    if c.in_channels != pipe.vae.config.latent_channels:
        return f"in_channels={c.in_channels}, the latents have {pipe.vae.config.latent_channels}"
    mine = _skips(c.block_out_channels, (c.layers_per_block,) * len(c.block_out_channels))
    theirs = _skips(u.block_out_channels, u.layers_per_block)
    if mine != theirs:
        return (
            f"its residuals (channels {[ch for ch, _ in mine]}) do not match the UNet's skip "
            f"states ({[ch for ch, _ in theirs]})"
        )
    if c.cond_factor != pipe.vae_scale_factor:
        return (
            f"its control image is {c.cond_factor}x the latent size, the VAE's factor is "
            f"{pipe.vae_scale_factor}"
        )
    return None


def check_fit(pipe):
    """ConfigError naming the ControlNet (``controlnet``, ``controlnet[k]`` for several) whose
    context width, micro-conditioning, input channels, residual shapes or control image factor
    differ from what the pipeline's UNet and VAE give and take."""
    models = nets(pipe)
    for k, cn in enumerate(models):
        why = _misfit(pipe, cn.config)
        if why is not None:
            name = "controlnet" if len(models) == 1 else f"controlnet[{k}]"
            raise ConfigError(
                f"{name} ({cn.config.source}): does not fit this pipeline's UNet: {why}"
            )


def _plan(pipe, control_image, mode):
    """Union ControlNets: per ControlNet (its images, its modes) (pipeline_control_union.check);
    None for plain ControlNets."""
    models = nets(pipe)
    images = control_image if len(models) == 1 else images_per_net(control_image, len(models))
    return union.check(models, images, mode)


def check(pipe, control_image, scale, guess_mode, start, end, mode=None):
    """Refuse bad ControlNet arguments up front (InputError naming the argument), and a
    ControlNet that does not fit (ConfigError, :func:`check_fit`)."""
    if control_image is None:
        if mode is not None:
            raise InputError("control_mode: given without control_image")
        return
    n = len(nets(pipe))
    if n == 0:
        raise InputError(
            "control_image: this pipeline has no ControlNet; load one with "
            "StableDiffusion.from_pretrained(..., controlnet=FOLDER) or set pipe.controlnet"
        )
    check_fit(pipe)
    images_per_net(control_image, n)
    plan = _plan(pipe, control_image, mode)
    if plan is not None and n == 1:  # one union ControlNet: scales and windows per image
        count, values = len(plan[0][0]), union.per_image
    else:
        count, values = n, per_net
    for v in values(scale, count, "controlnet_conditioning_scale"):
        if not (is_number(v) and math.isfinite(v)):
            raise InputError(f"controlnet_conditioning_scale={scale!r}: expected finite numbers")
    if not isinstance(guess_mode, bool):
        raise InputError(f"guess_mode={guess_mode!r}: expected True or False")
    starts = values(start, count, "control_guidance_start")
    ends = values(end, count, "control_guidance_end")
    for s0, e0 in zip(starts, ends):
        if not (is_number(s0) and is_number(e0) and 0 <= s0 < e0 <= 1):
            raise InputError(
                f"control_guidance_start={start!r}, control_guidance_end={end!r}: expected "
                "0 <= start < end <= 1"
            )


def prepare(pipe, control_image, *, scale, guess_mode, start, end, batch, nipp, size, cfg,
            mode=None):  # fmt: skip
    """The per-run ControlNet state: for each ControlNet its preprocessed control image(s),
    batched as the latents (and doubled for CFG unless in guess mode), its scale and step
    window; guess mode (from the first ControlNet's global_pool_conditions too, as diffusers)."""
    if control_image is None:
        return None
    models = nets(pipe)
    n = len(models)
    guess = bool(guess_mode or models[0].config.global_pool_conditions)
    plan = _plan(pipe, control_image, mode)

    def batched(cn, image):
        img = _control_batch(pipe, image, size, batch, nipp)  # (B, 3, H, W) in [0, 1]
        img = pipe.xp.asarray(img).astype(cn.dtype)
        return pipe.xp.concatenate([img, img]) if cfg and not guess else img  # [uncond; text]

    for cn in models:
        cn.attention_chunk_size = pipe.unet.attention_chunk_size  # the pipeline's memory policy
    if plan is not None:
        units = union.units(pipe.xp, models, plan, batched, scale=scale, start=start, end=end)
        return {"units": units, "guess": guess}
    units = []
    scales = per_net(scale, n, "controlnet_conditioning_scale")
    windows = zip(
        per_net(start, n, "control_guidance_start"), per_net(end, n, "control_guidance_end")
    )
    for cn, image, s0, (a, b) in zip(models, images_per_net(control_image, n), scales, windows):
        img = batched(cn, image)
        units.append({"net": cn, "image": img, "scale": float(s0), "start": a, "end": b})
    return {"units": units, "guess": guess}


def _control_batch(pipe, image, size, batch, nipp):
    """diffusers' control_image_processor, then one image for the batch or one per prompt."""
    proc = imageproc.ImageProcessor(pipe.vae_scale_factor, do_normalize=False, do_convert_rgb=True)
    img = proc.preprocess(image, height=size[0], width=size[1])  # (n, 3, H, W) in [0, 1]
    prompts = batch // nipp
    if img.shape[0] == 1:
        return img.repeat(batch, axis=0)  # (B, 3, H, W)
    if img.shape[0] == prompts:
        return img.repeat(nipp, axis=0)  # each prompt's image for each of its images
    raise InputError(
        f"control_image: {img.shape[0]} images for {prompts} prompt(s); give one image, "
        "or one per prompt"
    )


def keep(i, n, start, end) -> float:
    """1.0 where step i of n lies in the [start, end] fraction of the run, else 0.0."""
    return 1.0 - float(i / n < start or (i + 1) / n > end)


def _run(u, x, t, ctx, i, n, guess, added):
    """One ControlNet's (down, mid) residuals at step i of n, or None (scale 0 there)."""
    if "modes" in u:
        return union.run(u, x, t, ctx, i, n, guess, added, keep)
    scale = u["scale"] * keep(i, n, u["start"], u["end"])
    if scale == 0:
        return None
    return u["net"](
        x, t, ctx, u["image"], conditioning_scale=scale, guess_mode=guess, added_cond_kwargs=added
    )


def _prompt_half(rows):
    """The second (prompt) half of a [negative; prompt] batch."""
    return rows[rows.shape[0] // 2 :]


def residuals(pipe, control, sched, x, x_in, t, i, n, ctx, cfg, added=None):
    """(down residuals, mid residual) for the UNet call at step i of n, summed over the
    ControlNets (diffusers' MultiControlNetModel), or (None, None).

    x: the latents (B, 4, h, w); x_in: the scaled UNet input (2B or B, 4, h, w), before an
    inpainting UNet's extra channels; ctx: the prompt embeddings (2B or B, 77, D); added:
    SDXL's added_cond_kwargs, rows as ctx (None for SD1.x / SD2.x)."""
    if control is None:
        return None, None
    guess_cfg = control["guess"] and cfg
    cx = sched.scale_model_input(x, t) if guess_cfg else x_in  # prompt half only
    cctx = _prompt_half(ctx) if guess_cfg else ctx
    if guess_cfg and added is not None:
        added = {k: _prompt_half(v) for k, v in added.items()}  # (B, P), (B, k)
    down, mid = None, None
    for u in control["units"]:
        out = _run(u, cx, t, cctx, i, n, control["guess"], added)
        if out is None:
            continue  # its residuals would be zeros: adding them changes nothing
        d, m = out
        down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
    if guess_cfg and down is not None:  # the unconditional half gets no control
        xp = pipe.xp
        down = [xp.concatenate([xp.zeros_like(d), d]) for d in down]
        mid = xp.concatenate([xp.zeros_like(mid), mid])
    return down, mid
