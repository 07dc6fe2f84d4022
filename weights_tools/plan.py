"""Conversion plans: which source tensors make each target tensor, computed from names and
shapes only (so the output header can be written before any tensor is read).

A plan is a list of :class:`Move`; ``src`` names ``(part, key)`` pairs, where part is a diffusers
component ("unet", "vae", "text_encoder") or "file" for an original single-file checkpoint.
Operations: "" (copy), "to2d" / "to4d" (VAE attention 1x1 conv <-> linear weights),
"split0..2" (rows of OpenCLIP's fused q/k/v), "concat" (fuse q/k/v).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minisd.errors import WeightsError

from . import keymaps as km
from .configs import (
    component_of,
    openclip_used_layers,
    unet_arch_diffusers,
    unet_arch_original,
    vae_arch_diffusers,
    vae_arch_original,
)


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
    return s[0]


def apply(move, arrays):
    """Run ``move`` on its source arrays (views where possible: no copy but for "concat")."""
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
    return a


# ------------------------------------------------------------------------- original -> diffusers


def from_original(shapes, text_layers=None, *, extract_ema=False, text_prefix=""):
    """Plan an original checkpoint -> {"unet": [Move], "vae": [...], "text_encoder": [...]}.

    Returns ``(plans, skipped)``; skipped: {"unused": [keys], "unknown": [keys]} (known buffers /
    EMA copies / the unused last OpenCLIP block, and keys no table knows).
    """
    unet = km.invert(km.unet_modules(unet_arch_original(shapes)))
    vae = km.invert(km.vae_modules(vae_arch_original(shapes)))
    layers = openclip_used_layers(shapes) if text_layers is None else text_layers
    openclip = km.invert(km.openclip_modules(layers))
    top = {o: d for d, o in km.OPENCLIP_TOP.items()}
    plans = {"unet": [], "vae": [], "text_encoder": []}
    skipped = {"unused": [], "unknown": []}
    for key in shapes:
        part = component_of(key)
        dst, op = None, ""
        if part == "unet":
            dst = km.rename(key[len(km.UNET_PREFIX) :], unet)
        elif part == "vae":
            dst = km.rename(key[len(km.VAE_PREFIX) :], vae)
            if dst is not None and dst.endswith(km.VAE_ATTENTION_CONV) and len(shapes[key]) > 2:
                op = "to2d"
        elif part == "text_encoder" and not key.startswith(km.OPENCLIP_PREFIX):
            dst = key[len(km.CLIP_PREFIX_OLD) :].removeprefix("text_model.")
            if dst == "embeddings.position_ids":  # a buffer (older SD1 layout)
                skipped["unused"].append(key)
                continue
        elif part == "text_encoder":
            moves = _openclip_key(key[len(km.OPENCLIP_PREFIX) :], openclip, top, layers)
            if moves == "unused":
                skipped["unused"].append(key)
                continue
            if moves:
                plans[part] += [Move(text_prefix + d, (("file", key),), o) for d, o in moves]
                continue
        if dst is None:
            skipped["unused" if part in ("unused", "ema") else "unknown"].append(key)
            continue
        if part == "text_encoder":
            dst = text_prefix + dst
        src = key
        if part == "unet" and extract_ema:
            src = km.EMA_PREFIX + "".join(key.split(".")[1:])
            if src not in shapes:
                raise WeightsError(f"checkpoint: extract_ema: no EMA copy {src!r} of {key!r}")
        plans[part].append(Move(dst, (("file", src),), op))
    for part in plans:
        plans[part].sort(key=lambda m: m.dst)
    return plans, skipped


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
    and the "text_model." prefix are accepted). Returns ``(moves, unknown)``.
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
    text = shapes["text_encoder"]
    if text_layout == "clip":
        for key in text:
            name = key.removeprefix(km.TEXT_MODEL_PREFIX)
            _add(moves, unknown, "text_encoder", key, km.CLIP_PREFIX + name)
    else:
        _openclip_moves(text, moves, unknown)
    moves.sort(key=lambda m: m.dst)
    return moves, unknown


def _add(moves, unknown, part, key, dst, op=""):
    if dst is None:
        unknown.append(f"{part}/{key}")
    else:
        moves.append(Move(dst, ((part, key),), op))


def _openclip_moves(text, moves, unknown):
    prefix = km.TEXT_MODEL_PREFIX if any(k.startswith(km.TEXT_MODEL_PREFIX) for k in text) else ""
    names = {k[len(prefix) :]: k for k in text}
    layers = len({int(n.split(".")[2]) for n in names if n.startswith("encoder.layers.")})
    table = km.openclip_modules(layers)
    fused = set()
    for name, key in names.items():
        parts = name.split(".")
        if name in km.OPENCLIP_TOP:
            _add(moves, unknown, "text_encoder", key, km.OPENCLIP_PREFIX + km.OPENCLIP_TOP[name])
        elif len(parts) == 6 and parts[3] == "self_attn" and parts[4] in km.OPENCLIP_QKV:
            fused.add((parts[2], parts[5]))  # (layer, weight|bias)
        else:
            dst = km.rename(name, table)
            _add(moves, unknown, "text_encoder", key, dst and km.OPENCLIP_PREFIX + dst)
    for layer, kind in sorted(fused):
        srcs = [f"{prefix}encoder.layers.{layer}.self_attn.{p}.{kind}" for p in km.OPENCLIP_QKV]
        missing = [s for s in srcs if s not in text]
        if missing:
            raise WeightsError(f"text encoder: missing key {missing[0]!r} (q/k/v are fused)")
        dst = f"{km.OPENCLIP_PREFIX}transformer.resblocks.{layer}.{km.OPENCLIP_FUSED[kind]}"
        moves.append(Move(dst, tuple(("text_encoder", s) for s in srcs), "concat"))
