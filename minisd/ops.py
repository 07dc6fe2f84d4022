"""Core array operations, written once for NumPy and CuPy.

Every function takes arrays in PyTorch layouts (activations NCHW, Linear weights (out, in), conv
weights (out, in, kh, kw)) and returns an array of the input's dtype: there are no silent float64
upcasts. Where a statistic must be accumulated at higher precision (float16 inputs), it is said.

The activations (silu, quick_gelu, gelu, geglu, erf) are written in ``ops_act``, the norms
(group_norm, layer_norm) in ``ops_norm``; both are re-exported here, so ``ops.gelu``,
``ops.group_norm`` etc. are the names model code uses.
"""

from __future__ import annotations

import math

import numpy as np

from . import conv_fast, conv_gemm, gpu_kernels, parallel
from .backend import array_module, is_cupy

# Every name of ops_act, private kernels included, stays reachable as ops.<name>.
from .ops_act import (  # noqa: F401
    _AS7126,
    _AS_P,
    _BLOCK,
    _HALF_AS,
    _LOG2E,
    _erf_as7126,
    _gelu_into,
    _sigmoid,
    _silu_into,
    erf,
    geglu,
    gelu,
    gelu_fast,
    quick_gelu,
    silu,
    silu_fast,
)

# Every name of ops_norm likewise.
from .ops_norm import (  # noqa: F401
    _GN_BLOCK,
    _LN_BLOCK,
    _stat_dtype,
    group_norm,
    group_norm_fast,
    layer_norm,
    layer_norm_fast,
)

# --------------------------------------------------------------------------- linear / conv


def matmul(a, b, bias=None, *, out=None):
    """a @ b (+ bias broadcast to the product), into ``out`` if given: NumPy's split over the
    cores by ``parallel.matmul`` (each core adds the bias to its part), CuPy's as one product.
    Strided (e.g. transposed) operands are passed to BLAS as they are, without a copy."""
    if not is_cupy(a):
        return parallel.matmul(a, b, out=out, bias=bias)
    y = array_module(a).matmul(a, b, out=out)
    if bias is not None:
        y += bias
    return y


def linear(x, w, b=None, *, out=None):
    """y = x W^T + b.  x (..., in), w (out, in), b (out,) -> (..., out), written into ``out``
    (a C-contiguous array of that shape) if given.

    Leading axes are folded into one so BLAS sees a single 2-D GEMM (numpy's batched matmul
    over a 3-D x is up to 2x slower), through ``matmul``."""
    x2 = x.reshape(-1, x.shape[-1])  # (prod(...), in)
    y = None if out is None else out.reshape(len(x2), w.shape[0])
    y = matmul(x2, w.T, b, out=y)  # (prod(...), out)
    return y.reshape(*x.shape[:-1], w.shape[0])  # (..., out)


def _pads(padding):
    """padding: int, (ph, pw) or (top, bottom, left, right)."""
    if isinstance(padding, int):
        return padding, padding, padding, padding
    if len(padding) == 2:
        return padding[0], padding[0], padding[1], padding[1]
    return tuple(padding)


def conv2d(x, w, b=None, *, stride=1, padding=0):
    """2-D cross-correlation as torch.nn.functional.conv2d (groups=1, dilation=1).

    x (N, Cin, H, W), w (Cout, Cin, kh, kw), b (Cout,) or None -> (N, Cout, Ho, Wo); padding is
    an int, (ph, pw) or (top, bottom, left, right). Dispatches to the fast paths of
    ``conv_fast`` on NumPy (GEMM on shifted slices; Winograd F(4x4, 3x3) / F(2x2, 3x3) for
    float32 3x3 stride-1 convolutions with enough channels) and to ``conv_gemm`` (one im2col GEMM)
    on CuPy; ``conv2d_reference`` is the readable version.
    """
    n, cin, h, wd = x.shape
    cout, cin_w, kh, kw = w.shape
    if cin_w != cin:
        raise ValueError(f"conv2d: input has {cin} channels, weight expects {cin_w}")
    pads = _pads(padding)
    if kh == kw == 1 and stride == 1 and not any(pads):
        bias = None if b is None else b.reshape(cout, 1)
        y = matmul(w.reshape(cout, cin), x.reshape(n, cin, h * wd), bias)  # (N, Cout, HW)
        return y.reshape(n, cout, h, wd)  # (N, Cout, H, W)
    if is_cupy(x):  # a few large kernels per convolution (launch costs dominate on a GPU)
        return conv_gemm.conv2d_im2col(x, w, b, stride=stride, pads=pads)
    tile = conv_fast.winograd_tile(x, w, stride, pads)
    if tile:
        return conv_fast.conv2d_winograd(x, w, b, pads=pads, m=tile)
    return conv_fast.conv2d_direct(x, w, b, stride=stride, pads=pads)


def conv2d_reference(x, w, b=None, *, stride=1, padding=0):
    """Readable reference for ``conv2d`` (the fast paths are tested against it).

    x (N, Cin, H, W), w (Cout, Cin, kh, kw) -> (N, Cout, Ho, Wo). Built on GEMM: the input is
    put channels-last once, then each of the kh*kw kernel taps is one (NHoWo, Cin) @ (Cin, Cout)
    product accumulated into the output. A 1x1 stride-1 conv is a single GEMM.
    """
    xp = array_module(x)
    n, cin, h, wd = x.shape
    cout, cin_w, kh, kw = w.shape
    if cin_w != cin:
        raise ValueError(f"conv2d: input has {cin} channels, weight expects {cin_w}")
    top, bottom, left, right = _pads(padding)
    ho = (h + top + bottom - kh) // stride + 1
    wo = (wd + left + right - kw) // stride + 1
    if kh == kw == 1 and stride == 1 and not any((top, bottom, left, right)):
        y = w.reshape(cout, cin) @ x.reshape(n, cin, h * wd)  # (N, Cout, HW)
        y = y.reshape(n, cout, h, wd)  # (N, Cout, H, W)
    else:
        xh = xp.ascontiguousarray(x.transpose(0, 2, 3, 1))  # (N, H, W, Cin)
        if top or bottom or left or right:
            xh = xp.pad(xh, ((0, 0), (top, bottom), (left, right), (0, 0)))  # (N, Hp, Wp, Cin)
        wt = w.transpose(2, 3, 1, 0)  # (kh, kw, Cin, Cout)
        acc = None
        for i in range(kh):
            for j in range(kw):
                tap = xh[
                    :,
                    i : i + stride * (ho - 1) + 1 : stride,
                    j : j + stride * (wo - 1) + 1 : stride,
                ]
                part = tap.reshape(n * ho * wo, cin) @ wt[i, j]  # (N*Ho*Wo, Cout)
                if acc is None:
                    acc = part
                else:
                    acc += part
        y = acc.reshape(n, ho, wo, cout).transpose(0, 3, 1, 2)  # (N, Cout, Ho, Wo)
    if b is not None:
        y = y + b.reshape(1, cout, 1, 1)
    return xp.ascontiguousarray(y)


# --------------------------------------------------------------------------- softmax / attention


def softmax(x, axis=-1):
    """Numerically stable softmax: exp(x - max) / sum."""
    xp = array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


# Score elements per attention tile on the NumPy path: 2 MiB of float32, so the score block,
# its exp and the second product stay in a core's L2 cache.
ATTENTION_TILE = 1 << 19


def attention(q, k, v, *, scale=None, chunk_size=None, upcast=False, mask=None):
    """Scaled dot-product attention, softmax(q k^T * scale + mask) v (Vaswani et al. 2017).

    q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv) -> (B, H, Lq, Dv). ``mask`` is additive,
    broadcastable to (B, H, Lq, Lk). Queries are processed at most ``chunk_size`` rows at a time
    so the score tensor never exceeds (B, H, chunk_size, Lk). ``upcast``: scores and softmax in
    float32 for float16 inputs (diffusers' ``upcast_attention`` / ``upcast_softmax``; float16 is
    always accumulated in float32 here). NumPy runs ``attention_tiled`` (cache-sized tiles);
    CuPy runs ``attention_chunked``, the readable reference, whose large batched products suit
    a GPU.
    """
    if is_cupy(q):
        return attention_chunked(q, k, v, scale=scale, chunk_size=chunk_size, mask=mask)
    return attention_tiled(q, k, v, scale=scale, chunk_size=chunk_size, mask=mask)


def _acc_dtype(q):
    """float16 scores/softmax are accumulated in float32; float32/float64 keep their own."""
    return np.dtype(np.float32 if q.dtype == np.float16 else q.dtype)


def attention_chunked(q, k, v, *, scale=None, chunk_size=None, mask=None):
    """Reference attention (and the GPU's): all heads at once, ``chunk_size`` query rows per
    step; scores in float32 for float16 inputs; the softmax and second product in
    ``_softmax_times``."""
    xp = array_module(q)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lq = q.shape[2]
    step = lq if not chunk_size else int(chunk_size)
    out = xp.empty(q.shape[:3] + (v.shape[-1],), dtype=q.dtype)  # (B, H, Lq, Dv)
    acc = _acc_dtype(q)
    kt = xp.ascontiguousarray(k.swapaxes(-1, -2), dtype=acc)  # (B, H, D, Lk), one copy
    for s in range(0, lq, step):
        qs = xp.multiply(q[:, :, s : s + step], acc.type(scale), dtype=acc)  # cast and scale
        scores = qs @ kt  # (B, H, chunk, Lk)
        if mask is not None:
            scores += mask if mask.shape[-2] == 1 else mask[..., s : s + step, :]
        if step >= lq:  # one chunk: straight into the output
            return _softmax_times(scores, v, out)
        out[:, :, s : s + step] = _softmax_times(scores, v)
    return out


def _softmax_times(scores, v, out=None):
    """softmax(scores) @ v, into ``out`` if given; ``scores`` (..., Lq, Lk) is overwritten. On
    a GPU one fused softmax (``gpu_kernels.softmax``) then the product; otherwise normalized
    after the product: exp(s - max) v / sum exp(s - max)."""
    xp = array_module(scores)
    probs = gpu_kernels.softmax(scores, v.dtype)  # three fused passes, or None
    if probs is not None:
        return xp.matmul(probs, v, out=out)
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)
    total = scores.sum(axis=-1, keepdims=True)  # (..., Lq, 1)
    o = xp.matmul(scores.astype(v.dtype, copy=False), v, out=out)  # (..., Lq, Dv)
    o /= total.astype(o.dtype, copy=False)
    return o


def attention_tiled(q, k, v, *, scale=None, chunk_size=None, mask=None):
    """The same attention in cache-sized tiles (NumPy): g heads x r query rows per step, with
    g * r * Lk <= ATTENTION_TILE (short sequences: several heads per batched product; long
    ones: one head, a block of rows). Per tile: S2 = (q scale log2 e) k^T, the scores in base 2;
    P = 2^S2 = exp(S) (np.exp2 is ~35% faster than np.exp on float32), shifted by the row
    maximum only where a bound says it must be (see the body); then one product with [v | 1],
    whose last column is the softmax denominator sum_j P_ij (no separate reduction pass);
    o = (P v) / sum."""
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = _acc_dtype(q)
    bh = b * h
    # One pass each from the (usually strided: heads split off the channels) inputs into the
    # contiguous per-head operands (work arrays reused across calls).
    qs = parallel.scratch("attn.q", (bh, lq, d), acc)  # (BH, Lq, D), scaled once
    np.multiply(q, acc.type(scale * _LOG2E), out=qs.reshape(b, h, lq, d), dtype=acc)
    kt = parallel.scratch("attn.k", (bh, d, lk), acc)  # (BH, D, Lk)
    np.copyto(kt.reshape(b, h, d, lk), k.swapaxes(-1, -2))
    v1 = parallel.scratch("attn.v", (bh, lk, dv + 1), acc)  # (BH, Lk, Dv + 1): [v | 1]
    v1.reshape(b, h, lk, dv + 1)[..., :dv] = v
    v1[..., dv] = 1
    if mask is not None:
        mq = mask.shape[-2] if mask.ndim >= 2 else 1
        with np.errstate(over="ignore"):  # (a mask of finfo.min becomes -inf)
            mask = np.multiply(mask, _LOG2E, dtype=acc)  # base 2 as the scores
        mask = np.broadcast_to(mask, (b, h, mq, lk)).reshape(bh, mq, lk)  # (BH, mq, Lk)
    rows = max(1, min(lq, ATTENTION_TILE // lk, int(chunk_size or lq)))
    heads = 1  # heads per tile: several for short sequences, but at least one tile per worker
    if rows == lq:
        heads = max(1, min(ATTENTION_TILE // (lk * lq), -(-bh // parallel.WORKERS)))
    out = np.empty((bh, lq, dv), dtype=q.dtype)  # (BH, Lq, Dv)
    row_tiles = -(-lq // rows)
    # Softmax is shift invariant, so P v / sum P needs no shift as long as P = 2^S2 neither
    # overflows nor underflows. By Cauchy-Schwarz |S2_ij| <= |q_i| max_j |k_j| =: reach_i (q
    # scaled), so tiles whose reach is within _unshifted_reach (69.9 in natural units in
    # float32, 100.8 in base 2; the random-weight SD1.5 UNet of the benchmarks reaches 13-18)
    # skip the max and subtract passes (-14% time). Other tiles (and masked ones) subtract the
    # row maximum; scores far below it would make exp2 underflow to subnormals (NumPy's SIMD
    # exp then takes a slow path for the whole vector, and the product after it is slow too:
    # an attention whose rows span ~260 in logits took 12x longer), so they are clamped at
    # 0.8 log2(tiny) (-100.8 in float32), where a term weighs ~4e-31 against the maximum's 1:
    # far below round-off. The clamp runs only where some score can be that low:
    # max_j S2_ij + reach_i > -floor.
    floor = acc.type(0.8 * math.log2(np.finfo(acc).tiny))
    reach = np.sqrt(np.einsum("bld,bld->bl", qs, qs))  # (BH, Lq): |q_i|, scale included
    reach *= np.sqrt(np.einsum("bdl,bdl->bl", kt, kt).max(axis=1))[:, None]  # * max_j |k_j|
    unshifted = _unshifted_reach(acc, lk, v) * _LOG2E if mask is None else -1.0

    def tiles(lo, hi):  # tiles [lo, hi) in (head group, row block) order
        s_buf = parallel.scratch("attn.s", (min(heads, bh), rows, lk), acc)  # score tile
        o_buf = parallel.scratch("attn.o", (min(heads, bh), rows, dv + 1), acc)
        for n in range(lo, hi):
            i, r0 = n // row_tiles * heads, n % row_tiles * rows
            g, r = min(heads, bh - i), min(rows, lq - r0)
            s, o = s_buf[:g, :r], o_buf[:g, :r]  # (g, r, Lk), (g, r, Dv + 1)
            np.matmul(qs[i : i + g, r0 : r0 + r], kt[i : i + g], out=s)
            tile_reach = reach[i : i + g, r0 : r0 + r]  # (g, r)
            if not tile_reach.max() <= unshifted:  # (also when reach is NaN)
                if mask is not None:
                    s += mask[i : i + g, r0 : r0 + r] if mask.shape[1] > 1 else mask[i : i + g]
                m = s.max(axis=-1, keepdims=True)  # (g, r, 1)
                s -= m
                if mask is not None or (m[..., 0] + tile_reach > -floor).any():
                    np.maximum(s, floor, out=s)
            np.exp2(s, out=s)
            np.matmul(s, v1[i : i + g], out=o)
            np.divide(o[..., :dv], o[..., dv:], out=out[i : i + g, r0 : r0 + r])

    parallel.run_ranges(tiles, -(-bh // heads) * row_tiles)
    return out.reshape(b, h, lq, dv)  # (B, H, Lq, Dv)


def _unshifted_reach(acc, lk, v):
    """Largest R such that scores |S| <= R can go into exp unshifted: e^R Lk max(1, |v|) stays
    below the dtype's maximum (the sums of the second product), and e^-R above e^floor, so no
    term becomes subnormal (0.8 log(tiny): 69.9 in float32, 566 in float64)."""
    info = np.finfo(acc)
    vmax = float(max(v.max(), -v.min())) if v.size else 0.0
    high = math.log(float(info.max)) - 1.0 - math.log(lk * max(1.0, vmax))
    return min(high, -0.8 * math.log(float(info.tiny)))


# --------------------------------------------------------------------------- resampling / time


def resize_nearest(x, size):
    """Nearest-neighbour resize of (N, C, H, W) to ``size`` = (h, w), index for index as torch's
    ``interpolate(mode="nearest")`` on the CPU: src = min(floor(dst * float32(in / out)), in - 1)
    in float32 arithmetic (identity when in == out, dst // 2 when out == 2 in)."""
    xp = array_module(x)
    rows = xp.asarray(_nearest_index(x.shape[2], size[0]))
    cols = xp.asarray(_nearest_index(x.shape[3], size[1]))
    return x[:, :, rows][:, :, :, cols]  # (N, C, h, w)


def _nearest_index(n_in, n_out):
    dst = np.arange(n_out)
    if n_out == n_in:
        return dst
    if n_out == 2 * n_in:
        return dst >> 1
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.floor(dst.astype(np.float32) * scale).astype(np.int64)
    return np.minimum(src, n_in - 1)


def upsample_nearest2x(x):
    """Nearest-neighbour 2x upsampling. (N, C, H, W) -> (N, C, 2H, 2W)."""
    xp = array_module(x)
    n, c, h, w = x.shape
    y = xp.broadcast_to(x[:, :, :, None, :, None], (n, c, h, 2, w, 2))  # (N, C, H, 2, W, 2)
    return xp.ascontiguousarray(y).reshape(n, c, 2 * h, 2 * w)  # (N, C, 2H, 2W)


def timestep_embedding(
    timesteps,
    dim,
    *,
    flip_sin_to_cos=False,
    downscale_freq_shift=1.0,
    scale=1.0,
    max_period=10000,
):
    """Sinusoidal timestep embedding (Ho et al. 2020; Vaswani et al. 2017), as diffusers'
    ``get_timestep_embedding``. timesteps (N,) -> (N, dim), always float32.

    Precision island: diffusers computes this in float32 whatever the model dtype, so we do too
    (frequencies, products and sin/cos in float32); callers cast the result to the model dtype.
    exp and sin/cos are evaluated in float64 and rounded (correctly rounded float32). torch's
    float32 exp and sin/cos are not: ~1% of its frequencies and ~5% of its sin/cos values are 1 ulp
    away, so this island agrees with diffusers to 1-2 ulp (plus t * ulp(freq) in the argument),
    never bit for bit. Whole-model float64 tests therefore feed both sides the same embedding.
    """
    xp = array_module(timesteps)
    half = dim // 2
    exponent = (-math.log(max_period)) * xp.arange(half, dtype=np.float32)  # (half,)
    exponent = exponent / np.float32(half - downscale_freq_shift)
    freqs = xp.exp(exponent.astype(np.float64)).astype(np.float32)  # (half,)
    args = timesteps.astype(np.float32)[:, None] * freqs[None, :]  # (N, half)
    args = np.float32(scale) * args
    a64 = args.astype(np.float64)
    sin = xp.sin(a64).astype(np.float32)
    cos = xp.cos(a64).astype(np.float32)
    emb = xp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)  # (N, 2*half)
    if dim % 2:
        emb = xp.pad(emb, ((0, 0), (0, 1)))  # (N, dim)
    return emb
