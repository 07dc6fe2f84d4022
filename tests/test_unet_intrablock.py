"""The UNet's down_intrablock_additional_residuals (T2I-Adapter features) against diffusers'
UNet2DConditionModel, every layer, every parameter randomized; and T2IAdapter features driving
the UNet (minisd/t2i_adapter.py; the adapter itself is tested in tests/test_t2i_adapter.py);
and the full-size adapter architectures (TencentARC's SD1.x adapters) layer by layer.

The comparisons reuse tests/test_unet.py's time_proj rule (compare_whole).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from refharness import TOL, assert_rel, diffusers_models, need, rand, rel_err, to_np, torch_dtype
from test_t2i_adapter import DTYPES, TINY, image_for, tensor
from test_unet import TINY as UNET_TINY
from test_unet import compare_whole, skip_shapes

from minisd.errors import InputError
from minisd.t2i_adapter import T2IAdapter
from minisd.unet import UNet2DConditionModel


@pytest.fixture(scope="module")
def tiny(ref_cache):
    """name -> (randomized diffusers T2IAdapter, its folder), as in tests/test_t2i_adapter.py."""
    return diffusers_models(ref_cache, "T2IAdapter", TINY, "t2i_adapter", seed=3)


@pytest.fixture(scope="module")
def unets(ref_cache):
    configs = {
        "sd1": UNET_TINY["sd1"],
        "down_first": {  # a DownBlock2D with a downsampler: its feature is added after it
            **UNET_TINY["sd1"],
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        },
    }
    return diffusers_models(ref_cache, "UNet2DConditionModel", configs, "t2i_unet", seed=1)


def intrablock_shapes(cfg, n, h, w):
    """Where diffusers adds feature i: a CrossAttnDownBlock2D's last layer output (before its
    downsampler), a DownBlock2D's output (after it)."""
    shapes = []
    for i, kind in enumerate(cfg.down_block_types):
        c, down = cfg.block_out_channels[i], i < len(cfg.down_block_types) - 1
        h2, w2 = ((h + 1) // 2, (w + 1) // 2) if down else (h, w)
        shapes.append((n, c, h, w) if kind == "CrossAttnDownBlock2D" else (n, c, h2, w2))
        h, w = h2, w2
    return shapes


UNET_CASES = {  # (UNet, how many features, with ControlNet residuals, (h, w))
    "all_blocks": ("sd1", 3, False, (8, 8)),
    "odd_size": ("sd1", 3, False, (13, 10)),
    "first_two_blocks": ("sd1", 2, False, (8, 12)),
    "with_controlnet_residuals": ("sd1", 3, True, (12, 12)),
    "downblock_first": ("down_first", 3, False, (9, 8)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(UNET_CASES))
def test_unet_intrablock_residuals_match_diffusers(unets, case, dtype):
    """diffusers' UNet2DConditionModel(..., down_intrablock_additional_residuals=features),
    every layer; the caller's list is left as it was (diffusers pops from its own)."""
    name, k, controlnet, (h, w) = UNET_CASES[case]
    ref, folder = unets(name)
    ours = UNet2DConditionModel.from_pretrained(folder, dtype=dtype)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    cfg, n, t = ours.config, 2, np.array([7, 800])
    x, ctx = rand(n, 4, h, w).astype(dtype), rand(n, 5, 32, seed=1).astype(dtype)
    shapes = intrablock_shapes(cfg, n, h, w)[:k]
    feats = [rand(*s, seed=20 + i).astype(dtype) for i, s in enumerate(shapes)]
    given = list(feats)
    args, kw = [x, t, ctx], {"down_intrablock_additional_residuals": [tensor(f) for f in feats]}
    if controlnet:
        downs, mid = skip_shapes(cfg, n, h, w)
        res = [rand(*s, seed=40 + i).astype(dtype) for i, s in enumerate(downs)]
        mid = rand(*mid, seed=9).astype(dtype)
        args += [res, mid]
        kw.update(down_block_additional_residuals=[tensor(r) for r in res])
        kw.update(mid_block_additional_residual=tensor(mid))
    our_call = _with_features(ours, feats)
    errs = compare_whole(our_call, ref, args, [tensor(x), tensor(t), tensor(ctx)], dtype,
                         ref_kwargs=kw)  # fmt: skip
    assert len(errs) > 100
    assert len(feats) == k and all(a is b for a, b in zip(feats, given))
    plain = ours(x, t, ctx, *args[3:])
    assert rel_err(plain, ours(*args, down_intrablock_additional_residuals=feats)) > 1e-2


def _with_features(unet, feats):
    """unet with the features bound (compare_whole passes positional arguments)."""

    def call(*args):
        return unet(*args, down_intrablock_additional_residuals=feats)

    return call


def test_adapter_drives_the_unet_as_in_diffusers(tiny, unets):
    """Our adapter's features into our UNet == diffusers' into diffusers' (float32), for the
    full and the light adapter sized for tests/test_unet.py's tiny UNet."""
    torch = need("torch")
    unet_ref, folder = unets("sd1")
    unet = UNet2DConditionModel.from_pretrained(folder, dtype="float32")
    x, ctx, t = rand(2, 4, 12, 10).astype(np.float32), rand(2, 5, 32, seed=1), np.array([3, 900])
    for name in ("full", "light"):
        ref, afolder = tiny(name)
        adapter = T2IAdapter.from_pretrained(afolder, dtype="float32")
        img = image_for(adapter.config, 2, 12, 10, "float32")
        with torch.no_grad():
            feats = [f * 0.8 for f in ref(tensor(img))]
            args = (tensor(x), tensor(t), tensor(ctx.astype(np.float32)))
            r = unet_ref(*args, down_intrablock_additional_residuals=feats).sample
        scaled = [f * 0.8 for f in adapter(img)]
        eps = unet(x, t, ctx, down_intrablock_additional_residuals=scaled)
        assert_rel(eps, to_np(r), TOL["float32"], f"eps with {name} adapter features")
        assert rel_err(unet(x, t, ctx), eps) > 1e-2


def test_unet_intrablock_input_errors(unets):
    _, folder = unets("sd1")
    unet = UNet2DConditionModel.from_pretrained(folder)
    x, ctx = rand(2, 4, 8, 8), rand(2, 5, 32)
    feats = [rand(*s) for s in intrablock_shapes(unet.config, 2, 8, 8)]
    unet(x, 1, ctx, down_intrablock_additional_residuals=feats)  # the valid call
    with pytest.raises(InputError, match="3 down blocks"):
        unet(x, 1, ctx, down_intrablock_additional_residuals=feats + feats[-1:] * 2)
    bad = [feats[0], feats[1][:, :, :-1], feats[2]]
    with pytest.raises(InputError, match=r"residuals\[1\].*down_blocks\.1"):
        unet(x, 1, ctx, down_intrablock_additional_residuals=bad)
    with pytest.raises(InputError, match="down_intrablock_additional_residuals"):
        unet(x, 1, ctx, down_block_additional_residuals=feats)  # diffusers' deprecated use


@pytest.fixture(scope="module")
def full_size(ref_cache):
    from test_t2i_adapter import FULL

    return diffusers_models(ref_cache, "T2IAdapter", FULL, "t2i_full", seed=5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["sketch_sd15", "color_sd14"])
def test_full_size_adapters_match_diffusers(full_size, name, dtype):
    """TencentARC's SD architectures (full: 320..1280 channels, 77M parameters; light: the
    color adapter) at a 256 x 192 image: every layer and feature, float64 <= 1e-10, float32
    <= 1e-4, as the tiny ones."""
    from test_t2i_adapter import compare_adapter

    ref, folder = full_size(name)
    ours = T2IAdapter.from_pretrained(folder, dtype=dtype)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    errs, feats = compare_adapter(ours, ref, image_for(ours.config, 1, 32, 24, dtype), dtype)
    print(f"\n{name} {dtype}: worst {max(errs.values()):.2e} over {len(errs)} outputs")
    assert feats[0].shape == (1, 320, 32, 24) and len(errs) > 20
