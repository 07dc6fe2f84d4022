"""Fast NumPy paths of minisd.ops against their readable references (and torch where it
defines the semantics): tiled attention, blocked in-place GELU / GEGLU."""

from __future__ import annotations

import math

import numpy as np
import pytest
from refharness import assert_rel, need

from minisd import ops, ops_norm, parallel


def _gelu_exact(x):
    """x Phi(x) = x erfc(-x / sqrt 2) / 2 in float64 with math.erfc (no cancellation in the
    negative tail, where 1 + erf would round to 0)."""
    x = np.asarray(x, dtype=np.float64)
    return x * 0.5 * np.vectorize(math.erfc, otypes=[np.float64])(-x / math.sqrt(2))


@pytest.mark.parametrize("n", [1, 7, ops._BLOCK - 1, ops._BLOCK + 3, 3 * ops._BLOCK])
def test_gelu_fast_float32_bound(n):
    """Blocked float32 GELU within 1e-6 relative (global) of the exact value; extremes finite."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 4).astype(np.float32)
    edge = [0.0, -0.0, 1e4, -1e4, 9.5, -9.5, 12.0, -12.0, 30.0, -30.0]  # |x| > 11.8: clamped exp
    x[: min(n, 10)] = np.array(edge, np.float32)[: min(n, 10)]
    y = ops.gelu(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.isfinite(y).all()
    assert_rel(y, _gelu_exact(x), 1e-6, "gelu float32")
    small = np.abs(x) < 10
    assert np.abs(y[small] - _gelu_exact(x[small])).max() < 5e-7  # absolute, |x| < 10
    big = np.abs(x) >= 10
    # |x| >= 10: the negative tail is below 1e-21 in magnitude; A&S's tail error and the exp
    # clamp (~1e-31 |x|) keep ours there too, and the positive side exact to round-off.
    assert np.abs(y[big] - _gelu_exact(x[big])).max(initial=0) <= 1e-20


def test_gelu_fast_matches_torch_and_keeps_float16():
    torch = need("torch")
    x = np.random.default_rng(0).standard_normal((3, 5, 1001)).astype(np.float32) * 3
    ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    assert_rel(ops.gelu(x), ref, 1e-5, "gelu vs torch")
    h = ops.gelu(x.astype(np.float16))
    assert h.dtype == np.float16
    assert_rel(h, _gelu_exact(x.astype(np.float16)), 1e-3, "gelu float16")


@pytest.mark.parametrize("d", [8, 1000, ops._BLOCK + 5])
def test_geglu_equals_a_times_gelu(d):
    """ops.geglu on the two (strided) halves of a projection = a * gelu(g), float32 and float64."""
    rng = np.random.default_rng(d)
    h = rng.standard_normal((2, 9, 2 * d))
    a, g = np.split(h, 2, axis=-1)
    np.testing.assert_array_equal(ops.geglu(a, g), a * ops.gelu(g))  # float64: the formula
    a32, g32 = np.split(h.astype(np.float32), 2, axis=-1)
    y = ops.geglu(a32, g32)
    assert y.dtype == np.float32 and y.shape == (2, 9, d)
    assert_rel(y, a32 * _gelu_exact(g32), 1e-6, "geglu float32")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "b, h, lq, lk, tile, chunk",
    [(2, 3, 40, 40, 1 << 19, None), (1, 2, 50, 30, 300, None), (2, 2, 33, 70, 64, 5)],
)
def test_attention_tiled_equals_chunked(dtype, b, h, lq, lk, tile, chunk, monkeypatch):
    """Tiles of several heads, of row blocks, and of single rows (tile < Lk) agree with the
    reference, with a per-row mask and a broadcast key mask."""
    monkeypatch.setattr(ops, "ATTENTION_TILE", tile)
    rng = np.random.default_rng(lq)
    q, k = (rng.standard_normal((b, h, n, 16)).astype(dtype) for n in (lq, lk))
    v = rng.standard_normal((b, h, lk, 24)).astype(dtype)
    tol = 1e-13 if dtype == "float64" else 1e-6
    for mask in (None, rng.standard_normal((lq, lk)), rng.standard_normal((b, 1, 1, lk))):
        mask = None if mask is None else mask.astype(dtype)
        ours = ops.attention_tiled(q, k, v, chunk_size=chunk, mask=mask)
        ref = ops.attention_chunked(q, k, v, mask=mask)
        assert ours.shape == (b, h, lq, 24) and ours.dtype == np.dtype(dtype)
        assert_rel(ours, ref, tol, f"tiled attention tile={tile}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("spread", [0.3, 6.0, 40.0])
def test_attention_tiled_wide_logits_and_causal_mask(dtype, spread, monkeypatch):
    """Rows whose logits span far more than exp's range and a causal mask of the dtype's lowest
    value: exp2 (scores in base 2) never sees an argument below 0.8 log2(tiny) (its slow
    subnormal path), the result still agrees with the reference, and masked keys contribute
    nothing visible."""
    rng = np.random.default_rng(5)
    q, k = (rng.standard_normal((1, 2, 64, 40)).astype(dtype) * spread for _ in range(2))
    v = rng.standard_normal((1, 2, 64, 8)).astype(dtype)
    # Against the float64 reference on the same inputs. float32: scores reach |S| ~ 100 here, so
    # rounding them costs ~|S| eps32 ~ 6e-6 relative (the reference algorithm in float32:
    # 5.8e-6; these tiles, in base 2: 5.1e-6).
    tol = 1e-13 if dtype == "float64" else 1e-5
    causal = np.where(np.triu(np.ones((64, 64), bool), 1), np.finfo(dtype).min, 0).astype(dtype)
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    refs = [ops.attention_chunked(q64, k64, v64, mask=m) for m in (None, causal.astype("f8"))]
    floor, real_exp2, seen = 0.8 * np.log2(np.finfo(dtype).tiny), np.exp2, []

    def exp2(x, *args, **kw):
        seen.append(float(x.min()))
        return real_exp2(x, *args, **kw)

    monkeypatch.setattr(ops.np, "exp2", exp2)
    for mask, ref in zip((None, causal), refs):
        ours = ops.attention_tiled(q, k, v, mask=mask)
        assert_rel(ours, ref, tol, "wide logits")
    assert seen and min(seen) >= floor * (1 + 1e-6)
    monkeypatch.undo()
    first = ops.attention_tiled(q[:, :, :1], k, v, mask=causal[:1])  # sees only key 0
    assert_rel(first, np.broadcast_to(v[:, :, :1], first.shape), tol, "causal row 0")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_attention_unshifted_exp_at_the_edge_of_its_bound(dtype, monkeypatch):
    """Scores spanning [-R, R] with R just inside ops._unshifted_reach go into exp2 (as
    R log2 e) without the row-maximum shift (exp2 sees arguments near +R log2 e, which a
    shifted softmax never does) and still match the float64 reference; past the bound, the
    shifted path runs (max arg 0)."""
    limit = ops._unshifted_reach(np.dtype(dtype), 64, np.ones(1))
    assert limit == pytest.approx(69.87 if dtype == "float32" else 566.72, abs=0.01)
    theta = np.linspace(0, np.pi, 64)
    k = np.stack([np.cos(theta), np.sin(theta)], -1)[None, None]  # (1, 1, 64, 2), |k_j| = 1
    v = np.random.default_rng(0).standard_normal((1, 1, 64, 3))
    real_exp2, seen = np.exp2, []

    def exp2(x, *args, **kw):
        seen.append(float(x.max()))
        return real_exp2(x, *args, **kw)

    for reach, shifted in ((0.99 * limit, False), (1.01 * limit, True)):
        q = np.array([[[[reach, 0.0], [0.0, reach], [-reach, 0.0]]]])  # (1, 1, 3, 2)
        ref = ops.attention_chunked(q, k, v, scale=1.0)  # float64, shifted by the row max
        monkeypatch.setattr(ops.np, "exp2", exp2)
        ours = ops.attention_tiled(*(a.astype(dtype) for a in (q, k, v)), scale=1.0)
        monkeypatch.undo()
        assert np.isfinite(ours).all()
        # exp of arguments near R ~ 70 (float32): relative error ~ R eps32, 1.6e-6 and 3.8e-6 here
        assert_rel(ours, ref, 1e-13 if dtype == "float64" else 1e-5, f"reach {reach}")
        assert (max(seen) == 0.0) if shifted else max(seen) > 0.9 * limit / np.log(2)
        seen.clear()


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_run_ranges_covers_each_chunk_once(workers, n, monkeypatch):
    """Every chunk exactly once, in disjoint ranges; nested regions run serially; the BLAS
    thread count is restored."""
    monkeypatch.setattr(parallel, "WORKERS", workers)
    blas = parallel._openblas()
    before = blas[0]() if blas else None
    seen = []

    def fn(lo, hi):
        parallel.run_ranges(lambda a, b: None, 4)  # nested: must not deadlock
        seen.extend(range(lo, hi))

    parallel.run_ranges(fn, n)
    assert sorted(seen) == list(range(n))
    if blas:
        assert blas[0]() == before


@pytest.mark.parametrize("n", [5, ops._BLOCK + 3])
def test_silu_fast(n):
    """Blocked x / (1 + exp(-x)): float32 within 1e-6 of float64, exact limits at the extremes,
    float16 kept."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 8).astype(np.float32)
    x[:5] = [-1e4, 1e4, 0.0, -90.0, 90.0]
    x64 = x.astype(np.float64)
    e = np.exp(-np.abs(x64))  # in (0, 1]: no overflow
    ref = x64 * np.where(x64 >= 0, 1 / (1 + e), e / (1 + e))
    y = ops.silu(x)
    assert y.dtype == np.float32 and np.isfinite(y).all()
    assert y[0] == 0 and y[1] == 1e4 and y[2] == 0
    assert_rel(y, ref, 1e-6, "silu float32")
    h = ops.silu(x.astype(np.float16))
    assert h.dtype == np.float16
    assert_rel(h, ref, 1e-3, "silu float16")


@pytest.mark.parametrize(
    "shape, groups", [((2, 64, 9, 7), 32), ((1, 6, 5), 3), ((3, 32, 4, 4, 2), 8)]
)
def test_group_norm_fast(shape, groups, monkeypatch):
    """Blocked float32 GroupNorm within 1e-5 of the float64 reference, on data with a large
    mean (two-pass variance: no cancellation) and on a non-contiguous input; blocks of all
    groups, of a few (with a partial last block) and of one, on one worker and several."""
    rng = np.random.default_rng(len(shape))
    x = (rng.standard_normal(shape) * 3 + 50).astype(np.float32).astype(np.float64)
    w, b = rng.standard_normal((2, shape[1])).astype(np.float32).astype(np.float64)
    ref = ops.group_norm(x, w, b, groups=groups, eps=1e-6)  # float64: reference path
    length = x.size // (shape[0] * groups)
    for block, workers in [(ops._GN_BLOCK, 2), (3 * length - 1, 2), (1, 1), (1, 3)]:
        monkeypatch.setattr(ops_norm, "_GN_BLOCK", block)
        monkeypatch.setattr(parallel, "WORKERS", workers)
        args = [a.astype(np.float32) for a in (x, w, b)]
        y = ops.group_norm(*args, groups=groups, eps=1e-6)
        assert y.dtype == np.float32 and y.shape == x.shape
        assert_rel(y, ref, 1e-5, f"group_norm float32, block {block}")  # ulp(50) / std
        args[1] = args[1] * 60  # outputs up to ~+-200: exp(-y) overflows, silu -> -0
        ys = ops.group_norm(*args, groups=groups, eps=1e-6, act="silu")
        ref_s = ops.group_norm(x, args[1].astype(np.float64), b, groups=groups, eps=1e-6)
        assert_rel(ys, ops.silu(ref_s), 1e-5, f"group_norm + silu float32, block {block}")
    xt = np.ascontiguousarray(np.swapaxes(x, -1, -2)).astype(np.float32)
    yt = ops.group_norm(np.swapaxes(xt, -1, -2), w.astype(np.float32), b, groups=groups, eps=1e-6)
    assert_rel(yt, ref, 1e-5, "group_norm float32, strided input")


def test_group_norm_act_reference_and_errors():
    """act="silu" on the reference path (float64) is silu(group_norm); other acts are refused."""
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 4, 3)), rng.standard_normal(4), rng.standard_normal(4)
    ref = ops.silu(ops.group_norm(x, w, b, groups=2, eps=1e-5))
    np.testing.assert_array_equal(ops.group_norm(x, w, b, groups=2, eps=1e-5, act="silu"), ref)
    with pytest.raises(ValueError, match="act='gelu'"):
        ops.group_norm(x, w, b, groups=2, eps=1e-5, act="gelu")


@pytest.mark.parametrize("shape", [(2, 9, 40), (3, 1000, 320), (1, 3, ops._LN_BLOCK + 7)])
def test_layer_norm_fast(shape, monkeypatch):
    """Blocked float32 LayerNorm within 1e-5 of the float64 reference: blocks of many rows
    (with a partial last one), rows longer than a block, a large mean (two-pass variance),
    a strided input, a constant row (variance 0: eps alone), one worker and several."""
    rng = np.random.default_rng(shape[-1])
    x = (rng.standard_normal(shape) * 3 + 50).astype(np.float32).astype(np.float64)
    x[0, 0] = 7.0  # constant row
    w, b = rng.standard_normal((2, shape[-1])).astype(np.float32).astype(np.float64)
    ref = ops.layer_norm(x, w, b, eps=1e-5)  # float64: reference path
    for workers in (1, 2):
        monkeypatch.setattr(parallel, "WORKERS", workers)
        y = ops.layer_norm(*(a.astype(np.float32) for a in (x, w, b)), eps=1e-5)
        assert y.dtype == np.float32 and y.shape == x.shape
        assert_rel(y, ref, 1e-5, "layer_norm float32")  # ulp(50) / std
        np.testing.assert_allclose(y[0, 0], b, rtol=0, atol=1e-6)
    xt = np.ascontiguousarray(np.swapaxes(x, 0, 1)).astype(np.float32)
    yt = ops.layer_norm(np.swapaxes(xt, 0, 1), w.astype(np.float32), b.astype(np.float32), eps=1e-5)
    assert_rel(yt, ref, 1e-5, "layer_norm float32, strided input")


def test_quick_gelu_fast():
    """float32 quick_gelu (x / (1 + exp(-1.702 x)), blocked) vs float64 x sigmoid(1.702 x)."""
    x = (np.random.default_rng(3).standard_normal(ops._BLOCK + 9) * 8).astype(np.float32)
    x[:3] = [-1e4, 1e4, 0.0]
    y = ops.quick_gelu(x)
    x64 = x.astype(np.float64)
    e = np.exp(-np.abs(1.702 * x64))  # in (0, 1]: no overflow
    ref = x64 * np.where(x64 >= 0, 1 / (1 + e), e / (1 + e))
    assert y.dtype == np.float32 and y[0] == 0 and y[1] == 1e4
    assert_rel(y, ref, 1e-6, "quick_gelu float32")
