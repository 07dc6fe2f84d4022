"""A quick self-check of the core ops against closed-form values (no framework needed), and,
with ``--device cuda``, of the GPU path: each op on CuPy (float32, fused kernels included)
against NumPy float64, and whether every kernel built."""

from __future__ import annotations

import math

import numpy as np

from . import backend, gpu_kernels, ops


def _checks():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 5))
    w = rng.standard_normal((4, 3, 3, 3))
    # conv2d against a direct sum over the receptive field
    y = ops.conv2d(x, w, padding=1)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    direct = np.einsum("nchwij,ocij->nohw", _windows(xp, 3), w)
    yield "conv2d", float(np.abs(y - direct).max())
    # group norm: zero mean / unit variance per group
    g = ops.group_norm(
        rng.standard_normal((2, 4, 5, 5)), np.ones(4), np.zeros(4), groups=2, eps=0.0
    )
    yield "group_norm", float(np.abs(g.reshape(2, 2, -1).mean(-1)).max())
    # erf against math.erf
    t = np.linspace(-6, 6, 1001)
    yield "erf", float(np.abs(ops.erf(t) - np.vectorize(math.erf)(t)).max())
    # attention with chunking equals attention without
    q, k, v = (rng.standard_normal((1, 2, 33, 8)) for _ in range(3))
    a = ops.attention(q, k, v, chunk_size=5) - ops.attention(q, k, v)
    yield "attention(chunked)", float(np.abs(a).max())


def _windows(x, k):
    n, c, h, w = x.shape
    s = x.strides
    shape = (n, c, h - k + 1, w - k + 1, k, k)
    return np.lib.stride_tricks.as_strided(x, shape, s + s[2:])


def run(verbose=True) -> bool:
    ok = True
    for name, err in _checks():
        good = err < 1e-12
        ok &= good
        if verbose:
            print(f"  {name:<20} max error {err:.2e}  {'ok' if good else 'FAIL'}")
    return ok


def gpu_line() -> str:
    """One line on the GPU backend: the device and CuPy's version, or why there is none."""
    cupy = backend._cupy
    if cupy is None:
        return "GPU: CuPy is not installed (pip install cupy-cuda12x)"
    version = getattr(cupy, "__version__", "?")
    if not backend.cuda_available():
        return f"GPU: none visible to CuPy {version}"
    return f"GPU: {backend.device_info('cuda')['name']} (CuPy {version})"


def _device_cases(rng):
    x, g = rng.standard_normal((2, 8, 12, 10)), rng.standard_normal((2, 40, 32))
    w, b = rng.standard_normal((2, 8)) + [[1], [0]]
    wc = rng.standard_normal((6, 8, 3, 3)) / 9
    q, k, v = (rng.standard_normal((2, 3, 50, 16)) for _ in range(3))
    return {
        "conv2d (im2col)": (lambda o, x, w: o.conv2d(x, w, padding=1), (x, wc)),
        "conv2d stride 2": (lambda o, x, w: o.conv2d(x, w, stride=2, padding=(0, 1)), (x, wc)),
        "group_norm + silu": (
            lambda o, x, w, b: o.group_norm(x, w, b, groups=4, eps=1e-5, act="silu"),
            (x, w, b),
        ),
        "layer_norm": (lambda o, g, w, b: o.layer_norm(g, w, b, eps=1e-5), (g, g[0, 0], g[1, 0])),
        "gelu / geglu": (lambda o, g: o.geglu(g, o.gelu(g)), (g,)),
        "quick_gelu": (lambda o, g: o.quick_gelu(g), (g,)),
        "attention": (lambda o, q, k, v: o.attention(q, k, v), (q, k, v)),
    }


def run_device(device="cuda", verbose=True, tol=1e-5) -> bool:
    """Each case on ``device`` in float32 against NumPy float64 (relative max-abs error within
    ``tol``), then whether every fused kernel built (a fallback works, but slower)."""
    xp = backend.get_xp(device)
    ok = True
    for name, (fn, args) in _device_cases(np.random.default_rng(1)).items():
        want = fn(ops, *args)
        got = backend.to_numpy(fn(ops, *(xp.asarray(a.astype(np.float32)) for a in args)))
        err = float(np.abs(got - want).max() / np.abs(want).max())
        ok &= err <= tol
        if verbose:
            print(f"  {name:<20} rel. error {err:.2e}  {'ok' if err <= tol else 'FAIL'}")
    failed = sorted(name for mod, name in gpu_kernels._failed if mod is xp)
    if verbose:
        built = "every one built" if not failed else f"FAIL: fell back for {', '.join(failed)}"
        print(f"  {'fused kernels':<20} {built}")
    return ok and not failed
