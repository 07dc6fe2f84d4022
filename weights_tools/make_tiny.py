"""make_tiny: small random Stable Diffusion pipeline folders, numpy only, deterministic by seed.

Families: "sd1" (conv projections, 8-style head count, quick_gelu CLIP, PNDM, pads with EOS),
"sd2" (linear projections, per-block head counts, upcast attention, gelu text encoder, v-
prediction with DDIM, pads with "!"), "inpaint" (sd1 with a 9-channel UNet input),
"instruct-pix2pix" (sd1 with an 8-channel UNet input: InstructPix2Pix), "sd2-depth" (sd2 with
a 5-channel UNet input and epsilon prediction: depth2img), "sdxl" (SDXL base:
3 UNet levels, the first without attention, depths (1, 1, 2), "text_time" micro-conditioning
with 6 time ids, a quick_gelu CLIP plus a gelu CLIPTextModelWithProjection, Euler) and
"sdxl-refiner" (no first text encoder, 5 time ids, aesthetic-score conditioning) and
"sdxl-inpaint" (sdxl with a 9-channel UNet input: StableDiffusionXLInpaintPipeline). The folder is
laid out as diffusers' save_pretrained writes it: model_index.json, unet/ vae/ text_encoder/
(config.json + safetensors; SDXL: text_encoder_2/ too), tokenizer/ (the real CLIP vocabulary:
49408 tokens; SDXL: tokenizer_2/, padding with "!") and scheduler/. SD's real topology is kept
(4 UNet / VAE levels, 3 cross-attention blocks) at small widths.

Also: full-size configs and original-layout shape tables, for tests and benchmarks that need
the real architecture without real weights.
"""

from __future__ import annotations

import math

import numpy as np

from minisd.config import is_int
from minisd.errors import InputError

from . import configs as C
from . import plan as pl
from .folders import COMPONENTS, write_configs
from .keymaps import (
    OPENCLIP_PREFIX,
    OPENCLIP_XL_PREFIX,
    OPENCLIP_XL_REFINER_PREFIX,
    TEXT_MODEL_PREFIX,
)
from .output import building_folder, check_out_folder
from .presets import sdxl_model_index
from .schema import component_shapes
from .stream import write_tensors

FAMILIES = (
    "sd1", "sd2", "inpaint", "instruct-pix2pix", "sd2-depth", "sdxl", "sdxl-refiner",
    "sdxl-inpaint",
)  # fmt: skip
#: UNet input channels (else 4)
IN_CHANNELS = {
    "inpaint": 9, "sd2-inpaint": 9, "instruct-pix2pix": 8, "sd2-depth": 5, "sdxl-inpaint": 9,
}  # fmt: skip
PARTS = ("unet", "vae", "text_encoder")


def tiny_configs(family="sd1"):
    """Configs (as infer_configs returns them) of the tiny model of ``family``."""
    if family not in FAMILIES:
        raise InputError(f"family={family!r}: expected one of {FAMILIES}")
    if family.startswith("sdxl"):
        return _tiny_xl_configs(family == "sdxl-refiner", IN_CHANNELS.get(family, 4))
    sd2, depth = family.startswith("sd2"), family == "sd2-depth"
    blocks = [32, 32, 64, 64]
    unet = C.unet_config(
        block_out_channels=blocks,
        layers_per_block=1,
        cross_attention_dim=32,
        norm_num_groups=8,
        sample_size=8,
        in_channels=IN_CHANNELS.get(family, 4),
        attention_head_dim=[c // 16 for c in blocks] if sd2 else 4,
        use_linear_projection=sd2,
        upcast_attention=sd2,
    )
    vae = C.vae_config(
        block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=64
    )
    text = C.text_encoder_config(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=3 if sd2 else 2,
        hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=32,
    )
    pred = "v_prediction" if sd2 and not depth else "epsilon"
    sched = C.scheduler_config(pred)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text,
        "scheduler": sched,
        "model_index": C.model_index(sched["_class_name"], IN_CHANNELS.get(family, 4)),
        "tokenizer": {"pad_token": "!" if sd2 else "<|endoftext|>"},
        "family": "sd2-v" if family == "sd2" else family,
    }


def _tiny_xl_configs(refiner, in_channels=4):
    """SDXL base / refiner / inpainting at tiny widths (see the module docstring)."""
    blocks, time_dim, n_ids = [32, 64, 64], 8, 5 if refiner else 6
    text = {"intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    te1 = None if refiner else C.text_encoder_config(hidden_size=32, projection_dim=32, **text)
    te2 = C.text_encoder_config(
        architectures=["CLIPTextModelWithProjection"], hidden_act="gelu", hidden_size=32,
        projection_dim=32, **{**text, "num_hidden_layers": 3},
    )  # fmt: skip
    unet = C.unet_config(
        block_out_channels=blocks,
        layers_per_block=1,
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
        up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"],
        attention_head_dim=[c // 16 for c in blocks],
        transformer_layers_per_block=[1, 1, 2],
        cross_attention_dim=te2["hidden_size"] + (0 if refiner else te1["hidden_size"]),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=te2["projection_dim"] + n_ids * time_dim,
        norm_num_groups=8,
        sample_size=8,
        in_channels=in_channels,
    )
    vae = C.vae_config(
        block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8,
        sample_size=64, scaling_factor=0.13025, force_upcast=True,
    )  # fmt: skip
    sched = C.sdxl_scheduler_config()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": te1,
        "text_encoder_2": te2,
        "scheduler": sched,
        "model_index": sdxl_model_index(refiner, sched["_class_name"], in_channels),
        "tokenizer": None if refiner else {"pad_token": "<|endoftext|>"},
        "tokenizer_2": {"pad_token": "!"},
        "family": C.family_of(unet, te1, "epsilon"),
    }


def full_size_configs(family="sd1"):
    """Configs of the real architectures: "sd1" (SD1.5), "sd2-v" (SD2.1 768-v), "inpaint"
    (SD1.5 inpainting), "sd2-inpaint" (SD2 inpainting, epsilon, 512 px), "sd2-depth" (SD2
    depth2img, epsilon, 512 px), "instruct-pix2pix" (SD1.5 with an 8-channel input), "sdxl" /
    "sdxl-refiner" / "sdxl-inpaint" (SDXL 1.0 base / refiner / inpainting 0.1)."""
    names = ("sd1", "sd2-v", "inpaint", "sd2-inpaint", "sd2-depth", "instruct-pix2pix", "sdxl",
             "sdxl-refiner", "sdxl-inpaint")  # fmt: skip
    if family not in names:
        raise InputError(f"family={family!r}: expected one of {', '.join(names)}")
    in_channels = IN_CHANNELS.get(family, 4)
    if family.startswith("sdxl"):
        return _sdxl_configs(family == "sdxl-refiner", in_channels)
    sd2, v = family.startswith("sd2"), family == "sd2-v"
    unet = C.unet_config(in_channels=in_channels)
    text = C.text_encoder_config()
    vae = C.vae_config()
    if sd2:
        unet.update(
            cross_attention_dim=1024, use_linear_projection=True, attention_head_dim=[5, 10, 20, 20]
        )
        text.update(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=23,
            hidden_act="gelu",
            projection_dim=512,
        )
    if v:
        unet.update(sample_size=96, upcast_attention=True)
        vae["sample_size"] = 768
    sched = C.scheduler_config("v_prediction" if v else "epsilon")
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": sched}


def _sdxl_configs(refiner, in_channels=4):
    """SDXL 1.0 base / refiner (and inpainting 0.1: the base with a 9-channel input), as their
    diffusers folders configure them."""
    blocks = [384, 768, 1536, 1536] if refiner else [320, 640, 1280]
    attn = [False, True, True, False] if refiner else [False, True, True]
    unet = C.unet_config(
        block_out_channels=blocks,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
        attention_head_dim=[c // 64 for c in blocks],
        transformer_layers_per_block=4 if refiner else [1, 2, 10],
        cross_attention_dim=1280 if refiner else 2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2560 if refiner else 2816,
        sample_size=128,
        in_channels=in_channels,
    )
    vae = C.vae_config(sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    bigg = C.text_encoder_config(
        architectures=["CLIPTextModelWithProjection"], hidden_act="gelu", hidden_size=1280,
        intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280,
    )  # fmt: skip
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": None if refiner else C.text_encoder_config(),
        "text_encoder_2": bigg,
        "scheduler": C.sdxl_scheduler_config(),
    }


def original_shapes(configs):
    """{original-layout key: shape} of the model ``configs`` describe. SD2 files get OpenCLIP's
    unused last block and contrastive head, SDXL files OpenCLIP's logit_scale, as real
    checkpoints have them."""
    parts = [p for p in (*PARTS, "text_encoder_2") if configs.get(p) is not None]
    shapes = {part: component_shapes(part, configs[part]) for part in parts}
    xl = "text_encoder_2" in shapes
    openclip = not xl and configs["text_encoder"].get("hidden_act") == "gelu"
    moves, _ = pl.to_original(shapes, "sdxl" if xl else "openclip" if openclip else "clip")
    src = {(part, k): s for part, d in shapes.items() for k, s in d.items()}
    out = {m.dst: pl.out_shape(m, src) for m in moves}
    if xl:
        prefix = OPENCLIP_XL_PREFIX if "text_encoder" in shapes else OPENCLIP_XL_REFINER_PREFIX
        out[prefix + "logit_scale"] = ()
    if openclip:
        D, n = configs["text_encoder"]["hidden_size"], configs["text_encoder"]["num_hidden_layers"]
        last = {k: s for k, s in out.items() if ".transformer.resblocks.0." in k}
        out.update({k.replace(".resblocks.0.", f".resblocks.{n}."): s for k, s in last.items()})
        out.update(
            {OPENCLIP_PREFIX + "text_projection": (D, D), OPENCLIP_PREFIX + "logit_scale": ()}
        )
    return out


def random_tensor(name, shape, rng, dtype=np.float32):
    """A random parameter that keeps activations of the random model in a sane range.

    Matrices and kernels: N(0, 1/fan_in) (variance-preserving); embeddings: N(0, 0.02^2);
    norm scales: 1 + N(0, 0.05^2); biases: N(0, 0.02^2). Residual-branch outputs are halved so
    that the residual stream grows slowly with depth.
    """
    if name.endswith("embedding.weight"):
        return (0.02 * rng.standard_normal(shape)).astype(dtype)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        scale = 1.0 / math.sqrt(fan_in)
        if name.endswith(
            ("conv2.weight", "to_out.0.weight", "ff.net.2.weight", "proj_out.weight", "fc2.weight")
        ):
            scale *= 0.5
        return (scale * rng.standard_normal(shape)).astype(dtype)
    if name.endswith("weight"):
        return (1.0 + 0.05 * rng.standard_normal(shape)).astype(dtype)
    return (0.02 * rng.standard_normal(shape)).astype(dtype)


def make_tiny(out_folder, family="sd1", seed=0):
    """Write a small random pipeline folder of ``family`` (one of FAMILIES) into
    ``out_folder``; the same seed gives the same bytes. Returns the configs written."""
    configs = tiny_configs(family)
    seed = check_seed(seed)
    with building_folder(check_out_folder(out_folder, "out_folder")) as tmp:
        for index, part in enumerate((*PARTS, "text_encoder_2")):
            if configs.get(part) is None:
                continue
            rng = np.random.default_rng([seed, index])
            prefix = TEXT_MODEL_PREFIX if part == "text_encoder_2" else ""
            shapes = component_shapes(part, configs[part], prefix)
            items = [(k, "F32", s, random_tensor(k, s, rng)) for k, s in sorted(shapes.items())]
            sub, name = COMPONENTS[part]
            write_tensors(tmp / sub / name, items, metadata={"format": "pt"})
        write_configs(tmp, configs)
    return configs


def check_seed(seed):
    """``seed`` as an int; InputError unless it is a non-negative integer (numpy's rule)."""
    if is_int(seed) and seed >= 0:
        return int(seed)
    raise InputError(f"seed={seed!r}: expected a non-negative integer")
