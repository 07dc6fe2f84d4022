"""minisd.trace() and minisd.backend."""

import numpy as np
import pytest
from refharness import need

import minisd
from minisd import backend, trace
from minisd.errors import InputError


def _model(x):
    with trace.scope("down_blocks"), trace.scope(0):
        trace.record("conv", x + 1)
        x = trace.record("", x * 2)
    return trace.record("conv_out", x)


def test_trace_records_full_names_and_copies():
    x = np.ones(3)
    with minisd.trace() as acts:
        y = _model(x)
    assert set(acts) == {"down_blocks.0.conv", "down_blocks.0", "conv_out"}
    np.testing.assert_array_equal(acts["down_blocks.0.conv"], 2.0)
    y += 100  # recorded values are copies: later in-place changes never leak in
    np.testing.assert_array_equal(acts["conv_out"], 2.0)


def test_trace_filter_and_off_by_default():
    with minisd.trace(names={"conv_out"}) as acts:
        _model(np.ones(2))
    assert list(acts) == ["conv_out"]
    with minisd.trace(names="conv_out") as acts:  # one name as a plain string
        _model(np.ones(2))
    assert list(acts) == ["conv_out"]
    assert not trace.active()
    assert trace.scope("x") is trace.scope("y")  # shared no-op when off


def test_cupy_imports_without_gpu():
    """CuPy (a test dependency; required in CI) imports on a machine without a GPU and says so;
    minisd then refuses device="cuda" with a clear error. On a GPU machine it sees the GPU."""
    import fake_cupy

    cupy = need("cupy")
    assert backend._cupy is cupy and fake_cupy._real_cupy is cupy  # the fake checks names
    try:
        visible = cupy.cuda.is_available()
    except cupy.cuda.runtime.CUDARuntimeError:  # CuPy 13 with a driver stub but no GPU raises
        visible = False
    assert visible == backend.cuda_available()
    if not visible:
        with pytest.raises(InputError, match="CuPy with a visible GPU is required"):
            backend.to_device(np.ones(2), "cuda")


def test_backend_dtypes_and_devices():
    assert backend.resolve_dtype("fp16") == np.float16
    assert backend.resolve_dtype(np.float64) == np.float64
    with pytest.raises(InputError, match="dtype='int8'"):
        backend.resolve_dtype("int8")
    with pytest.raises(InputError, match="device='tpu'"):
        backend.get_xp("tpu")
    if not backend.cuda_available():
        with pytest.raises(InputError, match="GPU"):
            backend.get_xp("cuda")
    a = backend.to_device([1.0, 2.0], "cpu", dtype="float32")
    assert a.dtype == np.float32 and backend.array_module(a) is np
    assert backend.device_of(a) == "cpu"


def test_selfcheck_passes(capsys):
    from minisd import selfcheck

    assert selfcheck.run()
    assert "conv2d" in capsys.readouterr().out
    assert selfcheck.gpu_line().startswith("GPU: ")
