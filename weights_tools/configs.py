"""Architecture from tensor shapes: diffusers config dicts for an original single-file checkpoint.

What the weights show: channel counts, block and layer counts, which blocks have attention,
conv vs linear projection (SD1 vs SD2), the text encoder's size and layout (OpenAI CLIP vs
OpenCLIP). What they do not show, and where the defaults come from:

- ``prediction_type``: SD2.x 768-v checkpoints predict v, SD2.x-base predicts epsilon, with the
  same tensors. As diffusers does (single_file_utils._legacy_load_scheduler), an SD2 checkpoint is
  assumed to be v-prediction unless told otherwise (``prediction_type=`` or ``config=``).
- head counts: SD1 uses 8 heads per attention (diffusers' misnamed ``attention_head_dim=8``),
  SD2 64-channel heads; CLIP 64-channel heads.
- ``norm_num_groups`` (32), ``scaling_factor`` (0.18215), sample sizes (512 / 768 px),
  ``upcast_attention`` (True for SD2.x-v, as the SD2.1 repository configures it).

Files written by :func:`weights_tools.to_original` carry the configs of their folder in the
safetensors metadata (key ``minisd_configs``); they are used as hints when they fit the tensors.
"""

from __future__ import annotations

import re
import warnings

from minisd.errors import ConfigError, WeightsError

from .hints import HINTS_KEY, apply_given, given_prediction  # noqa: F401  (HINTS_KEY re-exported)
from .keymaps import (
    CLIP_PREFIX,
    CLIP_PREFIX_OLD,
    CLIP_XL_PREFIX,
    DEPTH_MODEL_PREFIX,
    EMA_PREFIX,
    OPENCLIP_PREFIX,
    OPENCLIP_XL_PREFIX,
    OPENCLIP_XL_REFINER_PREFIX,
    UNET_PREFIX,
    UNUSED_ORIGINAL,
    UNUSED_XL,
    VAE_PREFIX,
    UNetArch,
    VAEArch,
)
from .presets import (  # noqa: F401  (re-exported: the config builders live in presets.py)
    PREDICTION_TYPES,
    check_prediction_type,
    family_of,
    model_index,
    scheduler_config,
    sdxl_scheduler_config,
    text_encoder_config,
    unet_config,
    vae_config,
)

# Structural fields: seen in the tensors, so a config given by the user must agree with them.
STRUCTURE = {
    "unet": (
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "down_block_types",
        "up_block_types",
        "cross_attention_dim",
        "use_linear_projection",
    ),
    "vae": ("in_channels", "out_channels", "block_out_channels", "latent_channels"),
    "text_encoder": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"),
}


def shapes_of(flat):
    """{name: shape tuple} of a flat dict of arrays (or of shapes)."""
    return {
        k: tuple(v) if isinstance(v, (tuple, list)) else tuple(v.shape) for k, v in flat.items()
    }


def component_of(key):
    """Which part of an original single-file checkpoint a key belongs to (SDXL's OpenCLIP
    encoder: "text_encoder_2")."""
    if key in UNUSED_ORIGINAL or key in UNUSED_XL or key.startswith(DEPTH_MODEL_PREFIX):
        return "unused"
    for prefix, part in (
        (UNET_PREFIX, "unet"),
        (VAE_PREFIX, "vae"),
        (CLIP_PREFIX_OLD, "text_encoder"),
        (OPENCLIP_PREFIX, "text_encoder"),
        (CLIP_XL_PREFIX, "text_encoder"),
        (OPENCLIP_XL_PREFIX, "text_encoder_2"),
        (OPENCLIP_XL_REFINER_PREFIX, "text_encoder_2"),
        (EMA_PREFIX, "ema"),
    ):
        if key.startswith(prefix):
            return part
    return "unknown"


def indices(keys, prefix):
    """Sorted integers ``i`` of the keys starting with ``prefix + "i."``."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _need(shapes, key, source="checkpoint"):
    if key not in shapes:
        raise WeightsError(f"{source}: missing key {key!r}, needed to infer the architecture")
    return shapes[key]


# ------------------------------------------------------------------------- architectures


def unet_arch_original(shapes, prefix=UNET_PREFIX):
    """UNetArch from original-layout keys (``model.diffusion_model.`` prefix; a ControlNet's
    encoder copy has no output blocks, so its up_attn is all False)."""
    p = prefix
    keys = [k for k in shapes if k.startswith(p)]
    inputs = [i for i in indices(keys, p + "input_blocks.") if i > 0]
    downs = [i for i in inputs if p + f"input_blocks.{i}.0.op.weight" in shapes]
    n = len(downs) + 1
    L, rem = divmod(len(inputs) - len(downs), n)
    if not inputs or rem or L < 1:
        raise WeightsError(
            f"checkpoint: cannot read the UNet block layout from {len(inputs)} inputs"
        )
    down_attn = tuple(
        p + f"input_blocks.{1 + b * (L + 1)}.1.norm.weight" in shapes for b in range(n)
    )
    up_attn = tuple(p + f"output_blocks.{b * (L + 1)}.1.norm.weight" in shapes for b in range(n))
    mid_attn = p + "middle_block.1.norm.weight" in shapes
    return UNetArch(L, down_attn, up_attn, mid_attn, p + "label_emb.0.0.weight" in shapes)


def unet_arch_diffusers(shapes):
    """UNetArch from diffusers-layout keys."""
    n = len(indices(shapes, "down_blocks."))
    L = len(indices(shapes, "down_blocks.0.resnets."))
    if n < 1 or L < 1:
        raise WeightsError("UNet weights: no down_blocks.*.resnets.* keys")
    down_attn = tuple(bool(indices(shapes, f"down_blocks.{b}.attentions.")) for b in range(n))
    up_attn = tuple(bool(indices(shapes, f"up_blocks.{b}.attentions.")) for b in range(n))
    mid_attn = "mid_block.attentions.0.norm.weight" in shapes
    return UNetArch(L, down_attn, up_attn, mid_attn, "add_embedding.linear_1.weight" in shapes)


def vae_arch_original(shapes):
    n = len(indices(shapes, VAE_PREFIX + "encoder.down."))
    L = len(indices(shapes, VAE_PREFIX + "encoder.down.0.block."))
    if n < 1 or L < 1:
        raise WeightsError("checkpoint: no first_stage_model.encoder.down.*.block.* keys (VAE)")
    return VAEArch(n, L)


def vae_arch_diffusers(shapes):
    n = len(indices(shapes, "encoder.down_blocks."))
    L = len(indices(shapes, "encoder.down_blocks.0.resnets."))
    if n < 1 or L < 1:
        raise WeightsError("VAE weights: no encoder.down_blocks.*.resnets.* keys")
    return VAEArch(n, L)


def text_layout(shapes):
    """ "clip" (SD1), "openclip" (SD2) or None, for original-layout keys."""
    if clip_prefix(shapes):
        return "clip"
    if OPENCLIP_PREFIX + "token_embedding.weight" in shapes:
        return "openclip"
    return None


def clip_prefix(shapes):
    """The prefix of the SD1 (OpenAI CLIP) text encoder keys, or None."""
    for prefix in (CLIP_PREFIX, CLIP_PREFIX_OLD):
        if prefix + "embeddings.token_embedding.weight" in shapes:
            return prefix
    return None


def openclip_used_layers(shapes):
    """Blocks of the OpenCLIP text transformer that SD2 uses.

    SD2 conditions on the penultimate layer, so the file's last block is unused: diffusers drops
    ``resblocks.23`` (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE). A full OpenCLIP dump is recognised by its
    ``text_projection`` or by the 24 blocks of ViT-H; files written by to_original hold exactly
    the used blocks.
    """
    n = len(indices(shapes, OPENCLIP_PREFIX + "transformer.resblocks."))
    full = OPENCLIP_PREFIX + "text_projection" in shapes or n == 24
    return n - 1 if full else n


# ------------------------------------------------------------------------- inference


def _unet_from_shapes(shapes, sd2):
    arch = unet_arch_original(shapes)
    if any(k.startswith(UNET_PREFIX + "label_emb.") for k in shapes):
        raise ConfigError("checkpoint: class/size-conditioned UNet (label_emb): not SD1.x/SD2.x")
    fields = unet_fields(shapes, arch)
    blocks, linear = fields["block_out_channels"], fields["use_linear_projection"]
    depths = {d for d in transformer_depths(shapes, arch) if d is not None}
    heads = [max(1, c // 64) for c in blocks] if linear or sd2 else 8
    return unet_config(
        **fields,
        attention_head_dim=heads,
        transformer_layers_per_block=depths.pop() if len(depths) == 1 else 1,
    )


def unet_fields(shapes, arch):
    """The UNet config fields an original checkpoint shows in its tensors (block layout,
    channels, context width, linear vs conv projections)."""
    p, L, n = UNET_PREFIX, arch.layers_per_block, arch.blocks
    conv_in = _need(shapes, p + "input_blocks.0.0.weight")  # (C0, in, 3, 3)
    blocks = [
        _need(shapes, p + f"input_blocks.{1 + b * (L + 1)}.0.out_layers.3.weight")[0]
        for b in range(n)
    ]
    cross = [s for k, s in shapes.items() if k.startswith(p) and k.endswith("attn2.to_k.weight")]
    proj = [s for k, s in shapes.items() if k.startswith(p) and k.endswith(".proj_in.weight")]
    if not cross or not proj:
        raise ConfigError("checkpoint: the UNet has no cross-attention (not a text-to-image model)")
    return dict(
        in_channels=conv_in[1],
        out_channels=_need(shapes, p + "out.2.weight")[0],
        block_out_channels=blocks,
        layers_per_block=L,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch.down_attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in arch.up_attn],
        mid_block_type="UNetMidBlock2DCrossAttn" if arch.mid_attn else "UNetMidBlock2D",
        cross_attention_dim=cross[0][1],
        use_linear_projection=len(proj[0]) == 2,
    )


def transformer_depths(shapes, arch):
    """Transformer blocks per down level (None where the level has no attention)."""
    p, L = UNET_PREFIX, arch.layers_per_block
    return [
        len(indices(shapes, p + f"input_blocks.{1 + b * (L + 1)}.1.transformer_blocks."))
        if arch.down_attn[b]
        else None
        for b in range(arch.blocks)
    ]


def _vae_from_shapes(shapes):
    p, arch = VAE_PREFIX, vae_arch_original(shapes)
    return vae_config(
        in_channels=_need(shapes, p + "encoder.conv_in.weight")[1],
        out_channels=_need(shapes, p + "decoder.conv_out.weight")[0],
        block_out_channels=[
            _need(shapes, p + f"encoder.down.{i}.block.0.conv2.weight")[0]
            for i in range(arch.blocks)
        ],
        latent_channels=_need(shapes, p + "decoder.conv_in.weight")[1],
        layers_per_block=arch.layers_per_block,
    )


def _text_from_shapes(shapes, layout):
    if layout == "clip":
        return clip_config(shapes, clip_prefix(shapes))
    return openclip_config(shapes, OPENCLIP_PREFIX, openclip_used_layers(shapes), 512)


def clip_config(shapes, p):
    """CLIPTextModel config of an OpenAI CLIP text encoder whose keys start with ``p``."""
    tok, pos = p + "embeddings.token_embedding.weight", p + "embeddings.position_embedding.weight"
    layers = len(indices(shapes, p + "encoder.layers."))
    return _text_config(
        shapes, tok, pos, layers, p + "encoder.layers.0.mlp.fc1.weight", "quick_gelu", 768
    )


def openclip_config(shapes, p, layers, proj):
    """CLIPTextModel config of ``layers`` blocks of an OpenCLIP text tower under ``p``."""
    tok, pos = p + "token_embedding.weight", p + "positional_embedding"
    fc1 = p + "transformer.resblocks.0.mlp.c_fc.weight"
    return _text_config(shapes, tok, pos, layers, fc1, "gelu", proj)


def _text_config(shapes, tok, pos, layers, fc1, act, proj):
    vocab, hidden = _need(shapes, tok)
    return text_encoder_config(
        vocab_size=vocab,
        hidden_size=hidden,
        max_position_embeddings=_need(shapes, pos)[0],
        num_hidden_layers=layers,
        intermediate_size=_need(shapes, fc1)[0],
        num_attention_heads=max(1, hidden // 64),
        hidden_act=act,
        projection_dim=proj,
    )


def infer_configs(flat, *, config=None, prediction_type=None, hints=None, source=None):
    """Diffusers configs for an original-layout checkpoint (``flat``: {name: array or shape}).

    Returns {"family", "unet", "vae", "text_encoder", "scheduler", "tokenizer": {"pad_token"},
    "model_index", "text_layout", "source"}; SDXL files (``conditioner.embedders.*``) add
    "text_encoder_2" and "tokenizer_2", with "text_encoder" / "tokenizer" None for the refiner
    (see weights_tools/configs_xl.py). ``config``: a diffusers folder whose configs are used
    (they must agree with the tensors); ``hints``: configs stored by to_original in the file's
    metadata (a dict, or the metadata dict holding ``minisd_configs``); ``prediction_type``
    overrides the scheduler's. ``source`` (a file name) is named in error messages.
    """
    check_prediction_type(prediction_type)
    try:
        return _infer(shapes_of(flat), config, prediction_type, hints, source)
    except (WeightsError, ConfigError) as e:
        msg = str(e)
        if source is not None and msg.startswith("checkpoint:"):
            raise type(e)(f"{source}:{msg[len('checkpoint:') :]}") from None
        raise


def _infer(shapes, config, prediction_type, hints, source):
    from .configs_xl import infer_xl, is_sdxl  # (it builds on this module)

    if is_sdxl(shapes):
        return infer_xl(shapes, config, prediction_type, hints, source)
    layout = text_layout(shapes)
    if layout is None:
        raise WeightsError("checkpoint: no text encoder (cond_stage_model.*) keys")
    sd2 = layout == "openclip"
    out = {
        "unet": _unet_from_shapes(shapes, sd2),
        "vae": _vae_from_shapes(shapes),
        "text_encoder": _text_from_shapes(shapes, layout),
    }
    given, source = apply_given(out, config, hints, source, STRUCTURE)
    pred = given_prediction(prediction_type, given, config)
    pred = pred or _default_prediction(sd2, out["unet"]["in_channels"])
    if "scheduler" in given:
        out["scheduler"] = {**given["scheduler"], "prediction_type": pred}
    else:
        out["scheduler"] = scheduler_config(pred)
    if source == "inferred" and pred == "v_prediction":
        out["unet"].update(sample_size=96, upcast_attention=True)
        out["vae"]["sample_size"] = 768
    out["model_index"] = given.get("model_index") or model_index(
        out["scheduler"]["_class_name"], out["unet"]["in_channels"]
    )
    out["tokenizer"] = given.get("tokenizer") or {"pad_token": "!" if sd2 else "<|endoftext|>"}
    out["family"] = family_of(out["unet"], out["text_encoder"], pred)
    out["text_layout"], out["source"] = layout, source
    return out


def _default_prediction(sd2, in_channels):
    """What diffusers assumes when nothing says (single_file_utils._legacy_load_scheduler): SD2
    text-to-image checkpoints predict v (SD2.x 768-v), everything else epsilon."""
    if not sd2 or in_channels != 4:
        return "epsilon"
    warnings.warn(
        "SD2.x checkpoint: v-prediction (768-v) vs epsilon (512-base) cannot be seen in the "
        "weights; assuming prediction_type='v_prediction' as diffusers does. Pass "
        "prediction_type='epsilon' (or config=<diffusers folder>) for SD2-base models.",
        stacklevel=5,
    )
    return "v_prediction"
