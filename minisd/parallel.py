"""Independent chunks of NumPy work on all cores.

NumPy's ufuncs run on one core, and OpenBLAS parallelizes each GEMM call on its own, so a loop
of small GEMMs and elementwise passes (attention tiles, Winograd chunks, GELU blocks) keeps one
core busy while the other waits. ``run_ranges`` instead gives each worker thread a contiguous
range of the chunks (NumPy releases the GIL inside ufunc loops and BLAS calls) and sets OpenBLAS
to one thread meanwhile, so that its own threads do not oversubscribe the cores. Where the BLAS
thread count cannot be set (no OpenBLAS found), or with one core, the chunks run in order.

MINISD_THREADS: number of workers (default: the cores this process may run on).
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache

WORKERS = int(os.environ.get("MINISD_THREADS", "0")) or len(os.sched_getaffinity(0))
_lock = threading.Lock()  # one parallel region at a time; nested or concurrent calls run serially


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
    return ThreadPoolExecutor(WORKERS, thread_name_prefix="minisd")


def run_ranges(fn, n):
    """fn(lo, hi) over a split of range(n) into up to WORKERS contiguous ranges (in parallel,
    OpenBLAS single-threaded), or fn(0, n) in this thread. fn must write disjoint outputs."""
    workers = min(WORKERS, n)
    blas = _openblas() if workers > 1 else None
    if blas is None or not _lock.acquire(blocking=False):
        fn(0, n)
        return
    get, put = blas
    try:
        saved = get()
        put(1)
        bounds = [n * i // workers for i in range(workers + 1)]
        futures = [_pool().submit(fn, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
        for f in futures:
            f.result()
    finally:
        put(saved)
        _lock.release()
