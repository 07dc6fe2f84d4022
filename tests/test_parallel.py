"""minisd.parallel: GEMMs split over the cores (``matmul``) and per-thread work arrays
(``scratch``), and the callers that reuse work arrays (Winograd's padded input, GEGLU's
projection) giving the same results call after call."""

import threading

import numpy as np
import pytest
from refharness import assert_rel

from minisd import conv_fast, ops, parallel, trace, unet_blocks

# (a shape, b shape): rows split (m >= n), columns split (m < n), a batched product (a 2-D
# matrix against a stack: the 1x1 convolution), and uneven sizes around the 16-aligned cuts.
SHAPES = [
    ((300, 64), (64, 40)),
    ((5, 70), (70, 333)),
    ((48, 32), (3, 32, 257)),
    ((2, 33, 17), (2, 17, 47)),
]


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("shapes", SHAPES)
def test_matmul_splits_match_numpy(shapes, workers, monkeypatch):
    """Split products equal one np.matmul in float64 to round-off, whatever the split (the
    threshold is lowered so these small products are split), into a given ``out`` too, with a
    transposed (strided) operand; the BLAS thread count is restored."""
    monkeypatch.setattr(parallel, "WORKERS", workers)
    monkeypatch.setattr(parallel, "_SPLIT_WORK", 1)
    rng = np.random.default_rng(workers)
    a, b = (rng.standard_normal(s) for s in shapes)
    blas = parallel._openblas()
    before = blas[0]() if blas else None
    ref = np.matmul(a, b)
    assert_rel(parallel.matmul(a, b), ref, 1e-14, "matmul")
    out = np.full(ref.shape, np.nan)
    assert parallel.matmul(a, b, out=out) is out
    assert_rel(out, ref, 1e-14, "matmul into out")
    for bias in (rng.standard_normal(ref.shape[-1]), rng.standard_normal((ref.shape[-2], 1))):
        with_bias = parallel.matmul(a, b, bias=bias)
        assert_rel(with_bias, ref + bias, 1e-14, f"matmul + bias {bias.shape}")
    bt = np.ascontiguousarray(np.swapaxes(b, -1, -2))
    assert_rel(parallel.matmul(a, np.swapaxes(bt, -1, -2)), ref, 1e-14, "transposed operand")
    if blas:
        assert blas[0]() == before


def test_matmul_nested_and_small(monkeypatch):
    """Inside a parallel region (each worker's own product) and below the split threshold the
    product runs as one call, with the same result."""
    monkeypatch.setattr(parallel, "WORKERS", 2)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 64, 64)), rng.standard_normal((64, 64))
    out = np.empty((2, 64, 64))

    def fn(lo, hi):
        for i in range(lo, hi):
            parallel.matmul(a[i], b, out=out[i])

    parallel.run_ranges(fn, 2)
    assert_rel(out, a @ b, 1e-14, "nested matmul")
    assert_rel(parallel.matmul(a[0, :2], b), a[0, :2] @ b, 1e-14, "small matmul")


def test_scratch_reuse_grow_release():
    """Same name and thread: the same memory, grown when a larger shape is asked for; another
    thread: its own array; release_scratch frees them all."""
    parallel.release_scratch()
    x = parallel.scratch("t.x", (4, 5), np.float32)
    assert x.shape == (4, 5) and x.dtype == np.float32
    assert np.shares_memory(parallel.scratch("t.x", (2, 3), np.float32), x)  # smaller: reused
    y = parallel.scratch("t.x", (10, 10), np.float32)  # larger: a new array
    assert not np.shares_memory(y, x) and y.shape == (10, 10)
    assert parallel.scratch("t.x", (10, 10), np.float64).dtype == np.float64
    other = []
    t = threading.Thread(target=lambda: other.append(parallel.scratch("t.x", (10, 10), "f8")))
    t.start()
    t.join()
    assert not np.shares_memory(other[0], parallel.scratch("t.x", (10, 10), np.float64))
    assert parallel.scratch_bytes() >= 800
    parallel.release_scratch()
    assert parallel.scratch_bytes() == 0


def test_winograd_reused_padding_is_zero(monkeypatch):
    """The padded-input work array is reused across calls: a convolution with less padding (or
    none) after one with large values must still see zeros in its padding."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((32, 32, 3, 3)) / 17).astype(np.float32)
    big = np.full((1, 32, 12, 12), 1e3, np.float32)
    x = rng.standard_normal((1, 32, 12, 12)).astype(np.float32)
    for pads in [(1, 1, 1, 1), (0, 1, 1, 0), (0, 0, 0, 0), (2, 0, 0, 2)]:
        conv_fast.conv2d_winograd(big, w, pads=(2, 2, 2, 2), m=2)  # fills the work array
        y = conv_fast.conv2d_winograd(x, w, pads=pads, m=2)
        ref = ops.conv2d_reference(x.astype(np.float64), w.astype(np.float64), padding=pads)
        assert_rel(y, ref, 1e-5, f"winograd after reuse, pads {pads}")


def test_geglu_projection_work_array_vs_trace():
    """GEGLU's projection goes to a reused work array unless a trace is recording, which must
    get its own copy; the outputs agree either way and across repeated calls."""
    rng = np.random.default_rng(2)
    p = {"proj": {"weight": rng.standard_normal((16, 4)), "bias": rng.standard_normal(16)}}
    p["proj"] = {k: v.astype(np.float32) for k, v in p["proj"].items()}
    x1, x2 = rng.standard_normal((2, 1, 5, 4)).astype(np.float32)
    y1 = unet_blocks.geglu(x1, p)
    y2 = unet_blocks.geglu(x2, p)
    assert not np.array_equal(y1, y2)
    np.testing.assert_array_equal(unet_blocks.geglu(x1, p), y1)
    with trace(copy=False) as acts:
        np.testing.assert_array_equal(unet_blocks.geglu(x1, p), y1)
    recorded = acts["proj"]  # recorded without a copy: must not be the work array
    unet_blocks.geglu(x2, p)  # (reuses the work array)
    proj = x1.astype(np.float64) @ p["proj"]["weight"].T.astype(np.float64) + p["proj"]["bias"]
    assert_rel(recorded, proj, 1e-6, "recorded projection")


def test_blas_threads_mode_is_scoped(monkeypatch):
    """Inside blas_threads() matmul is one np.matmul (never a split), with the same result; the
    mode ends with the block, also when it raises."""
    monkeypatch.setattr(parallel, "_SPLIT_WORK", 1)
    calls = []
    real = parallel.run_ranges
    monkeypatch.setattr(parallel, "run_ranges", lambda fn, n: calls.append(n) or real(fn, n))
    a, b = np.random.default_rng(3).standard_normal((2, 64, 64))
    with pytest.raises(KeyError):
        with parallel.blas_threads():
            assert_rel(parallel.matmul(a, b), a @ b, 1e-14, "matmul in blas_threads")
            raise KeyError
    assert calls == []
    parallel.matmul(a, b)
    assert calls or parallel.WORKERS == 1 or parallel._openblas() is None  # split outside
