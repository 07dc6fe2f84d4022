"""SDXL's micro-conditioning (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for
High-Resolution Image Synthesis", sec. 2.2): the UNet's timestep embedding also carries the
pooled text embedding and six numbers that describe the training image, as diffusers'
``addition_embed_type="text_time"``:

    time_ids  = (original_h, original_w, crop_top, crop_left, target_h, target_w)   (N, 6)
    feats     = [text_embeds ; time_proj(time_ids[:, 0]) ; ... ; time_proj(time_ids[:, 5])]
    aug_emb   = linear_2(silu(linear_1(feats)))                                        (N, T)
    temb      = time_embedding(time_proj(t)) + aug_emb

time_proj is the sinusoidal embedding of ops.timestep_embedding with
``addition_time_embed_dim`` channels (256 for SDXL), flip and shift as the UNet's own; like the
timestep's, it is a float32 precision island. SDXL's refiner has five numbers: the crop is
followed by an aesthetic score instead of the target size.

Traced names: ``add_time_proj`` (the (N*k, d) sinusoids, as diffusers' module sees them),
``add_embedding.linear_1``, ``add_embedding.linear_2``, ``add_embedding``.
"""

from __future__ import annotations

from . import ops, trace
from .backend import array_module, device_of, to_device
from .blocks import lin
from .errors import InputError

_rec = trace.record


def text_time_embedding(added_cond_kwargs, x, p, cfg, owner="UNet"):
    """``added_cond_kwargs`` {"text_embeds": (N, P), "time_ids": (N, k)} -> aug_emb (N, T) in
    x's dtype. ``p``: the model's ``add_embedding`` params; ``cfg``: its config (UNetConfig or
    ControlNetConfig: the same fields); ``owner`` names the model in error messages."""
    text, ids = _inputs(added_cond_kwargs, x, cfg, owner)
    xp, n = array_module(x), x.shape[0]
    proj = ops.timestep_embedding(
        ids.reshape(-1),
        cfg.addition_time_embed_dim,
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        downscale_freq_shift=cfg.freq_shift,
    )  # (N*k, d) float32
    _rec("add_time_proj", proj)
    feats = xp.concatenate([text, proj.reshape(n, -1).astype(x.dtype)], axis=1)  # (N, P + k*d)
    with trace.scope("add_embedding"):
        e = _rec("linear_1", lin(feats, p["linear_1"]))  # (N, T)
        e = _rec("linear_2", lin(ops.silu(e), p["linear_2"]))  # (N, T)
    return _rec("add_embedding", e)


def _inputs(added, x, cfg, owner):
    """text_embeds and time_ids on x's device (text in x's dtype), their shapes checked."""
    if not isinstance(added, dict) or not {"text_embeds", "time_ids"} <= set(added):
        raise InputError(
            f"added_cond_kwargs: this {owner} has addition_embed_type='text_time' (SDXL) and "
            "needs {'text_embeds': (N, P), 'time_ids': (N, k)}"
        )
    n, width = x.shape[0], cfg.projection_class_embeddings_input_dim
    text = to_device(added["text_embeds"], device_of(x), x.dtype)
    ids = to_device(added["time_ids"], device_of(x))
    if text.ndim != 2 or text.shape[0] != n or ids.ndim != 2 or ids.shape[0] != n:
        raise InputError(
            f"added_cond_kwargs: text_embeds {tuple(text.shape)} and time_ids "
            f"{tuple(ids.shape)} must be 2-d with {n} rows (one per sample)"
        )
    if text.shape[1] + ids.shape[1] * cfg.addition_time_embed_dim != width:
        raise InputError(
            f"added_cond_kwargs: text_embeds width {text.shape[1]} + {ids.shape[1]} time ids x "
            f"{cfg.addition_time_embed_dim} != projection_class_embeddings_input_dim {width}"
        )
    return text, ids
