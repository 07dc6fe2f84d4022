"""Normalization layers of ``ops``: GroupNorm (Wu & He 2018) and LayerNorm (Ba et al. 2016).

Three paths per layer, one formula (two-pass statistics: mean, then the mean squared deviation,
so there is no cancellation; biased variance, as torch):
- the reference (float64; float16 on NumPy; CuPy with the kernels off): the formula as
  written, statistics of float16 accumulated in float32;
- float32 NumPy: ``*_fast``, blocks of whole groups / rows on all cores, in cache;
- float16/float32 CuPy: float32 two-pass statistics in two reductions (``gpu_kernels.moments``),
  then one fused kernel for the normalize-scale-shift (+ SiLU) pass (``gpu_kernels.norm_affine``).
Re-exported by ``ops`` (``ops.group_norm`` is the name model code uses).
"""

from __future__ import annotations

import numpy as np

from . import gpu_kernels, parallel
from .backend import is_cupy
from .ops_act import _silu_into, silu


def _stat_dtype(x):
    """Statistics of float16 activations are accumulated in float32."""
    return np.float32 if x.dtype == np.float16 else x.dtype


def group_norm(x, w, b, *, groups, eps, act=None):
    """GroupNorm (Wu & He 2018). x (N, C, *spatial); statistics over each group of C/groups
    channels and all spatial positions; biased variance, as torch. ``act="silu"``: return
    silu(GroupNorm(x)), the pair every ResNet block runs (one pass fewer on the fast path).
    float32 NumPy arrays take ``group_norm_fast``, float16/32 CuPy arrays the fused kernels; the
    rest is the reference."""
    if act not in (None, "silu"):
        raise ValueError(f"group_norm: act={act!r}: expected None or 'silu'")
    if x.dtype == np.float32 and not is_cupy(x):
        return group_norm_fast(x, w, b, groups=groups, eps=eps, act=act)
    if gpu_kernels.usable(x):  # float16/32 CuPy: float32 statistics, one fused pass (+ SiLU)
        y = _group_norm_kernels(x, w, b, groups, eps, act)
        if y is not None:
            return y
    n, c = x.shape[:2]
    if act == "silu":
        return silu(group_norm(x, w, b, groups=groups, eps=eps))
    xg = x.reshape(n, groups, -1).astype(_stat_dtype(x), copy=False)  # (N, G, C/G * HW)
    mean = xg.mean(axis=-1, keepdims=True)  # (N, G, 1)
    xc = xg - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (N, G, 1)
    y = (xc / (var + eps) ** 0.5).astype(x.dtype, copy=False).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return y * w.reshape(shape) + b.reshape(shape)


def _group_norm_kernels(x, w, b, groups, eps, act):
    """GroupNorm by ``gpu_kernels``: moments of each group, then norm_affine per channel; None
    when a kernel is unavailable."""
    n, c = x.shape[:2]
    stats = gpu_kernels.moments(x.reshape(n, groups, -1))  # (N, G, 1) each
    if stats is None:
        return None
    x4 = x.reshape(n, groups, c // groups, -1)  # (N, G, C/G, HW)
    wb = (a.reshape(1, groups, c // groups, 1) for a in (w, b))  # (1, G, C/G, 1)
    y = gpu_kernels.norm_affine(x4, *(s[..., None] for s in stats), eps, *wb, act)
    return None if y is None else y.reshape(x.shape)


# Elements per GroupNorm block (1 MiB of float32: several groups, or one): few NumPy calls per
# block, each over many channels, since per-call and per-row overheads (and the GIL between
# the two workers' calls) dominate smaller blocks.
_GN_BLOCK = 1 << 18


def group_norm_fast(x, w, b, *, groups, eps, act=None):
    """GroupNorm of a float32 NumPy array, a block of whole groups at a time on all cores: per
    group, mean (pairwise sum), d = x - mean, var = d . d / L (two-pass, so no cancellation);
    then y = d * (w_c / sqrt(var + eps)) + b_c per channel, d kept in the output; act="silu":
    y / (1 + 2^(-y log2 e)) on the block while it is in cache. x (N, C, *spatial) -> same
    shape."""
    n, c = x.shape[:2]
    cg = c // groups
    xg = np.ascontiguousarray(x).reshape(n * groups, -1)  # (N*G, L), L = C/G * HW
    y = np.empty(xg.shape, dtype=x.dtype)  # (N*G, L)
    length = xg.shape[1]
    wg = w.astype(np.float32).reshape(groups, cg, 1)  # (G, C/G, 1)
    bg = b.astype(np.float32).reshape(groups, cg, 1)  # (G, C/G, 1)
    per = max(1, _GN_BLOCK // length)  # groups per block

    def blocks(lo, hi):
        for s in range(lo * per, min(len(xg), hi * per), per):
            xb, d = xg[s : s + per], y[s : s + per]  # (k, L); d: the output as work space
            mean = np.add.reduce(xb, axis=1, keepdims=True) / np.float32(length)  # (k, 1)
            np.subtract(xb, mean, out=d)
            var = np.einsum("ij,ij->i", d, d) / np.float32(length)  # (k,)
            rstd = np.float32(1) / np.sqrt(var + np.float32(eps))  # (k,)
            g = np.arange(s, s + len(d)) % groups  # group of each row
            d3 = d.reshape(len(d), cg, -1)  # (k, C/G, HW)
            d3 *= wg[g] * rstd[:, None, None]
            d3 += bg[g]
            if act == "silu":  # in place, while the block is in cache
                _silu_into(d, d, parallel.scratch("gn.silu", d.shape, np.float32))

    parallel.run_ranges(blocks, -(-len(xg) // per))
    return y.reshape(x.shape)


def layer_norm(x, w, b, *, eps):
    """LayerNorm over the last axis (Ba et al. 2016). x (..., D). float32 NumPy arrays take
    ``layer_norm_fast``, float16/32 CuPy arrays the fused kernels; the rest is the reference."""
    if x.dtype == np.float32 and not is_cupy(x):
        return layer_norm_fast(x, w, b, eps=eps)
    stats = gpu_kernels.moments(x)  # float16/32 CuPy: (..., 1) each, else None
    if stats is not None:
        y = gpu_kernels.norm_affine(x, *stats, eps, w, b)
        if y is not None:
            return y
    xs = x.astype(_stat_dtype(x), copy=False)
    mean = xs.mean(axis=-1, keepdims=True)
    xc = xs - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)
    y = (xc / (var + eps) ** 0.5).astype(x.dtype, copy=False)
    return y * w + b


# Elements per LayerNorm block (1 MiB of float32: the seven NumPy calls per block, each with
# a per-row overhead, and the GIL hand-offs between workers are few next to the work; 3.1 ->
# 2.2 ms for 8192 x 320 against 64K-element blocks).
_LN_BLOCK = 1 << 18


def layer_norm_fast(x, w, b, *, eps):
    """LayerNorm of a float32 NumPy array, a block of rows at a time on all cores: the same
    two-pass formula as ``layer_norm`` (mean, d = x - mean, var = mean(d^2)), then
    y = d * rstd * w + b, every pass in cache. x (..., D) -> same shape."""
    dim = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, dim)  # (M, D)
    y = np.empty(x2.shape, dtype=np.float32)  # (M, D)
    w32, b32 = w.astype(np.float32, copy=False), b.astype(np.float32, copy=False)
    rows = max(1, _LN_BLOCK // dim)

    def blocks(lo, hi):
        for s in range(lo * rows, min(len(x2), hi * rows), rows):
            blk, d = x2[s : s + rows], y[s : s + rows]  # (r, D); d: the output as work space
            mean = np.add.reduce(blk, axis=1, keepdims=True) / np.float32(dim)  # (r, 1)
            np.subtract(blk, mean, out=d)
            var = np.einsum("ij,ij->i", d, d)[:, None] / np.float32(dim)  # (r, 1)
            d *= np.float32(1) / np.sqrt(var + np.float32(eps))
            d *= w32
            d += b32

    parallel.run_ranges(blocks, -(-len(x2) // rows))
    return y.reshape(x.shape)
