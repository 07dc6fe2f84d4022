"""Full-size SDXL 1.0 base / refiner key tables, on shapes only (meta tensors, no memory).

The original-layout key set weights_tools writes for Stability's published configs must be what
diffusers recognises as an SDXL base / refiner file and converts (single_file_utils) into
exactly the keys and shapes of diffusers / transformers models built from those configs; and
weights_tools must infer those configs back from the shapes and plan the same keys and shapes.
"""

import importlib
import warnings

import numpy as np
import pytest
from refharness import need

import weights_tools as wt
from weights_tools import plan as pl
from weights_tools.make_tiny import full_size_configs, original_shapes

OPENCLIP = {
    "sdxl": "conditioner.embedders.1.model.",
    "sdxl-refiner": "conditioner.embedders.0.model.",
}


def _unprefixed(flat):
    return {k.removeprefix("text_model."): v for k, v in flat.items()}


def _meta_models(configs):
    """diffusers / transformers modules of ``configs`` on the meta device (no memory)."""
    torch, diffusers, transformers = need("torch", "diffusers", "transformers")
    drop = ("_class_name", "_diffusers_version")
    out = {}
    with torch.device("meta"):
        out["unet"] = diffusers.UNet2DConditionModel(
            **{k: v for k, v in configs["unet"].items() if k not in drop}
        )
        out["vae"] = diffusers.AutoencoderKL(
            **{k: v for k, v in configs["vae"].items() if k not in drop}
        )
        classes = {"text_encoder": transformers.CLIPTextModel,
                   "text_encoder_2": transformers.CLIPTextModelWithProjection}  # fmt: skip
        for part, cls in classes.items():
            if configs.get(part) is not None:
                out[part] = cls(transformers.CLIPTextConfig(**configs[part]))
    return out


# Stability's published diffusers configs (stable-diffusion-xl-{base,refiner}-1.0), the fields
# that shape the weights or the computation.
PUBLISHED = {
    "sdxl": {
        "unet": dict(block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
                     transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
                     projection_class_embeddings_input_dim=2816, addition_time_embed_dim=256,
                     down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
                     up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"]),
        "text_encoder": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             hidden_act="quick_gelu", projection_dim=768),
    },
    "sdxl-refiner": {
        "unet": dict(block_out_channels=[384, 768, 1536, 1536], attention_head_dim=[6, 12, 24, 24],
                     transformer_layers_per_block=4, cross_attention_dim=1280,
                     projection_class_embeddings_input_dim=2560, addition_time_embed_dim=256,
                     down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2
                     + ["DownBlock2D"],
                     up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"]),
    },
}  # fmt: skip
BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, hidden_act="gelu", projection_dim=1280)  # fmt: skip
UNET_COMMON = dict(layers_per_block=2, use_linear_projection=True, sample_size=128,
                   addition_embed_type="text_time", in_channels=4, out_channels=4,
                   mid_block_type="UNetMidBlock2DCrossAttn")  # fmt: skip


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner"])
def test_full_size_key_tables_match_diffusers(family):
    """Full-size SDXL 1.0: the original key set (shapes only) is what diffusers recognises and
    converts into exactly its models' keys and shapes; weights_tools infers Stability's configs
    from it and plans the same keys and shapes."""
    torch = need("torch")
    sfu = importlib.import_module("diffusers.loaders.single_file_utils")
    configs = full_size_configs(family)
    pub = PUBLISHED[family]
    for f, v in {**UNET_COMMON, **pub["unet"]}.items():
        assert configs["unet"][f] == v, f"unet.{f}"
    for part, want in (("text_encoder_2", BIGG), ("text_encoder", pub.get("text_encoder"))):
        for f, v in (want or {}).items():
            assert configs[part][f] == v, f"{part}.{f}"
    models = _meta_models(configs)
    expect = {p: {k: tuple(v.shape) for k, v in m.state_dict().items()} for p, m in models.items()}
    expect.get("text_encoder", {}).pop("embeddings.position_ids", None)
    expect["text_encoder_2"].pop("text_model.embeddings.position_ids", None)
    if family == "sdxl":
        assert sum(map(np.prod, expect["unet"].values())) == 2_567_463_684  # SDXL base UNet

    shapes = original_shapes(configs)
    ckpt = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    want_type = "xl_base" if family == "sdxl" else "xl_refiner"
    assert sfu.infer_diffusers_model_type(ckpt) == want_type
    prefix = OPENCLIP[family]
    got = {
        "unet": sfu.convert_ldm_unet_checkpoint(ckpt, configs["unet"]),
        "vae": sfu.convert_ldm_vae_checkpoint(ckpt, configs["vae"]),
        "text_encoder_2": sfu.convert_open_clip_checkpoint(
            models["text_encoder_2"], ckpt, prefix=prefix
        ),
    }
    if family == "sdxl":
        got["text_encoder"] = _unprefixed(sfu.convert_ldm_clip_checkpoint(ckpt))
    got = {p: {k: tuple(v.shape) for k, v in flat.items()} for p, flat in got.items()}
    assert got == expect, "diffusers' converters disagree with the original key table"

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inferred = wt.infer_configs(shapes)
    for part in configs:
        assert inferred[part] == configs[part], part
    plans, skipped = pl.from_original(shapes, text_prefix_2="text_model.")
    assert skipped == {"unused": [prefix + "logit_scale"], "unknown": []}
    src = {("file", k): s for k, s in shapes.items()}
    planned = {p: {m.dst: pl.out_shape(m, src) for m in moves} for p, moves in plans.items()}
    assert planned == expect
