"""Every op in minisd.ops against torch.nn.functional, float64 (<= 1e-12) and float32 (<= 1e-5)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from refharness import OP_TOL, TOL, assert_rel, need, to_np, to_torch

from minisd import ops
from minisd.backend import to_numpy

DTYPES = ["float64", "float32"]


def _rand(xp, rng, shape, dtype, scale=1.0):
    return xp.asarray((scale * rng.standard_normal(shape)).astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,cin,cout,h,w,k,stride,padding",
    [
        (2, 3, 5, 7, 9, 3, 1, 1),  # odd sizes
        (1, 4, 6, 8, 8, 3, 2, 1),  # stride 2 (UNet downsample)
        (2, 5, 3, 9, 7, 3, 2, (0, 1, 0, 1)),  # asymmetric pad (VAE downsample)
        (3, 6, 4, 5, 5, 1, 1, 0),  # 1x1
        (1, 2, 3, 6, 11, 3, 1, 0),  # no padding
        (1, 3, 2, 10, 6, 5, 1, 2),  # 5x5
        (2, 4, 4, 7, 7, 3, 2, (1, 0, 2, 1)),  # odd asymmetric pad with stride
    ],
)
def test_conv2d(xp, dtype, n, cin, cout, h, w, k, stride, padding):
    torch = need("torch")
    rng = np.random.default_rng(0)
    x = _rand(xp, rng, (n, cin, h, w), dtype)
    wt = _rand(xp, rng, (cout, cin, k, k), dtype)
    b = _rand(xp, rng, (cout,), dtype)
    ours = ops.conv2d(x, wt, b, stride=stride, padding=padding)
    tx = to_torch(to_numpy(x))
    if isinstance(padding, tuple):  # F.pad order: (left, right, top, bottom)
        top, bottom, left, right = padding
        tx = torch.nn.functional.pad(tx, (left, right, top, bottom))
        padding = 0
    ref = torch.nn.functional.conv2d(
        tx, to_torch(to_numpy(wt)), to_torch(to_numpy(b)), stride=stride, padding=padding
    )
    assert ours.dtype == np.dtype(dtype)
    assert_rel(ours, to_np(ref), OP_TOL[dtype], "conv2d")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,groups", [((2, 64, 5, 7), 32), ((1, 32, 4, 4), 32), ((3, 12, 9), 4)]
)
def test_group_norm(xp, dtype, shape, groups):
    torch = need("torch")
    rng = np.random.default_rng(1)
    x = _rand(xp, rng, shape, dtype, scale=3.0) + 2.0
    w = _rand(xp, rng, shape[1:2], dtype)
    b = _rand(xp, rng, shape[1:2], dtype)
    ours = ops.group_norm(x, w, b, groups=groups, eps=1e-6)
    ref = torch.nn.functional.group_norm(
        to_torch(to_numpy(x)), groups, to_torch(to_numpy(w)), to_torch(to_numpy(b)), eps=1e-6
    )
    assert_rel(ours, to_np(ref), OP_TOL[dtype], "group_norm")


def _near_constant(rng, shape, dtype):
    """Standard normal of ``shape``, except x[:, 0] constant (variance 0) and x[:, 1] of
    variance ~1e-7, about eps: a flat image region or a repeated token, where eps is most of
    ``var + eps``. Shaped (N, G, C/G, ...) for GroupNorm (x[:, g] is group g), (N, M, D) for
    LayerNorm (x[:, m] is a row)."""
    x = rng.standard_normal(shape)
    x[:, 0] = 0.75
    x[:, 1] = -0.5 + 3e-4 * x[:, 1]
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_norms_where_eps_dominates(xp, dtype, eps):
    """GroupNorm / LayerNorm on a constant group / row and one of variance ~1e-7 (about eps)
    against torch: without the eps of ``rsqrt(var + eps)`` the constant one is NaN and the
    other 3-10x off, which data of variance ~9 cannot show (there eps moves y by ~5e-8)."""
    torch = need("torch")
    rng = np.random.default_rng(3)
    # The project bound, not OP_TOL: in the variance-1e-7 group, 1/sqrt(var + eps) ~ 950
    # amplifies the float32 rounding of the mean (ours and torch's differ), up to 1.2e-5.
    tol = TOL[dtype]
    x = _near_constant(rng, (2, 4, 2, 5, 7), dtype).reshape(2, 8, 5, 7)  # 4 groups of 2
    w, b = (rng.uniform(0.5, 1.5, (2, 8)) * [[1], [0.1]]).astype(dtype)
    ours = ops.group_norm(xp.asarray(x), xp.asarray(w), xp.asarray(b), groups=4, eps=eps)
    ref = torch.nn.functional.group_norm(to_torch(x), 4, to_torch(w), to_torch(b), eps=eps)
    assert_rel(ours, to_np(ref), tol, "group_norm, near-constant groups")
    x = _near_constant(rng, (3, 6, 48), dtype)
    w, b = (rng.uniform(0.5, 1.5, (2, 48)) * [[1], [0.1]]).astype(dtype)
    ours = ops.layer_norm(xp.asarray(x), xp.asarray(w), xp.asarray(b), eps=eps)
    ref = torch.nn.functional.layer_norm(to_torch(x), (48,), to_torch(w), to_torch(b), eps=eps)
    assert_rel(ours, to_np(ref), tol, "layer_norm, near-constant rows")


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm(xp, dtype):
    torch = need("torch")
    rng = np.random.default_rng(2)
    x = _rand(xp, rng, (2, 7, 48), dtype, scale=2.0) - 1.0
    w, b = _rand(xp, rng, (48,), dtype), _rand(xp, rng, (48,), dtype)
    ours = ops.layer_norm(x, w, b, eps=1e-5)
    ref = torch.nn.functional.layer_norm(
        to_torch(to_numpy(x)), (48,), to_torch(to_numpy(w)), to_torch(to_numpy(b)), eps=1e-5
    )
    assert_rel(ours, to_np(ref), OP_TOL[dtype], "layer_norm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations(xp, dtype):
    torch = need("torch")
    F = torch.nn.functional
    grid = np.concatenate([np.linspace(-10, 10, 20001), [-1e4, -50, -30, 30, 50, 1e4, 0.0]])
    x = xp.asarray(grid.astype(dtype))
    tx = to_torch(to_numpy(x))
    assert_rel(ops.gelu(x), to_np(F.gelu(tx)), OP_TOL[dtype], "gelu")
    assert_rel(ops.silu(x), to_np(F.silu(tx)), OP_TOL[dtype], "silu")
    assert_rel(ops.quick_gelu(x), to_np(tx * torch.sigmoid(1.702 * tx)), OP_TOL[dtype], "qgelu")
    for f in (ops.gelu, ops.silu, ops.quick_gelu):
        out = f(x)
        assert out.dtype == np.dtype(dtype) and bool(xp.isfinite(out).all())


def test_erf_float64_accuracy():
    import math

    x = np.linspace(-8, 8, 40001)
    ref = np.array([math.erf(v) for v in x])
    assert np.abs(ops.erf(x) - ref).max() < 2e-15


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_stable(xp, dtype):
    torch = need("torch")
    rng = np.random.default_rng(3)
    x = _rand(xp, rng, (3, 17), dtype, scale=50.0)
    x[0, 0] = 1e4 if dtype == "float64" else 3e3  # would overflow a naive exp
    ref = torch.softmax(to_torch(to_numpy(x)), dim=-1)
    assert_rel(ops.softmax(x), to_np(ref), OP_TOL[dtype], "softmax")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lq,lk,chunk",
    [(33, 33, None), (33, 33, 7), (64, 77, 10), (50, 13, 64), (4096 // 16, 77, 100)],
)
def test_attention(xp, dtype, lq, lk, chunk):
    torch = need("torch")
    rng = np.random.default_rng(4)
    q = _rand(xp, rng, (2, 3, lq, 16), dtype)
    k = _rand(xp, rng, (2, 3, lk, 16), dtype)
    v = _rand(xp, rng, (2, 3, lk, 8), dtype)
    ours = ops.attention(q, k, v, chunk_size=chunk)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(to_torch(to_numpy(a)) for a in (q, k, v))
    )
    assert_rel(ours, to_np(ref), OP_TOL[dtype], "attention")


def test_attention_mask_and_upcast():
    torch = need("torch")
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 9, 8)) for _ in range(3))
    mask = np.triu(np.full((9, 9), -np.inf), 1)
    ours = ops.attention(q, k, v, mask=mask, chunk_size=4)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(to_torch(a) for a in (q, k, v)), is_causal=True
    )
    assert_rel(ours, to_np(ref), OP_TOL["float64"], "causal attention")
    h = ops.attention(*(a.astype(np.float16) for a in (q, k, v)), mask=mask, upcast=True)
    assert h.dtype == np.float16
    assert_rel(h, to_np(ref), 5e-3, "fp16 upcast attention")  # fp16 inputs: ~1e-3 round-off


def test_attention_chunk_bounds_memory():
    """With chunking, the largest temporary is (B, H, chunk, Lk), not (B, H, Lq, Lk)."""
    import tracemalloc

    rng = np.random.default_rng(6)
    q = rng.standard_normal((1, 2, 2048, 8)).astype(np.float32)
    tracemalloc.start()
    ops.attention(q, q, q, chunk_size=128)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    full_scores = 2 * 2048 * 2048 * 4
    tile = 2 * 128 * 2048 * 4  # one chunk of scores
    assert peak < 4 * tile < full_scores / 2, f"peak {peak} bytes, tile {tile}, full {full_scores}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_upsample_nearest2x(xp, dtype):
    torch = need("torch")
    rng = np.random.default_rng(7)
    x = _rand(xp, rng, (2, 3, 5, 7), dtype)
    ref = torch.nn.functional.interpolate(to_torch(to_numpy(x)), scale_factor=2.0, mode="nearest")
    np.testing.assert_array_equal(to_numpy(ops.upsample_nearest2x(x)), to_np(ref))


@pytest.mark.parametrize("flip,shift,dim", [(True, 0, 320), (False, 1, 64), (True, 1, 33)])
def test_timestep_embedding(flip, shift, dim):
    """Float32 island, computed in float32 as diffusers does.

    torch's float32 exp and sin/cos are not correctly rounded (~1% of the frequencies and ~5% of
    the sin/cos values are 1 ulp away from ours), so agreement is bounded by 1-2 ulp of the
    values plus 1 ulp of a frequency times t (the argument t * f then differs by t * ulp(f)).
    """
    need("torch", "diffusers")
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 250, 500.5, 999], dtype=np.float64)
    ours = ops.timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    ref = get_timestep_embedding(to_torch(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert ours.dtype == np.float32 and ours.shape == (5, dim)
    bound = 2.5e-7 + t.max() * 2.0**-23
    assert np.abs(ours - to_np(ref)).max() <= bound
    assert np.abs(ours[:2] - to_np(ref)[:2]).max() <= 2.5e-7  # small t: only sin/cos rounding


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 2),
    cin=st.integers(1, 4),
    cout=st.integers(1, 4),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    k=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    pad=st.integers(0, 2),
)
def test_conv2d_shapes_property(n, cin, cout, h, w, k, stride, pad):
    """Output shape follows floor((H + 2p - k) / s) + 1 and matches a direct sum."""
    if h + 2 * pad < k or w + 2 * pad < k:
        return
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, cin, h, w))
    wt = rng.standard_normal((cout, cin, k, k))
    y = ops.conv2d(x, wt, stride=stride, padding=pad)
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    assert y.shape == (n, cout, ho, wo)
    xp_ = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    i, j = ho - 1, wo - 1  # the last output pixel, where off-by-one errors show
    patch = xp_[:, :, i * stride : i * stride + k, j * stride : j * stride + k]
    np.testing.assert_allclose(
        y[:, :, i, j], np.einsum("ncij,ocij->no", patch, wt), rtol=1e-12, atol=1e-12
    )


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 3),
    lq=st.integers(1, 40),
    lk=st.integers(1, 40),
    chunk=st.integers(1, 50),
)
def test_attention_chunking_property(b, h, lq, lk, chunk):
    """Chunking over queries never changes the result; rows of weights sum to one."""
    rng = np.random.default_rng(lq * 100 + lk)
    q, k = rng.standard_normal((b, h, lq, 4)), rng.standard_normal((b, h, lk, 4))
    v = np.ones((b, h, lk, 1))
    full = ops.attention(q, k, v)
    np.testing.assert_allclose(full, 1.0, rtol=1e-12)
    v = rng.standard_normal((b, h, lk, 3))
    np.testing.assert_allclose(
        ops.attention(q, k, v, chunk_size=chunk), ops.attention(q, k, v), rtol=1e-12, atol=1e-13
    )


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), g=st.sampled_from([1, 2, 4]), cg=st.integers(1, 4), s=st.integers(1, 6))
def test_group_norm_property(n, g, cg, s):
    """Each group of the normalized output has zero mean and unit (biased) variance."""
    rng = np.random.default_rng(n * 7 + s)
    x = rng.standard_normal((n, g * cg, s, s)) * 5 + 3
    y = ops.group_norm(x, np.ones(g * cg), np.zeros(g * cg), groups=g, eps=1e-12)
    yg = y.reshape(n, g, -1)
    np.testing.assert_allclose(yg.mean(-1), 0.0, atol=1e-12)
    if yg.shape[-1] > 1 and np.all(x.reshape(n, g, -1).std(-1) > 1e-6):
        np.testing.assert_allclose(yg.var(-1), 1.0, rtol=1e-9)
