"""The im2col convolution (minisd/conv_gemm.py), the path ``ops.conv2d`` takes on CuPy, against
torch and ``ops.conv2d_reference``, on every backend (NumPy runs the same code), in chunks,
and on the fake device (where it must stay a handful of device operations per convolution)."""

import fake_cupy
import numpy as np
import pytest
from refharness import OP_TOL, assert_rel
from test_conv_fast import DIRECT_CASES, _case, _torch_conv

from minisd import conv_gemm, gpu_kernels, ops
from minisd.backend import to_numpy


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", DIRECT_CASES)
def test_im2col_matches_torch_and_reference(xp, dtype, case):
    n, cin, cout, h, w, k, stride, pads = case
    x, wt, b = _case(xp, n, cin, cout, h, w, k, dtype)
    ref = _torch_conv(x, wt, b, stride, pads)
    ours = conv_gemm.conv2d_im2col(x, wt, b, stride=stride, pads=pads)
    assert type(ours) is xp.ndarray and ours.dtype == np.dtype(dtype) and ours.shape == ref.shape
    assert_rel(ours, ref, OP_TOL[dtype], "conv2d_im2col vs torch")
    readable = ops.conv2d_reference(x, wt, b, stride=stride, padding=pads)
    assert_rel(ours, to_numpy(readable), OP_TOL[dtype], "conv2d_im2col vs conv2d_reference")
    nobias = conv_gemm.conv2d_im2col(x, wt, None, stride=stride, pads=pads)
    assert_rel(nobias, _torch_conv(x, wt, None, stride, pads), OP_TOL[dtype], "no bias")


@pytest.mark.parametrize("gathered", [False, True])
@pytest.mark.parametrize("budget", [1, 700, 3000])
@pytest.mark.parametrize("stride,pads", [(1, (1, 1, 1, 1)), (2, (0, 1, 0, 1))])
def test_im2col_chunks_straddle_images(monkeypatch, budget, stride, pads, gathered):
    """A small column budget: one row per chunk (budget 1 byte), or chunk borders inside images
    and between them; the array code (NumPy, float64) and the fused gather (fake device)."""
    monkeypatch.setattr(conv_gemm, "COLS_BYTES", budget)
    x, wt, b = _case(np, 3, 4, 5, 9, 7, 3, "float32" if gathered else "float64", seed=3)
    ref = _torch_conv(x, wt, b, stride, pads)
    with fake_cupy.installed() as fcp:
        if gathered:
            x, wt, b = (fcp.asarray(a) for a in (x, wt, b))
        ours = conv_gemm.conv2d_im2col(x, wt, b, stride=stride, pads=pads)
        assert gathered == (fake_cupy.OPS["minisd_im2col"] > 0)
    assert_rel(ours, ref, OP_TOL[str(x.dtype)], "chunked im2col")


@pytest.mark.parametrize(
    "kernels,stride,pads,most",
    [(True, 1, (1, 1, 1, 1), 3), (True, 2, (0, 1, 0, 1), 3)]
    + [(False, 1, (1, 1, 1, 1), 5), (False, 2, (0, 1, 0, 1), 15)],
)
def test_conv2d_on_device_is_few_operations(monkeypatch, kernels, stride, pads, most):
    """On the (fake) device ops.conv2d takes im2col. With the fused kernels: gather X from the
    unpadded input (one kernel, any stride), one GEMM, one copy out (+ bias) for all images.
    The array code: zero-pad (zeros + copy; stride 2: twice), gather (one strided copy for
    stride 1, one per tap for stride 2), the GEMM and the copy out. Allocations (``empty``)
    launch nothing. The tap-by-tap path took ~37 device operations for a 64x64 UNet
    convolution."""
    monkeypatch.setattr(gpu_kernels, "ENABLED", kernels)
    x, wt, b = _case(np, 2, 8, 6, 12, 10, 3, "float32", seed=4)
    ref = ops.conv2d(x, wt, b, stride=stride, padding=pads)
    with fake_cupy.installed() as fcp:
        dx, dw, db = (fcp.asarray(a) for a in (x, wt, b))
        fake_cupy.OPS.clear()
        y = ops.conv2d(dx, dw, db, stride=stride, padding=pads)
        ops_count = sum(fake_cupy.OPS.values()) - fake_cupy.OPS["empty"]
    assert type(y) is fake_cupy.DeviceArray and fake_cupy.OPS["matmul"] == 1
    assert ops_count <= most, dict(fake_cupy.OPS)
    assert_rel(y, ref, OP_TOL["float32"], "device conv2d vs numpy")


def test_fake_as_strided_keeps_the_boundary():
    with fake_cupy.installed() as fcp:
        d = fcp.asarray(np.arange(6.0))
        v = fcp.lib.stride_tricks.as_strided(d, shape=(2, 3), strides=(8, 8))
        assert type(v) is fake_cupy.DeviceArray and v.tolist() == [[0, 1, 2], [1, 2, 3]]
        c = fcp.ascontiguousarray(v.T, dtype=np.float32)  # a device copy, as in CuPy
        assert c.flags.c_contiguous and c.dtype == np.float32 and type(c) is fake_cupy.DeviceArray
        with pytest.raises(fake_cupy.HostDeviceMix):
            fcp.lib.stride_tricks.as_strided(np.arange(6.0), shape=(2, 3), strides=(8, 8))
