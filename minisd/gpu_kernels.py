"""Fused CUDA kernels for the CuPy path (``cupy.ElementwiseKernel`` / ``ReductionKernel``).

On a GPU every CuPy call is a kernel launch (~10 us of Python and driver time) and a pass over
memory. The array formulas in ``ops`` / ``ops_act`` / ``ops_norm`` spend 9-20 calls on a SiLU,
a GELU or a GroupNorm's normalize-and-scale, and six passes on a softmax; the kernels here do
that work in one pass (the softmax in three), reading float16 or float32 and computing in
float32 (as torch's CUDA kernels do: "opmath"):

    silu         y = x / (1 + exp(-alpha x))              (alpha = 1.702: CLIP's quick_gelu)
    gelu         y = x/2 (1 + erf(x / sqrt 2))
    geglu        y = a * gelu(g)
    moments      mean, var = sum (x - mean)^2 / n          (float32, two-pass): Group/LayerNorm
    norm_affine  y = (x - mean) / sqrt(var + eps) * w + b  (then silu if act): Group/LayerNorm
    im2col       a convolution's columns X, zero padding included, from the unpadded input
    softmax      p = exp(s - max) / sum exp(s - max)      (float32 attention scores)

The array formulas stay the readable reference and the fallback: they run on NumPy, for float64
on CuPy, with MINISD_GPU_KERNELS=0, and when a kernel fails to build (a warning says so once).
The bodies are plain C, compiled and checked against NumPy on the CPU by tests/test_gpu_kernels.py
(and, through ``tests/fake_cupy.py``, inside whole models); the CUDA source CuPy generates for
each is compiled there by nvcc.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from .backend import array_module, is_cupy

ENABLED = os.environ.get("MINISD_GPU_KERNELS", "1") != "0"

_SILU = "v = v / (1.0f + expf(-alpha * v));"
_GELU = "0.5f * u * (1.0f + erff(u * 0.70710678118654752f))"

# name -> (input parameters, output parameters, body), in cupy.ElementwiseKernel's terms: T is
# the array dtype (float16 or float32), the body sees one element of each broadcast operand.
SOURCES = {
    "silu": ("T x, float32 alpha", "T y", f"float v = (float)x; {_SILU} y = (T)v;"),
    "gelu": ("T x", "T y", f"float u = (float)x; y = (T)({_GELU});"),
    "geglu": ("T a, T g", "T y", f"float u = (float)g; y = (T)((float)a * {_GELU});"),
    "norm_affine": (
        "T x, float32 mean, float32 var, float32 eps, T w, T b, int32 act, float32 alpha",
        "T y",
        "float v = ((float)x - mean) / sqrtf(var + eps) * (float)w + (float)b;"
        f" if (act) {{ {_SILU} }} y = (T)v;",
    ),
    "im2col": (  # col[(c, i, j), (r, v)] = x_pad[img, c, oh s + i, v s + j], r = img Ho + oh
        "raw T x, int32 cin, int32 hin, int32 win, int32 kh, int32 kw, int32 st, int32 pt,"
        " int32 pl, int32 ho, int32 wo, int32 row0, int32 nrows",
        "T col",
        "long long q = i; const int v = q % wo; q /= wo;"
        " const int r = row0 + (int)(q % nrows); q /= nrows;"
        " const int tj = q % kw; q /= kw; const int ti = q % kh; const int ch = (int)(q / kh);"
        " const int yy = (r % ho) * st - pt + ti, xx = v * st - pl + tj;"
        " col = (yy >= 0 && yy < hin && xx >= 0 && xx < win)"
        " ? x[(((long long)(r / ho) * cin + ch) * hin + yy) * win + xx] : (T)0.0f;",
    ),
    "softmax_apply": (  # T: the output's dtype (the probabilities, for the second product)
        "float32 s, float32 m, float32 total",
        "T p",
        "p = (T)(expf(s - m) / total);",
    ),
}

# name -> cupy.ReductionKernel(in, out, map, reduce, post-map, identity): reduced over the axis
# given at the call, the other operands broadcast against the first.
REDUCTIONS = {
    "expsum": ("float32 s, float32 m", "float32 total", "expf(s - m)", "a + b", "total = a", "0"),
    "sqdev": (
        "T x, float32 m, float32 inv_n",
        "float32 v",
        "((float)x - m) * ((float)x - m)",
        "a + b",
        "v = a * inv_n",
        "0",
    ),
}

_kernels: dict = {}
_failed: set = set()


def usable(x) -> bool:
    """True when ``x`` should take the fused kernels: a float16/float32 CuPy array."""
    return ENABLED and is_cupy(x) and x.dtype in (np.float16, np.float32)


def run(name, *args, **kw):
    """Kernel ``name`` on CuPy arrays (broadcast like a ufunc; ``kw``: a reduction's axis and
    keepdims). None, so that the caller uses its array formula, unless ``usable(args[0])`` and
    the kernel builds."""
    if not usable(args[0]):
        return None
    xp = array_module(args[0])
    key = (xp, name)
    if key in _failed:
        return None
    try:
        kernel = _kernels.get(key)
        if kernel is None:
            kernel = _kernels[key] = _build(xp, name)
        return kernel(*args, **kw)
    except Exception as err:  # a build or launch failure: never worse than the array code
        if "OutOfMemory" in type(err).__name__:  # the array code would need more, not less
            raise
        _failed.add(key)
        message = f"minisd: GPU kernel {name!r} failed ({err}); using the array code"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return None


def _build(xp, name):
    if name in REDUCTIONS:
        return xp.ReductionKernel(*REDUCTIONS[name], f"minisd_{name}")
    return xp.ElementwiseKernel(*SOURCES[name], f"minisd_{name}")


def silu(x, alpha=1.0):
    return run("silu", x, np.float32(alpha))


def gelu(x):
    return run("gelu", x)


def geglu(a, g):
    return run("geglu", a, g)


def moments(x):
    """float32 mean and biased variance over the last axis of a float16/32 CuPy array, two-pass
    (the mean by CuPy's reduction, then sum (x - mean)^2 / n by one kernel): (..., 1) each.
    None when unavailable."""
    if not usable(x):
        return None
    mean = x.mean(axis=-1, dtype=np.float32, keepdims=True)  # (..., 1)
    var = run("sqdev", x, mean, np.float32(1 / x.shape[-1]), axis=-1, keepdims=True)
    return None if var is None else (mean, var)


def norm_affine(x, mean, var, eps, w, b, act=None):
    """(x - mean) / sqrt(var + eps) * w + b, then SiLU when act == "silu"; mean, var float32
    arrays broadcast against x."""
    act = np.int32(act == "silu")
    return run("norm_affine", x, mean, var, np.float32(eps), w, b, act, np.float32(1))


def softmax(s, dtype):
    """Softmax over the last axis of float32 scores s (..., L), as a new array of ``dtype``: the
    row max (CuPy's reduction), sum exp(s - max) (one reduction kernel), then exp(s - max) / sum
    (one elementwise kernel): three passes over the scores instead of six. None when
    unavailable."""
    if not usable(s):
        return None
    m = s.max(axis=-1, keepdims=True)  # (..., 1)
    total = run("expsum", s, m, axis=-1, keepdims=True)  # (..., 1)
    if total is None:
        return None
    return run("softmax_apply", s, m, total, array_module(s).empty(s.shape, dtype=dtype))


def im2col(x, kernel, stride, pads, out_size, row0, rows):
    """X (Cin*kh*kw, rows*Wo) of ``conv_gemm``'s product for output rows [row0, row0 + rows)
    of all images stacked (row r = image r // Ho, row r % Ho), gathered in one kernel from the
    unpadded, C-contiguous x (N, Cin, H, W); pads (top, left). None when unavailable."""
    if not usable(x):
        return None
    xp = array_module(x)
    _, c, h, w = x.shape  # (N, Cin, H, W)
    (kh, kw), (ho, wo) = kernel, out_size
    col = xp.empty((c * kh * kw, rows * wo), dtype=x.dtype)
    ints = (c, h, w, kh, kw, stride, pads[0], pads[1], ho, wo, row0, rows)
    return run("im2col", x, *map(np.int32, ints), col)
