"""Rename tables between checkpoint layouts, and nothing else.

minisd's internal names are diffusers' safetensors names. Every other layout is renamed here,
once, at load time:

- the original CompVis / Stability AI single-file layout ("ldm"): ``model.diffusion_model.*``
  (UNet), ``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.text_model.*`` (SD1,
  OpenAI CLIP) or ``cond_stage_model.model.*`` (SD2, OpenCLIP with fused q/k/v);
- Stability's SDXL ("sgm") files: the same UNet and VAE names (plus ``label_emb``), the text
  encoders under ``conditioner.embedders.N.`` (see the SDXL prefixes below);
- lllyasviel's ControlNet files (``control_model.*``, ldm's cldm.ControlNet);
- the legacy diffusers VAE attention names (``query/key/value/proj_attn``).

The UNet, ControlNet and VAE tables are generated from the architecture (block count, layers
per block, which blocks have attention), so small test models convert exactly as full-size ones
do. The same tables drive both directions (diffusers <-> original). Semantics follow diffusers'
``loaders/single_file_utils.py`` (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_open_clip_checkpoint, convert_controlnet_checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

# Older diffusers VAE files name the attention projections of the mid-block attention as below.
LEGACY_VAE_ATTENTION = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}


def rename_legacy_vae_attention(flat):
    """Rename ``...attentions.0.query.weight`` -> ``...attentions.0.to_q.weight`` etc."""
    out = {}
    for name, value in flat.items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in LEGACY_VAE_ATTENTION and ".attentions." in name:
            name = ".".join(parts[:-2] + [LEGACY_VAE_ATTENTION[parts[-2]], parts[-1]])
        out[name] = value
    return out


# ------------------------------------------------------------------------- key prefixes

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD1.x: OpenAI CLIP ViT-L/14
# Some early SD1 files lack the "text_model." level (diffusers strips either prefix).
CLIP_PREFIX_OLD = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD2.x: OpenCLIP ViT-H/14
EMA_PREFIX = "model_ema."  # full checkpoints: EMA copy of the UNet, dots removed from names
# SD2-depth (512-depth-ema): the MiDaS DPT-Hybrid depth estimator, which minisd does not run.
DEPTH_MODEL_PREFIX = "depth_model."
# Second layout of diffusers' CLIP text encoder files (transformers < 5.6 saved this prefix).
TEXT_MODEL_PREFIX = "text_model."

# SDXL (sgm's GeneralConditioner): base = [OpenAI CLIP ViT-L/14 (HF layout), OpenCLIP ViT-bigG/14
# (fused q/k/v, all 32 blocks used)]; the refiner has the OpenCLIP encoder alone, as embedder 0.
CLIP_XL_PREFIX = "conditioner.embedders.0.transformer."  # then "text_model.*"
OPENCLIP_XL_PREFIX = "conditioner.embedders.1.model."
OPENCLIP_XL_REFINER_PREFIX = "conditioner.embedders.0.model."
# OpenCLIP's projection is a (width, embed) matrix applied as x @ P; transformers'
# text_projection is a Linear: its weight is P transposed (op "T" of weights_tools/plan.py).
OPENCLIP_PROJECTION = {"text_projection.weight": "text_projection"}

# Keys of original checkpoints that no diffusers model uses: DDPM schedule buffers of the
# LatentDiffusion module, EMA bookkeeping, CLIP's position_ids buffer, OpenCLIP's contrastive head.
UNUSED_ORIGINAL = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "model_ema.decay",
    "model_ema.num_updates",
    CLIP_PREFIX + "embeddings.position_ids",
    OPENCLIP_PREFIX + "text_projection",
    OPENCLIP_PREFIX + "logit_scale",
)
# The same in SDXL files (``denoiser.sigmas``: the sgm denoiser's noise levels, SDXL-Turbo).
UNUSED_XL = (
    CLIP_XL_PREFIX + "text_model.embeddings.position_ids",
    OPENCLIP_XL_PREFIX + "logit_scale",
    OPENCLIP_XL_REFINER_PREFIX + "logit_scale",
    "denoiser.sigmas",
)

# ------------------------------------------------------------------------- UNet

# diffusers name -> original name, at the top level of the UNet.
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# SDXL's micro-conditioning MLP (addition_embed_type "text_time"): ldm's label_emb Sequential.
UNET_TEXT_TIME = {
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
# Inside a ResnetBlock2D (diffusers) / ResBlock (ldm).
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Transformer2DModel (diffusers) and SpatialTransformer (ldm) share every inner name.


@dataclass(frozen=True)
class UNetArch:
    """What the UNet tables depend on. down_attn[b] / up_attn[b]: block b has attention;
    text_time: SDXL's add_embedding (ldm label_emb)."""

    layers_per_block: int
    down_attn: tuple
    up_attn: tuple
    mid_attn: bool = True
    text_time: bool = False

    @property
    def blocks(self):
        return len(self.down_attn)


def unet_modules(arch: UNetArch):
    """{diffusers module: (original module, inner table)} for a UNet2DConditionModel.

    ldm numbers its input blocks 0 (conv_in), then for down block b, layer l:
    ``1 + b (L + 1) + l``, with the downsampler at ``l = L`` (all blocks but the last). Output
    blocks: ``b (L + 1) + l`` for l in 0..L; the upsampler follows the resnet (``.1``) or the
    attention (``.2``). The middle block is resnet ``.0``, attention ``.1``, resnet ``.2``.
    """
    L, n = arch.layers_per_block, arch.blocks
    table = {d: (o, None) for d, o in UNET_TOP.items()}
    if arch.text_time:
        table.update({d: (o, None) for d, o in UNET_TEXT_TIME.items()})
    for b in range(n):
        for l in range(L):
            i = 1 + b * (L + 1) + l
            table[f"down_blocks.{b}.resnets.{l}"] = (f"input_blocks.{i}.0", UNET_RESNET)
            if arch.down_attn[b]:
                table[f"down_blocks.{b}.attentions.{l}"] = (f"input_blocks.{i}.1", None)
        if b < n - 1:
            i = 1 + b * (L + 1) + L
            table[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{i}.0.op", None)
    table["mid_block.resnets.0"] = ("middle_block.0", UNET_RESNET)
    if arch.mid_attn:
        table["mid_block.attentions.0"] = ("middle_block.1", None)
        table["mid_block.resnets.1"] = ("middle_block.2", UNET_RESNET)
    else:
        table["mid_block.resnets.1"] = ("middle_block.1", UNET_RESNET)
    for b in range(n):
        for l in range(L + 1):
            i = b * (L + 1) + l
            table[f"up_blocks.{b}.resnets.{l}"] = (f"output_blocks.{i}.0", UNET_RESNET)
            if arch.up_attn[b]:
                table[f"up_blocks.{b}.attentions.{l}"] = (f"output_blocks.{i}.1", None)
        if b < n - 1:
            i = b * (L + 1) + L
            slot = 2 if arch.up_attn[b] else 1
            table[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{i}.{slot}.conv", None)
    return table


# ------------------------------------------------------------------------- ControlNet

# lllyasviel's ControlNet 1.0 / 1.1 files (ldm ``cldm.ControlNet``): the keys carry this prefix,
# or none (files holding the ControlNet alone are often saved without it).
CONTROLNET_PREFIX = "control_model."
# diffusers name -> original name of the ControlNet's mid-block zero convolution.
CONTROLNET_TOP = {"controlnet_mid_block": "middle_block_out.0"}
_UNET_DECODER = ("up_blocks.", "conv_norm_out", "conv_out")


def controlnet_modules(arch: UNetArch, hint_convs: int):
    """{diffusers module: (original module, inner table)} for a ControlNetModel.

    The UNet's encoder half keeps the UNet's names (:func:`unet_modules` without up blocks and
    output convs). The zero convolutions are ``zero_convs.k.0`` (one per skip state, as
    ``input_blocks.k``), the mid one ``middle_block_out.0``. The hint block (diffusers'
    ``controlnet_cond_embedding``) is one Sequential of ``hint_convs`` convs with a SiLU after
    each but the last, so its convs sit at the even indices: conv_in at 0, ``blocks.j`` at
    ``2 (j + 1)``, conv_out at ``2 (hint_convs - 1)`` (14 in every SD ControlNet).
    """
    table = {d: v for d, v in unet_modules(arch).items() if not d.startswith(_UNET_DECODER)}
    table.update({d: (o, None) for d, o in CONTROLNET_TOP.items()})
    for k in range(arch.blocks * (arch.layers_per_block + 1)):  # = the number of skip states
        table[f"controlnet_down_blocks.{k}"] = (f"zero_convs.{k}.0", None)
    emb = "controlnet_cond_embedding"
    table[f"{emb}.conv_in"] = ("input_hint_block.0", None)
    for j in range(hint_convs - 2):
        table[f"{emb}.blocks.{j}"] = (f"input_hint_block.{2 * (j + 1)}", None)
    table[f"{emb}.conv_out"] = (f"input_hint_block.{2 * (hint_convs - 1)}", None)
    return table


# ------------------------------------------------------------------------- VAE

VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_norm_out": "decoder.norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# The mid-block attention: diffusers Attention (linear, 2-D weights) vs ldm AttnBlock (1x1 conv,
# 4-D weights (C, C, 1, 1)); the weights are reshaped at conversion, as diffusers does.
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
VAE_ATTENTION_CONV = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


@dataclass(frozen=True)
class VAEArch:
    blocks: int
    layers_per_block: int


def vae_modules(arch: VAEArch):
    """{diffusers module: (original module, inner table)} for AutoencoderKL.

    The encoder has L resnets per level, the decoder L + 1; ldm numbers decoder levels from the
    lowest resolution up in reverse: diffusers ``up_blocks.i`` is ldm ``up.{n - 1 - i}``.
    """
    n, L = arch.blocks, arch.layers_per_block
    table = {d: (o, None) for d, o in VAE_TOP.items()}
    for i in range(n):
        for j in range(L):
            table[f"encoder.down_blocks.{i}.resnets.{j}"] = (
                f"encoder.down.{i}.block.{j}",
                VAE_RESNET,
            )
        if i < n - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (
                f"encoder.down.{i}.downsample.conv",
                None,
            )
        for j in range(L + 1):
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = (
                f"decoder.up.{n - 1 - i}.block.{j}",
                VAE_RESNET,
            )
        if i < n - 1:
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (
                f"decoder.up.{n - 1 - i}.upsample.conv",
                None,
            )
    for part in ("encoder", "decoder"):
        for k in range(2):
            table[f"{part}.mid_block.resnets.{k}"] = (f"{part}.mid.block_{k + 1}", VAE_RESNET)
        table[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", VAE_ATTENTION)
    return table


# ------------------------------------------------------------------------- OpenCLIP (SD2)

OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
# q, k, v projections are one fused (3D, D) ``in_proj_weight`` / (3D,) ``in_proj_bias`` in
# OpenCLIP (torch.nn.MultiheadAttention), stacked in this order along dim 0.
OPENCLIP_QKV = ("q_proj", "k_proj", "v_proj")
OPENCLIP_FUSED = {"weight": "attn.in_proj_weight", "bias": "attn.in_proj_bias"}


def openclip_modules(layers: int):
    """{diffusers module: (original module, None)}: the unfused names of the OpenCLIP text
    transformer (``encoder.layers.i`` <-> ``transformer.resblocks.i``)."""
    table = {}
    for i in range(layers):
        for d, o in OPENCLIP_LAYER.items():
            table[f"encoder.layers.{i}.{d}"] = (f"transformer.resblocks.{i}.{o}", None)
    return table


# ------------------------------------------------------------------------- renaming


def invert(table):
    """Invert a module table: {original: (diffusers, inverted inner table)}."""
    out = {}
    for d, (o, inner) in table.items():
        out[o] = (d, None if inner is None else {v: k for k, v in inner.items()})
    return out


def rename(key, table):
    """Rename one parameter name through a module table (longest module prefix wins).

    Returns None when no module of the table holds ``key``.
    """
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if module in table:
            target, inner = table[module]
            rest = ".".join(parts[cut:])
            if inner is not None:
                rest = _rename_inner(rest, inner)
                if rest is None:
                    return None
            return f"{target}.{rest}"
    return None


def _rename_inner(rest, inner):
    """``conv_shortcut.weight`` -> ``skip_connection.weight`` (longest inner prefix wins)."""
    parts = rest.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in inner:
            return ".".join([inner[head], *parts[cut:]])
    return None
