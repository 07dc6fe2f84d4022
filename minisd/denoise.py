"""The denoising run behind StableDiffusion.__call__: prepare latents, then the sampling loop.

Each branch mirrors the matching diffusers pipeline, including where it draws random numbers:
- txt2img: latents ~ N(0, I) * init_noise_sigma                        (1 draw)
- img2img: z0 = VAE posterior sample (draw 1); z_t = add_noise(z0, eps, t_start) (draw 2)
- inpaint: image latents (draw 1, when needed), noise (draw 2), masked-image latents (draw 3)
then one draw per step for stochastic samplers (DDPM, DDIM with eta > 0, Euler ancestral).
"""

from __future__ import annotations

import inspect

import numpy as np
from tqdm.auto import tqdm

from . import pipeline_pix2pix as pix2pix
from .blocks import upsample_nearest
from .pipeline_call import unet_rows
from .pipeline_control import residuals as control_residuals
from .pipeline_depth import conditioning as depth_channel
from .pipeline_steps import (
    cut_end,
    cut_start,
    draw,
    guidance_scale_embedding,
    guide,
    img2img_timesteps,
    is_latents,
    tile_to,
)


def run(
    pipe,
    *,
    prompts,
    negative,
    steps,
    guidance_scale,
    height,
    width,
    scheduler,
    nipp,
    latents,
    image,
    strength,
    mask_image,
    clip_skip,
    eta,
    callback,
    rng,
    progress,
    addons=None,
    guidance_rescale=0.0,
):
    """``addons``: the add-ons' conditioning (pipeline_call.py), or None for none."""
    addons = {} if addons is None else addons
    edit = addons.get("image_guidance_scale")  # InstructPix2Pix's s_I, else None
    n_rows = unet_rows(pipe, guidance_scale, edit)
    cfg = n_rows > 1
    # (2B or B, 77, D) and SDXL's pooled text embeddings and time ids (None for SD1.x / 2.x)
    ctx, added = pipe.text_conditioning(prompts, negative, nipp, cfg, clip_skip, addons.get("text"))
    pipe.phase_done("text encoding")  # frees CuPy's cached blocks when asked (GPU policy)
    sched = pipe.make_scheduler(scheduler)
    sched.set_timesteps(steps)
    f = pipe.vae_scale_factor
    batch = len(prompts) * nipp
    shape = (batch, pipe.vae.config.latent_channels, height // f, width // f)
    state = {"timesteps": sched.timesteps, "solver_steps": steps, "rows": n_rows}
    if image is None:
        lat = initial_latents(pipe, sched, shape, latents, rng)
    elif edit is not None:  # InstructPix2Pix: from pure noise, the image as extra channels
        lat = initial_latents(pipe, sched, shape, latents, rng)
        ctx, state["edit"] = pix2pix.conditioning(pipe, image, shape, ctx, n_rows)
    elif mask_image is None:
        start = addons.get("denoising_start")
        lat = _img2img_latents(pipe, sched, state, shape, image, steps, strength, rng, start)
    else:
        lat = _inpaint_latents(
            pipe, sched, state, shape, image, mask_image, steps, strength, latents, rng, cfg,
            addons.get("denoising_start"),
        )  # fmt: skip
    if addons.get("depth_map") is not None:  # depth2img: the depth channel of every row
        state["depth"] = depth_channel(pipe, addons["depth_map"], shape, n_rows)
    # ControlNet step windows are fractions of this run's steps before a denoising_end cut
    # (diffusers' StableDiffusionXLControlNet{,Inpaint}Pipeline)
    state["control_steps"] = len(state["timesteps"])
    if addons.get("denoising_end") is not None:  # SDXL's ensemble of experts: stop early
        state["timesteps"] = cut_end(state["timesteps"], sched, addons["denoising_end"])
    state["timestep_cond"] = _timestep_cond(pipe, guidance_scale, batch)
    state["added"] = added
    state.update(
        control=addons.get("control"),
        adapter=addons.get("adapter"),
        image_embeds=addons.get("image_embeds"),
        scales=(guidance_scale, edit, guidance_rescale),
    )
    return _loop(pipe, sched, state, lat, ctx, eta, rng, callback, progress)


def _timestep_cond(pipe, guidance_scale, batch):
    """LCM-distilled UNets: the embedding of w = guidance_scale - 1, one row per latent."""
    dim = pipe.unet.config.time_cond_proj_dim
    if dim is None:
        return None
    w = np.full((batch,), guidance_scale - 1, dtype=np.float32)  # (B,)
    return pipe.xp.asarray(guidance_scale_embedding(w, dim)).astype(pipe.dtype)  # (B, dim)


def initial_latents(pipe, sched, shape, latents, rng):
    """Latents ~ N(0, I) (or the given ones, shape-checked) scaled by init_noise_sigma.
    (B, C, h, w)"""
    if latents is None:
        lat = draw(pipe, rng, shape)  # (B, 4, h, w)
    else:
        lat = pipe.xp.asarray(latents).astype(pipe.dtype)
        if tuple(lat.shape) != shape:
            from .errors import InputError

            raise InputError(f"latents: shape {tuple(lat.shape)}, expected {shape}")
    return lat * sched.init_noise_sigma


def _start(sched, state, steps, strength):
    """Cut the schedule for strength < 1 and tell the scheduler where it begins."""
    order = getattr(sched, "order", 1)
    ts, begin, state["solver_steps"] = img2img_timesteps(state["timesteps"], order, steps, strength)
    if len(ts) == 0:
        from .errors import InputError

        raise InputError(f"strength={strength}: leaves no denoising step of {steps}")
    if hasattr(sched, "base_timesteps"):  # CompVis PLMS begins at a base step and re-lists
        sched.set_begin_index(begin // order)  # its model calls (two for its first step)
        ts = sched.timesteps
    elif hasattr(sched, "set_begin_index"):
        sched.set_begin_index(begin)
    state["timesteps"] = ts
    return ts


def _img2img_latents(pipe, sched, state, shape, image, steps, strength, rng, start=None):
    """z_t from the image's latents (the image itself when it is latents, SDXL); with SDXL's
    ``denoising_start`` the schedule begins there and the latents are taken as they are (the
    base model's partly denoised output: no noise is added)."""
    xp = pipe.xp
    ts = _start(sched, state, steps, strength) if start is None else cut_start(sched, state, start)
    if is_latents(pipe, image):
        z0 = xp.asarray(image).astype(pipe.dtype)  # (n, 4, h, w)
    else:
        hw = (shape[2] * pipe.vae_scale_factor, shape[3] * pipe.vae_scale_factor)
        init = xp.asarray(pipe.image_processor.preprocess(image, height=hw[0], width=hw[1]))
        z0 = pipe.encode_image(init.astype(pipe.dtype), rng)  # (n, 4, h, w)  draw 1
    z0 = tile_to(z0, shape[0], "image")  # (B, 4, h, w)
    if start is not None:
        return z0
    noise = draw(pipe, rng, shape)  # draw 2
    t0 = np.asarray([ts[0]] * shape[0])  # host timesteps: add_noise indexes host tables
    return sched.add_noise(z0, noise, t0)  # (B, 4, h, w)


def _inpaint_latents(
    pipe, sched, state, shape, image, mask_image, steps, strength, latents, rng, cfg, start=None
):
    """diffusers' StableDiffusion{,XL}InpaintPipeline: 9-channel UNets get [z, mask, masked-image
    latents] as input; 4-channel UNets keep the unmasked region by re-noising the image latents
    to the next timestep after every step and blending with the mask. SDXL: ``image`` may be
    latents (then there is no masked image to encode: 4-channel UNets only, see
    pipeline_steps.check_inpaint), and ``denoising_start`` begins the schedule there."""
    xp, dt, f = pipe.xp, pipe.dtype, pipe.vae_scale_factor
    ts = _start(sched, state, steps, strength) if start is None else cut_start(sched, state, start)
    hw = (shape[2] * f, shape[3] * f)
    mask_c = xp.asarray(pipe.mask_processor.preprocess(mask_image, height=hw[0], width=hw[1]))
    init = None
    if not is_latents(pipe, image):
        init = xp.asarray(pipe.image_processor.preprocess(image, height=hw[0], width=hw[1]))
        init = init.astype(dt)  # (n, 3, H, W)
    nine = pipe.unet.config.in_channels == 9
    z_img = None
    if init is None:
        z_img = tile_to(xp.asarray(image).astype(dt), shape[0], "image")  # (B, 4, h, w)
    elif not nine or start is not None or (latents is None and strength != 1.0):
        z_img = tile_to(pipe.encode_inpaint_image(init, rng), shape[0], "image")  # draw 1
    lat, noise = _inpaint_noise(pipe, sched, shape, z_img, ts[0], strength, latents, rng, start)
    mask = upsample_nearest(mask_c.astype(dt), shape[2:])  # (n, 1, h, w)
    mask = tile_to(mask, shape[0], "mask_image")  # (B, 1, h, w)
    state.update(nine=nine, mask=mask, z_img=z_img, noise=noise)
    if init is not None:  # (encoded for 4-channel UNets too, as diffusers: the draw counts)
        z_masked = pipe.encode_inpaint_image(init * (mask_c < 0.5), rng)  # draw 3
        z_masked = tile_to(z_masked, shape[0], "image")  # (B, 4, h, w)
        rows = 2 if cfg else 1
        state["cond"] = (xp.concatenate([mask] * rows), xp.concatenate([z_masked] * rows))
    return lat


def _inpaint_noise(pipe, sched, shape, z_img, t0, strength, latents, rng, start):
    """(initial latents, the noise the blending re-noises the image latents with), as diffusers'
    ``prepare_latents``: pure noise at strength 1, else the image latents noised to the first
    timestep; given ``latents`` are that noise; SDXL's ``denoising_start`` continues from the
    image latents as they are (diffusers then draws the noise, and ignores given latents)."""
    if start is not None:
        return z_img, draw(pipe, rng, shape)  # draw 2
    if latents is not None:
        noise = pipe.xp.asarray(latents).astype(pipe.dtype)
        if tuple(noise.shape) != shape:
            from .errors import InputError

            raise InputError(f"latents: shape {tuple(noise.shape)}, expected {shape}")
        return noise * sched.init_noise_sigma, noise
    noise = draw(pipe, rng, shape)  # draw 2
    if strength == 1.0:
        return noise * sched.init_noise_sigma, noise
    return sched.add_noise(z_img, noise, np.asarray([t0] * shape[0])), noise


def _step_kwargs(sched, eta, rng):
    params = inspect.signature(sched.step).parameters
    kw = {}
    if "eta" in params:
        kw["eta"] = eta
    if "rng" in params:
        kw["rng"] = rng
    return kw


def _loop(pipe, sched, state, lat, ctx, eta, rng, callback, progress):
    xp = pipe.xp
    ts = state["timesteps"]
    kw = _step_kwargs(sched, eta, rng)
    rows, (scale, edit, rescale) = state["rows"], state["scales"]

    def model(x, t, i):
        """Guided eps (or v) prediction for latents x at timestep t (step i)."""
        x_in = xp.concatenate([x] * rows) if rows > 1 else x  # (rows B, 4, h, w)
        x_in = sched.scale_model_input(x_in, t)
        # ControlNet: one residual per skip state and one for the mid block (or None)
        down, mid = control_residuals(
            pipe, state["control"], sched, x, x_in, t, i, state["control_steps"], ctx,
            rows > 1, state["added"],
        )  # fmt: skip
        if state.get("nine"):
            x_in = xp.concatenate([x_in, *state["cond"]], axis=1)  # (2B, 9, h, w)
        if "edit" in state:
            x_in = xp.concatenate([x_in, state["edit"]], axis=1)  # (rows B, 8, h, w)
        if "depth" in state:
            x_in = xp.concatenate([x_in, state["depth"]], axis=1)  # (rows B, 5, h, w)
        eps = pipe.unet(x_in, t, ctx, down, mid, **_unet_extras(state, i, len(ts)))
        if edit is not None:
            return pix2pix.guide(eps, rows, scale, edit)  # (B, 4, h, w)
        return guide(eps, rows > 1, scale, rescale)  # (B, 4, h, w)

    # diffusers' legacy callback: once per solver step, after its last model call (Heun makes
    # two per step; PNDM's warm-up calls and PLMS's extra first call report nothing), numbered
    # model call // order
    order = getattr(sched, "order", 1)
    warmup = len(ts) - state["solver_steps"] * order
    for i, t in enumerate(tqdm(ts, desc="denoising", disable=not progress, leave=False)):
        lat = sched.step(model(lat, t, i), t, lat, **kw).prev_sample
        if "nine" in state and not state["nine"]:
            lat = _blend(sched, state, lat, ts, i)
        solver_step_done = i == len(ts) - 1 or (i + 1 > warmup and (i + 1) % order == 0)
        if callback is not None and solver_step_done:
            callback(i // order, t, lat)
    return lat


def _unet_extras(state, i, n):
    """The UNet's keyword inputs beyond ControlNet's: LCM's guidance embedding, SDXL's pooled
    text embeddings and time ids, T2I-Adapter features (while the step is inside
    adapter_conditioning_factor), IP-Adapter embeddings."""
    kw = {"timestep_cond": state["timestep_cond"]}
    if state.get("added") is not None:  # SDXL's micro-conditioning (minisd/micro_cond.py)
        kw["added_cond_kwargs"] = state["added"]
    if state["adapter"] is not None:
        from .pipeline_adapter import residuals

        kw["down_intrablock_additional_residuals"] = residuals(state["adapter"], i, n)
    if state["image_embeds"] is not None:
        kw["image_embeds"] = state["image_embeds"]
    return kw


def _blend(sched, state, lat, ts, i):
    """Keep the known region: image latents noised to the next timestep outside the mask."""
    keep = state["z_img"]
    if i < len(ts) - 1:
        # host timesteps: a device array would be copied back (a GPU sync) to index the tables
        keep = sched.add_noise(keep, state["noise"], np.asarray([ts[i + 1]]))
    mask = state["mask"]
    return (1 - mask) * keep + mask * lat
