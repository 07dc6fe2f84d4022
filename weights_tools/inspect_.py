"""inspect: what is in a checkpoint (family, layout, dtypes, parameter counts, odd keys).

Reads headers only (no tensor data), so it is instant even on multi-GB files.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

from minisd.errors import MinisdError, WeightsError
from minisd.weights import find_weights, read_config, read_header

from .configs import HINTS_KEY, component_of, family_of, infer_configs
from .folders import COMPONENTS, is_pipeline_folder, weights_paths
from .keymaps import UNUSED_ORIGINAL
from .output import path_arg


def inspect(path):
    """Describe a checkpoint: a single .safetensors file (original or diffusers layout) or a
    diffusers pipeline folder. Returns a dict (see :func:`format_report` for the text form)."""
    path = path_arg(path, "path")
    if path.is_dir():
        return _inspect_folder(path)
    tensors, meta, _, size = read_header(path)
    shapes = {k: t[1] for k, t in tensors.items()}
    tags = {k: t[0] for k, t in tensors.items()}
    report = {"path": str(path), "bytes": size, "metadata": meta, "notes": []}
    addon = _addon(shapes, tags, path.stem)
    if addon is not None:
        report.update(addon)
    elif any(component_of(k) in ("unet", "vae", "text_encoder") for k in shapes):
        report.update(_original(shapes, tags, meta, report["notes"]))
    else:
        report.update(_component(shapes, tags))
    return report


# ------------------------------------------------------------------ add-on files

LORA_MARKS = ("lora_down", "lora_up", "lora_A", "lora_B", ".lora.", "_lora.", "hada_", "lokr_")
TEXT_WIDTHS = {768: "sd1", 1024: "sd2", 1280: "sdxl"}


def _addon(shapes, tags, stem):
    """LoRA, textual inversion and ControlNet files: what they are and what they fit."""
    keys = list(shapes)
    stats = _stats(keys, shapes, tags)
    if any(m in k for k in keys for m in LORA_MARKS):
        return {"kind": "lora", "family": "add-on", "components": {"lora": stats}, **_lora(shapes)}
    if any("input_hint_block." in k for k in keys):
        return {"kind": "controlnet", "layout": "original", **_controlnet(shapes, stats)}
    if "controlnet_cond_embedding.conv_in.weight" in shapes:
        return {"kind": "controlnet", "layout": "diffusers", **_controlnet(shapes, stats)}
    vectors = {k: v for k, v in shapes.items() if "." not in k and 1 <= len(v) <= 2}
    if vectors and len(vectors) == len(shapes) and len(shapes) <= 8:
        ti = _ti(vectors, stem)
        return {"kind": "textual-inversion", "components": {"embeddings": stats}, **ti}
    return None


def _lora(shapes):
    """Format, modules per component and ranks of a LoRA file (from the down factors)."""
    kohya = any(k.startswith(("lora_unet_", "lora_te")) for k in shapes)
    downs = {k: v for k, v in shapes.items() if "lora_down" in k or "lora_A" in k or ".down." in k}
    parts = Counter(
        "unet" if k.startswith(("lora_unet_", "unet.")) else "text_encoder" for k in downs
    )
    other = [k for k in shapes if "hada_" in k or "lokr_" in k]
    lora = {
        "format": "kohya / A1111" if kohya else "diffusers / peft",
        "modules": dict(parts),
        "ranks": sorted({v[0] for v in downs.values()}),
        "alphas": any(k.endswith(".alpha") for k in shapes),
    }
    if other:
        lora["unsupported"] = "LoHa / LoKr (minisd merges plain LoRA factors only)"
    return {"layout": lora["format"], "lora": lora}


def _controlnet(shapes, stats):
    key = next((k for k in shapes if k.endswith("attn2.to_k.weight")), None)
    family = TEXT_WIDTHS.get(shapes[key][1], "unknown") if key else "unknown"
    return {"family": family, "components": {"controlnet": stats}}


def _ti(vectors, stem):
    """Tokens (an A1111 file's is its name, as minisd and A1111 load it) and vector counts."""
    names = {(stem if k == "emb_params" else k): (v[0] if len(v) == 2 else 1)
             for k, v in vectors.items()}  # fmt: skip
    width = {v[-1] for v in vectors.values()}
    family = TEXT_WIDTHS.get(width.pop(), "unknown") if len(width) == 1 else "unknown"
    if set(vectors) == {"clip_l", "clip_g"}:
        family = "sdxl"
    return {"family": family, "layout": "A1111" if "emb_params" in vectors else "diffusers",
            "embeddings": names}  # fmt: skip


def _stats(keys, shapes, tags):
    return {
        "tensors": len(keys),
        "parameters": sum(math.prod(shapes[k]) for k in keys),
        "dtypes": dict(Counter(tags[k] for k in keys)),
    }


def _original(shapes, tags, meta, notes):
    """Report fields of an original-layout single file."""
    groups = {}
    for k in shapes:
        groups.setdefault(component_of(k), []).append(k)
    out = {"layout": "original", "kind": "single-file"}
    out["components"] = {
        p: _stats(groups[p], shapes, tags)
        for p in ("unet", "vae", "text_encoder", "ema")
        if p in groups
    }
    ema = [k for k in groups.get("ema", []) if k not in UNUSED_ORIGINAL]
    out["ema"] = {"ema_keys": len(ema), "non_ema_unet_keys": len(groups.get("unet", []))}
    if ema:
        notes.append(
            "full training checkpoint: the UNet is stored twice (EMA copy under "
            "model_ema.*); to_diffusers takes the non-EMA weights unless extract_ema=True"
        )
    out["unused_keys"] = sorted(groups.get("unused", []))
    out["unknown_keys"] = sorted(groups.get("unknown", []))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = infer_configs(shapes, hints=meta)
    except MinisdError as e:
        out.update(family=_partial_family(shapes), prediction_type=None)
        notes.append(f"not a complete SD1.x/SD2.x checkpoint: {e}")
        return out
    notes.extend(str(w.message) for w in caught)
    pred = cfg["scheduler"]["prediction_type"]
    out.update(family=cfg["family"], prediction_type=pred, text_encoder_layout=cfg["text_layout"])
    out["prediction_type_assumed"] = (
        cfg["source"] == "inferred" and cfg["text_layout"] == "openclip"
    )
    out["config_source"] = "file metadata" if HINTS_KEY in meta else "tensor shapes"
    out["text_encoder_layers"] = cfg["text_encoder"]["num_hidden_layers"]
    return out


def _partial_family(shapes):
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        return "sdxl"
    if any(component_of(k) == "unet" for k in shapes):
        cross = any(k.endswith("attn2.to_k.weight") for k in shapes)
        return "unet-only" if cross else "unconditional"
    if any(component_of(k) == "vae" for k in shapes):
        return "vae"
    return "unknown"


def _component(shapes, tags):
    """A diffusers-layout component file (or something else)."""
    keys = list(shapes)
    out = {"layout": "diffusers", "kind": "component-file", "unknown_keys": []}
    if "conv_in.weight" in shapes and any(k.startswith("down_blocks.") for k in keys):
        part = "unet"
        cross = any(k.endswith("attn2.to_k.weight") for k in keys)
        linear = any(k.endswith("proj_in.weight") and len(s) == 2 for k, s in shapes.items())
        unet = {"in_channels": shapes["conv_in.weight"][1], "use_linear_projection": linear}
        family = family_of(unet, {}, "epsilon") if cross else "unconditional"
    elif "encoder.conv_in.weight" in shapes:
        part, family = "vae", "vae"
    elif any(k.endswith("embeddings.token_embedding.weight") for k in keys):
        part, family = "text_encoder", "text-encoder"
    else:
        part, family = "unknown", "unknown"
        out["layout"] = "unknown"
    out["components"] = {part: _stats(keys, shapes, tags)}
    out["family"] = family
    return out


def _inspect_folder(folder):
    out = {"path": str(folder), "kind": "folder", "layout": "diffusers", "notes": []}
    if not is_pipeline_folder(folder):
        # A single component folder (config.json + weights).
        for _, name in COMPONENTS.values():
            if (folder / name).is_file():
                return {**inspect(folder / name), "path": str(folder), "kind": "component-folder"}
        raise WeightsError(f"{folder}: neither a diffusers pipeline folder nor a component folder")
    index = read_config(folder / "model_index.json")
    out["pipeline_class"] = index.get("_class_name")
    unet_cfg = read_config(folder / "unet" / "config.json")
    if unet_cfg.get("_class_name") == "UNet2DModel":
        out["family"] = "unconditional"
        paths = {"unet": find_weights(folder / "unet", names=(COMPONENTS["unet"][1],))}
    else:
        paths = weights_paths(folder)
        text = read_config(folder / "text_encoder" / "config.json")
        sched = folder / "scheduler" / "scheduler_config.json"
        pred = read_config(sched).get("prediction_type", "epsilon") if sched.is_file() else None
        out.update(family=family_of(unet_cfg, text, pred), prediction_type=pred)
    out["components"] = {}
    for part, p in paths.items():
        tensors = read_header(p)[0]
        shapes = {k: t[1] for k, t in tensors.items()}
        out["components"][part] = _stats(
            list(shapes), shapes, {k: t[0] for k, t in tensors.items()}
        )
    return out


def format_report(report):
    """Human-readable text of an inspect() report."""
    lines = [f"{report['path']}", f"  {'family:':<20} {report.get('family')}"]
    for key in ("kind", "layout", "prediction_type", "text_encoder_layout", "config_source"):
        if report.get(key) is not None:
            lines.append(f"  {key + ':':<20} {report[key]}")
    if report.get("prediction_type_assumed"):
        lines.append("  (prediction type assumed: not visible in the weights)")
    for part, s in report.get("components", {}).items():
        dtypes = ", ".join(f"{t} x{n}" for t, n in sorted(s["dtypes"].items()))
        lines.append(
            f"  {part:<13} {s['tensors']:>5} tensors {s['parameters']:>14,} params  {dtypes}"
        )
    if "lora" in report:
        lo = report["lora"]
        mods = ", ".join(f"{n} {part}" for part, n in sorted(lo["modules"].items()))
        lines.append(f"  LoRA modules: {mods}; ranks {lo['ranks']}; alphas: {lo['alphas']}")
        if lo.get("unsupported"):
            lines.append(f"  note: {lo['unsupported']}")
    if "embeddings" in report:
        tokens = ", ".join(f"{t} ({n} vectors)" for t, n in report["embeddings"].items())
        lines.append(f"  embeddings: {tokens}")
    if "ema" in report:
        lines.append(
            f"  EMA keys: {report['ema']['ema_keys']}, non-EMA UNet keys: "
            f"{report['ema']['non_ema_unet_keys']}"
        )
    for field in ("unused_keys", "unknown_keys"):
        keys = report.get(field) or []
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            lines.append(f"  {field.replace('_', ' ')}: {', '.join(keys[:5])}{more}")
    lines += [f"  note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)
