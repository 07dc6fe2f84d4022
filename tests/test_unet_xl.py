"""SDXL UNets (addition_embed_type "text_time", minisd/micro_cond.py) against diffusers: every
named module and the output, float64 and float32, base-like (six time ids) and refiner-like
(five), tiny and at SDXL's widths. The add_time_proj sinusoids are a float32 island like
time_proj (tests/test_unet.py's docstring); in float64 the reference continues from ours."""

from __future__ import annotations

import numpy as np
import pytest
from refharness import diffusers_models, need, rand, torch_dtype
from test_unet import DTYPES, build_full_size, compare_whole, in_each_dtype

from minisd.errors import ConfigError, InputError
from minisd.unet import UNet2DConditionModel, UNetConfig

TINY = {
    # SDXL base's layout: no attention at the top level, deeper transformers further down
    "base": dict(
        sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3), attention_head_dim=(2, 4, 4),
        use_linear_projection=True, cross_attention_dim=48, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    ),
    # the refiner's: four levels, attention in the middle two, five time ids (aesthetic score)
    "refiner": dict(
        sample_size=16, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                          "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2, attention_head_dim=(2, 4, 4, 4),
        use_linear_projection=True, cross_attention_dim=24, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=16,
        projection_class_embeddings_input_dim=24 + 5 * 16,
    ),
}  # fmt: skip
TIME_IDS = {
    "base": np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 832, 1216]], float),
    "refiner": np.array([[1024, 1024, 0, 0, 6.0], [512, 768, 16, 0, 2.5]]),
}


@pytest.fixture(scope="module")
def tiny(ref_cache):
    return diffusers_models(ref_cache, "UNet2DConditionModel", TINY, "unet_xl", seed=5)


def _inputs(cfg, time_ids, h, w, dtype):
    n = len(time_ids)
    pooled = cfg.projection_class_embeddings_input_dim - time_ids.shape[1] * (
        cfg.addition_time_embed_dim
    )
    x = rand(n, cfg.in_channels, h, w).astype(dtype)
    ctx = rand(n, 9, cfg.cross_attention_dim[0], seed=1).astype(dtype)
    text = rand(n, pooled, seed=2).astype(dtype)
    return x, ctx, {"text_embeds": text, "time_ids": time_ids.astype(dtype)}


def _compare(ours, ref, x, t, ctx, added, dtype):
    torch = need("torch")
    ref_added = {k: torch.from_numpy(v) for k, v in added.items()}
    ref_args = [torch.from_numpy(x), torch.from_numpy(np.asarray(t)), torch.from_numpy(ctx)]
    return compare_whole(
        ours, ref, [x, t, ctx, None, None, None, None, None, added], ref_args, dtype,
        ref_kwargs={"added_cond_kwargs": ref_added}, time_ids=added["time_ids"],
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(TINY))
def test_every_layer_matches_diffusers(tiny, name, dtype):
    ref, folder = tiny(name)
    ours = UNet2DConditionModel.from_pretrained(folder, dtype=dtype)
    ref = ref.to(torch_dtype(dtype))
    try:
        x, ctx, added = _inputs(ours.config, TIME_IDS[name], 8, 12, dtype)
        errs = _compare(ours, ref, x, np.array([999, 37]), ctx, added, dtype)
    finally:
        ref.float()
    assert {"add_embedding.linear_1", "add_embedding.linear_2", "add_embedding"} <= set(errs)
    assert len(errs) > 60


def test_micro_conditioning_changes_the_output(tiny):
    """The six numbers and the pooled embedding both reach eps (nothing is dropped)."""
    _, folder = tiny("base")
    unet = UNet2DConditionModel.from_pretrained(folder)
    x, ctx, added = _inputs(unet.config, TIME_IDS["base"][:1], 8, 8, "float32")
    base = unet(x, 500, ctx, added_cond_kwargs=added)
    other_ids = {**added, "time_ids": added["time_ids"] + np.float32(64)}
    other_text = {**added, "text_embeds": -added["text_embeds"]}
    for changed in (other_ids, other_text):
        assert np.abs(unet(x, 500, ctx, added_cond_kwargs=changed) - base).max() > 1e-3


def test_added_cond_kwargs_errors(tiny):
    _, folder = tiny("base")
    unet = UNet2DConditionModel.from_pretrained(folder)
    x, ctx, added = _inputs(unet.config, TIME_IDS["base"], 8, 8, "float32")
    with pytest.raises(InputError, match="added_cond_kwargs.*text_time"):
        unet(x, 1, ctx)
    with pytest.raises(InputError, match="added_cond_kwargs.*text_time"):
        unet(x, 1, ctx, added_cond_kwargs={"text_embeds": added["text_embeds"]})
    bad = {**added, "time_ids": added["time_ids"][:, :5]}
    with pytest.raises(InputError, match="projection_class_embeddings_input_dim 80"):
        unet(x, 1, ctx, added_cond_kwargs=bad)
    with pytest.raises(InputError, match="2 rows"):
        unet(x, 1, ctx, added_cond_kwargs={**added, "time_ids": added["time_ids"][:1]})


def test_sd_unet_refuses_added_cond_kwargs(ref_cache):
    from test_unet import TINY as SD

    _, folder = diffusers_models(ref_cache, "UNet2DConditionModel", SD, "unet", seed=1)("sd1")
    unet = UNet2DConditionModel.from_pretrained(folder)
    x, ctx = rand(1, 4, 8, 8), rand(1, 7, 32, seed=1)
    added = {"text_embeds": np.zeros((1, 4)), "time_ids": np.zeros((1, 6))}
    with pytest.raises(InputError, match="no addition_embed_type"):
        unet(x, 1, ctx, added_cond_kwargs=added)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"addition_embed_type": "text"}, "addition_embed_type='text' is not supported"),
        ({"addition_time_embed_dim": None}, "needs addition_time_embed_dim"),
        ({"projection_class_embeddings_input_dim": None}, "needs addition_time_embed_dim"),
        ({"addition_time_embed_dim": 0}, "addition_time_embed_dim"),
    ],
)
def test_bad_addition_configs_are_refused(change, match):
    with pytest.raises(ConfigError, match=match):
        UNetConfig.from_dict({**TINY["base"], **change}, source="unet/config.json")


# SDXL base's widths (320/640/1280 channels, 2048-wide context, 2816 = 1280 pooled + 6 x 256
# time ids); the last level's transformer depth 10 is cut to 2 so that the float64 reference
# (about 0.9e9 parameters instead of 2.6e9) fits CI's memory next to everything else.
FULL_XL = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 2), attention_head_dim=(5, 10, 20),
    use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)  # fmt: skip


@pytest.mark.slow
def test_sdxl_widths_every_layer():
    torch, diffusers = need("torch", "diffusers")
    ref = build_full_size(diffusers.UNet2DConditionModel, FULL_XL, seed=4)

    def check(dtype, ours, ref):
        x, ctx, added = _inputs(ours.config, TIME_IDS["base"], 8, 8, dtype)
        assert len(_compare(ours, ref, x, np.array([999, 20]), ctx, added, dtype)) > 300

    in_each_dtype(ref, check)
