"""A quick self-check of the core ops against closed-form values (no framework needed)."""

from __future__ import annotations

import math

import numpy as np

from . import ops


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
