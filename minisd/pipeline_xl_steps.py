"""The steps of StableDiffusionXL (pipeline_xl.py) that differ from SD's: prompt encoding with
two text encoders, the micro-conditioning time ids, the VAE's latent statistics, and the
defaults of image-to-image and inpainting.

Prompt encoding, as diffusers' ``StableDiffusionXLPipeline.encode_prompt``:
    E1 = text_encoder(prompt).hidden_states[-(k + 2)]              (N, 77, 768)   k = clip_skip
    E2, pooled = text_encoder_2(prompt_2): hidden_states[-(k + 2)], text_embeds  (N, 77, 1280)
    context = [E1 ; E2]                                            (N, 77, 2048)
The negative rows use no clip_skip; they are zeros when no negative prompt is given and the
checkpoint says ``force_zeros_for_empty_prompt``. A folder without the first encoder (the
refiner) encodes ``prompt`` (not ``prompt_2``) with the second, as diffusers does.
"""

from __future__ import annotations

import numpy as np

from . import pipeline_steps as steps
from .config import is_number
from .errors import ConfigError, InputError


def prompt_list(value, prompts, name):
    """``prompt_2`` / ``negative_prompt_2`` as one string per prompt; None or "": ``prompts``
    (diffusers' ``prompt_2 or prompt``)."""
    if not value:
        return prompts
    texts = steps.as_prompt_list(value, name)
    if isinstance(value, str):
        texts = texts * len(prompts)
    if prompts is not None and len(texts) != len(prompts):
        raise InputError(f"{name}: {len(texts)} prompt(s) for {len(prompts)} prompt(s)")
    return texts


def _pair(value, name):
    if value is None:
        return None
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    if not ok or not all(is_number(v) for v in value):
        raise InputError(f"{name}={value!r}: expected a (height, width) / (top, left) pair")
    return tuple(value)


def time_ids(pipe, a, height, width):
    """(positive, negative) micro-conditioning numbers: SDXL base's six (original_size, crop,
    target_size), the refiner's five (original_size, crop, aesthetic score). Defaults and
    negative rows as diffusers: in txt2img the negative row copies the positive one unless both
    negative sizes are given; in img2img each negative size defaults to the positive one and the
    base's negative row takes the positive crop."""
    size = (height, width)
    orig = _pair(a.original_size, "original_size") or size
    target = _pair(a.target_size, "target_size") or size
    crop = _pair(a.crops_coords_top_left, "crops_coords_top_left")
    neg_crop = _pair(a.negative_crops_coords_top_left, "negative_crops_coords_top_left")
    neg_orig = _pair(a.negative_original_size, "negative_original_size")
    neg_target = _pair(a.negative_target_size, "negative_target_size")
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        if not is_number(getattr(a, name)):
            raise InputError(f"{name}={getattr(a, name)!r}: must be a finite number")
    if pipe.requires_aesthetics_score:
        pos = orig + crop + (a.aesthetic_score,)
        neg = (neg_orig or orig) + neg_crop + (a.negative_aesthetic_score,)
    elif a.image is None:
        both = neg_orig is not None and neg_target is not None
        pos = orig + crop + target
        neg = neg_orig + neg_crop + neg_target if both else pos
    else:
        pos = orig + crop + target
        neg = (neg_orig or orig) + crop + (neg_target or target)
    _check_width(pipe, len(pos))
    return pos, neg


def _check_width(pipe, n_ids):
    """The UNet's add_embedding input = pooled width + n_ids sinusoids (diffusers'
    ``_get_add_time_ids`` check), with a hint at requires_aesthetics_score when one is off."""
    cfg = pipe.unet.config
    got = cfg.addition_time_embed_dim * n_ids + pipe.text_encoder_2.config.projection_dim
    want = cfg.projection_class_embeddings_input_dim
    if got != want:
        hint = ""
        if abs(got - want) == cfg.addition_time_embed_dim:
            hint = (
                "; the UNet expects 5 numbers (a refiner: set requires_aesthetics_score) or 6 "
                "(a base model: unset it) in model_index.json"
            )
        raise ConfigError(
            f"unet: projection_class_embeddings_input_dim={want}, but {n_ids} time ids x "
            f"{cfg.addition_time_embed_dim} + text_encoder_2 projection_dim "
            f"{pipe.text_encoder_2.config.projection_dim} = {got}{hint}"
        )


def _encode_pair(pipe, texts, texts_2, clip_skip):
    """[E1 ; E2] (N, 77, D1 + D2) and the pooled embedding (N, P) of the second encoder."""
    xp = pipe.xp
    pairs = [(pipe.tokenizer_2, pipe.text_encoder_2, texts)]  # the refiner: prompt, not prompt_2
    if pipe.text_encoder is not None:
        pairs = [(pipe.tokenizer, pipe.text_encoder, texts)]
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2, texts_2))
    hidden, pooled = [], None
    for tok, te, batch in pairs:
        ids = xp.asarray(tok(batch))  # (N, 77)
        if hasattr(te, "encode_xl"):  # CLIPTextModelWithProjection
            h, p = te.encode_xl(ids, clip_skip)
            pooled = p if pooled is None else pooled
        else:
            h = te.hidden_state(ids, clip_skip)
        hidden.append(h.astype(pipe.dtype))  # (N, 77, D_i)
    return xp.concatenate(hidden, axis=-1), pooled.astype(pipe.dtype)


def encode(pipe, prompts, negative, extra, nipp, cfg, clip_skip):
    """(context (rows, 77, D), {"text_embeds": (rows, P), "time_ids": (rows, k)}), rows as
    [negative; positive] with guidance, each prompt repeated ``nipp`` times in place."""
    xp = pipe.xp
    emb, pooled = _encode_pair(pipe, prompts, extra.prompt_2, clip_skip)
    emb, pooled = xp.repeat(emb, nipp, axis=0), xp.repeat(pooled, nipp, axis=0)
    pos, neg = extra.time_ids
    n = emb.shape[0]
    ids = np.asarray([pos] * n, dtype=pipe.dtype)  # (B, k)
    if cfg:
        if negative is None and pipe.force_zeros_for_empty_prompt:
            nemb, npooled = xp.zeros_like(emb), xp.zeros_like(pooled)
        else:
            negative = negative or [""] * len(prompts)
            negative_2 = prompt_list(extra.negative_prompt_2, negative, "negative_prompt_2")
            nemb, npooled = _encode_pair(pipe, negative, negative_2, None)
            nemb, npooled = xp.repeat(nemb, nipp, axis=0), xp.repeat(npooled, nipp, axis=0)
        emb = xp.concatenate([nemb, emb])  # (2B, 77, D)
        pooled = xp.concatenate([npooled, pooled])  # (2B, P)
        ids = np.concatenate([np.asarray([neg] * n, dtype=pipe.dtype), ids])  # (2B, k)
    return emb, {"text_embeds": pooled, "time_ids": xp.asarray(ids)}


def _stats(pipe, like):
    """The VAE config's latents_mean and latents_std as (1, C, 1, 1) arrays, or None."""
    cfg = pipe.vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is None or std is None:
        return None
    xp = pipe.xp
    shape = (1, len(mean), 1, 1)
    return xp.asarray(mean, like.dtype).reshape(shape), xp.asarray(std, like.dtype).reshape(shape)


def unscale(pipe, lat):
    """Denoised latents -> the VAE's space: lat * std / scaling_factor + mean (or without the
    statistics: lat / scaling_factor)."""
    stats, sf = _stats(pipe, lat), pipe.vae.config.scaling_factor
    return lat / sf if stats is None else lat * stats[1] / sf + stats[0]


def encode_image(pipe, image, rng, use_stats=True):
    """Pixels -> scaled latents; a float16 VAE with force_upcast encodes in float32 (diffusers'
    SDXL img2img), then (z - mean) * scaling_factor / std, or z * scaling_factor.
    ``use_stats`` False: z * scaling_factor whatever the VAE config says, as diffusers' SDXL
    inpainting (``_encode_vae_image``) scales its image and masked-image latents, although its
    decoding does use latents_mean / latents_std."""
    vae = pipe.vae.upcast(encoder=True) if pipe.vae.needs_upcast else pipe.vae
    out = vae.encode(image.astype(vae.dtype))
    z = (out.sample(rng) if hasattr(out, "sample") else out).astype(pipe.dtype)
    stats, sf = _stats(pipe, z) if use_stats else None, pipe.vae.config.scaling_factor
    return z * sf if stats is None else (z - stats[0]) * sf / stats[1]


#: diffusers' default ``strength``: StableDiffusionXLImg2ImgPipeline's and
#: StableDiffusionXLInpaintPipeline's. 0.9999, not 1: int(steps * 0.9999) = steps - 1 (for
#: fewer than 10000 steps), so the first timestep is skipped and the latents start as the image
#: latents noised to the second, not as pure noise. With a control image, img2img's is
#: StableDiffusionXLControlNetImg2ImgPipeline's 0.8.
STRENGTH = {"img2img": 0.3, "inpaint": 0.9999, "control_img2img": 0.8}


def default_strength(strength, mask_image, control_image=None):
    """``strength`` None -> the default of img2img (with or without a control image), or of
    inpainting when there is a mask."""
    if strength is not None:
        return strength
    if mask_image is not None:
        return STRENGTH["inpaint"]
    return STRENGTH["img2img" if control_image is None else "control_img2img"]


def default_guidance(guidance_scale, mask_image, control_image=None):
    """``guidance_scale`` None -> 5.0, diffusers' SDXL txt2img and img2img default (also its
    ControlNet pipelines', inpainting included), or 7.5 for inpainting without a control image
    (StableDiffusionXLInpaintPipeline's)."""
    if guidance_scale is not None:
        return guidance_scale
    return 7.5 if mask_image is not None and control_image is None else 5.0
