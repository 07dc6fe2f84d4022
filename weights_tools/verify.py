"""verify: do two checkpoints hold the same tensors, whatever their layouts?

Both sides are seen in diffusers names (``unet/down_blocks.0...``): original single files are
renamed through the keymaps, OpenCLIP's fused q/k/v split, VAE attention 1x1 convs reshaped;
older diffusers names (``text_model.`` prefix, legacy VAE attention) are normalised. Tensors
are read one at a time from memory maps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minisd.errors import WeightsError

from . import plan as pl
from .configs import component_of
from .folders import COMPONENTS, is_pipeline_folder, weights_paths
from .keymaps import TEXT_MODEL_PREFIX, rename_legacy_vae_attention
from .output import path_arg
from .stream import LazyFile

EXAMPLES = 20  # mismatches listed per category


def diffusers_view(path):
    """{"part/diffusers key": (LazyFile, Move)} for a file or folder in any supported layout."""
    path = Path(path)
    if path.is_dir():
        if is_pipeline_folder(path):
            return _folder_view(weights_paths(path))
        for _, name in COMPONENTS.values():
            if (path / name).is_file():
                return _folder_view({_guess_part(path / name): path / name})
        raise WeightsError(f"{path}: neither a diffusers pipeline folder nor a component folder")
    src = LazyFile(path)
    shapes = {k: src.shape(k) for k in src.tensors}
    if any(component_of(k) in ("unet", "vae", "text_encoder") for k in shapes):
        plans, _ = pl.from_original(shapes)
        return {f"{part}/{m.dst}": (src, m) for part, moves in plans.items() for m in moves}
    return _folder_view({_guess_part(path): path}, {path: src})


def _guess_part(path):
    keys = read_keys(path)
    if "conv_in.weight" in keys:
        return "unet"
    if "encoder.conv_in.weight" in keys:
        return "vae"
    return "text_encoder"


def read_keys(path):
    return set(LazyFile(path).tensors)


def _folder_view(paths, opened=None):
    view = {}
    for part, p in paths.items():
        src = (opened or {}).get(p) or LazyFile(p)
        for key in src.tensors:
            name = key
            if part == "vae":
                name = next(iter(rename_legacy_vae_attention({key: None})))
            if part in ("text_encoder", "text_encoder_2"):
                name = name.removeprefix(TEXT_MODEL_PREFIX)
            op = (
                "to2d"
                if part == "vae" and ".attentions." in name and len(src.shape(key)) == 4
                else ""
            )
            view[f"{part}/{name}"] = (src, pl.Move(name, ((part, key),), op))
    return view


def _read(entry):
    src, move = entry
    keys = [k for _, k in move.src]
    arr = pl.apply(move, [src.value(k) for k in keys])
    return arr, src.tag(keys[0]), keys


def _compare(x, y, chunk=1 << 20):
    """None when x and y hold the same bits (same dtype) or the same values (different dtypes);
    else {"max_abs_diff", "rel"}. Works in chunks so big tensors need little extra memory."""
    x, y = x.reshape(-1), y.reshape(-1)
    if x.dtype == y.dtype:
        u = np.dtype(f"u{x.dtype.itemsize}") if x.dtype.kind in "fc" else x.dtype
        if np.array_equal(x.view(u), y.view(u)):
            return None
    worst, scale, same = 0.0, 0.0, True
    for i in range(0, x.size, chunk):
        a, b = x[i : i + chunk].astype(np.float64), y[i : i + chunk].astype(np.float64)
        d = np.abs(a - b)
        d[np.isnan(a) & np.isnan(b)] = 0.0
        same = same and not d.any()
        worst, scale = (
            max(worst, float(np.nanmax(d, initial=0))),
            max(scale, float(np.nanmax(np.abs(b), initial=0))),
        )
    if same and x.dtype != y.dtype:
        return None
    return {"max_abs_diff": worst, "rel": worst / (scale or 1.0)}


def verify(a, b):
    """Compare two checkpoints tensor by tensor. Returns a report dict; ``report["same"]`` is
    True when both hold the same names, shapes, dtypes and bit-identical values."""
    a, b = path_arg(a, "a"), path_arg(b, "b")
    va, vb = diffusers_view(a), diffusers_view(b)
    report = {
        "a": str(a),
        "b": str(b),
        "compared": 0,
        "only_in_a": sorted(set(va) - set(vb)),
        "only_in_b": sorted(set(vb) - set(va)),
        "shape_mismatch": [],
        "dtype_mismatch": [],
        "value_mismatch": [],
    }
    for name in sorted(set(va) & set(vb)):
        (x, tx, kx), (y, ty, ky) = _read(va[name]), _read(vb[name])
        report["compared"] += 1
        if x.shape != y.shape:
            report["shape_mismatch"].append({"key": name, "a": x.shape, "b": y.shape})
        else:
            if tx != ty:
                report["dtype_mismatch"].append({"key": name, "a": tx, "b": ty})
            diff = _compare(x, y)
            if diff is not None:
                report["value_mismatch"].append({"key": name, **diff})
        for src, keys in ((va[name][0], kx), (vb[name][0], ky)):
            for k in keys:
                src.release(k)
    fields = ("only_in_a", "only_in_b", "shape_mismatch", "dtype_mismatch", "value_mismatch")
    report["same"] = not any(report[f] for f in fields)
    return report


def format_verify(report):
    lines = [f"{report['a']}  vs  {report['b']}: {report['compared']} tensors compared"]
    for field in ("only_in_a", "only_in_b", "shape_mismatch", "dtype_mismatch", "value_mismatch"):
        items = report[field]
        if items:
            lines.append(f"  {field.replace('_', ' ')}: {len(items)}")
            lines += [f"    {item}" for item in items[:EXAMPLES]]
    lines.append("  SAME: every tensor identical" if report["same"] else "  DIFFERENT")
    return "\n".join(lines)
