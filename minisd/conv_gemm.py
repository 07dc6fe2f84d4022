"""Convolution as one GEMM per chunk (im2col): the GPU path of ``ops.conv2d``.

    Y (Cout, P) = W (Cout, Cin*kh*kw) @ X (Cin*kh*kw, P),   X[(c, i, j), p] = x_pad[c, p + d(i, j)]

with p running over the padded output grid of all images side by side, as in
``conv_fast.conv2d_direct``: rows flattened, so tap (i, j) reads a contiguous slice shifted by
d(i, j) = i Wq + j (stride 1; stride s reads phase (i % s, j % s) shifted by (i // s) Wq + j // s),
and the Wq - Wo wrapped columns of each row are dropped on the way out. The rows of X are in
(c, i, j) order, so W's matrix is a free reshape of the (Cout, Cin, kh, kw) weight.

Why a GPU wants this rather than the CPU's tap-by-tap accumulation: every CuPy call is a kernel
launch costing ~10 us of Python and driver time, which for the UNet's small convolutions is
more than the arithmetic. Here a 3x3 stride-1 convolution is four kernels (zero fill and copy
for the padding, gather X, one cuBLAS GEMM) and one copy out with the bias, instead of 9 GEMMs,
8 adds and the copies per cache-sized chunk (~37 per UNet convolution at 64x64 latents, ~3000
for a VAE convolution at 512x512). With the fused kernels (float16/float32 on CuPy),
``_conv_gathered`` gathers X straight from the unpadded input in one kernel
(``gpu_kernels.im2col``, any stride): three launches per convolution; the array code stays the
readable reference and the fallback. One product over K = 9 Cin also keeps the whole sum in
cuBLAS's accumulator (float32 for float16 data under CuPy's default compute type), where nine
float16 partial products would each be rounded. The price is memory: X is kh*kw times the
input, so it is built in chunks of output rows of at most ``COLS_BYTES`` (MINISD_GPU_CONV_MB,
default 256 MiB: the UNet's largest, 9 x 320 x 2 x 64 x 64 float16, is 47 MB; a 512x512 VAE
decode takes a few chunks).
"""

from __future__ import annotations

import os

from . import gpu_kernels
from .backend import array_module
from .conv_fast import _copy_out, _flat_grid

COLS_BYTES = int(os.environ.get("MINISD_GPU_CONV_MB", "256")) << 20


def conv2d_im2col(x, w, b=None, *, stride=1, pads=(0, 0, 0, 0)):
    """x (N, Cin, H, W), w (Cout, Cin, kh, kw), b (Cout,) or None -> (N, Cout, Ho, Wo);
    pads (top, bottom, left, right). NumPy or CuPy (the same code)."""
    xp = array_module(x)
    y = _conv_gathered(xp, x, w, b, stride, pads) if gpu_kernels.usable(x) else None
    if y is not None:
        return y
    n, cin = x.shape[:2]
    cout, _, kh, kw = w.shape
    flat, (ho, wo, hq, wq, rows_total) = _flat_grid(xp, x, w.shape, stride, pads)
    w2 = w.reshape(cout, cin * kh * kw)  # (Cout, Cin*kh*kw), rows (c, i, j)
    y = xp.empty((n, cout, ho, wo), dtype=x.dtype)
    per_row = cin * kh * kw * wq * x.dtype.itemsize  # bytes of X per grid row
    rows = max(1, min(rows_total, COLS_BYTES // per_row))  # grid rows per chunk
    for r0 in range(0, rows_total, rows):
        r = min(rows, rows_total - r0)
        cols = _columns(xp, flat, r0 * wq, r * wq, (kh, kw), stride, wq)  # (Cin*kh*kw, r*Wq)
        acc = xp.matmul(w2, cols)  # (Cout, r*Wq)
        _copy_out(xp, acc.reshape(cout, r, wq), y, b, r0, hq)
    return y


def _conv_gathered(xp, x, w, b, s, pads):
    """The same product with X gathered by one fused kernel (``gpu_kernels.im2col``) from the
    unpadded input: no padded copy, no wrapped columns, one launch for any stride. Columns run
    over the output rows of all images stacked, (N*Ho) x Wo. None when the kernel is unusable."""
    n, cin, h, wd = x.shape
    cout, _, kh, kw = w.shape
    top, bottom, left, right = pads
    ho, wo = (h + top + bottom - kh) // s + 1, (wd + left + right - kw) // s + 1
    w2 = w.reshape(cout, cin * kh * kw)
    y = xp.empty((n, cout, ho, wo), dtype=x.dtype)
    rows = max(1, min(n * ho, COLS_BYTES // (cin * kh * kw * wo * x.dtype.itemsize)))
    x = xp.ascontiguousarray(x)  # the kernel reads it by flat index; once, not per chunk
    for r0 in range(0, n * ho, rows):
        r = min(rows, n * ho - r0)
        cols = gpu_kernels.im2col(x, (kh, kw), s, (top, left), (ho, wo), r0, r)  # (K, r*Wo)
        if cols is None:
            return None
        acc = xp.matmul(w2, cols)  # (Cout, r*Wo)
        _copy_out(xp, acc.reshape(cout, r, wo), y, b, r0, ho)  # output rows = grid rows here
    return y


def _columns(xp, flat, start, length, kernel, s, wq):
    """X for grid positions [start, start + length): (Cin*kh*kw, length), rows (c, i, j).
    Tap (i, j) reads phase (i % s, j % s) shifted by (i // s) * Wq + j // s."""
    kh, kw = kernel
    cin, total = flat.shape[2:]
    if s == 1:  # every tap is a shift of the same matrix: one strided view, one copy
        base = flat[0, 0, :, start:]  # (Cin, total - start)
        e = flat.itemsize
        view = xp.lib.stride_tricks.as_strided(
            base, shape=(cin, kh, kw, length), strides=(total * e, wq * e, e, e)
        )  # (Cin, kh, kw, length), overlapping reads
        return xp.ascontiguousarray(view).reshape(cin * kh * kw, length)
    cols = xp.empty((cin, kh, kw, length), dtype=flat.dtype)
    for i in range(kh):
        for j in range(kw):
            off = start + (i // s) * wq + j // s
            cols[:, i, j] = flat[i % s, j % s, :, off : off + length]  # (Cin, length)
    return cols.reshape(cin * kh * kw, length)
