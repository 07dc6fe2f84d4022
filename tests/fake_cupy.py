"""A CPU stand-in for CuPy that is as strict as CuPy about the host/device boundary.

    with fake_cupy.installed() as fcp:     # minisd.backend now treats fcp as "cupy"
        unet = UNet2DConditionModel.from_pretrained(folder, device="cuda")
        out = unet(fcp.asarray(x), 7, fcp.asarray(ctx))  # a DeviceArray, like a cupy.ndarray

``DeviceArray`` is a numpy subclass living "on the device". What CuPy rejects, it rejects:
- mixing host ndarrays (any shape, 0-d too) with device arrays in ufuncs / operators, or passing
  host arrays to ``xp.<function>`` other than the upload functions (asarray, array, ...);
- host index arrays in ``dev[idx]`` (CuPy would upload them; we ask for ``xp.asarray(idx)``);
- ``xp.<name>`` for names real CuPy does not have.
Stricter than CuPy: ``np.<function>(device_array)`` raises (DESIGN.md: model code uses xp), so
host-only numpy code never silently receives device arrays. Implicit syncs (``float(x)``,
``int(x)``, ``bool(x)``, ``x.item()``, ``x.get()``) are allowed, as in CuPy, and counted in
``SYNCS`` so tests can assert that hot loops do none. Not detectable: ``np.asarray(dev)`` (numpy
views a subclass without asking it); the code is grepped for that instead.

Device operations (ufuncs, ``xp.<function>`` calls, copies, casts, reductions as CuPy runs them,
kernels) are counted by name in ``OPS``: on a GPU each is a kernel launch. ``ElementwiseKernel``
and ``ReductionKernel`` run their C bodies compiled for the CPU (``fake_kernels``), and
``lib.stride_tricks.as_strided`` gives device views.
"""

from __future__ import annotations

import collections
import contextlib
import types

import numpy as np

try:
    import cupy as _real_cupy  # importable without a GPU; only used for its list of names
except Exception:  # pragma: no cover
    _real_cupy = None

SYNCS = {"count": 0}
# Device operations (a proxy for kernel launches): ufunc calls, xp.<function> calls, array
# assignments, dtype casts, by name. Each is one or more CUDA kernels in CuPy, and each costs
# a Python-side launch (~10 us), which bounds small-batch GPU speed.
OPS: collections.Counter = collections.Counter()
_UPLOAD = {"asarray", "array", "ascontiguousarray", "asanyarray"}


class HostDeviceMix(TypeError):
    """A host ndarray met a device array where CuPy raises."""


def _is_host(a):
    return isinstance(a, np.ndarray) and not isinstance(a, DeviceArray)


def _host(a):
    """Device arrays -> plain ndarray views (same memory); containers recursively."""
    if isinstance(a, DeviceArray):
        return a.view(np.ndarray)
    if isinstance(a, (list, tuple)):
        return type(a)(_host(v) for v in a)
    return a


def _dev(a):
    """Plain ndarrays / numpy scalars from a computation -> DeviceArray; containers recursively."""
    if isinstance(a, DeviceArray):
        return a
    if isinstance(a, np.ndarray):
        return a.view(DeviceArray)
    if isinstance(a, np.generic):  # CuPy returns 0-d arrays, never numpy scalars
        return np.asarray(a).view(DeviceArray)
    if isinstance(a, (list, tuple)):
        return type(a)(_dev(v) for v in a)
    return a


def _reject_host(what, args):
    for a in args:
        if isinstance(a, (list, tuple)):
            _reject_host(what, a)
        elif _is_host(a):
            raise HostDeviceMix(f"{what}: host numpy array {a.shape} {a.dtype} mixed with device")


class DeviceArray(np.ndarray):
    """An ndarray that pretends to live on a GPU (see the module docstring)."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kw):
        _reject_host(f"{ufunc.__name__}.{method}", inputs + (out or ()))
        if not _QUIET["depth"]:
            OPS[ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}"] += 1
        if out is not None:
            kw["out"] = tuple(_host(o) for o in out)
        if ufunc is np.matmul and method == "__call__":
            res = _matmul(*_host(inputs), **kw)
        else:
            res = getattr(ufunc, method)(*_host(inputs), **kw)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _dev(res)

    def __array_function__(self, func, types_, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} called on a device array: use xp.{func.__name__}")

    def __getitem__(self, idx):
        parts = idx if isinstance(idx, tuple) else (idx,)
        _reject_host("indexing", [p for p in parts if _is_host(p) and p.ndim > 0])
        return _dev(np.ndarray.__getitem__(self, _host(idx)))

    def __setitem__(self, idx, value):
        _reject_host("assignment", [value])
        OPS["setitem"] += 1
        np.ndarray.__setitem__(self, _host(idx), _host(value))

    # Reductions CuPy runs as one kernel (mean: sum and divide fused) or two (var: the mean,
    # then the fused sum of squared deviations); NumPy composes them from several ufuncs.
    def mean(self, *a, **kw):
        return _counted("mean", 1, np.ndarray.mean, self, *a, **kw)

    def var(self, *a, **kw):
        return _counted("var", 2, np.ndarray.var, self, *a, **kw)

    def astype(self, dtype, *a, copy=True, **kw):
        if copy or np.dtype(dtype) != self.dtype:
            OPS["astype"] += 1
        return np.ndarray.astype(self, dtype, *a, copy=copy, **kw)

    def copy(self, *a, **kw):
        OPS["copy"] += 1
        return np.ndarray.copy(self, *a, **kw)

    def get(self):
        SYNCS["count"] += 1
        return np.array(self.view(np.ndarray))

    def item(self, *a):
        SYNCS["count"] += 1
        return self.view(np.ndarray).item(*a)

    def tolist(self):
        SYNCS["count"] += 1
        return self.view(np.ndarray).tolist()

    def __float__(self):
        SYNCS["count"] += 1
        return float(self.view(np.ndarray))

    def __int__(self):
        SYNCS["count"] += 1
        return int(self.view(np.ndarray))

    def __bool__(self):
        SYNCS["count"] += 1
        return bool(self.view(np.ndarray))

    __index__ = __int__


_QUIET = {"depth": 0}


def _matmul(a, b, out=None, **kw):
    """np.matmul as cuBLAS computes float16 products: exact products summed in float32, one
    rounding to float16 at the end (CuPy's default compute type). NumPy's own float16 matmul
    does the same arithmetic without BLAS, ~170x slower; only the summation order differs."""
    half = np.dtype(np.float16)
    if not (a.dtype == half and b.dtype == half and kw.get("dtype") in (None, half)):
        return np.matmul(a, b, out=out, **kw)
    kw.pop("dtype", None)
    res = np.matmul(a.astype(np.float32), b.astype(np.float32), **kw).astype(half)
    if out is None:
        return res
    target = out[0] if isinstance(out, tuple) else out
    target[...] = res
    return out


def _counted(name, kernels, fn, *a, **kw):
    """fn(*a, **kw) counted as ``kernels`` device operations, whatever ufuncs NumPy uses."""
    OPS[name] += kernels
    _QUIET["depth"] += 1
    try:
        return fn(*a, **kw)
    finally:
        _QUIET["depth"] -= 1


def _wrap(name, fn):
    def call(*args, **kw):
        if name in _UPLOAD:
            a = args[0]
            if isinstance(a, DeviceArray) and (name == "array" or not a.flags.c_contiguous):
                OPS[name] += 1  # a device copy
            return _dev(fn(np.array(_host(a)), *args[1:], **kw))  # upload = a copy
        _reject_host(f"xp.{name}", list(args) + list(kw.values()))
        OPS[name] += 1
        return _dev(fn(*_host(args), **{k: _host(v) for k, v in kw.items()}))

    call.__name__ = name
    return call


def _launcher(kernel):
    """A fake_kernels kernel on device arrays: one device operation per call."""

    def launch(*args, **kw):
        _reject_host(f"kernel {kernel.name}", list(args))
        OPS[kernel.name] += 1
        return _dev(kernel(*args, **kw))

    return launch


class _Namespace(types.SimpleNamespace):
    pass


def _fake_cuda(free=8 << 30, total=16 << 30):
    pool = _Pool()
    pinned = _Pool()
    props = {"name": b"fake", "totalGlobalMem": total, "major": 0, "minor": 0}
    runtime = _Namespace(
        getDeviceCount=lambda: 1,
        memGetInfo=lambda: (free, total),
        getDeviceProperties=lambda i: props,
    )
    dev = _Namespace(mem_info=(free, total))
    return (
        _Namespace(runtime=runtime, Device=lambda *a: dev, is_available=lambda: True),
        pool,
        pinned,
    )


class _Pool:
    """Stand-in for cupy's MemoryPool / PinnedMemoryPool (counts free_all_blocks calls)."""

    def __init__(self):
        self.freed = 0

    def free_all_blocks(self):
        self.freed += 1

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0


class FakeCupy(types.ModuleType):
    """The fake ``cupy`` module: numpy functions behind CuPy's boundary rules."""

    ndarray = DeviceArray

    def __init__(self, free=8 << 30, total=16 << 30):
        super().__init__("fake_cupy")
        self.cuda, self._pool, self._pinned = _fake_cuda(free, total)

    def ElementwiseKernel(self, *spec, **kw):  # noqa: N802 - CuPy's name
        """The kernel body compiled for the CPU (fake_kernels), on device arrays."""
        import fake_kernels

        return _launcher(fake_kernels.ElementwiseKernel(*spec, **kw))

    def ReductionKernel(self, *spec, **kw):  # noqa: N802 - CuPy's name
        import fake_kernels

        return _launcher(fake_kernels.ReductionKernel(*spec, **kw))

    @property
    def lib(self):
        """cupy.lib.stride_tricks.as_strided: a view of a device array, as in CuPy."""

        def as_strided(x, shape=None, strides=None):
            if not isinstance(x, DeviceArray):
                raise HostDeviceMix("cupy.lib.stride_tricks.as_strided: host array")
            return _dev(np.lib.stride_tricks.as_strided(_host(x), shape, strides))

        return _Namespace(stride_tricks=_Namespace(as_strided=as_strided))

    @property
    def fft(self):
        """cupy.fft's 2-D transforms and shifts (minisd/freeu.py) on device arrays."""
        names = ("fft2", "ifft2", "fftshift", "ifftshift")
        return _Namespace(**{n: _wrap(f"fft.{n}", getattr(np.fft, n)) for n in names})

    def get_default_memory_pool(self):
        return self._pool

    def get_default_pinned_memory_pool(self):
        return self._pinned

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if _real_cupy is not None and not hasattr(_real_cupy, name):
            raise AttributeError(f"cupy has no attribute {name!r}")
        obj = _matmul if name == "matmul" else getattr(np, name)
        if callable(obj) and not isinstance(obj, type) and not isinstance(obj, np.ufunc):
            return _wrap(name, obj)
        if isinstance(obj, np.ufunc):
            return _wrap(name, obj)
        return obj


@contextlib.contextmanager
def installed(**kw):
    """Make minisd.backend treat FakeCupy as CuPy (and a GPU as present) inside the block."""
    from minisd import backend

    fake = FakeCupy(**kw)
    saved = backend._cupy
    backend._cupy = fake
    SYNCS["count"] = 0
    OPS.clear()
    try:
        yield fake
    finally:
        backend._cupy = saved
