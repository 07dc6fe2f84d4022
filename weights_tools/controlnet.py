"""Single-file ControlNets: lllyasviel's ControlNet 1.0 / 1.1 checkpoints in the original layout
(ldm's ``cldm.ControlNet``) as A1111 / ComfyUI users have them, e.g.
``control_v11p_sd15_canny.safetensors`` or ``control_..._fp16.safetensors``; and bare
diffusers-layout weights without their config.json, the usual form of SDXL ControlNets
(``diffusers_xl_canny_full.safetensors`` is diffusers/controlnet-canny-sdxl-1.0's
diffusion_pytorch_model.safetensors renamed), union ones included (xinsir's
controlnet-union-sdxl-1.0 files, with 8 attention heads assumed for their union layer).
Stability's Control-LoRAs (``lora_controlnet``
key: low-rank deltas, not a ControlNet) and kohya's ControlNet-LLLite are refused by name.

Keys: ``control_model.`` + the UNet encoder's ldm names (``time_embed.{0,2}``,
``input_blocks.*``, ``middle_block.*``; for SDXL ``label_emb.0.{0,2}``, diffusers'
add_embedding, as in SDXL UNet files), ``zero_convs.k.0`` (one 1x1 zero conv per skip state),
``middle_block_out.0`` and ``input_hint_block.{0,2,...,14}`` (the control image encoder); the
prefix may be missing. Renamed to diffusers' ControlNetModel names by the tables of
:func:`weights_tools.keymaps.controlnet_modules` (semantics of diffusers'
``convert_controlnet_checkpoint``). A diffusers-layout file is renamed the other way through the
same tables for the inference below, and loaded under its own names.

What the shapes show: channels, blocks, layers per block, which blocks have attention, the
transformer depths, cross-attention width, conv vs linear projection, the control image's
channels (``input_hint_block.0``) and the hint encoder's widths
(``conditioning_embedding_out_channels``). What they do not show, and what is assumed:

- heads: 8 per attention for SD1.x (conv projection, context 768); 64-channel heads for SD2.x
  and SDXL (linear projection, or a 1024-wide context), as configs.py assumes for UNets;
- SDXL (an add_embedding): ``addition_time_embed_dim`` 256, SDXL's (the weights show only
  pooled width + time ids x that width, 2816 = 1280 + 6 x 256);
- ``global_pool_conditions`` (True only for the shuffle ControlNet): False unless told;
- ``norm_num_groups`` 32, ``upcast_attention`` False (diffusers' single-file defaults too).

``config=`` (a dict of ControlNetModel config fields, a diffusers ControlNet folder or its
config.json) overrides them; so do configs stored in the file's metadata under ``minisd_configs``
(``{"controlnet": {...}}``), used when they fit the tensors. Keys of a Stable Diffusion model
bundled in the same file (ControlNet 1.0's full checkpoints) are ignored; any other key is
refused. Nothing is unpickled; tensors are memory-mapped (minisd.weights.load_file).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from minisd.config import path_arg
from minisd.controlnet_config import ControlNetConfig, param_shapes
from minisd.controlnet_union import ControlNetUnionConfig, union_param_shapes
from minisd.errors import ConfigError, WeightsError
from minisd.weights import load_file, read_config, read_header, refuse_pickle

from . import keymaps as km
from .configs import HINTS_KEY, component_of, indices, unet_arch_diffusers, unet_arch_original
from .schema import check_shapes

# Fields the tensors show: a given config must agree with them.
STRUCTURE = (
    "in_channels",
    "conditioning_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "mid_block_type",
    "cross_attention_dim",
    "use_linear_projection",
    "conditioning_embedding_out_channels",
    "addition_embed_type",
    "projection_class_embeddings_input_dim",
)
# Present in every diffusers-layout ControlNet (and in no other file).
DIFFUSERS_KEY = "controlnet_cond_embedding.conv_in.weight"


def load_single_file_controlnet(path, config=None, *, global_pool_conditions=None):
    """An original-layout ControlNet ``.safetensors`` file -> ``(diffusers config dict,
    {diffusers key: array})``, arrays memory-mapped (bf16 widened to float32, see
    minisd.weights.load_file). ``config``: see the module docstring; ``global_pool_conditions``:
    True for shuffle ControlNets (None: the config's / hints' value, else False)."""
    path = path_arg(path, "path")
    refuse_pickle(path)
    tensors, meta, _, _ = read_header(path)
    shapes = {k: t[1] for k, t in tensors.items()}
    cfg, names = plan_controlnet(
        shapes, config, hints=meta, global_pool_conditions=global_pool_conditions, source=path
    )
    flat = load_file(path, keys=list(names.values()))
    return cfg, {d: flat[o] for d, o in names.items()}


def plan_controlnet(shapes, config=None, *, hints=None, global_pool_conditions=None, source=None):
    """From names and shapes only: ``(diffusers config dict, {diffusers key: file key})``.
    Every key of the file is checked (missing, unexpected, misshapen: WeightsError naming
    ``source`` and the file's key)."""
    source = str(source or "checkpoint")
    shapes = {k: tuple(v) for k, v in shapes.items()}
    _refuse_other_kinds(shapes, source)
    if DIFFUSERS_KEY in shapes:
        return _plan_diffusers(shapes, config, hints, global_pool_conditions, source)
    prefix = _prefix(shapes, source)
    own = {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)}
    arch, hint = _arch(own, prefix, source), _hint_convs(own, prefix, source)
    inferred = infer_config(own, arch, hint, lambda k: prefix + k, source)
    cfg = _apply_overrides(inferred, config, hints, global_pool_conditions, source)
    parsed = ControlNetConfig.from_dict(cfg, source=f"{source} (config)")
    table = km.controlnet_modules(arch, hint)
    names = {}
    for d in param_shapes(parsed):
        o = km.rename(d, table)
        if o is None:  # e.g. time_cond_proj_dim: no original name
            raise ConfigError(f"{source}: the config needs {d!r}, which has no original name")
        names[d] = prefix + o
    expected = {names[d]: s for d, s in param_shapes(parsed).items()}
    check_shapes({prefix + k: s for k, s in own.items()}, expected, source)
    return cfg, names


def _plan_diffusers(shapes, config, hints, global_pool, source):
    """plan_controlnet for diffusers-layout keys: renamed to the original layout through the
    same tables only to infer the config (messages name the file's own keys); the file's keys
    are the parameter names."""
    try:
        arch = unet_arch_diffusers(shapes)
    except WeightsError as e:
        raise WeightsError(f"{source}: {e}") from None
    hint = len(indices(shapes, "controlnet_cond_embedding.blocks.")) + 2
    table = km.controlnet_modules(arch, hint)
    renamed = {k: km.rename(k, table) for k in shapes}
    own = {o: shapes[k] for k, o in renamed.items() if o is not None}
    inferred = infer_config(own, arch, hint, lambda k: _unrename(k, table), source)
    inferred.update(_union_fields(shapes))
    cfg = _apply_overrides(inferred, config, hints, global_pool, source)
    union = cfg.get("_class_name") == "ControlNetUnionModel"
    config_cls, table_of = (ControlNetUnionConfig, union_param_shapes) if union else (
        ControlNetConfig, param_shapes)  # fmt: skip
    expected = table_of(config_cls.from_dict(cfg, source=f"{source} (config)"))
    check_shapes(shapes, expected, source)
    return cfg, {d: d for d in expected}


def _union_fields(shapes):
    """A union ControlNet's fields (xinsir's controlnet-union-sdxl-1.0 files: diffusers
    layout plus ``task_embedding`` (K, C), ``transformer_layes.i``, ``spatial_ch_projs``,
    ``control_add_embedding``), or {}. The heads do not show: xinsir's 8 are assumed; the
    sinusoid width shows here (control_add_embedding's input is K x that width)."""
    if "task_embedding" not in shapes or len(shapes["task_embedding"]) != 2:
        return {}
    k, c = shapes["task_embedding"]
    width = shapes.get("control_add_embedding.linear_1.weight", (0, 256 * k))[1]
    return {
        "addition_time_embed_dim": width // k,
        "_class_name": "ControlNetUnionModel", "num_control_type": k, "num_trans_channel": c,
        "num_trans_layer": len(indices(shapes, "transformer_layes.")), "num_trans_head": 8,
        "num_proj_channel": shapes.get("spatial_ch_projs.weight", (c,))[0],
    }  # fmt: skip


def _unrename(key, table):
    """The diffusers name of an original key through a module table (longest module wins)."""
    best = max((o for o, _ in table.values() if key.startswith(o + ".")), key=len, default=None)
    if best is None:
        return key
    d, inner = next((d, i) for d, (o, i) in table.items() if o == best)
    rest = key[len(best) + 1 :]
    for head, ohead in (inner or {}).items():
        if rest.startswith(ohead + "."):
            rest = head + rest[len(ohead) :]
            break
    return f"{d}.{rest}"


def _refuse_other_kinds(shapes, source):
    """Files that control a UNet by other means than a ControlNet's residuals."""
    if "lora_controlnet" in shapes:
        raise WeightsError(
            f"{source}: a Control-LoRA (Stability's control-lora, key 'lora_controlnet': "
            "low-rank deltas applied to the SDXL UNet's own weights) is not a ControlNet and is "
            "not supported; use a full SDXL ControlNet (e.g. diffusers/controlnet-canny-sdxl-1.0)"
        )
    lllite = next((k for k in shapes if "lllite" in k.lower()), None)
    if lllite is not None:
        raise WeightsError(
            f"{source}: a ControlNet-LLLite (kohya's, key {lllite!r}) is not a ControlNet and "
            "is not supported"
        )


# ------------------------------------------------------------------------- layout


def _prefix(shapes, source):
    """ "control_model." or "" (a bare ControlNet); refuses files that hold no ControlNet and
    keys that belong to nothing known."""
    p = km.CONTROLNET_PREFIX
    if any(k.startswith(p) for k in shapes):
        bundled = [k for k in shapes if not k.startswith(p)]
        for k in bundled:
            if component_of(k) == "unknown":
                raise WeightsError(f"{source}: unexpected key {k!r} (not part of a ControlNet)")
        if bundled:
            warnings.warn(
                f"{source}: {len(bundled)} keys of a bundled Stable Diffusion model ignored "
                f"(e.g. {bundled[0]!r}); only the {p}* keys are loaded",
                stacklevel=4,
            )
        return p
    if any(k.startswith(("input_hint_block.", "zero_convs.", "time_embed.")) for k in shapes):
        return ""
    what = ""
    if any(component_of(k) == "unet" for k in shapes):
        what = " (it holds a Stable Diffusion UNet, model.diffusion_model.*)"
    raise WeightsError(
        f"{source}: not a ControlNet checkpoint{what}: missing key "
        f"'{p}input_hint_block.0.weight' (or the same without the {p} prefix)"
    )


def _arch(own, prefix, source):
    """The UNet-encoder layout (blocks, layers per block, attention) of the ControlNet."""
    try:
        arch = unet_arch_original(own, prefix="")
    except WeightsError as e:
        raise WeightsError(f"{source}:{str(e).removeprefix('checkpoint:')}") from None
    if not any(k.startswith("middle_block.") for k in own):
        raise WeightsError(f"{source}: missing key '{prefix}middle_block.0.in_layers.0.weight'")
    return arch


def _hint_convs(own, prefix, source):
    """The number of convs of the hint block: an even number (conv_in, pairs of 3x3 convs,
    conv_out) at indices 0, 2, 4, ... (a SiLU sits between them)."""
    found = indices(own, "input_hint_block.")
    odd = [i for i in found if i % 2]
    if odd:
        raise WeightsError(
            f"{source}: unexpected key '{prefix}input_hint_block.{odd[0]}.weight' (the hint "
            "block's convs sit at 0, 2, 4, ...; the odd indices are SiLUs)"
        )
    n = len(found) + len(found) % 2  # an odd count: the next conv is missing
    for i in range(0, 2 * max(n, 2), 2):
        if i not in found:
            raise WeightsError(f"{source}: missing key '{prefix}input_hint_block.{i}.weight'")
    return n


# ------------------------------------------------------------------------- config


def infer_config(own, arch, hint, shown=str, source="checkpoint"):
    """diffusers ControlNetModel config from the (unprefixed) original keys' shapes.
    ``shown(key)``: the file's name of an original key, for messages."""

    def need(key):
        if key not in own:
            raise WeightsError(
                f"{source}: missing key {shown(key)!r}, needed to infer the architecture"
            )
        return own[key]

    L, n = arch.layers_per_block, arch.blocks
    first = [1 + b * (L + 1) for b in range(n)]  # input block of each block's first layer
    blocks = [need(f"input_blocks.{i}.0.out_layers.3.weight")[0] for i in first]
    cross = [s for k, s in own.items() if k.endswith(".attn2.to_k.weight")]
    proj = [s for k, s in own.items() if k.endswith(".proj_in.weight")]
    if not cross or not proj:
        raise ConfigError(
            f"{source}: the ControlNet has no cross-attention (not an SD / SDXL ControlNet)"
        )
    context, linear = cross[0][1], len(proj[0]) == 2
    heads = [max(1, c // 64) for c in blocks] if linear or context == 1024 else 8
    hint_out = [need(f"input_hint_block.{4 * i}.weight")[0] for i in range(hint // 2)]
    # SDXL's micro-conditioning MLP: its input width shows, the sinusoid width is SDXL's 256
    pooled_and_ids = need("label_emb.0.0.weight")[1] if arch.text_time else None
    return {
        "_class_name": "ControlNetModel",
        "in_channels": need("input_blocks.0.0.weight")[1],
        "conditioning_channels": need("input_hint_block.0.weight")[1],
        "down_block_types": [
            "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch.down_attn
        ],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if arch.mid_attn else "UNetMidBlock2D",
        "block_out_channels": blocks,
        "layers_per_block": L,
        "cross_attention_dim": context,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "transformer_layers_per_block": _depths(own, arch, first),
        "conditioning_embedding_out_channels": hint_out,
        "global_pool_conditions": False,
        "addition_embed_type": "text_time" if arch.text_time else None,
        "addition_time_embed_dim": 256 if arch.text_time else None,
        "projection_class_embeddings_input_dim": pooled_and_ids,
    }


def _depths(own, arch, first):
    """Transformer layers per block (an int when all agree). Blocks without attention get 1,
    but the last entry is also the mid block's depth (diffusers builds it so)."""
    count = lambda p: len(indices(own, p + "transformer_blocks."))  # noqa: E731
    depths = [count(f"input_blocks.{i}.1.") if a else 1 for i, a in zip(first, arch.down_attn)]
    if arch.mid_attn and not arch.down_attn[-1]:
        depths[-1] = count("middle_block.1.")
    return depths[0] if len(set(depths)) == 1 else depths


def _apply_overrides(inferred, config, hints, global_pool, source):
    """inferred < metadata hints (when they fit) < config= < global_pool_conditions=."""
    cfg = dict(inferred)
    hinted = _hints(hints, source)
    if hinted and _mismatch(inferred, hinted) is None:
        cfg.update(hinted)
    elif hinted:
        bad = _mismatch(inferred, hinted)
        warnings.warn(f"{source}: metadata {HINTS_KEY}: {bad}; ignored", stacklevel=4)
    given, where = _given(config)
    bad = _mismatch(inferred, given)
    if bad is not None:
        raise ConfigError(f"{where}: {bad}")
    cfg.update(given)
    if global_pool is not None:
        cfg["global_pool_conditions"] = bool(global_pool)
    elif not hinted and not given and "shuffle" in Path(source).name.lower():
        warnings.warn(
            f"{source}: a shuffle ControlNet needs global_pool_conditions=True, which the "
            "weights cannot show; loading with False",
            stacklevel=4,
        )
    return cfg


def _given(config):
    """(config dict, its name for messages) from config=: a dict, a folder or a config.json."""
    if config is None:
        return {}, "config"
    if isinstance(config, dict):
        return dict(config), "config"
    path = path_arg(config, "config")
    path = path / "config.json" if path.is_dir() else path
    return read_config(path), str(path)


def _hints(meta, source):
    """The ControlNet config stored in the file's metadata, or {}."""
    raw = (meta or {}).get(HINTS_KEY)
    if raw is None:
        return {}
    try:
        hints = json.loads(raw).get("controlnet", {})
    except (AttributeError, TypeError, json.JSONDecodeError):
        hints = None
    if not isinstance(hints, dict):
        msg = f"metadata {HINTS_KEY} has no usable 'controlnet' object; ignored"
        warnings.warn(f"{source}: {msg}", stacklevel=5)
        return {}
    return hints


def _mismatch(inferred, given):
    """What a given config says against the tensors (None: nothing)."""
    for field in STRUCTURE:
        if field not in given:
            continue
        have, want = given[field], inferred[field]
        if isinstance(have, (list, tuple)):
            have = list(have)
        if have != want:
            return (
                f"{field}={given[field]!r} does not fit the checkpoint's tensors, which say "
                f"{want!r}"
            )
    return None
