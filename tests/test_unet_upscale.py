"""The UNet features of the Stable Diffusion x4 upscaler against diffusers' UNet2DConditionModel:
the class embedding (``num_class_embeds``: an nn.Embedding of the low-resolution image's noise
level, added to the time embedding) and ``only_cross_attention`` (attn1 attends to the text
embedding too; the up blocks take the reversed per-block list). Every parameter randomized;
float64 rel. error <= 1e-10, float32 <= 1e-4, at every traced module.

The tiny configs use a cross-attention width (24) unlike every block width, so an attn1 built
with the wrong key/value width cannot load, and an up path that forgot to reverse the list
reads keys of the wrong shape.
"""

from __future__ import annotations

import copy
import functools
import json

import numpy as np
import pytest
from refharness import (
    TOL,
    assert_rel,
    diffusers_models,
    need,
    rand,
    to_np,
    torch_dtype,
)
from test_unet import DTYPES, build_full_size, compare_whole, in_each_dtype

from minisd.errors import ConfigError, InputError
from minisd.unet import UNet2DConditionModel, UNetConfig, param_shapes
from minisd.weights import RecordingDict, load_file

_X4 = dict(  # the x4 upscaler's layout, tiny: DownBlock2D first, only_cross on the first levels
    sample_size=16,
    in_channels=7,
    out_channels=4,
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=24,
    attention_head_dim=2,
    norm_num_groups=4,
    use_linear_projection=True,
    num_class_embeds=40,
    only_cross_attention=(True, True, False),
)
TINY = {
    "x4": _X4,
    # one bool for every block (diffusers then also sets mid_block_only_cross_attention, which
    # UNetMidBlock2DCrossAttn ignores), SD1-like conv projections and block order
    "all_cross": {
        **_X4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "use_linear_projection": False,
        "only_cross_attention": True,
        "attention_head_dim": (1, 2, 4),
    },
    "labels_only": {**_X4, "only_cross_attention": False},  # a class embedding alone
}
# stabilityai/stable-diffusion-x4-upscaler's unet/config.json (the fields that shape it)
HUB = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=(256, 512, 512, 1024),
    down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
    cross_attention_dim=1024,
    in_channels=7,
    out_channels=4,
    layers_per_block=2,
    num_class_embeds=1000,
    only_cross_attention=(True, True, True, False),
    use_linear_projection=True,
    sample_size=128,
)
# case: (tiny model, batch, (h, w), timesteps, class labels)
CASES = {
    "x4_8x8": ("x4", 2, (8, 8), np.array([999, 20]), np.array([20, 35])),
    "x4_odd_6x10_int_label": ("x4", 1, (6, 10), 501, 7),  # forward_upsample_size; a python int
    "all_cross_batch3_one_label": ("all_cross", 3, (8, 4), 3, np.array([39])),  # broadcast
    "labels_only": ("labels_only", 2, (4, 8), np.array([1, 700]), np.array([0, 13])),
}


@pytest.fixture(scope="module")
def tiny(ref_cache):
    """name -> (randomized float32 diffusers model, its save_pretrained folder)."""
    return diffusers_models(ref_cache, "UNet2DConditionModel", TINY, "unet_x4", seed=5)


def _torch_labels(labels):
    torch = need("torch")
    return torch.from_numpy(labels) if isinstance(labels, np.ndarray) else torch.tensor(labels)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_every_layer_matches_diffusers(tiny, case, dtype):
    torch = need("torch")
    name, n, (h, w), t, labels = CASES[case]
    ref, folder = tiny(name)
    ours = UNet2DConditionModel.from_pretrained(folder, dtype=dtype)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    x = rand(n, 7, h, w).astype(dtype)
    ctx = rand(n, 5, 24, seed=1).astype(dtype)
    tt = torch.from_numpy(t) if isinstance(t, np.ndarray) else t
    ref_args = [torch.from_numpy(x), tt, torch.from_numpy(ctx)]
    errs = compare_whole(
        functools.partial(ours, class_labels=labels),
        ref,
        [x, t, ctx],
        ref_args,
        dtype,
        ref_kwargs={"class_labels": _torch_labels(labels)},
    )
    assert "class_embedding" in errs
    assert len(errs) > 100  # every resnet / attention / transformer submodule was compared


@pytest.mark.parametrize("name", [*TINY, "hub"])
def test_key_table_matches_diffusers(name):
    """param_shapes(config) is exactly diffusers' state dict (meta device): attn1's to_k / to_v
    take the context width where only_cross_attention holds, class_embedding is (classes, T)."""
    torch, diffusers = need("torch", "diffusers")
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**(HUB if name == "hub" else TINY[name]))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    cfg = UNetConfig.from_dict(dict(ref.config))
    assert param_shapes(cfg) == expected
    if name == "hub":
        assert expected["class_embedding.weight"] == (1000, 1024)
        assert cfg.only_cross_attention == (True, True, True, False)


@pytest.mark.parametrize("name", list(TINY))
def test_every_checkpoint_key_is_read(tiny, name):
    _, folder = tiny(name)
    unet = UNet2DConditionModel.from_pretrained(folder)
    keys = set(load_file(folder / "diffusion_pytorch_model.safetensors"))
    unet.params = RecordingDict(unet.params)
    unet(rand(2, 7, 8, 8), 10, rand(2, 5, 24), class_labels=np.array([1, 2]))
    assert unet.params.reads == keys


def test_class_labels_are_checked(tiny):
    _, folder = tiny("x4")
    unet = UNet2DConditionModel.from_pretrained(folder)
    x, ctx = rand(2, 7, 8, 8), rand(2, 5, 24)
    with pytest.raises(InputError, match="class_labels: this UNet2DConditionModel has a class"):
        unet(x, 1, ctx)
    bad = [
        (np.array([1.0, 2.0]), "got float64"),
        (np.array([1, 2, 3]), r"shape \(3,\)"),
        (np.array([[1, 2]]), r"shape \(1, 2\)"),
        (np.array([0, 40]), r"\[0, 40\)"),
        (-1, r"\[0, 40\)"),
    ]
    for labels, match in bad:
        with pytest.raises(InputError, match=match):
            unet(x, 1, ctx, class_labels=labels)


def test_class_labels_need_a_class_embedding():
    """A UNet without num_class_embeds refuses labels (diffusers would silently drop them)."""
    cfg = UNetConfig.from_dict({k: v for k, v in _X4.items() if k != "num_class_embeds"})
    unet = UNet2DConditionModel(cfg, {k: np.zeros(s) for k, s in param_shapes(cfg).items()})
    assert "class_embedding.weight" not in param_shapes(cfg)
    with pytest.raises(InputError, match="no num_class_embeds; leave it None"):
        unet(rand(1, 7, 8, 8), 1, rand(1, 5, 24), class_labels=3)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"class_embed_type": "timestep"}, "class_embed_type='timestep' is not supported"),
        ({"class_embed_type": "projection"}, "class_embed_type='projection' is not supported"),
        ({"class_embeddings_concat": True}, "class_embeddings_concat=True is not supported"),
        ({"only_cross_attention": [True, False]}, r"only_cross_attention=\(True, False\)"),
        ({"only_cross_attention": [1, 0, 0]}, "expected a bool or 3 bools"),
        ({"num_class_embeds": 0}, "num_class_embeds=0"),
    ],
)
def test_unsupported_or_bad_config_is_refused(tiny, change, match):
    _, folder = tiny("x4")
    cfg = json.loads((folder / "config.json").read_text())
    with pytest.raises(ConfigError, match=match) as e:
        UNetConfig.from_dict({**cfg, **change}, source="unet/config.json")
    assert "unet/config.json" in str(e.value)


def test_mid_block_only_cross_attention_is_inert(tiny):
    """diffusers passes mid_block_only_cross_attention to UNetMidBlock2DSimpleCrossAttn only;
    with UNetMidBlock2DCrossAttn the weights and the result are the same either way."""
    _, folder = tiny("x4")
    cfg = json.loads((folder / "config.json").read_text())
    on = UNetConfig.from_dict({**cfg, "mid_block_only_cross_attention": True})
    assert param_shapes(on) == param_shapes(UNetConfig.from_dict(cfg))


def test_array_backend_matches_diffusers(tiny, xp):
    """The x4 layout on each array backend (NumPy; fake_cupy's device path; CuPy where a GPU
    exists), float32, labels given as a device array."""
    torch = need("torch")
    from minisd.backend import to_numpy

    ref, folder = tiny("x4")
    device = "cpu" if xp is np else "cuda"
    unet = UNet2DConditionModel.from_pretrained(folder, dtype="float32", device=device)
    x, ctx = rand(2, 7, 6, 10).astype(np.float32), rand(2, 5, 24, seed=1).astype(np.float32)
    labels = np.array([20, 3])
    t = xp.asarray(np.array([7, 700]))
    out = unet(xp.asarray(x), t, xp.asarray(ctx), class_labels=xp.asarray(labels))
    assert isinstance(out, xp.ndarray)
    with torch.no_grad():
        r = ref(
            torch.from_numpy(x),
            torch.tensor([7, 700]),
            torch.from_numpy(ctx),
            class_labels=torch.from_numpy(labels),
        ).sample
    assert_rel(to_numpy(out), to_np(r), TOL["float32"], "output")


@pytest.mark.slow
def test_full_size_x4_upscaler_every_layer():
    """The x4 upscaler's real architecture (random weights, 473M parameters) at 8x8 latents,
    float64 then float32, sharing the reference's memory."""
    torch, diffusers = need("torch", "diffusers")
    ref = build_full_size(diffusers.UNet2DConditionModel, HUB, seed=4)
    x, ctx, t = rand(2, 7, 8, 8), rand(2, 77, 1024, seed=1), np.array([999, 20])
    labels = np.array([20, 350])

    def check(dtype, ours, ref):
        xs, cs = x.astype(dtype), ctx.astype(dtype)
        ref_args = [torch.from_numpy(xs), torch.from_numpy(t), torch.from_numpy(cs)]
        kw = {"class_labels": torch.from_numpy(labels)}
        call = functools.partial(ours, class_labels=labels)
        assert len(compare_whole(call, ref, [xs, t, cs], ref_args, dtype, ref_kwargs=kw)) > 500

    in_each_dtype(ref, check)
