"""UNet2DModel (unconditional, DDPM) against diffusers: every named module and the output.

Same rules as tests/test_unet.py, including the float32 ``time_proj`` precision island.
"""

from __future__ import annotations

import copy
import gc

import numpy as np
import pytest
from refharness import (
    diffusers_models,
    need,
    rand,
    rel_err,
    to_np,
    torch_dtype,
)
from test_unet import build_full_size, compare_whole

from minisd.errors import ConfigError, InputError, WeightsError
from minisd.unet2d import UNet2DConfig, UNet2DModel, param_shapes
from minisd.weights import RecordingDict, load_file

DTYPES = ["float64", "float32"]

_CAT = dict(  # google/ddpm-cat-256's architecture (DDPM, Ho et al. 2020)
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    layers_per_block=2,
    attention_head_dim=None,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    sample_size=256,
)
_TINY_CAT = {
    **_CAT,
    "block_out_channels": (16, 16, 32, 32),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "sample_size": 16,
}
TINY = {
    "cat": _TINY_CAT,
    # scale-shift time norm: the mid attention then has no GroupNorm; mid scale factor;
    # 2 heads of 8 channels; diffusers' default block types
    "scale_shift": dict(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        resnet_time_scale_shift="scale_shift",
        mid_block_scale_factor=1.5,
        attention_head_dim=8,
        norm_num_groups=4,
        layers_per_block=1,
    ),
    "attn_groups": {**_TINY_CAT, "attn_norm_num_groups": 4, "layers_per_block": 1},
    "no_mid_attention": {**_TINY_CAT, "add_attention": False, "in_channels": 1},
}
# case: (tiny model, batch, size, timestep)
CASES = {
    "cat_16x16": ("cat", 2, (16, 16), 999),
    "cat_8x24_batch3_per_item_t": ("cat", 3, (8, 24), np.array([0, 500, 999])),
    "cat_float_t_truncated": ("cat", 1, (8, 8), 10.7),  # diffusers: torch.long -> 10
    "scale_shift": ("scale_shift", 2, (6, 10), np.array([40])),
    "attn_groups": ("attn_groups", 2, (8, 8), 300),
    "no_mid_attention": ("no_mid_attention", 2, (8, 16), np.array([1, 2])),
}


@pytest.fixture(scope="module")
def tiny(ref_cache):
    return diffusers_models(ref_cache, "UNet2DModel", TINY, "unet2d", seed=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_every_layer_matches_diffusers(tiny, case, dtype):
    torch = need("torch")
    name, n, (h, w), t = CASES[case]
    ref, folder = tiny(name)
    ours = UNet2DModel.from_pretrained(folder, dtype=dtype)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    x = rand(n, ours.config.in_channels, h, w).astype(dtype)
    tt = torch.from_numpy(t) if isinstance(t, np.ndarray) else t
    errs = compare_whole(ours, ref, [x, t], [torch.from_numpy(x), tt], dtype)
    assert len(errs) > 50


@pytest.mark.parametrize("name", list(TINY))
def test_every_checkpoint_key_is_read(tiny, name):
    _, folder = tiny(name)
    unet = UNet2DModel.from_pretrained(folder)
    keys = set(load_file(folder / "diffusion_pytorch_model.safetensors"))
    unet.params = RecordingDict(unet.params)
    unet(rand(1, unet.config.in_channels, 8, 8), 3)
    assert unet.params.reads == keys


@pytest.mark.parametrize("name", [*TINY, "cat256"])
def test_key_table_matches_diffusers(name):
    torch, diffusers = need("torch", "diffusers")
    with torch.device("meta"):
        ref = diffusers.UNet2DModel(**(TINY[name] if name in TINY else _CAT))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert param_shapes(UNet2DConfig.from_dict(dict(ref.config))) == expected


def test_errors(tiny):
    ref, folder = tiny("cat")
    unet = UNet2DModel.from_pretrained(folder)
    with pytest.raises(InputError, match="in_channels=3"):
        unet(rand(1, 4, 16, 16), 1)
    with pytest.raises(InputError, match="multiples of 8"):
        unet(rand(1, 3, 12, 16), 1)
    flat = {k: to_np(v) for k, v in ref.state_dict().items()}
    flat.pop("up_blocks.1.attentions.0.group_norm.bias")
    with pytest.raises(WeightsError, match="up_blocks.1.attentions.0.group_norm.bias"):
        UNet2DModel(dict(ref.config), flat)
    with pytest.raises(ConfigError, match="time_embedding_type"):
        UNet2DModel({**dict(ref.config), "time_embedding_type": "fourier"}, flat)


def test_in_memory_constructor_matches_from_pretrained(tiny):
    ref, folder = tiny("scale_shift")
    a = UNet2DModel(dict(ref.config), {k: to_np(v) for k, v in ref.state_dict().items()})
    b = UNet2DModel.from_pretrained(folder)
    x = rand(2, 3, 4, 4)
    assert rel_err(a(x, 5), b(x, 5)) == 0.0


@pytest.mark.slow
def test_full_size_cat256_every_layer():
    """google/ddpm-cat-256's architecture (random weights) at 32x32, float64 then float32."""
    torch, diffusers = need("torch", "diffusers")
    ref = build_full_size(diffusers.UNet2DModel, _CAT, seed=4)
    x, t = rand(1, 3, 32, 32), np.array([999])
    try:
        for dtype in DTYPES:
            ref = ref.to(torch_dtype(dtype))
            ours = UNet2DModel(dict(ref.config), {k: to_np(v) for k, v in ref.state_dict().items()})
            xs = x.astype(dtype)
            errs = compare_whole(
                ours, ref, [xs, t], [torch.from_numpy(xs), torch.from_numpy(t)], dtype
            )
            assert len(errs) > 200
            del ours
            gc.collect()
    finally:
        del ref
        gc.collect()
