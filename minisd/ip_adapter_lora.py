"""The LoRA layers inside IP-Adapter FaceID files (h94's ip-adapter-faceid_sd15 /
ip-adapter-faceid_sdxl; Ye et al. 2023, arXiv:2308.06721: FaceID "uses LoRA to improve ID
consistency"), LoRA as Hu et al. 2021 (arXiv:2106.09685, eq. 3). minisd/lora.py has the
stand-alone LoRA files.

Such a file holds, next to the adapter, a rank-r pair for the to_q, to_k, to_v and to_out.0
Linears of every attention layer (attn1 and attn2), n numbering the UNet's attention
processors as for ``to_k_ip`` (ip_adapter.processor_paths):

    ip_adapter.{n}.{to_q,to_k,to_v,to_out}_lora.down.weight (r, in)   .up.weight (out, r)

diffusers 0.42.1 applies them in ``load_ip_adapter`` (loaders/ip_adapter.py): the UNet's
``_load_ip_adapter_loras`` renames them to the old attention-processor LoRA format
(``unet.<attention>.processor.to_q_lora.down.weight``) and ``load_lora_weights`` loads them as
the PEFT adapter ``faceid_0``, active at weight 1.0, without an alpha (lora_alpha = r):

    W' = W + up @ down                                   for each of the 4 Linears of a layer

minisd merges exactly that when the adapter is attached (ip_adapter.attach), in float32
(float64 for a float64 model) as minisd/lora.py merges, and puts the original arrays back when
it is detached; diffusers keeps the LoRA unmerged (the same sum up to float rounding). The
adapter's ``scale`` does not touch the LoRA (diffusers' does not either). Unlike diffusers,
whose ``unload_ip_adapter`` leaves the ``faceid_0`` LoRA active in the UNet, minisd removes it
with the adapter it was trained with. A LoRA merged later into the same weights
(minisd/lora.py) must be removed before the adapter is detached (InputError otherwise). Only
h94's layout carries the LoRA: a diffusers UNet holds it as PEFT layers, which are not
IP-Adapter keys.
"""

from __future__ import annotations

import re

from .errors import WeightsError
from .lora import merged_weight, param_slot, put_back
from .weights import CastOnRead

__all__ = ["KEY", "MODULES", "merge", "restore", "split_lora", "targets"]

KEY = re.compile(r"^ip_adapter\.(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
MODULES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}  # file: UNet


def _key(n, name, role):
    return f"ip_adapter.{n}.{name}_lora.{role}.weight"


def split_lora(flat, source):
    """(the other keys, {n: {(name, role): array}}) of an h94-layout state dict; a layer that
    has one of the 8 LoRA keys must have all 8, each a matrix."""
    rest, lora = {}, {}
    for key, value in flat.items():
        m = KEY.match(key)
        if m:
            lora.setdefault(int(m[1]), {})[m[2], m[3]] = value
        else:
            rest[key] = value
    for n, factors in sorted(lora.items()):
        for name in MODULES:
            for role in ("down", "up"):
                if (name, role) not in factors:
                    raise WeightsError(
                        f"{source}: key {_key(n, *next(iter(factors)))!r} is one of IP-Adapter "
                        "FaceID's LoRA keys, 8 per attention layer (to_q, to_k, to_v, to_out; "
                        f"down, up): missing key {_key(n, name, role)!r}"
                    )
                if factors[name, role].ndim != 2:
                    raise WeightsError(
                        f"{source}: key {_key(n, name, role)!r} has shape "
                        f"{tuple(factors[name, role].shape)}, expected a matrix"
                    )
    return rest, lora


def targets(lora, paths, params, source) -> dict:
    """{UNet param key: (up, down)} for ``lora`` ({n: factors}, :func:`split_lora`) on a UNet
    whose attention layers are ``paths`` (processor order), after checking that every n names
    one and that up @ down has its Linear's shape."""
    out = {}
    for n, factors in sorted(lora.items()):
        if n >= len(paths):
            raise WeightsError(
                f"{source}: key {_key(n, 'to_q', 'down')!r} names no attention layer of this "
                f"UNet (its attention processors: 0 ... {len(paths) - 1})"
            )
        for name, module in MODULES.items():
            key = f"{paths[n]}.{module}.weight"
            node, leaf = param_slot(params, key)
            shape = tuple(dict.__getitem__(node, leaf).shape)  # (out, in)
            up, down = factors[name, "up"], factors[name, "down"]  # (out, r), (r, in)
            if up.shape[1] != down.shape[0] or (up.shape[0], down.shape[1]) != shape:
                raise WeightsError(
                    f"{source}: keys {_key(n, name, 'up')!r} {tuple(up.shape)} and "
                    f"{_key(n, name, 'down')!r} {tuple(down.shape)} do not make the shape "
                    f"{shape} of {key}"
                )
            out[key] = (up, down)
    return out


def merge(params, lora_targets) -> tuple:
    """W + up @ down into each target of the UNet's ``params``, in place (:func:`targets`).
    Returns ((key, original, merged), ...) for :func:`restore`."""
    changes = []
    for key, (up, down) in lora_targets.items():
        node, leaf = param_slot(params, key)
        w = dict.__getitem__(node, leaf)  # stored array (file dtype under CastOnRead)
        dtype = node.dtype if isinstance(node, CastOnRead) else w.dtype
        new = merged_weight(w, dtype, up, down, 1.0)  # (out, in)
        dict.__setitem__(node, leaf, new)
        changes.append((key, w, new))
    return tuple(changes)


def restore(params, changes, source) -> None:
    """Put back the arrays :func:`merge` replaced; every weight is checked first, so that a
    weight changed since (a LoRA merged later) leaves everything as it is."""
    put_back(
        [(params, key, original, merged) for key, original, merged in changes],
        lambda i: (
            f"unload_ip_adapter: {changes[i][0]} was changed after the IP-Adapter "
            f"{source} merged its LoRA into it (a LoRA loaded later?); remove that first"
        ),
    )
