"""inspect: what is in a checkpoint (family, layout, dtypes, parameter counts, odd keys).

Reads headers only (no tensor data), so it is instant even on multi-GB files.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter

import numpy as np

from minisd import ip_adapter_files
from minisd.errors import MinisdError, WeightsError
from minisd.t2i_adapter import T2IAdapterConfig, param_shapes
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
        report.update(addon, notes=addon.get("notes", []))
    elif any(component_of(k) in ("unet", "vae", "text_encoder") for k in shapes):
        report.update(_original(shapes, tags, meta, report["notes"]))
    else:
        report.update(_component(shapes, tags))
    return report


# ------------------------------------------------------------------ add-on files

ADDON_KINDS = ("lora", "textual-inversion", "controlnet", "ip-adapter", "t2i-adapter")
LORA_MARKS = ("lora_down", "lora_up", "lora_A", "lora_B", ".lora.", "_lora.", "hada_", "lokr_")
TEXT_WIDTHS = {768: "sd1", 1024: "sd2", 1280: "sdxl"}


def _addon(shapes, tags, stem):
    """LoRA, textual inversion, ControlNet, IP-Adapter and T2I-Adapter files: what they are
    and what they fit."""
    keys = list(shapes)
    stats = _stats(keys, shapes, tags)
    if any(_is_ip_adapter_key(k) for k in keys):  # before LoRA: FaceID files have "_lora." keys
        return {"kind": "ip-adapter", "components": {"ip_adapter": stats}, **_ip_adapter(shapes)}
    if any(k.startswith(("adapter.conv_in.", "adapter.body.")) for k in keys):
        return {"kind": "t2i-adapter", "layout": "diffusers", "components": {"adapter": stats},
                **_t2i_adapter(shapes)}  # fmt: skip
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


T2I_BLOCK = re.compile(r"^adapter\.body\.(\d+)\.")
IP_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # cross_attention_dim -> family


def _is_ip_adapter_key(key):
    """h94's ``image_proj.*`` / ``ip_adapter.N.*`` keys, or diffusers' converted ones."""
    key = key.removeprefix("unet.")
    return (
        key.startswith(("image_proj.", "ip_adapter.", "encoder_hid_proj.image_projection_layers."))
        or ".processor.to_k_ip." in key
    )


def _ip_adapter(shapes):
    """Layout, variant and what the IP-Adapter fits: the CLIP image embedding width it takes,
    the UNet's cross_attention_dim, the number of cross-attention layers it adds to. Base
    adapters are checked as minisd reads them (minisd/ip_adapter_files.py, on the shapes)."""
    flat = {k.removeprefix("unet."): v for k, v in shapes.items()}
    diffusers = any(
        k in ip_adapter_files.DIFFUSERS_KEYS or ip_adapter_files.DIFFUSERS_LAYER.match(k)
        for k in flat
    )
    refused = next(
        (kind for part, kind in ip_adapter_files.REFUSED if any(part in k for k in shapes)), None
    )
    layers = {}  # processor number / attn2 path -> to_k_ip shape
    for key, shape in flat.items():
        m = ip_adapter_files.H94_LAYER.match(key) or ip_adapter_files.DIFFUSERS_LAYER.match(key)
        if m and m[2] == "to_k_ip":
            layers[m[1]] = shape
    widths = {s[1] for s in layers.values() if len(s) == 2}
    embed = next(
        (shapes[k][-1] for k in ("image_proj.proj.weight", "image_proj.proj.0.weight",
                                 "image_proj.proj_in.weight") if len(shapes.get(k, ())) == 2),
        None,
    )  # fmt: skip
    ip = {
        "variant": refused or ip_adapter_files.variant_of(shapes),
        "cross_attention_dim": widths.pop() if len(widths) == 1 else None,
        "image_embed_dim": embed,
        "layers": len(layers),
    }
    notes = []
    if refused:
        ip["unsupported"] = f"{refused} (minisd loads the base, Plus, Full and FaceID IP-Adapters)"
    else:
        fake = {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in shapes.items()}
        try:
            adapter = ip_adapter_files.parse(fake, "file")  # minisd's own checks, on the shapes
            ip.update(cross_attention_dim=adapter.cross_attention_dim,
                      image_embed_dim=adapter.embed_dim)  # fmt: skip
        except MinisdError as e:
            notes.append(f"minisd would not load it: {str(e).removeprefix('file: ')}")
    family = IP_WIDTHS.get(ip["cross_attention_dim"], "unknown")
    layout = "diffusers" if diffusers else "h94"
    return {"family": family, "layout": layout, "ip_adapter": ip, "notes": notes}


def _t2i_adapter(shapes):
    """Type (light adapters have no conv_in), channels, input channels and resnets per block of
    a diffusers T2IAdapter weights file, checked against minisd's T2IAdapter parameter shapes.
    The pixel-unshuffle factor is not in the weights: 8 (SD) is assumed; in_channels * 16^2
    input features hint at SDXL's full_adapter_xl."""
    light = "adapter.conv_in.weight" not in shapes
    blocks = sorted({int(m[1]) for k in shapes if (m := T2I_BLOCK.match(k))})
    res = {k.split(".")[4] for k in shapes if k.startswith("adapter.body.0.resnets.")}
    outs = []
    if light:
        first = shapes.get("adapter.body.0.in_conv.weight", (0, 0))[1]
        outs = [shapes.get(f"adapter.body.{i}.out_conv.weight", (0,))[0] for i in blocks]
        channels = outs[:-1]
    else:
        c, first = shapes["adapter.conv_in.weight"][:2]
        for i in blocks:
            c = shapes.get(f"adapter.body.{i}.in_conv.weight", (c,))[0]
            outs.append(c)
        channels = outs
    t2i = {
        "adapter_type": "light_adapter" if light else "full_adapter",
        "in_channels": first // 64 if first % 64 == 0 else None,
        "channels": channels,
        "num_res_blocks": len(res),
        "feature_channels": outs,
    }
    notes, family = [], "unknown"
    if not light and first in (256, 768):
        t2i["unsupported"] = "full_adapter_xl (SDXL; minisd runs SD1.x / SD2.x adapters)"
        t2i["in_channels"], family = first // 256, "sdxl"
    else:
        try:
            cfg = T2IAdapterConfig(t2i["in_channels"] or 0, tuple(channels), len(res),
                                   adapter_type=t2i["adapter_type"], source="file")  # fmt: skip
            want = param_shapes(cfg)
        except MinisdError as e:
            want, notes = None, [f"not a T2I-Adapter minisd reads: {e}"]
        if want is not None:
            bad = sorted(k for k in set(want) | set(shapes) if want.get(k) != shapes.get(k))
            if bad:
                notes.append(f"not a T2I-Adapter minisd reads: key {bad[0]!r} is "
                             f"{shapes.get(bad[0], 'missing')}, expected "
                             f"{want.get(bad[0], 'none')}")  # fmt: skip
        if outs == [320, 640, 1280, 1280]:
            family = "sd1/sd2"
    return {"family": family, "t2i_adapter": t2i, "notes": notes}


#: A ControlNet's cross-attention context width (its attn2.to_k input) -> family
CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl"}


def _controlnet(shapes, stats):
    """The family from the context width; an SDXL micro-conditioning MLP (``add_embedding``,
    originally ``label_emb``) marks SDXL ControlNets of other widths (-small ones, tiny ones)."""
    key = next((k for k in shapes if k.endswith("attn2.to_k.weight")), None)
    family = CONTEXT_WIDTHS.get(shapes[key][1], "unknown") if key else "unknown"
    if family == "unknown" and any(k.startswith(("add_embedding.", "label_emb.")) for k in shapes):
        family = "sdxl"
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
        for p in ("unet", "vae", "text_encoder", "text_encoder_2", "ema")
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
        notes.append(f"not a complete SD1.x/SD2.x/SDXL checkpoint: {e}")
        return out
    notes.extend(str(w.message) for w in caught)
    pred = cfg["scheduler"]["prediction_type"]
    out.update(family=cfg["family"], prediction_type=pred, text_encoder_layout=cfg["text_layout"])
    out["prediction_type_assumed"] = (
        cfg["source"] == "inferred" and cfg["text_layout"] == "openclip"
    )
    out["config_source"] = "file metadata" if HINTS_KEY in meta else "tensor shapes"
    texts = [cfg[p] for p in ("text_encoder", "text_encoder_2") if cfg.get(p) is not None]
    out["text_encoder_layers"] = texts[0]["num_hidden_layers"]
    if cfg.get("text_encoder_2") is not None:  # SDXL
        out["text_encoder_2_layers"] = cfg["text_encoder_2"]["num_hidden_layers"]
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
                report = inspect(folder / name)
                kind = report["kind"] if report["kind"] in ADDON_KINDS else "component-folder"
                return {**report, "path": str(folder), "kind": kind}
        raise WeightsError(f"{folder}: neither a diffusers pipeline folder nor a component folder")
    index = read_config(folder / "model_index.json")
    out["pipeline_class"] = index.get("_class_name")
    unet_cfg = read_config(folder / "unet" / "config.json")
    if unet_cfg.get("_class_name") == "UNet2DModel":
        out["family"] = "unconditional"
        paths = {"unet": find_weights(folder / "unet", names=(COMPONENTS["unet"][1],))}
    else:
        paths = weights_paths(folder)
        text = (
            read_config(folder / "text_encoder" / "config.json") if "text_encoder" in paths else {}
        )
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
    if "ip_adapter" in report:
        ip = report["ip_adapter"]
        variant = ip["variant"].removeprefix("IP-Adapter ")
        lines.append(
            f"  IP-Adapter: {variant}; image embeddings {ip['image_embed_dim']}-d; "
            f"cross_attention_dim {ip['cross_attention_dim']}; {ip['layers']} cross-attention "
            "layers"
        )
        if ip.get("unsupported"):
            lines.append(f"  note: unsupported: {ip['unsupported']}")
    if "t2i_adapter" in report:
        t = report["t2i_adapter"]
        lines.append(
            f"  T2I-Adapter: {t['adapter_type']}; in_channels {t['in_channels']}; channels "
            f"{t['channels']}; {t['num_res_blocks']} resnets per block; features for UNet "
            f"down blocks of {t['feature_channels']} channels"
        )
        if t.get("unsupported"):
            lines.append(f"  note: unsupported: {t['unsupported']}")
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
