"""Fast 2-D convolution paths behind ``ops.conv2d``.

Two algorithms, both pure array code (no compiled extension), both exact to round-off:

``conv2d_direct``  any kernel, stride and padding; NumPy (CuPy takes ``conv_gemm``). The input
    stays NCHW. Each kernel tap (i, j) reads the padded image shifted by (i, j); flattening the
    padded rows makes that shift a *contiguous slice* of length Ho*Wq of a (Cin, Hq*Wq) matrix,
    so every tap is one copy-free GEMM  W[:, :, i, j] (Cout, Cin) @ X_flat[:, off : off + L]
    (Cin, L)  accumulated into the output. The Wq - Wo extra columns of each output row (taps
    wrapping into the next row) are dropped when the result is copied out. Stride s splits the
    padded input into s*s phases x[pi::s, pj::s] first, so that strided taps become shifts too.
    Output rows are processed in chunks so the accumulator stays in cache.

``conv2d_winograd``  3x3, stride 1, NumPy: Winograd's minimal filtering F(m x m, 3 x 3)
    (Winograd 1980; Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks"):
        Y = A^T [ (G g G^T) . (B^T d B) ] A
    per (m+2)x(m+2) input tile d (stride m) and 3x3 filter g; the elementwise product summed over
    input channels is a GEMM per Winograd-domain position. Multiplications drop from 9 m^2 to
    (m+2)^2 per tile and channel pair: 2.25x (m=2) or 4x (m=4). The 2-D transforms are applied
    as one small GEMM with the Kronecker product (B^T (x) B^T) on vectorized tiles.
    Interpolation points for m=4 are {0, 1, -1, 1/2, -2} (plus infinity), not the common
    {0, +-1, +-2}: on float32 activations that roughly halves the error (Barabasz et al. 2020,
    "Error analysis and improving the accuracy of Winograd convolution for DNNs").
"""

from __future__ import annotations

import os
import threading
import weakref
from fractions import Fraction
from functools import cache

import numpy as np

from . import parallel
from .backend import array_module, is_cupy

# Accumulator chunk (output elements) kept per GEMM: ~1 MiB of float32, below L2.
_CHUNK_ELEMS = 1 << 18

# Largest Winograd output tile for float32 3x3 stride-1 convolutions: 4 (F(4x4,3x3) on large
# images, F(2x2,3x3) on small ones), 2 (F(2x2,3x3) only: float32 error close to direct GEMM),
# 0 (off: direct GEMM only). Environment: MINISD_WINOGRAD=4|2|0.
WINOGRAD_TILE = int(os.environ.get("MINISD_WINOGRAD", "4"))
_WINOGRAD_MIN_CHANNELS = 32
_F4_MIN_PIXELS = 2048  # N*Ho*Wo; F(4x4) needs enough tiles to pay for 36 transformed weights
_WINO_CHUNK_TILES = 256  # tiles (GEMM columns) per chunk: transforms stay in cache
# Up to this many tiles, a convolution runs as one chunk whose GEMMs are split over the cores
# (parallel.matmul), so each core reads part of the transformed weights; one chunk per core
# would make each core stream all of them (16 or 36 x Cout x Cin: 105 MB for 1280 channels),
# which dominates when there are few tiles. UNet 64x64 batch 2: the 32x32 and smaller levels
# (<= 128 tiles), convs 3.65 -> 2.86 s; at 256 tiles it depends on the shapes (VAE 512
# channels at 64x64: 33 ms per core, 50 ms shared), so larger convolutions keep one chunk per
# core.
_WINO_SHARED_TILES = 128


def winograd_tile(x, w, stride, pads):
    """Output tile m of the Winograd path for this convolution, or 0 for the direct path.

    Winograd is used for NumPy float32 3x3 stride-1 convolutions with at least 32 input and
    output channels (below that the transforms cost more than the multiplies they save). F(4x4)
    transforms the weights to 36/9 = 4x their size and wins once there are >= 2048 output
    pixels (e.g. 2 x 32x32); smaller images (1280 channels at 16x16 or 8x8) use F(2x2).
    float64 stays on the direct path, which is exact to round-off."""
    cout, cin, kh, kw = w.shape
    if not (
        WINOGRAD_TILE in (2, 4)
        and not is_cupy(x)
        and x.dtype == np.float32
        and (kh, kw, stride) == (3, 3, 1)
        and min(cin, cout) >= _WINOGRAD_MIN_CHANNELS
    ):
        return 0
    top, bottom, left, right = pads
    pixels = x.shape[0] * (x.shape[2] + top + bottom - 2) * (x.shape[3] + left + right - 2)
    return 4 if WINOGRAD_TILE == 4 and pixels >= _F4_MIN_PIXELS else 2


# --------------------------------------------------------------------------- derived weights

# Derived weights (Winograd-domain U = G g G^T, the tap-major copy of the direct path) are
# computed once per weight array and kept beside it, up to CONV_CACHE_BYTES in all
# (MINISD_CONV_CACHE_MB; default 6144 or a quarter of the machine's memory, whichever is less;
# 0: recompute on every call). The checkpoint's arrays are untouched. Memory: the full SD1.5
# UNet in float32 needs 4.2 GiB at 64x64 latents, 4.6 GiB once 32x32 ran too (F(4x4) weights
# are 4x, F(2x2) 16/9x the 3x3 weights; the smaller levels switch between them); that
# saves ~1.9 s of a 13.7 s batch-2 64x64 forward on 2 cores (benchmarks/RESULTS.md), mostly in
# the 640/1280-channel layers, where the transform costs 40-100% of the convolution. Entries
# are keyed by id(weight) and dropped when that array is freed (weakref); nothing else is
# evicted, so with a full budget the first layers used stay cached (an LRU would miss on every
# layer of a sweep larger than the budget). Weights must not be changed in place while cached
# (see ``clear_cache``).


def _default_cache_mb():
    """6144 MiB (all of SD1.5's; a 4096 default re-transformed ~200 MiB of them at every step,
    0.17 s of a 7.4 s forward), or a quarter of physical memory on smaller machines."""
    try:
        total_kib = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return 6144
    return min(6144, total_kib // 4096)


_CACHE_MB = os.environ.get("MINISD_CONV_CACHE_MB") or _default_cache_mb()
CONV_CACHE_BYTES = int(float(_CACHE_MB) * 2**20)
_cache: dict = {}  # (id(w), kind) -> (weakref to w, derived array)
_cache_lock = threading.Lock()


def cache_bytes():
    """Bytes held by the derived-weight cache."""
    with _cache_lock:
        return sum(arr.nbytes for _, arr in _cache.values())


def clear_cache():
    """Forget all derived weights. Weights are treated as immutable: call this after changing
    a convolution weight in place (e.g. merging a LoRA into it)."""
    with _cache_lock:
        _cache.clear()


def _derived(w, kind, make):
    """make() for weight ``w``, cached under ``kind`` while the budget allows."""
    key = (id(w), kind)
    hit = _cache.get(key)
    if hit is not None and hit[0]() is w:
        return hit[1]
    arr = make()
    if cache_bytes() + arr.nbytes > CONV_CACHE_BYTES:
        return arr
    try:
        ref = weakref.ref(w, lambda _, key=key, c=_cache: c.pop(key, None))
    except TypeError:  # not weak-referenceable: no caching
        return arr
    with _cache_lock:
        _cache[key] = (ref, arr)
    return arr


# --------------------------------------------------------------------------- direct (GEMM) path


def conv2d_direct(x, w, b=None, *, stride=1, pads=(0, 0, 0, 0)):
    """Shifted-slice GEMM convolution; see the module docstring. pads: (top, bottom, left, right).

    x (N, Cin, H, W), w (Cout, Cin, kh, kw), b (Cout,) or None -> (N, Cout, Ho, Wo). The images
    are laid side by side as (Cin, N*Hq*Wq), so one GEMM covers all of them (the weights are
    read once per chunk, which matters for 1280-channel layers at 8x8).
    """
    xp = array_module(x)
    n, cin = x.shape[:2]
    cout, _, kh, kw = w.shape
    s = stride
    flat, (ho, wo, hq, wq, rows_total) = _flat_grid(xp, x, w.shape, s, pads)
    taps = lambda: xp.ascontiguousarray(w.transpose(2, 3, 0, 1))  # noqa: E731
    wt = _derived(w, "taps", taps)  # (kh, kw, Cout, Cin)
    y = xp.empty((n, cout, ho, wo), dtype=x.dtype)
    rows = max(1, min(rows_total, max(_CHUNK_ELEMS // cout, 2048) // wq))  # rows per chunk

    def chunks(lo, hi):  # chunks [lo, hi) of ``rows`` grid rows; they write disjoint rows of y
        acc = parallel.scratch("direct.acc", (cout, rows * wq), x.dtype)  # (Cout, R*Wq), reused
        tmp = parallel.scratch("direct.tmp", (cout, rows * wq), x.dtype)
        for r0 in range(lo * rows, min(rows_total, hi * rows), rows):
            r = min(rows, rows_total - r0)
            a, t = acc[:, : r * wq], tmp[:, : r * wq]  # (Cout, r*Wq)
            for k in range(kh * kw):
                i, j = divmod(k, kw)
                off = (r0 + i // s) * wq + j // s
                xs = flat[i % s, j % s, :, off : off + r * wq]  # (Cin, r*Wq)
                parallel.matmul(wt[i, j], xs, out=a if k == 0 else t)  # split if one chunk
                if k:
                    a += t
            _copy_out(xp, a.reshape(cout, r, wq), y, b, r0, hq)

    parallel.run_ranges(chunks, -(-rows_total // rows))  # on all cores, one BLAS thread each
    return y


def _flat_grid(xp, x, w_shape, s, pads):
    """The padded input as ``_phases`` lays it out, (s, s, Cin, N*Hq*Wq + Wq + 1), and the grid:
    (Ho, Wo, Hq, Wq, rows) = output size, stride-phase size of the padded input, and the grid
    rows (of Wq columns, images stacked) up to the last valid output row."""
    n, _, h, wd = x.shape
    kh, kw = w_shape[2:]
    top, bottom, left, right = pads
    hp, wp = h + top + bottom, wd + left + right
    ho, wo = (hp - kh) // s + 1, (wp - kw) // s + 1
    hq, wq = -(-hp // s), -(-wp // s)
    return _phases(xp, x, s, hq, wq, top, left), (ho, wo, hq, wq, (n - 1) * hq + ho)


def _copy_out(xp, a, y, b, r0, hq):
    """Grid rows [r0, r0 + r) of the accumulator -> valid output rows of each image, + bias."""
    n, cout, ho, wo = y.shape
    r = a.shape[1]
    if r0 == 0 and (n - 1) * hq + ho <= r:  # every image in this chunk: one operation, not N
        s0, s1, s2 = a.strides  # image k's rows start at grid row k * Hq
        src = xp.lib.stride_tricks.as_strided(a, (n, cout, ho, wo), (hq * s1, s0, s1, s2))
        _add_bias(xp, src, b, y)
        return
    for img in range(r0 // hq, min(n, -(-(r0 + r) // hq))):
        lo, hi = max(r0, img * hq), min(r0 + r, img * hq + ho)  # grid rows of this image
        if lo >= hi:
            continue
        src = a[:, lo - r0 : hi - r0, :wo]  # (Cout, rows, Wo)
        _add_bias(xp, src, b, y[img, :, lo - img * hq : hi - img * hq])  # (Cout, rows, Wo)


def _add_bias(xp, src, b, dst):
    """dst = src + b, b (Cout,) broadcast over the last two axes (or dst = src if b is None)."""
    if b is None:
        dst[...] = src
    else:
        xp.add(src, b.reshape(-1, 1, 1), out=dst)


def _phases(xp, x, s, hq, wq, top, left):
    """Zero-padded input split into stride phases, images side by side, rows flattened:
    (s, s, Cin, N*Hq*Wq + Wq + 1). Phase (pi, pj) holds padded pixel (s*u + pi, s*v + pj) of
    image k at flat index k*Hq*Wq + u*Wq + v; the tail keeps the last windows in bounds."""
    n, cin, h, wd = x.shape
    size = n * hq * wq
    out = xp.zeros((s, s, cin, size + wq + 1), dtype=x.dtype)  # (s, s, Cin, N*Hq*Wq + tail)
    if s == 1:
        grid = out[0, 0, :, :size].reshape(cin, n, hq, wq)  # (Cin, N, Hp, Wp)
        grid[:, :, top : top + h, left : left + wd] = x.transpose(1, 0, 2, 3)
        return out
    xpad = xp.zeros((cin, n, hq * s, wq * s), dtype=x.dtype)  # (Cin, N, Hq*s, Wq*s)
    xpad[:, :, top : top + h, left : left + wd] = x.transpose(1, 0, 2, 3)
    ph = xpad.reshape(cin, n, hq, s, wq, s).transpose(3, 5, 0, 1, 2, 4)  # (s, s, Cin, N, Hq, Wq)
    out[:, :, :, :size].reshape(s, s, cin, n, hq, wq)[...] = ph
    return out


# --------------------------------------------------------------------------- Winograd path

_POINTS = {2: (0, 1, -1), 4: (0, 1, -1, Fraction(1, 2), -2)}


@cache
def winograd_matrices(m, r=3):
    """Toom-Cook matrices (A^T (m, a), G (a, r), B^T (a, a)), a = m + r - 1, float64.

    Finite points p_0..p_{a-2} and the point at infinity. A^T[k, i] = p_i^k evaluates the
    product polynomial; G[i, j] = p_i^j / prod_{k != i} (p_i - p_k) evaluates the filter with the
    Lagrange denominators folded in; B^T is the unique matrix that makes
    sum_i A^T[k, i] G[i, j] B^T[i, l] = [l == k + j], i.e. y_k = sum_j g_j d_{k+j} exactly,
    solved here in exact rational arithmetic."""
    pts = [Fraction(p) for p in _POINTS[m]]
    a = m + r - 1
    at = [[Fraction(0)] * a for _ in range(m)]
    g = [[Fraction(0)] * r for _ in range(a)]
    for i, p in enumerate(pts):
        f = Fraction(1)
        for k, q in enumerate(pts):
            if k != i:
                f *= p - q
        for k in range(m):
            at[k][i] = p**k
        for j in range(r):
            g[i][j] = p**j / f
    at[m - 1][a - 1] = g[a - 1][r - 1] = Fraction(1)
    bt = _solve_bt(at, g, m, r, a)
    return tuple(np.array(z, dtype=np.float64) for z in (at, g, bt))


def _solve_bt(at, g, m, r, a):
    """B^T column by column: for each l, the a unknowns B^T[:, l] satisfy the m*r equations
    sum_i at[k][i] g[i][j] B^T[i][l] = [l == k + j] (square after dropping dependent rows)."""
    rows = [[at[k][i] * g[i][j] for i in range(a)] for k in range(m) for j in range(r)]
    bt = [[Fraction(0)] * a for _ in range(a)]
    for col in range(a):
        rhs = [Fraction(int(col == k + j)) for k in range(m) for j in range(r)]
        sol = _exact_lstsq(rows, rhs, a)
        for i in range(a):
            bt[i][col] = sol[i]
    return bt


def _exact_lstsq(rows, rhs, a):
    """Solve a consistent, full-column-rank system exactly by Gauss-Jordan elimination."""
    aug = [row[:] + [v] for row, v in zip(rows, rhs)]
    piv_row = 0
    for col in range(a):
        p = next(i for i in range(piv_row, len(aug)) if aug[i][col] != 0)
        aug[piv_row], aug[p] = aug[p], aug[piv_row]
        pv = aug[piv_row][col]
        aug[piv_row] = [v / pv for v in aug[piv_row]]
        for i in range(len(aug)):
            if i != piv_row and aug[i][col] != 0:
                f = aug[i][col]
                aug[i] = [v - f * u for v, u in zip(aug[i], aug[piv_row])]
        piv_row += 1
    return [aug[i][a] for i in range(a)]


@cache
def _kron_mats(m, dtype):
    """(B^T (x) B^T, A^T (x) A^T, G (x) G) in ``dtype``: 2-D transforms of vectorized tiles."""
    at, g, bt = winograd_matrices(m)
    dt = np.dtype(dtype)
    return np.kron(bt, bt).astype(dt), np.kron(at, at).astype(dt), np.kron(g, g).astype(dt)


def _transform_weight(w, kg):
    """U = (G (x) G) vec(g) for every filter: (Cout, Cin, 3, 3) -> (a*a, Cout, Cin)."""
    cout, cin = w.shape[:2]
    return (kg @ w.reshape(cout * cin, 9).T).reshape(kg.shape[0], cout, cin)


def _zero_border(xpad, top, left, h, wd):
    """Zero xpad (..., H', W') outside rows [top, top + h) and columns [left, left + wd)."""
    xpad[..., :top, :] = 0
    xpad[..., top + h :, :] = 0
    xpad[..., top : top + h, :left] = 0
    xpad[..., top : top + h, left + wd :] = 0


def conv2d_winograd(x, w, b=None, *, pads=(1, 1, 1, 1), m=4):
    """F(m x m, 3 x 3) convolution, stride 1 (NumPy). x (N, Cin, H, W), w (Cout, Cin, 3, 3)."""
    n, cin, h, wd = x.shape
    cout = w.shape[0]
    dt = x.dtype
    a = m + 2
    top, bottom, left, right = pads
    ho, wo = h + top + bottom - 2, wd + left + right - 2
    ty, tx = -(-ho // m), -(-wo // m)  # tiles per column / row
    kb, ka, kg = _kron_mats(m, dt.str)
    u = _derived(w, m, lambda: _transform_weight(w, kg))  # (a*a, Cout, Cin)  G g G^T
    xpad = parallel.scratch("wino.x", (cin, n, ty * m + 2, tx * m + 2), dt)  # (Cin, N, Hp', Wp')
    _zero_border(xpad, top, left, h, wd)
    xpad[:, :, top : top + h, left : left + wd] = x.transpose(1, 0, 2, 3)
    y = np.empty((n, cout, ty * m, tx * m), dtype=dt)  # (N, Cout, Ty*m, Tx*m)
    yt = y.reshape(n, cout, ty, m, tx, m).transpose(3, 5, 1, 0, 2, 4)  # (m, m, Cout, N, Ty, Tx)
    step = max(1, min(-(-ty // parallel.WORKERS), _WINO_CHUNK_TILES // max(1, n * tx)))  # rows
    if n * ty * tx <= _WINO_SHARED_TILES:  # one chunk, its GEMMs split over the cores
        step = ty
    st = xpad.strides
    scratch, gemm = parallel.scratch, parallel.matmul  # (split over the cores if one chunk)

    def chunks(lo, hi):  # chunks [lo, hi) of ``step`` tile rows each
        for t0 in range(lo * step, min(ty, hi * step), step):
            t = min(step, ty - t0)
            tiles = np.lib.stride_tricks.as_strided(
                xpad[:, :, t0 * m :],
                shape=(a, a, cin, n, t, tx),
                strides=(st[2], st[3], st[0], st[1], m * st[2], m * st[3]),
            )  # (a, a, Cin, N, t, Tx): tile (y, x) of channel c, overlapping windows
            p = n * t * tx  # tiles in this chunk; work arrays reused across chunks and calls
            d = scratch("wino.d", (a * a, cin * p), dt)  # (a*a, Cin*P)
            np.copyto(d.reshape(tiles.shape), tiles)
            v = scratch("wino.v", (a * a, cin, p), dt)  # (a*a, Cin, P)
            gemm(kb, d, out=v.reshape(a * a, cin * p))  # B^T d B
            mm = scratch("wino.m", (a * a, cout, p), dt)  # (a*a, Cout, P)
            gemm(u, v, out=mm)  # sum over Cin of U . V
            z = scratch("wino.z", (m * m, cout * p), dt)  # (m*m, Cout*P)
            gemm(ka, mm.reshape(a * a, cout * p), out=z)  # A^T M A
            yt[:, :, :, :, t0 : t0 + t] = z.reshape(m, m, cout, n, t, tx)  # into y

    parallel.run_ranges(chunks, -(-ty // step))
    if b is not None and (ty * m, tx * m) == (ho, wo):
        y += b.reshape(1, cout, 1, 1)
        return y
    y = y[:, :, :ho, :wo]  # (N, Cout, Ho, Wo)
    return np.ascontiguousarray(y) if b is None else y + b.reshape(1, cout, 1, 1)
