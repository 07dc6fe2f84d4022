"""Activations and the other elementwise kernels of ``ops``: silu, quick_gelu, gelu (exact erf),
geglu, erf.

float32/float16 NumPy arrays take blocked in-place kernels (cache-sized blocks, on all cores);
float32/float16 CuPy arrays one fused CUDA kernel each (``gpu_kernels``); float64 (and CuPy when
the kernels are off) evaluate the formulas directly. Every name here is re-exported by ``ops``
(``ops.gelu`` etc.), which is where model code calls them.
"""

from __future__ import annotations

import math

import numpy as np

from . import gpu_kernels, parallel
from .backend import array_module, is_cupy

_LOG2E = 1.0 / math.log(2.0)  # exp(y) = 2^(y log2 e); np.exp2 is ~35% faster on float32


def silu(x):
    """x * sigmoid(x), written so exp never overflows (float32/float16 NumPy: ``silu_fast``)."""
    xp = array_module(x)
    if not is_cupy(x) and x.dtype != np.float64:
        return silu_fast(x)
    y = gpu_kernels.silu(x)  # one fused kernel for float16/32 CuPy arrays, else None
    return x * _sigmoid(xp, x) if y is None else y


def silu_fast(x, alpha=1.0):
    """x / (1 + exp(-alpha x)) in place on cache-sized float32 blocks, on all cores, with
    exp(y) taken as 2^(y log2 e) (np.exp2: ~35% faster than np.exp on float32). Where the power
    overflows to inf the quotient is the correct limit -0. (...) -> (...)."""
    flat = np.ascontiguousarray(x).reshape(-1)  # (n,)
    out = np.empty(flat.shape, dtype=x.dtype)  # (n,)

    def blocks(lo, hi):
        t = parallel.scratch("silu", (min(_BLOCK, flat.size),), np.float32)  # work array
        for s in range(lo * _BLOCK, min(flat.size, hi * _BLOCK), _BLOCK):
            blk = flat[s : s + _BLOCK]
            _silu_into(blk, out[s : s + _BLOCK], t[: blk.size], alpha)

    parallel.run_ranges(blocks, -(-flat.size // _BLOCK))
    return out.reshape(x.shape)


def _silu_into(x, out, e, alpha=1.0):
    """out = x / (1 + 2^(-alpha x log2 e)) for one block (out may be x); e: a float32 work
    array of x's shape. An overflowing power gives x / inf = -0, the limit."""
    np.multiply(x, np.float32(-alpha * _LOG2E), out=e)
    with np.errstate(over="ignore"):
        np.exp2(e, out=e)  # exp(-alpha x)
    e += np.float32(1)
    np.divide(x, e, out=out)


def _sigmoid(xp, x):
    e = xp.exp(-xp.abs(x))  # in (0, 1]
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def quick_gelu(x):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
    xp = array_module(x)
    if not is_cupy(x) and x.dtype != np.float64:
        return silu_fast(x, 1.702)
    y = gpu_kernels.silu(x, 1.702)
    return x * _sigmoid(xp, x * x.dtype.type(1.702)) if y is None else y


def gelu(x):
    """Exact GELU, x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)) (Hendrycks & Gimpel 2016).

    float32/float16 NumPy arrays take ``gelu_fast`` (same math, cache-sized blocks, in place);
    float32/float16 CuPy arrays ``gpu_kernels.gelu`` (CUDA's erff); float64 evaluates the
    formula here with ``erf``."""
    if not is_cupy(x) and x.dtype != np.float64:
        return gelu_fast(x)
    y = gpu_kernels.gelu(x)
    return x * (0.5 * (1 + erf(x * x.dtype.type(1 / math.sqrt(2))))) if y is None else y


# Elements per block of the in-place elementwise kernels: 256 KiB of float32, so a block, its
# work buffers and its output (~1.3 MB for GELU) stay in a core's L2 (2 MB here), while each
# block is long enough that the ~20 NumPy calls per block (Python overhead, serialized by the
# GIL across workers) cost little: GEGLU on 8192 x 1280 takes 38 ms, 50 ms with 32K blocks.
_BLOCK = 1 << 16


def gelu_fast(x):
    """GELU of a float32/float16 NumPy array, in blocks of ``_BLOCK`` elements. (...) -> (...)."""
    flat = np.ascontiguousarray(x).reshape(-1)  # (n,)
    out = np.empty(flat.shape, dtype=x.dtype)  # (n,)

    def blocks(lo, hi):
        buf = parallel.scratch("gelu", (3, min(_BLOCK, flat.size)), np.float32)  # work arrays
        for s in range(lo * _BLOCK, min(flat.size, hi * _BLOCK), _BLOCK):
            blk = flat[s : s + _BLOCK].astype(np.float32, copy=False)
            r, a, t = buf[:, : blk.size]
            _gelu_into(blk, r, a, t)
            out[s : s + _BLOCK] = r

    parallel.run_ranges(blocks, -(-flat.size // _BLOCK))
    return out.reshape(x.shape)


def geglu(a, g):
    """a * gelu(g) for the two halves of GEGLU (Shazeer 2020). a, g (..., D) -> (..., D).

    float32/float16 NumPy arrays are processed a block of rows at a time, in place."""
    if is_cupy(g) or g.dtype == np.float64:
        y = gpu_kernels.geglu(a, g)
        return a * gelu(g) if y is None else y
    d = g.shape[-1]
    a2, g2 = a.reshape(-1, d), g.reshape(-1, d)  # (rows, D), views of the projection
    out = np.empty(a2.shape, dtype=g.dtype)  # (rows, D)
    rows = max(1, _BLOCK // d)

    def blocks(lo, hi):
        buf = parallel.scratch("geglu", (3, min(rows, len(g2)), d), np.float32)  # work arrays
        for s in range(lo * rows, min(len(g2), hi * rows), rows):
            blk = g2[s : s + rows].astype(np.float32, copy=False)
            r, u, t = buf[:, : len(blk)]
            _gelu_into(blk, r, u, t)
            np.multiply(r, a2[s : s + rows], out=out[s : s + rows])

    parallel.run_ranges(blocks, -(-len(g2) // rows))
    return out.reshape(g.shape)  # (..., D)


# Abramowitz & Stegun 7.1.26 halved: erfc(z)/2 ~= t (b1 + t (b2 + ... + t b5)) exp(-z^2),
# t = 1 / (1 + p z), z = |x| / sqrt 2, b_i = a_i / 2; |error of erf| <= 1.5e-7.
_AS_P = 0.3275911
_HALF_AS = tuple(np.float32(c / 2) for c in (1.061405429, -1.453152027, 1.421413741))
_HALF_AS += tuple(np.float32(c / 2) for c in (-0.284496736, 0.254829592))


# exp(-x^2/2) = 2^(-x^2/2 log2 e) is clamped at 2^(0.8 log2(tiny)) ~ 4e-31: below that
# NumPy's SIMD exp2 (and the products after it) take a subnormal slow path for the whole vector
# (2x slower GELU on activations of scale 10). The term it multiplies is then ~1e-31 |x|
# instead of ~0.
_EXP2_FLOOR = np.float32(0.8 * math.log2(np.finfo(np.float32).tiny))


def _gelu_into(x, out, a, t):
    """out = gelu(x) = relu(x) - |x| erfc(|x|/sqrt 2)/2, on float32 blocks of one shape; a and
    t are scratch. For x >= 0, x Phi(x) = x - x erfc(z)/2; for x < 0, x Phi(x) = x erfc(z)/2."""
    np.abs(x, out=a)
    np.multiply(a, np.float32(_AS_P / math.sqrt(2)), out=t)
    t += np.float32(1)
    np.reciprocal(t, out=t)  # t = 1 / (1 + p z)
    np.multiply(t, _HALF_AS[0], out=out)
    for c in _HALF_AS[1:]:  # Horner: out = t (b1 + t (b2 + ...))
        out += c
        out *= t
    np.multiply(a, a, out=t)
    t *= np.float32(-0.5 * _LOG2E)
    np.maximum(t, _EXP2_FLOOR, out=t)  # |x| > 11.8: keep exp2 off its slow subnormal path
    np.exp2(t, out=t)  # exp(-z^2) = exp(-x^2 / 2)
    out *= t
    out *= a  # |x| erfc(z) / 2
    np.maximum(x, np.float32(0), out=a)
    np.subtract(a, out, out=out)


def erf(x):
    """Error function. float64 is accurate to a few ulp; float16/32 to ~1.5e-7 absolute.

    float64: |x| < 1.5 sums the Maclaurin series 2/sqrt(pi) sum_n (-1)^n x^(2n+1) / (n! (2n+1));
    |x| >= 1.5 uses the continued fraction of erfc (Abramowitz & Stegun 7.1.14),
        erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))),
    evaluated bottom-up from depth 120 (converged to round-off for x >= 1.5).
    float16/32: Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7, evaluated in the input dtype.
    """
    xp = array_module(x)
    if x.dtype != np.float64:
        return _erf_as7126(xp, x)
    a = xp.abs(x)
    small = xp.minimum(a, 1.5)
    x2 = small * small
    term = small.copy()
    total = small.copy()
    for n in range(1, 40):  # 1.5^(2n+1)/n! < 1e-17 beyond n = 40
        term *= -x2 / n
        total += term / (2 * n + 1)
    series = (2 / math.sqrt(math.pi)) * total
    big = xp.maximum(a, 1.5)
    frac = xp.zeros_like(big)
    for k in range(120, 0, -1):
        frac = (k / 2) / (big + frac)
    cf = 1 - xp.exp(-big * big) / (math.sqrt(math.pi) * (big + frac))
    return xp.sign(x) * xp.where(a < 1.5, series, cf)


_AS7126 = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)


def _erf_as7126(xp, x):
    """erf(x) = 1 - t (a1 + t (a2 + ... + t a5)) exp(-x^2), t = 1/(1 + p|x|)."""
    one = x.dtype.type(1)
    a = xp.abs(x)
    t = one / (one + x.dtype.type(0.3275911) * a)
    poly = xp.full_like(t, x.dtype.type(_AS7126[0]))
    for c in _AS7126[1:]:
        poly = poly * t + x.dtype.type(c)
    y = one - poly * t * xp.exp(-(a * a))
    return xp.copysign(y, x)
