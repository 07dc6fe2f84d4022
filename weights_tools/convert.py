"""Single-file (original CompVis / SAI layout) <-> diffusers folder conversion.

Streaming: the source is memory-mapped, the output header is planned from names and shapes,
and tensors are written one at a time (their source pages released after use), so converting a
4 GB checkpoint needs about one tensor of memory on top of the interpreter. Output files appear
under their final names only when complete (folders too: see weights_tools.output). Nothing is
ever unpickled. SD1.x / SD2.x and SDXL (base and refiner: weights_tools/configs_xl.py) files.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from minisd.errors import WeightsError
from minisd.weights import load_file, read_header

from . import plan as pl
from .configs import HINTS_KEY, check_prediction_type, infer_configs
from .configs_xl import PAD_TOKENS
from .folders import COMPONENTS, read_folder_configs, text_prefix_of, weights_paths, write_configs
from .keymaps import TEXT_MODEL_PREFIX
from .output import building_folder, check_out_file, check_out_folder, path_arg
from .schema import check_shapes, component_shapes
from .stream import FLOAT_TAGS, Lazy, LazyFile, cast_array, target_tag, write_tensors

PARTS = ("unet", "vae", "text_encoder")
XL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # (no text_encoder: a refiner)


def _text_prefixes(config):
    """Key layout of the text encoder files: follow the config folder's files, else
    transformers' current layouts (CLIPTextModel: no "text_model." prefix;
    CLIPTextModelWithProjection, SDXL's second encoder: "text_model.")."""
    out = {"text_encoder": "", "text_encoder_2": TEXT_MODEL_PREFIX}
    if config is None:
        return out
    try:
        paths = weights_paths(config)
    except WeightsError:
        return out
    return {part: text_prefix_of(paths[part]) if part in paths else p for part, p in out.items()}


def _plan(shapes, configs, extract_ema, prefixes, source):
    """Plans per component, checked against the configs' expected shapes."""
    plans, skipped = pl.from_original(
        shapes,
        configs["text_encoder"]["num_hidden_layers"]
        if configs["text_layout"] == "openclip"
        else None,
        extract_ema=extract_ema,
        text_prefix=prefixes.get("text_encoder", ""),
        text_prefix_2=prefixes.get("text_encoder_2", ""),
    )
    if skipped["unknown"]:
        unknown = skipped["unknown"]
        warnings.warn(
            f"{source}: {len(unknown)} unknown keys ignored, e.g. {unknown[0]!r}", stacklevel=3
        )
    src_shapes = {("file", k): s for k, s in shapes.items()}
    for part, moves in plans.items():
        got = {m.dst: pl.out_shape(m, src_shapes) for m in moves}
        want = component_shapes(part, configs[part], prefixes.get(part, ""))
        check_shapes(got, want, f"{source} ({part})")
    return plans, skipped


def original_to_diffusers(
    flat, config=None, *, extract_ema=False, text_prefix="", text_prefix_2="", source="checkpoint"
):
    """In memory: {original name: array} -> {"unet": flat, "vae": flat, "text_encoder": flat}
    (SDXL: "text_encoder_2" too, no "text_encoder" for the refiner).

    ``config``: the dict :func:`weights_tools.configs.infer_configs` returns, or a diffusers
    folder whose configs to use, or None (inferred from the shapes). Arrays are views of the
    inputs where possible (renames, reshapes and q/k/v row slices copy nothing).
    """
    shapes = {k: tuple(v.shape) for k, v in flat.items()}
    if not isinstance(config, dict):
        config = infer_configs(shapes, config=config, source=source)
    configs = config
    prefixes = {"text_encoder": text_prefix, "text_encoder_2": text_prefix_2}
    plans, _ = _plan(shapes, configs, extract_ema, prefixes, source)
    return {
        part: {m.dst: pl.apply(m, [flat[k] for _, k in m.src]) for m in moves}
        for part, moves in plans.items()
    }


def load_single_file(path, config=None, prediction_type=None, extract_ema=False):
    """What StableDiffusion.from_pretrained(single_file) needs, converted in memory.

    Returns {"unet": (config, flat), "vae": (config, flat), "text_encoder": (config, flat),
    "scheduler": config, "tokenizer": tokenizer folder or None, "pad_token": str, "family": str}.
    SDXL files ("family" "sdxl" / "sdxl-refiner") add "text_encoder_2": (config, flat with
    ``text_projection.weight``), "tokenizer_2", "pad_token_2", "force_zeros_for_empty_prompt"
    and "requires_aesthetics_score" (model_index.json's); the refiner's "text_encoder" is None.
    Text encoder keys carry no "text_model." prefix. Arrays come from minisd.weights.load_file
    (memory-mapped; bf16 widened to float32).
    """
    path = path_arg(path, "path")
    _, meta, _, _ = read_header(path)
    flat = load_file(path)
    configs = infer_configs(
        flat, config=config, prediction_type=prediction_type, hints=meta, source=path
    )
    parts = original_to_diffusers(flat, configs, extract_ema=extract_ema, source=path)
    xl = "text_encoder_2" in configs
    out = {p: (configs[p], parts[p]) if p in parts else None for p in (XL_PARTS if xl else PARTS)}
    out.update(
        scheduler=configs["scheduler"],
        family=configs["family"],
        tokenizer=_tokenizer_folder(config, "tokenizer"),
        pad_token=(configs["tokenizer"] or {"pad_token": PAD_TOKENS[0]})["pad_token"],
    )
    if xl:
        index = configs["model_index"]
        out.update(
            tokenizer_2=_tokenizer_folder(config, "tokenizer_2"),
            pad_token_2=configs["tokenizer_2"]["pad_token"],
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
            requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
        )
    return out


def _tokenizer_folder(config, name):
    tok = Path(config) / name if config is not None else None
    return tok if tok is not None and tok.is_dir() else None


def to_diffusers(
    single_file, out_folder, config=None, prediction_type=None, *, extract_ema=False, dtype=None
):
    """Convert an original-layout .safetensors checkpoint into a diffusers pipeline folder.

    The architecture is inferred from tensor shapes (see weights_tools.configs), or taken from
    ``config`` (a diffusers folder; its tokenizer and scheduler are copied). SD2 v-prediction is
    not visible in the weights: pass ``prediction_type`` (a warning says what was assumed).
    ``extract_ema``: take the UNet from the EMA copy of a full training checkpoint.
    ``dtype``: optionally cast floats (fp32 / fp16 / bf16). Returns the configs used.
    """
    single_file = path_arg(single_file, "single_file")
    out = check_out_folder(out_folder, "out_folder")
    config = None if config is None else path_arg(config, "config")
    check_prediction_type(prediction_type)
    tag = target_tag(dtype) if dtype is not None else None
    src = LazyFile(single_file)
    shapes = {k: src.shape(k) for k in src.tensors}
    configs = infer_configs(
        shapes, config=config, prediction_type=prediction_type, hints=src.metadata, source=src.path
    )
    plans, _ = _plan(shapes, configs, extract_ema, _text_prefixes(config), src.path)
    with building_folder(out) as tmp:
        for part, moves in plans.items():
            sub, name = COMPONENTS[part]
            items = [_item(src, m, tag) for m in moves]
            write_tensors(tmp / sub / name, items, metadata={"format": "pt"})
        toks = [_tokenizer_folder(config, t) for t in ("tokenizer", "tokenizer_2")]
        write_configs(tmp, configs, *toks)
    return configs


def _item(src, move, tag):
    """(name, tag, shape, producer) for one planned tensor whose sources all lie in ``src``."""
    keys = [k for _, k in move.src]
    source_tag = src.tag(keys[0])
    out_tag = source_tag if tag is None or source_tag not in FLOAT_TAGS else tag
    shape = pl.out_shape(move, {s: src.shape(s[1]) for s in move.src})

    def produce():
        arr = pl.apply(move, [src.raw(k) for k in keys])
        return cast_array(arr, source_tag, tag, move.dst, src.path)[0]

    def release():
        for k in keys:
            src.release(k)

    return move.dst, out_tag, shape, Lazy(produce, release)


def to_original(folder, out_file, dtype=None):
    """Convert a diffusers pipeline folder into one original-layout .safetensors file.

    SD1 text encoders (quick_gelu) are written in OpenAI CLIP layout, SD2 ones (gelu) in
    OpenCLIP layout with fused q/k/v; SDXL folders (text_encoder_2) in Stability's SDXL layout
    (conditioner.embedders.*). The folder's configs are stored in the file's metadata
    (``minisd_configs``) so that to_diffusers can restore them exactly; other tools ignore it.
    """
    folder = path_arg(folder, "folder")
    out_file = check_out_file(out_file, "out_file")
    tag = target_tag(dtype) if dtype is not None else None
    paths = weights_paths(folder)
    configs = read_folder_configs(folder)
    lcm = configs["unet"].get("time_cond_proj_dim")
    if lcm is not None:  # its cond_proj Linear has no name in the original (ldm) layout
        raise WeightsError(
            f"{folder}: an LCM-distilled UNet (time_cond_proj_dim={lcm}) has no original "
            "single-file layout; use the diffusers folder as it is"
        )
    srcs = {part: LazyFile(p) for part, p in paths.items()}
    shapes = {part: {k: f.shape(k) for k in f.tensors} for part, f in srcs.items()}
    layout = _text_layout(configs)
    moves, unknown = pl.to_original(shapes, layout)
    if unknown:
        raise WeightsError(f"{folder}: {len(unknown)} keys fit no known layout, e.g. {unknown[0]}")
    items = [_item(srcs[m.src[0][0]], m, tag) for m in moves]
    hints = {k: configs[k] for k in (*srcs, "scheduler", "model_index")}
    pads = {"tokenizer": "!" if layout == "openclip" else PAD_TOKENS[0]}
    if layout == "sdxl":
        pads = {"tokenizer": PAD_TOKENS[0], "tokenizer_2": PAD_TOKENS[1]}
        if "text_encoder" not in srcs:  # a refiner: one tokenizer
            del pads["tokenizer"]
    for tok, pad in pads.items():
        hints[tok] = configs.get(tok) or {"pad_token": pad}
    meta = {"format": "pt", HINTS_KEY: json.dumps(hints, sort_keys=True)}
    write_tensors(out_file, items, metadata=meta)
    return out_file


def _text_layout(configs):
    """The original layout of a folder's text encoder(s): "clip" (SD1), "openclip" (SD2),
    "sdxl"."""
    if "text_encoder_2" in configs:
        return "sdxl"
    return "openclip" if configs["text_encoder"].get("hidden_act") == "gelu" else "clip"
