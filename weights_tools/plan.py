"""Conversion plans: which source tensors make each target tensor, computed from names and
shapes only (so the output header can be written before any tensor is read).

A plan is a list of :class:`Move`; ``src`` names ``(part, key)`` pairs, where part is a diffusers
component ("unet", "vae", "text_encoder", SDXL's "text_encoder_2") or "file" for an original
single-file checkpoint. Operations: "" (copy), "to2d" / "to4d" (VAE attention 1x1 conv <->
linear weights), "split0..2" (rows of OpenCLIP's fused q/k/v), "concat" (fuse q/k/v), "T"
(OpenCLIP's text_projection, used as x @ P, <-> a Linear weight P^T).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minisd.errors import WeightsError

from . import keymaps as km
from .configs import (
    component_of,
    indices,
    openclip_used_layers,
    unet_arch_diffusers,
    unet_arch_original,
    vae_arch_diffusers,
    vae_arch_original,
)
from .configs_xl import is_sdxl, text_prefixes


@dataclass(frozen=True)
class Move:
    dst: str
    src: tuple  # ((part, key), ...)
    op: str = ""


def out_shape(move, shapes):
    """Target shape of ``move``; ``shapes[(part, key)]`` gives source shapes."""
    s = [tuple(shapes[src]) for src in move.src]
    if move.op == "to2d":
        return s[0][:2]
    if move.op == "to4d":
        return (*s[0], 1, 1)
    if move.op.startswith("split"):
        return (s[0][0] // 3, *s[0][1:])
    if move.op == "concat":
        return (sum(x[0] for x in s), *s[0][1:])
    if move.op == "T":
        return s[0][::-1]
    return s[0]


def apply(move, arrays):
    """Run ``move`` on its source arrays (views where possible: no copy but for "concat" and
    "T", which makes one small matrix C-contiguous as torch stores it)."""
    a = arrays[0]
    if move.op == "to2d":
        return a.reshape(a.shape[:2])  # (C, C, 1, 1) -> (C, C)
    if move.op == "to4d":
        return a.reshape(*a.shape, 1, 1)  # (C, C) -> (C, C, 1, 1)
    if move.op.startswith("split"):
        i, d = int(move.op[-1]), a.shape[0] // 3
        return a[i * d : (i + 1) * d]  # (3D, ...) -> (D, ...)
    if move.op == "concat":
        return np.concatenate(arrays, axis=0)  # 3 x (D, ...) -> (3D, ...)
    if move.op == "T":
        return np.ascontiguousarray(a.T)  # (D, P) <-> (P, D)
    return a


# ------------------------------------------------------------------------- original -> diffusers


def from_original(shapes, text_layers=None, *, extract_ema=False, text_prefix="", text_prefix_2=""):
    """Plan an original checkpoint -> {"unet": [Move], "vae": [...], "text_encoder": [...]};
    SDXL files add "text_encoder_2" (and have no "text_encoder" in a refiner).

    ``text_layers``: OpenCLIP blocks used (default: SD2 all but the last, SDXL all).
    ``text_prefix`` / ``text_prefix_2``: put before the text encoders' keys ("text_model.": the
    older transformers layout; never before ``text_projection.weight``). Returns ``(plans,
    skipped)``; skipped: {"unused": [keys], "unknown": [keys]} (known buffers / EMA copies / the
    unused last OpenCLIP block, and keys no table knows).
    """
    tables = _tables(shapes, text_layers)
    prefixes = {"text_encoder": text_prefix, "text_encoder_2": text_prefix_2}
    plans = {part: [] for part in _parts(shapes)}
    skipped = {"unused": [], "unknown": []}
    for key in shapes:
        part = component_of(key)
        found = _targets(key, part, tables) if part in plans else []
        if found == "unused" or (not found and part in ("unused", "ema")):
            skipped["unused"].append(key)
            continue
        if not found:
            skipped["unknown"].append(key)
            continue
        src = _ema_key(key, shapes) if part == "unet" and extract_ema else key
        for dst, op in found:
            if part in prefixes and dst not in km.OPENCLIP_PROJECTION:
                dst = prefixes[part] + dst
            plans[part].append(Move(dst, (("file", src),), op))
    for part in plans:
        plans[part].sort(key=lambda m: m.dst)
    return plans, skipped


def _parts(shapes):
    if not is_sdxl(shapes):
        return ("unet", "vae", "text_encoder")
    first = ("text_encoder",) if text_prefixes(shapes)[0] else ()  # (none in a refiner)
    return ("unet", "vae", *first, "text_encoder_2")


def _tables(shapes, text_layers):
    """Inverted rename tables of the file's UNet, VAE and OpenCLIP encoder."""
    if text_layers is not None:
        layers = text_layers
    elif is_sdxl(shapes):  # all blocks
        layers = len(indices(shapes, text_prefixes(shapes)[1] + "transformer.resblocks."))
    else:
        layers = openclip_used_layers(shapes)
    return {
        "shapes": shapes,
        "unet": km.invert(km.unet_modules(unet_arch_original(shapes))),
        "vae": km.invert(km.vae_modules(vae_arch_original(shapes))),
        "openclip": km.invert(km.openclip_modules(layers)),
        "top": {o: d for d, o in km.OPENCLIP_TOP.items()},
        "layers": layers,
    }


def _targets(key, part, t):
    """[(diffusers name, op)] of one original key of ``part``, "unused", or [] (unknown)."""
    if part == "unet":
        dst = km.rename(key[len(km.UNET_PREFIX) :], t["unet"])
        return [(dst, "")] if dst is not None else []
    if part == "vae":
        dst = km.rename(key[len(km.VAE_PREFIX) :], t["vae"])
        if dst is None:
            return []
        conv = dst.endswith(km.VAE_ATTENTION_CONV) and len(t["shapes"][key]) > 2
        return [(dst, "to2d" if conv else "")]
    if key.startswith((km.CLIP_PREFIX_OLD, km.CLIP_XL_PREFIX)):  # OpenAI CLIP, HF names
        name = key.removeprefix(km.CLIP_PREFIX_OLD).removeprefix(km.CLIP_XL_PREFIX)
        dst = name.removeprefix("text_model.")
        return "unused" if dst == "embeddings.position_ids" else [(dst, "")]  # (a buffer)
    prefix = next(p for p in (km.OPENCLIP_PREFIX, km.OPENCLIP_XL_PREFIX,
                              km.OPENCLIP_XL_REFINER_PREFIX) if key.startswith(p))  # fmt: skip
    name = key[len(prefix) :]
    if part == "text_encoder_2" and name in km.OPENCLIP_PROJECTION.values():
        return [(d, "T") for d, o in km.OPENCLIP_PROJECTION.items() if o == name]
    return _openclip_key(name, t["openclip"], t["top"], t["layers"])


def _ema_key(key, shapes):
    src = km.EMA_PREFIX + "".join(key.split(".")[1:])
    if src not in shapes:
        raise WeightsError(f"checkpoint: extract_ema: no EMA copy {src!r} of {key!r}")
    return src


def _openclip_key(name, table, top, layers):
    """[(diffusers name, op)] for one OpenCLIP key, "unused", or [] when unknown."""
    if name in top:
        return [(top[name], "")]
    parts = name.split(".")
    if name.startswith("transformer.resblocks.") and int(parts[2]) >= layers:
        return "unused"  # SD2 conditions on the penultimate layer
    for kind, fused in km.OPENCLIP_FUSED.items():
        if name.endswith(fused) and name.startswith("transformer.resblocks."):
            layer = f"encoder.layers.{parts[2]}.self_attn"
            return [(f"{layer}.{p}.{kind}", f"split{i}") for i, p in enumerate(km.OPENCLIP_QKV)]
    dst = km.rename(name, table)
    return [(dst, "")] if dst is not None else []


# ------------------------------------------------------------------------- diffusers -> original


def to_original(shapes, text_layout):
    """Plan diffusers components -> one original checkpoint.

    ``shapes``: {part: {key: shape}} for unet / vae / text_encoder (legacy VAE attention names
    and the "text_model." prefix are accepted). ``text_layout``: "clip" (SD1), "openclip" (SD2)
    or "sdxl" (``shapes`` then has "text_encoder_2", and "text_encoder" unless a refiner).
    Returns ``(moves, unknown)``.
    """
    moves, unknown = [], []
    unet = km.unet_modules(unet_arch_diffusers(shapes["unet"]))
    for key in shapes["unet"]:
        dst = km.rename(key, unet)
        _add(moves, unknown, "unet", key, dst and km.UNET_PREFIX + dst)
    vae = km.vae_modules(vae_arch_diffusers(shapes["vae"]))
    for key in shapes["vae"]:
        new = next(iter(km.rename_legacy_vae_attention({key: None})))
        dst = km.rename(new, vae)
        op = "to4d" if new.endswith(km.VAE_ATTENTION_CONV) and len(shapes["vae"][key]) == 2 else ""
        _add(moves, unknown, "vae", key, dst and km.VAE_PREFIX + dst, op)
    if text_layout == "sdxl":
        first = "text_encoder" in shapes
        if first:
            _clip_moves(shapes["text_encoder"], km.CLIP_XL_PREFIX + "text_model.", moves, unknown)
        prefix = km.OPENCLIP_XL_PREFIX if first else km.OPENCLIP_XL_REFINER_PREFIX
        _openclip_moves(shapes["text_encoder_2"], moves, unknown, prefix, "text_encoder_2")
    elif text_layout == "clip":
        _clip_moves(shapes["text_encoder"], km.CLIP_PREFIX, moves, unknown)
    else:
        _openclip_moves(shapes["text_encoder"], moves, unknown)
    moves.sort(key=lambda m: m.dst)
    return moves, unknown


def _add(moves, unknown, part, key, dst, op=""):
    if dst is None:
        unknown.append(f"{part}/{key}")
    else:
        moves.append(Move(dst, ((part, key),), op))


def _clip_moves(text, prefix, moves, unknown):
    for key in text:
        _add(moves, unknown, "text_encoder", key, prefix + key.removeprefix(km.TEXT_MODEL_PREFIX))


def _openclip_moves(text, moves, unknown, prefix=km.OPENCLIP_PREFIX, part="text_encoder"):
    text = dict(text)
    for d, o in km.OPENCLIP_PROJECTION.items():  # a CLIPTextModelWithProjection's, unprefixed
        if d in text:
            del text[d]
            moves.append(Move(prefix + o, ((part, d),), "T"))
    tm = km.TEXT_MODEL_PREFIX if any(k.startswith(km.TEXT_MODEL_PREFIX) for k in text) else ""
    names = {k[len(tm) :]: k for k in text}
    layers = len({int(n.split(".")[2]) for n in names if n.startswith("encoder.layers.")})
    table = km.openclip_modules(layers)
    fused = set()
    for name, key in names.items():
        parts = name.split(".")
        if name in km.OPENCLIP_TOP:
            _add(moves, unknown, part, key, prefix + km.OPENCLIP_TOP[name])
        elif len(parts) == 6 and parts[3] == "self_attn" and parts[4] in km.OPENCLIP_QKV:
            fused.add((parts[2], parts[5]))  # (layer, weight|bias)
        else:
            dst = km.rename(name, table)
            _add(moves, unknown, part, key, dst and prefix + dst)
    for layer, kind in sorted(fused):
        srcs = [f"{tm}encoder.layers.{layer}.self_attn.{p}.{kind}" for p in km.OPENCLIP_QKV]
        missing = [s for s in srcs if s not in text]
        if missing:
            raise WeightsError(f"text encoder: missing key {missing[0]!r} (q/k/v are fused)")
        dst = f"{prefix}transformer.resblocks.{layer}.{km.OPENCLIP_FUSED[kind]}"
        moves.append(Move(dst, tuple((part, s) for s in srcs), "concat"))
