"""SDXL (base and refiner) configs from the tensor shapes of an original "sgm" single file.

Stability's SDXL files keep SD's UNet and VAE names (the UNet adds ``label_emb``, the
micro-conditioning MLP) and hold the text encoders under ``conditioner.embedders.N.``: the base
has OpenAI CLIP ViT-L/14 (``0.transformer.text_model.*``) and OpenCLIP ViT-bigG/14
(``1.model.*``), the refiner the OpenCLIP one alone (``0.model.*``). What the weights show, on
top of what SD's do (weights_tools/configs.py):

- base or refiner: whether the first (CLIP) encoder is there;
- inpainting (SDXL 1.0 inpainting 0.1): 9 UNet input channels (latents, mask, masked-image
  latents), as SD inpainting checkpoints; the folder is then a StableDiffusionXLInpaintPipeline;
- transformer depth per UNet level and in the mid block (base [1, 2, 10]: the first level has
  no attention; refiner 4);
- the OpenCLIP projection width (``text_projection``: (width, embed), used as x @ P);
- ``addition_time_embed_dim``: ``label_emb.0.0`` takes the pooled text embedding plus one
  sinusoid per micro-conditioning number, 6 for the base (original size, crop top-left, target
  size), 5 for the refiner (original size, crop top-left, aesthetic score):
  2816 = 1280 + 6 * 256, 2560 = 1280 + 5 * 256.

What they do not show, taken from Stability's published diffusers configs: 64-channel heads
(UNet ``attention_head_dim`` [5, 10, 20] / [6, 12, 24, 24], CLIP 12 and 20 heads),
``norm_num_groups`` 32, 1024 px sample sizes, the VAE's ``scaling_factor`` 0.13025 and
``force_upcast``, and epsilon prediction with EulerDiscreteScheduler (as diffusers' single-file
loader assumes; pass ``prediction_type`` for v-prediction fine-tunes). Every OpenCLIP block is
used (SDXL conditions on the penultimate hidden state but needs the last for the pooled output).
"""

from __future__ import annotations

from minisd.errors import ConfigError

from .configs import (
    STRUCTURE,
    _need,
    _vae_from_shapes,
    clip_config,
    indices,
    openclip_config,
    transformer_depths,
    unet_arch_original,
    unet_fields,
)
from .hints import apply_given, given_prediction
from .keymaps import CLIP_XL_PREFIX, OPENCLIP_XL_PREFIX, OPENCLIP_XL_REFINER_PREFIX, UNET_PREFIX
from .presets import family_of, sdxl_model_index, sdxl_scheduler_config, unet_config

# Structural fields checked against a given config (see configs.STRUCTURE).
STRUCTURE_XL = {
    **STRUCTURE,
    "unet": STRUCTURE["unet"] + ("addition_embed_type", "projection_class_embeddings_input_dim"),
    "text_encoder_2": STRUCTURE["text_encoder"] + ("projection_dim",),
}
PAD_TOKENS = ("<|endoftext|>", "!")  # tokenizer (CLIP ViT-L), tokenizer_2 (OpenCLIP bigG)


def is_sdxl(shapes):
    return any(k.startswith("conditioner.embedders.") for k in shapes)


def text_prefixes(shapes):
    """(CLIP ViT-L prefix or None for the refiner, OpenCLIP prefix) of an SDXL file."""
    if any(k.startswith(CLIP_XL_PREFIX) for k in shapes):
        return CLIP_XL_PREFIX + "text_model.", OPENCLIP_XL_PREFIX
    return None, OPENCLIP_XL_REFINER_PREFIX


def infer_xl(shapes, config, prediction_type, hints, source):
    """configs.infer_configs for SDXL files (same arguments and result fields, plus
    "text_encoder_2" and "tokenizer_2"; "text_encoder" and "tokenizer" None for the refiner)."""
    if "edm_mean" in shapes:
        raise ConfigError("checkpoint: Playground v2.5 (EDM, edm_mean / edm_std): not supported")
    clip, openclip = text_prefixes(shapes)
    te2 = _text_encoder_2(shapes, openclip)
    out = {
        "unet": _unet(shapes, te2["projection_dim"], 6 if clip else 5),
        "vae": {
            **_vae_from_shapes(shapes),
            "sample_size": 1024,
            "scaling_factor": 0.13025,
            "force_upcast": True,
        },
        "text_encoder": clip_config(shapes, clip) if clip else None,
        "text_encoder_2": te2,
    }
    given, source = apply_given(out, config, hints, source, STRUCTURE_XL)
    pred = given_prediction(prediction_type, given, config) or "epsilon"
    if "scheduler" in given:
        out["scheduler"] = {**given["scheduler"], "prediction_type": pred}
    else:
        out["scheduler"] = sdxl_scheduler_config(pred)
    refiner = clip is None
    out["model_index"] = given.get("model_index") or sdxl_model_index(
        refiner, out["scheduler"]["_class_name"], out["unet"]["in_channels"]
    )
    tok = given.get("tokenizer") or {"pad_token": PAD_TOKENS[0]}
    out["tokenizer"] = None if refiner else tok
    out["tokenizer_2"] = given.get("tokenizer_2") or {"pad_token": PAD_TOKENS[1]}
    out["family"] = family_of(out["unet"], out["text_encoder"], pred)
    out["text_layout"], out["source"] = "sdxl", source
    return out


def _text_encoder_2(shapes, p):
    """CLIPTextModelWithProjection config of the OpenCLIP ViT-bigG encoder under ``p``."""
    layers = len(indices(shapes, p + "transformer.resblocks."))
    cfg = openclip_config(shapes, p, layers, None)
    cfg["projection_dim"] = _need(shapes, p + "text_projection")[1]  # (width, embed)
    cfg["architectures"] = ["CLIPTextModelWithProjection"]
    return cfg


def _unet(shapes, pooled, n_ids):
    """UNet2DConditionModel config with SDXL's "text_time" micro-conditioning."""
    arch = unet_arch_original(shapes)
    fields = unet_fields(shapes, arch)
    if fields["in_channels"] not in (4, 9):  # 9: inpainting
        raise ConfigError(
            f"checkpoint: SDXL UNet with {fields['in_channels']} input channels: not supported "
            "(4: text-to-image, 9: inpainting)"
        )
    width = _need(shapes, UNET_PREFIX + "label_emb.0.0.weight")[1]
    time_dim, rem = divmod(width - pooled, n_ids)
    if rem or time_dim < 1:
        raise ConfigError(
            f"checkpoint: label_emb.0.0 takes {width} features, not {pooled} (pooled text "
            f"embedding) + {n_ids} time embeddings of one width"
        )
    return unet_config(
        **fields,
        attention_head_dim=[max(1, c // 64) for c in fields["block_out_channels"]],
        transformer_layers_per_block=_depths(shapes, arch),
        sample_size=128,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=width,
    )


def _depths(shapes, arch):
    """transformer_layers_per_block: one int when every attention (and the mid block's) has the
    same depth, else a list (levels without attention: 1, or the mid block's depth for the last
    level, which diffusers' mid block reads)."""
    depths = transformer_depths(shapes, arch)
    mid = None
    if arch.mid_attn:
        mid = len(indices(shapes, UNET_PREFIX + "middle_block.1.transformer_blocks."))
    seen = {d for d in [*depths, mid] if d is not None}
    if len(seen) <= 1:
        return seen.pop() if seen else 1
    out = [1 if d is None else d for d in depths]
    if mid is not None and depths[-1] is None:
        out[-1] = mid
    if mid is not None and out[-1] != mid:
        raise ConfigError(
            f"checkpoint: the mid block has {mid} transformer blocks, the last level "
            f"{out[-1]}: diffusers' UNet2DConditionModel cannot hold that"
        )
    return out
