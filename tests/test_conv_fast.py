"""Fast conv2d paths (minisd/conv_fast.py) against torch and against ops.conv2d_reference.

float64: relative error <= 1e-12; float32: <= 1e-5 (OP_TOL), on realistic activations
(SiLU of normal noise, weights ~ N(0, 1/(9 Cin)) as after initialization/training).
"""

import numpy as np
import pytest
from refharness import OP_TOL, assert_rel, need, to_np, to_torch

from minisd import conv_fast, ops
from minisd.backend import to_numpy

DTYPES = ["float64", "float32"]


def _case(xp, n, cin, cout, h, w, k, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cin, h, w))
    x = x / (1 + np.exp(-x))  # SiLU activations, as every UNet/VAE conv sees
    wt = rng.standard_normal((cout, cin, k, k)) / np.sqrt(k * k * cin)
    b = 0.1 * rng.standard_normal(cout)
    return tuple(xp.asarray(a.astype(dtype)) for a in (x, wt, b))


def _torch_conv(x, w, b, stride, pads):
    """float64 torch reference; pads (top, bottom, left, right)."""
    torch = need("torch")
    F = torch.nn.functional
    top, bottom, left, right = pads
    tx = F.pad(to_torch(to_numpy(x).astype(np.float64)), (left, right, top, bottom))
    tb = None if b is None else to_torch(to_numpy(b).astype(np.float64))
    return to_np(F.conv2d(tx, to_torch(to_numpy(w).astype(np.float64)), tb, stride=stride))


# (n, cin, cout, h, w, k, stride, pads): the UNet/VAE conv kinds, odd sizes, batches 1-3
DIRECT_CASES = [
    (2, 5, 7, 9, 11, 3, 1, (1, 1, 1, 1)),  # 3x3 s1 p1, odd sizes
    (3, 4, 6, 8, 8, 3, 2, (1, 1, 1, 1)),  # UNet downsample
    (1, 6, 5, 9, 7, 3, 2, (0, 1, 0, 1)),  # VAE downsample (asymmetric pad)
    (2, 6, 4, 10, 7, 3, 2, (0, 1, 0, 1)),  # even height, odd width
    (3, 8, 5, 5, 6, 1, 1, (0, 0, 0, 0)),  # 1x1
    (1, 3, 4, 6, 11, 3, 1, (0, 0, 0, 0)),  # valid
    (2, 3, 2, 10, 6, 5, 1, (2, 2, 2, 2)),  # 5x5
    (2, 4, 3, 11, 9, 3, 3, (2, 0, 1, 1)),  # stride 3, odd asymmetric pad
    (1, 2, 3, 1, 1, 3, 1, (1, 1, 1, 1)),  # 1x1 image
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DIRECT_CASES)
def test_direct_matches_torch_and_reference(dtype, case):
    n, cin, cout, h, w, k, stride, pads = case
    x, wt, b = _case(np, n, cin, cout, h, w, k, dtype)
    ref = _torch_conv(x, wt, b, stride, pads)
    ours = conv_fast.conv2d_direct(x, wt, b, stride=stride, pads=pads)
    assert ours.dtype == np.dtype(dtype) and ours.shape == ref.shape
    assert_rel(ours, ref, OP_TOL[dtype], "conv2d_direct vs torch")
    readable = ops.conv2d_reference(x, wt, b, stride=stride, padding=pads)
    assert_rel(ours, to_numpy(readable), OP_TOL[dtype], "conv2d_direct vs conv2d_reference")
    nobias = conv_fast.conv2d_direct(x, wt, None, stride=stride, pads=pads)
    assert_rel(nobias, _torch_conv(x, wt, None, stride, pads), OP_TOL[dtype], "no bias")


@pytest.mark.parametrize("stride,pads", [(1, (1, 1, 1, 1)), (2, (0, 1, 0, 1))])
def test_direct_chunks_straddle_images(monkeypatch, stride, pads):
    """Tiny accumulator chunks: chunk borders fall inside images and between them."""
    monkeypatch.setattr(conv_fast, "_CHUNK_ELEMS", 7)
    x, wt, b = _case(np, 3, 4, 5, 9, 7, 3, "float64", seed=3)
    ours = conv_fast.conv2d_direct(x, wt, b, stride=stride, pads=pads)
    assert_rel(ours, _torch_conv(x, wt, b, stride, pads), OP_TOL["float64"], "chunked direct")


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_matrices_are_exact(m):
    """A^T [(G g) . (B^T d)] is the 1-D correlation y_k = sum_j g_j d_{k+j} (float64 round-off)."""
    at, g, bt = conv_fast.winograd_matrices(m)
    assert at.shape == (m, m + 2) and g.shape == (m + 2, 3) and bt.shape == (m + 2, m + 2)
    rng = np.random.default_rng(m)
    gg, d = rng.standard_normal(3), rng.standard_normal(m + 2)
    direct = np.array([gg @ d[k : k + 3] for k in range(m)])
    np.testing.assert_allclose(at @ ((g @ gg) * (bt @ d)), direct, rtol=0, atol=1e-13)


WINO_CASES = [
    (2, 8, 6, 8, 8, (1, 1, 1, 1)),  # tiles fit exactly (m = 2 and 4)
    (3, 5, 7, 9, 11, (1, 1, 1, 1)),  # partial tiles on both axes, batch 3
    (1, 4, 3, 7, 5, (0, 0, 0, 0)),  # valid convolution
    (2, 3, 4, 6, 9, (0, 1, 2, 1)),  # asymmetric padding
    (1, 2, 2, 1, 1, (1, 1, 1, 1)),  # 1x1 image
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("case", WINO_CASES)
def test_winograd_matches_torch(dtype, m, case):
    n, cin, cout, h, w, pads = case
    x, wt, b = _case(np, n, cin, cout, h, w, 3, dtype, seed=m)
    ours = conv_fast.conv2d_winograd(x, wt, b, pads=pads, m=m)
    ref = _torch_conv(x, wt, b, 1, pads)
    assert ours.dtype == np.dtype(dtype) and ours.shape == ref.shape
    assert_rel(ours, ref, OP_TOL[dtype], f"winograd F({m}x{m},3x3)")
    nobias = conv_fast.conv2d_winograd(x, wt, None, pads=pads, m=m)
    assert_rel(nobias, _torch_conv(x, wt, None, 1, pads), OP_TOL[dtype], "no bias")


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shared", [0, 10**6])
def test_winograd_chunks(monkeypatch, m, shared):
    """One tile row per chunk, partial last chunk (shared=0); or every tile in one chunk, as
    convolutions with few tiles run (shared above the tile count), whatever the chunk size."""
    monkeypatch.setattr(conv_fast, "_WINO_CHUNK_TILES", 1)
    monkeypatch.setattr(conv_fast, "_WINO_SHARED_TILES", shared)
    chunks = []
    real = conv_fast.parallel.run_ranges
    monkeypatch.setattr(
        conv_fast.parallel, "run_ranges", lambda fn, n: chunks.append(n) or real(fn, n)
    )
    x, wt, b = _case(np, 2, 4, 3, 13, 10, 3, "float64", seed=5)
    ours = conv_fast.conv2d_winograd(x, wt, b, m=m)
    assert_rel(ours, _torch_conv(x, wt, b, 1, (1, 1, 1, 1)), OP_TOL["float64"], "chunked")
    assert chunks == ([-(-13 // m)] if shared == 0 else [1])


# Real UNet/VAE channel counts at small sizes: float32 error of each path on the real K.
FULL_CASES = [
    (2, 320, 320, 32, 32),  # SD UNet level 0 (F4 at 2x32x32)
    (2, 640, 640, 16, 16),  # level 1 (F2)
    (2, 1280, 1280, 8, 8),  # levels 2-3 (F2)
    (1, 512, 512, 16, 16),  # VAE mid (F2)
    (2, 4, 320, 16, 16),  # conv_in: few channels -> direct
]


@pytest.mark.parametrize("case", FULL_CASES)
def test_conv2d_dispatch_full_size_channels(case):
    n, cin, cout, h, w = case
    x, wt, b = _case(np, n, cin, cout, h, w, 3, "float32", seed=7)
    tile = conv_fast.winograd_tile(x, wt, 1, (1, 1, 1, 1))
    assert tile == (0 if min(cin, cout) < 32 else 4 if n * h * w >= 2048 else 2)
    ours = ops.conv2d(x, wt, b, padding=1)
    assert ours.dtype == np.float32
    assert_rel(ours, _torch_conv(x, wt, b, 1, (1, 1, 1, 1)), OP_TOL["float32"], f"tile {tile}")


def test_f4_float32_error_on_large_image():
    """F(4x4,3x3) on a 64x64 SiLU image with 320 channels stays well under 1e-5 (about 5e-6)."""
    x, wt, b = _case(np, 1, 320, 320, 64, 64, 3, "float32", seed=11)
    ours = conv_fast.conv2d_winograd(x, wt, b, m=4)
    err = assert_rel(ours, _torch_conv(x, wt, b, 1, (1, 1, 1, 1)), OP_TOL["float32"], "F4")
    assert err > 0  # float32 arithmetic really happened


def test_dispatch_rules(monkeypatch):
    x32, w32, _ = _case(np, 2, 64, 64, 32, 32, 3, "float32")
    x64, w64, _ = _case(np, 2, 64, 64, 32, 32, 3, "float64")
    pads = (1, 1, 1, 1)
    assert conv_fast.winograd_tile(x32, w32, 1, pads) == 4
    assert conv_fast.winograd_tile(x32[:1, :, :16, :16], w32, 1, pads) == 2
    assert conv_fast.winograd_tile(x64, w64, 1, pads) == 0  # float64: exact direct path
    assert conv_fast.winograd_tile(x32, w32, 2, pads) == 0  # stride 2
    assert conv_fast.winograd_tile(x32, w32[:, :, :1, :1], 1, (0, 0, 0, 0)) == 0  # 1x1
    monkeypatch.setattr(conv_fast, "WINOGRAD_TILE", 2)
    assert conv_fast.winograd_tile(x32, w32, 1, pads) == 2
    monkeypatch.setattr(conv_fast, "WINOGRAD_TILE", 0)
    assert conv_fast.winograd_tile(x32, w32, 1, pads) == 0


def test_conv2d_rejects_channel_mismatch():
    x, wt, b = _case(np, 1, 3, 4, 5, 5, 3, "float32")
    with pytest.raises(ValueError, match="3 channels"):
        ops.conv2d(x, wt[:, :2], b, padding=1)


def test_derived_weight_cache(monkeypatch):
    """Transformed weights are reused (same result), bounded by the budget, dropped with the
    weight array, and cleared on request."""
    import gc

    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 32, 12, 12)).astype(np.float32)
    w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    conv_fast.clear_cache()
    monkeypatch.setattr(conv_fast, "CONV_CACHE_BYTES", 0)
    y0 = conv_fast.conv2d_winograd(x, w, m=2)
    assert conv_fast.cache_bytes() == 0  # no budget: nothing kept
    monkeypatch.setattr(conv_fast, "CONV_CACHE_BYTES", 1 << 30)
    y1 = conv_fast.conv2d_winograd(x, w, m=2)
    d1 = conv_fast.conv2d_direct(x, w, pads=(1, 1, 1, 1))
    assert conv_fast.cache_bytes() == 16 * 32 * 32 * 4 + w.nbytes  # U (F(2x2)) + tap-major copy
    np.testing.assert_array_equal(conv_fast.conv2d_winograd(x, w, m=2), y1)  # cache hit
    np.testing.assert_array_equal(conv_fast.conv2d_direct(x, w, pads=(1, 1, 1, 1)), d1)
    np.testing.assert_array_equal(y0, y1)
    w2 = w.copy()
    w2 *= 2  # another array: its own entry, not the cached one
    np.testing.assert_allclose(conv_fast.conv2d_winograd(x, w2, m=2), 2 * y1, rtol=1e-5, atol=1e-5)
    del w, w2
    gc.collect()
    assert conv_fast.cache_bytes() == 0  # entries die with their weights
    w3 = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    conv_fast.conv2d_winograd(x, w3, m=4)
    assert conv_fast.cache_bytes() > 0
    conv_fast.clear_cache()
    assert conv_fast.cache_bytes() == 0
