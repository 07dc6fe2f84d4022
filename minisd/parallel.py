"""Independent chunks of NumPy work on all cores.

NumPy's ufuncs run on one core, and OpenBLAS parallelizes each GEMM call on its own, so a loop
of small GEMMs and elementwise passes (attention tiles, Winograd chunks, GELU blocks) keeps one
core busy while the other waits. ``run_ranges`` instead gives each worker thread a contiguous
range of the chunks (NumPy releases the GIL inside ufunc loops and BLAS calls) and sets OpenBLAS
to one thread meanwhile, so that its own threads do not oversubscribe the cores. Where the BLAS
thread count cannot be set (no OpenBLAS found), or with one core, the chunks run in order.

``matmul`` splits large GEMMs the same way (by rows, or by columns when there are few rows) and
runs small ones with one BLAS thread, so that OpenBLAS's own threads are never woken: after each
threaded call they busy-wait (~0.1 s) for the next one, competing with these workers for the
cores; that cost ~1 s of a 10 s UNet forward on 2 cores (OPENBLAS_THREAD_TIMEOUT=20 showed it).

``scratch`` hands each thread reusable work arrays for the temporaries of such loops: a fresh
multi-megabyte NumPy array is a fresh mapping that the kernel must fault in and zero page by
page (glibc returns large blocks, and the per-thread arenas' free tops, to the system), which
cost ~1 s of system time per UNet forward before the Winograd chunks reused their buffers.

MINISD_THREADS: number of workers (default: the cores this process may run on).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from math import prod

import numpy as np

WORKERS = int(os.environ.get("MINISD_THREADS", "0")) or len(os.sched_getaffinity(0))
_lock = threading.Lock()  # one parallel region at a time; nested or concurrent calls run serially
_local = threading.local()  # .buffers: this thread's scratch arrays, by name
_all_buffers: list = []  # weak references to every thread's .buffers, for release_scratch
_scratch_lock = threading.Lock()


@cache
def _openblas():
    """(get_num_threads, set_num_threads) of the OpenBLAS that NumPy loaded, or None."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return None
    for path in sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", maps))):
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                return get, put
    return None


@cache
def _pool():
    return ThreadPoolExecutor(max(1, WORKERS - 1), thread_name_prefix="minisd")


def run_ranges(fn, n):
    """fn(lo, hi) over a split of range(n) into up to WORKERS contiguous ranges (in parallel,
    OpenBLAS single-threaded), or fn(0, n) in this thread. fn must write disjoint outputs."""
    workers = min(WORKERS, n)
    if workers < 2:
        fn(0, n)
        return
    with _one_blas_thread() as owned:
        if not owned:  # no OpenBLAS to pin, or another region runs: in order, here
            fn(0, n)
            return
        bounds = [n * i // workers for i in range(workers + 1)]
        futures = [_pool().submit(fn, lo, hi) for lo, hi in zip(bounds[1:], bounds[2:])]
        try:
            fn(bounds[0], bounds[1])  # the first range in this thread: one hand-off fewer
        finally:
            for f in futures:
                f.result()


# GEMMs below this many multiply-adds (m*k*n) run as one call with one BLAS thread.
_SPLIT_WORK = 1 << 22
_ALIGN = 16  # split points are multiples of this (whole SIMD vectors per part)


def matmul(a, b, out=None, *, bias=None):
    """np.matmul(a, b, out) (+ ``bias``, broadcast to the product) for NumPy arrays, on all
    cores without waking OpenBLAS's threads (module docstring): large products are split into
    WORKERS parts, by rows of ``a`` when it has at least as many rows as ``b`` has columns, else
    by columns of ``b``; each part is one one-thread BLAS call, then its share of the bias.
    Small products, nested calls and non-OpenBLAS builds run as a single np.matmul."""
    if getattr(_local, "blas_threads", False):  # inside ``blas_threads()``
        return _add(np.matmul(a, b, out=out), bias)
    shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    if out is None:
        out = np.empty(shape, dtype=np.result_type(a, b))
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    rows = m >= n
    parts = min(WORKERS, -(-(m if rows else n) // _ALIGN))
    if prod(shape[:-2]) * m * k * n < _SPLIT_WORK or parts < 2 or _openblas() is None:
        with _one_blas_thread():
            np.matmul(a, b, out=out)
        return _add(out, bias)
    cut = [
        min(m if rows else n, -(-(m if rows else n) * i // parts // _ALIGN) * _ALIGN)
        for i in range(parts + 1)
    ]
    bias = None if bias is None else np.broadcast_to(bias, out.shape)

    def part(lo, hi):
        for i in range(lo, hi):
            s = (Ellipsis, slice(cut[i], cut[i + 1])) + ((slice(None),) if rows else ())
            np.matmul(a[s] if rows else a, b if rows else b[s], out=out[s])
            _add(out[s], None if bias is None else bias[s])

    run_ranges(part, parts)
    return out


def _add(y, bias):
    if bias is not None:
        y += bias
    return y


@contextlib.contextmanager
def blas_threads():
    """Inside, ``matmul`` leaves threading to OpenBLAS (in this thread). Better for a model that
    is a chain of GEMMs with few rows (CLIP's text encoder: 154 x 768 x 768), where OpenBLAS's
    threads share one packed copy of the left operand and, spinning, take the next call at once
    (0.79 vs 0.97 ms for that shape); worse where parallel regions come in between."""
    saved = getattr(_local, "blas_threads", False)
    _local.blas_threads = True
    try:
        yield
    finally:
        _local.blas_threads = saved


@contextlib.contextmanager
def _one_blas_thread():
    """OpenBLAS at one thread inside, owning the parallel region: yields True; False (and the
    setting as is) when there is no OpenBLAS or another region owns it."""
    blas = _openblas()
    if blas is None or not _lock.acquire(blocking=False):
        yield False
        return
    get, put = blas
    try:
        saved = get()
        put(1)
        yield True
    finally:
        put(saved)
        _lock.release()


def scratch(name, shape, dtype):
    """A work array of ``shape`` for this thread, reused by later calls with the same ``name``
    (contents undefined). It grows to the largest size asked for and stays allocated until
    ``release_scratch``. The caller must be done with it before asking for ``name`` again in
    the same thread, and must not return it."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = _Buffers()  # dropped with the thread
        with _scratch_lock:
            _all_buffers.append(weakref.ref(buffers))
    size, dtype = prod(shape), np.dtype(dtype)
    buf = buffers.get(name)
    if buf is None or buf.dtype != dtype or buf.size < size:
        buffers[name] = None  # free the old one first
        buf = buffers[name] = np.empty(size, dtype)
    return buf[:size].reshape(shape)


class _Buffers(dict):
    """One thread's scratch arrays by name (a dict subclass, so it can be weakly referenced)."""


def _live_buffers():
    with _scratch_lock:
        _all_buffers[:] = [r for r in _all_buffers if r() is not None]
        return [r() for r in _all_buffers]


def scratch_bytes():
    """Bytes held by all threads' scratch arrays."""
    return sum(b.nbytes for d in _live_buffers() for b in list(d.values()) if b is not None)


def release_scratch():
    """Free every thread's scratch arrays (call between phases to hand the memory back); later
    calls allocate them again. Not to be called while a parallel region is running."""
    for buffers in _live_buffers():
        buffers.clear()
