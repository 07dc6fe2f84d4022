"""UNet blocks against the diffusers module classes, every submodule's output included.

Each test builds the diffusers module, randomizes every parameter (refharness.randomize_), runs
both sides on the same inputs in float64 (rel. error <= 1e-10) and float32 (<= 1e-4), and
compares the block's output(s) and every traced submodule. Submodules never compared: dropouts
(identity at inference) and parameter-free activation modules (SiLU / GELU modules; a ResNet's
``nonlinearity`` runs three times per call, so its hook output is ambiguous).
"""

from __future__ import annotations

import pytest
from refharness import (
    TOL,
    assert_rel,
    collect_outputs,
    compare_traces,
    need,
    rand,
    randomize_,
    to_np,
    torch_dtype,
)

import minisd
from minisd import blocks
from minisd.unet_blocks import (
    BlockOpts,
    basic_transformer_block,
    down_block,
    feed_forward,
    mid_block,
    transformer_2d,
    up_block,
)
from minisd.weights import nest

DTYPES = ["float64", "float32"]


def untraced_module(module) -> bool:
    """Modules whose outputs minisd does not record (see the module docstring)."""
    torch = need("torch")
    nn = torch.nn
    return isinstance(module, (nn.Dropout, nn.SiLU, nn.GELU, nn.Mish, nn.ReLU, nn.Identity))


def traced_names(ref, acts):
    """Names of the reference's submodules that ran and that minisd must record, in order."""
    return [n for n, m in ref.named_modules() if n in acts and not untraced_module(m)]


def check_block(ref, ref_call, our_call, inputs, dtype, *, seed=0):
    """Randomize ``ref``, run ``ref_call(ref, *tensors)`` and ``our_call(params, *arrays)`` on
    the same inputs and compare every output and every traced submodule."""
    torch = need("torch")
    randomize_(ref, seed)
    ref = ref.to(torch_dtype(dtype)).eval()
    params = nest({k: to_np(v) for k, v in ref.state_dict().items()})
    arrays = [_cast(a, dtype) for a in inputs]
    tensors = [_to_torch(a) for a in arrays]
    with torch.no_grad(), collect_outputs(ref) as racts:
        r = ref_call(ref, *tensors)
    with minisd.trace() as acts:
        o = our_call(params, *arrays)
    tol = TOL[dtype]
    _compare_outputs(o, r, tol)
    errs = compare_traces(acts, racts, tol, traced_names(ref, racts))
    assert errs, "the block has no traced submodule to compare"
    return o, errs


def _cast(a, dtype):
    return tuple(_cast(x, dtype) for x in a) if isinstance(a, tuple) else a.astype(dtype)


def _to_torch(a):
    torch = need("torch")
    return tuple(_to_torch(x) for x in a) if isinstance(a, tuple) else torch.from_numpy(a)


def _compare_outputs(o, r, tol, what="output"):
    torch = need("torch")
    if hasattr(r, "sample"):
        r = r.sample
    if isinstance(r, torch.Tensor):
        assert o.dtype == r.numpy().dtype, f"{what}: dtype {o.dtype} != {r.dtype}"
        return assert_rel(o, to_np(r), tol, what)
    assert len(o) == len(r), f"{what}: {len(o)} outputs, reference has {len(r)}"
    for i, (a, b) in enumerate(zip(o, r)):
        _compare_outputs(a, b, tol, f"{what}[{i}]")


# --------------------------------------------------------------------------- ResNet, resampling


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "cin, cout, groups, time_norm, scale",
    [(32, 32, 8, "default", 1.0), (16, 32, 4, "default", 1.0), (32, 16, 8, "scale_shift", 2.0)],
)
def test_resnet_block(dtype, cin, cout, groups, time_norm, scale):
    from diffusers.models.resnet import ResnetBlock2D

    ref = ResnetBlock2D(
        in_channels=cin,
        out_channels=cout,
        temb_channels=20,
        groups=groups,
        eps=1e-6,
        time_embedding_norm=time_norm,
        output_scale_factor=scale,
    )
    x, temb = rand(2, cin, 5, 7), rand(2, 20, seed=1)
    _, errs = check_block(
        ref,
        lambda m, x, t: m(x, t),
        lambda p, x, t: blocks.resnet_block(
            x, t, p, groups=groups, eps=1e-6, time_norm=time_norm, output_scale_factor=scale
        ),
        [x, temb],
        dtype,
    )
    assert "time_emb_proj" in errs and ("conv_shortcut" in errs) == (cin != cout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding, size", [(1, (9, 6)), (0, (8, 7))])
def test_downsample(dtype, padding, size):
    from diffusers.models.downsampling import Downsample2D

    ref = Downsample2D(8, use_conv=True, out_channels=8, padding=padding, name="op")
    check_block(
        ref,
        lambda m, x: m(x),
        lambda p, x: blocks.downsample(x, p, padding=padding),
        [rand(2, 8, *size)],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_size", [None, (7, 11), (10, 9)])
def test_upsample(dtype, out_size):
    from diffusers.models.upsampling import Upsample2D

    ref = Upsample2D(8, use_conv=True, out_channels=8)
    check_block(
        ref,
        lambda m, x: m(x, out_size),
        lambda p, x: blocks.upsample(x, p, size=out_size),
        [rand(2, 8, 4, 6)],
        dtype,
    )


# --------------------------------------------------------------------------- attention, transformer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, groups, rescale", [(1, 4, 1.0), (2, 8, 1.5)])
def test_group_norm_attention(dtype, heads, groups, rescale):
    """UNet2DModel's / the VAE's attention: GroupNorm, image tokens, residual, rescale."""
    from diffusers.models.attention_processor import Attention

    ref = Attention(
        16,
        heads=heads,
        dim_head=16 // heads,
        rescale_output_factor=rescale,
        eps=1e-6,
        norm_num_groups=groups,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    )
    check_block(
        ref,
        lambda m, x: m(x),
        lambda p, x: blocks.attention(
            x, p, heads=heads, groups=groups, eps=1e-6, residual=True, rescale=rescale, chunk_size=7
        ),
        [rand(2, 16, 5, 6)],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cross", [None, 12])
def test_cross_attention(dtype, cross):
    """The Transformer's attention: no q/k/v bias, optional context of another width."""
    from diffusers.models.attention_processor import Attention

    ref = Attention(16, cross_attention_dim=cross, heads=4, dim_head=4)
    ctx = rand(2, 7, cross or 16, seed=1)
    check_block(
        ref,
        lambda m, x, c: m(x, encoder_hidden_states=c if cross else None),
        lambda p, x, c: blocks.attention(x, p, heads=4, context=c if cross else None),
        [rand(2, 10, 16), ctx],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_feed_forward(dtype):
    from diffusers.models.attention import FeedForward

    ref = FeedForward(16, activation_fn="geglu")
    check_block(ref, lambda m, x: m(x), lambda p, x: feed_forward(x, p), [rand(2, 9, 16)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, upcast", [(2, False), (4, True)])
def test_basic_transformer_block(dtype, heads, upcast):
    from diffusers.models.attention import BasicTransformerBlock

    ref = BasicTransformerBlock(
        16, heads, 16 // heads, cross_attention_dim=12, upcast_attention=upcast
    )
    check_block(
        ref,
        lambda m, x, c: m(x, encoder_hidden_states=c),
        lambda p, x, c: basic_transformer_block(x, c, p, heads=heads, upcast=upcast),
        [rand(2, 11, 16), rand(2, 7, 12, seed=1)],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "linear, layers, heads, chunk", [(False, 1, 2, None), (True, 2, 4, 5), (False, 2, 1, 3)]
)
def test_transformer_2d(dtype, linear, layers, heads, chunk):
    """SD1 (1x1 conv projections) and SD2 (linear projections); query chunking changes
    nothing but memory."""
    from diffusers import Transformer2DModel

    ref = Transformer2DModel(
        heads,
        16 // heads,
        in_channels=16,
        num_layers=layers,
        cross_attention_dim=12,
        norm_num_groups=4,
        use_linear_projection=linear,
    )
    check_block(
        ref,
        lambda m, x, c: m(x, encoder_hidden_states=c, return_dict=False)[0],
        lambda p, x, c: transformer_2d(
            x, c, p, heads=heads, groups=4, linear_projection=linear, chunk_size=chunk
        ),
        [rand(2, 16, 3, 5), rand(2, 7, 12, seed=1)],
        dtype,
    )


# --------------------------------------------------------------------------- down / up / mid blocks

OPTS = BlockOpts(groups=4, eps=1e-6, chunk_size=6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["CrossAttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"])
@pytest.mark.parametrize("layers, add_down, linear", [(2, True, False), (1, False, True)])
def test_down_blocks(dtype, kind, layers, add_down, linear):
    from diffusers.models.unets import unet_2d_blocks as ub

    common = dict(
        num_layers=layers,
        in_channels=8,
        out_channels=16,
        temb_channels=20,
        resnet_eps=1e-6,
        resnet_groups=4,
    )
    opts = BlockOpts(groups=4, eps=1e-6, chunk_size=6, linear_projection=linear)
    cases = {  # kind: (reference module, its call, minisd's call)
        "CrossAttnDownBlock2D": (
            lambda: ub.CrossAttnDownBlock2D(
                **common,
                num_attention_heads=2,
                cross_attention_dim=12,
                add_downsample=add_down,
                use_linear_projection=linear,
            ),
            lambda m, x, t, c: m(x, t, encoder_hidden_states=c),
            lambda p, x, t, c: down_block(x, t, p, opts, heads=2, context=c),
        ),
        "DownBlock2D": (
            lambda: ub.DownBlock2D(**common, add_downsample=add_down),
            lambda m, x, t, c: m(x, t),
            lambda p, x, t, c: down_block(x, t, p, opts),
        ),
        "AttnDownBlock2D": (
            lambda: ub.AttnDownBlock2D(
                **common, attention_head_dim=8, downsample_type="conv" if add_down else None
            ),
            lambda m, x, t, c: m(x, t),
            lambda p, x, t, c: down_block(x, t, p, opts, heads=2),
        ),
    }
    make, call, ours = cases[kind]
    x, temb = rand(2, 8, 7, 6), rand(2, 20, seed=1)
    (h, states), _ = check_block(make(), call, ours, [x, temb, rand(2, 7, 12, seed=2)], dtype)
    assert len(states) == layers + add_down


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["CrossAttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"])
@pytest.mark.parametrize("layers, size", [(3, None), (2, (9, 7))])
def test_up_blocks(dtype, kind, layers, size):
    """Skip concatenation in reverse order and upsampling to 2x or to a forwarded size."""
    from diffusers.models.unets import unet_2d_blocks as ub

    common = dict(
        num_layers=layers,
        in_channels=8,
        prev_output_channel=24,
        out_channels=16,
        temb_channels=20,
        resnet_eps=1e-6,
        resnet_groups=4,
    )
    skips = [rand(2, 8, 5, 4, seed=3)] + [rand(2, 16, 5, 4, seed=4 + j) for j in range(layers - 1)]
    cases = {  # kind: (reference module, its call, minisd's call)
        "CrossAttnUpBlock2D": (
            lambda: ub.CrossAttnUpBlock2D(**common, num_attention_heads=4, cross_attention_dim=12),
            lambda m, x, s, t, c: m(x, s, t, encoder_hidden_states=c, upsample_size=size),
            lambda p, x, s, t, c: up_block(x, s, t, p, OPTS, heads=4, context=c, size=size),
        ),
        "UpBlock2D": (
            lambda: ub.UpBlock2D(**common),
            lambda m, x, s, t, c: m(x, s, t, upsample_size=size),
            lambda p, x, s, t, c: up_block(x, s, t, p, OPTS, size=size),
        ),
        "AttnUpBlock2D": (  # diffusers' AttnUpBlock2D ignores upsample_size: always 2x
            lambda: ub.AttnUpBlock2D(**common, attention_head_dim=4),
            lambda m, x, s, t, c: m(x, s, t),
            lambda p, x, s, t, c: up_block(x, s, t, p, OPTS, heads=4),
        ),
    }
    make, call, ours = cases[kind]
    x, temb = rand(2, 24, 5, 4), rand(2, 20, seed=1)
    check_block(make(), call, ours, [x, tuple(skips), temb, rand(2, 7, 12, seed=2)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layers, scale, linear", [(1, 1.0, False), (2, 1.5, True)])
def test_mid_block_cross_attn(dtype, layers, scale, linear):
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn

    ref = UNetMidBlock2DCrossAttn(
        16,
        20,
        num_layers=layers,
        resnet_eps=1e-6,
        resnet_groups=4,
        num_attention_heads=2,
        output_scale_factor=scale,
        cross_attention_dim=12,
        use_linear_projection=linear,
    )
    opts = BlockOpts(groups=4, eps=1e-6, out_scale=scale, linear_projection=linear)
    check_block(
        ref,
        lambda m, x, t, c: m(x, t, encoder_hidden_states=c),
        lambda p, x, t, c: mid_block(x, t, p, opts, heads=2, context=c),
        [rand(2, 16, 3, 5), rand(2, 20, seed=1), rand(2, 7, 12, seed=2)],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "time_norm, attn_groups, add_attention",
    [
        ("default", None, True),
        ("scale_shift", None, True),
        ("default", 2, True),
        ("default", None, False),
    ],
)
def test_mid_block(dtype, time_norm, attn_groups, add_attention):
    """UNetMidBlock2D: its attention's GroupNorm follows attn_groups / the time norm."""
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

    ref = UNetMidBlock2D(
        16,
        20,
        resnet_eps=1e-6,
        resnet_groups=4,
        attention_head_dim=8,
        resnet_time_scale_shift=time_norm,
        attn_groups=attn_groups,
        add_attention=add_attention,
        output_scale_factor=1.25,
    )
    groups = attn_groups if attn_groups is not None else (4 if time_norm == "default" else None)
    opts = BlockOpts(groups=4, eps=1e-6, out_scale=1.25, time_norm=time_norm)
    check_block(
        ref,
        lambda m, x, t: m(x, t),
        lambda p, x, t: mid_block(x, t, p, opts, heads=2, attn_groups=groups),
        [rand(2, 16, 4, 4), rand(2, 20, seed=1)],
        dtype,
    )
