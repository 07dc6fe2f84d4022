"""Array backend: NumPy on the CPU, CuPy on the GPU.

Only this module and ``ops.py`` know that CuPy exists. Model code asks an input array for its
module (``xp = array_module(x)``) and calls ``xp.<fn>``; the same code runs on both backends.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

try:  # CuPy is optional (extra "gpu"); importing it must never be required.
    import cupy as _cupy
except Exception:  # pragma: no cover - depends on the machine
    _cupy = None

DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16}


def cuda_available() -> bool:
    """True when CuPy is installed and sees at least one GPU."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def get_xp(device: str = "cpu"):
    """The array module for ``device``: ``"cpu"`` -> numpy, ``"cuda"`` -> cupy."""
    if device == "cpu":
        return np
    if device in ("cuda", "gpu") or str(device).startswith("cuda:"):
        if not cuda_available():
            raise InputError(f"device={device!r}: CuPy with a visible GPU is required")
        return _cupy
    raise InputError(f"device={device!r}: expected 'cpu' or 'cuda'")


def array_module(x):
    """numpy or cupy, whichever owns ``x``."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy
    return np


def is_cupy(x) -> bool:
    return _cupy is not None and isinstance(x, _cupy.ndarray)


def resolve_dtype(dtype) -> np.dtype:
    """Normalize ``"float32"`` / ``np.float32`` / ``"fp16"`` ... to a numpy dtype."""
    aliases = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "half": "float16"}
    if isinstance(dtype, str):
        name = aliases.get(dtype, dtype)
        if name not in DTYPES:
            raise InputError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        return np.dtype(DTYPES[name])
    dt = np.dtype(dtype)
    if dt.name not in DTYPES:
        raise InputError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    return dt


def to_device(x, device: str = "cpu", dtype=None):
    """Move an array to ``device`` (and cast to ``dtype`` if given)."""
    xp = get_xp(device)
    if xp is np:
        out = to_numpy(x)
    else:
        out = xp.asarray(x)
    if dtype is not None:
        out = out.astype(resolve_dtype(dtype), copy=False)
    return out


def to_numpy(x) -> np.ndarray:
    """A numpy array from a numpy or cupy array (or anything array-like)."""
    if is_cupy(x):
        return x.get()
    return np.asarray(x)


def device_of(x) -> str:
    return "cuda" if is_cupy(x) else "cpu"


# --------------------------------------------------------------------------- GPU policy


def default_dtype(device: str = "cpu") -> np.dtype:
    """The dtype a model gets when none is asked for: float16 on a GPU (what SD checkpoints are
    run in; statistics and softmax still accumulate in float32, see docs/gpu.md), float32 on the
    CPU (NumPy has no fast float16 matmul)."""
    return np.dtype(np.float16 if _is_cuda(device) else np.float32)


def resolve_device_dtype(dtype, device: str = "cpu") -> np.dtype:
    """``dtype`` normalized, or :func:`default_dtype` of ``device`` when ``dtype`` is None."""
    return default_dtype(device) if dtype is None else resolve_dtype(dtype)


def _is_cuda(device) -> bool:
    return device in ("cuda", "gpu") or str(device).startswith("cuda:")


def memory_info(device: str = "cuda"):
    """(free, total) bytes of the GPU, counting blocks CuPy's memory pool holds but does not use
    as free (the pool hands them out before asking CUDA). None on the CPU."""
    if not _is_cuda(device):
        return None
    xp = get_xp(device)
    free, total = xp.cuda.runtime.memGetInfo()
    pool = xp.get_default_memory_pool()
    return int(free) + int(pool.total_bytes() - pool.used_bytes()), int(total)


def pool_bytes(device: str = "cuda"):
    """(used, held) bytes of CuPy's default memory pool; (0, 0) on the CPU."""
    if not _is_cuda(device):
        return 0, 0
    pool = get_xp(device).get_default_memory_pool()
    return int(pool.used_bytes()), int(pool.total_bytes())


def free_memory(device: str = "cuda") -> int:
    """Give the unused blocks of CuPy's default and pinned memory pools back to CUDA (arrays
    still referenced are untouched). Returns the bytes released; a no-op returning 0 on the CPU.
    Useful between pipeline phases and before handing the GPU to another library."""
    if not _is_cuda(device):
        return 0
    xp = get_xp(device)
    pool = xp.get_default_memory_pool()
    held = pool.total_bytes()
    pool.free_all_blocks()
    xp.get_default_pinned_memory_pool().free_all_blocks()
    return int(held - pool.total_bytes())


def device_info(device: str = "cpu") -> dict:
    """A short description: {"device", "name", "total_bytes", "compute_capability"}."""
    if not _is_cuda(device):
        import platform

        return {"device": "cpu", "name": platform.processor() or platform.machine()}
    xp = get_xp(device)
    index = int(str(device).split(":")[1]) if ":" in str(device) else 0
    props = xp.cuda.runtime.getDeviceProperties(index)
    name = props["name"]
    return {
        "device": f"cuda:{index}",
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "total_bytes": int(props["totalGlobalMem"]),
        "compute_capability": f"{props['major']}.{props['minor']}",
    }


def attention_chunk_for(queries: int, bytes_per_query: int, free_bytes, *, fraction=0.5):
    """Query rows per attention chunk so one score tile uses at most ``fraction`` of
    ``free_bytes``: None (no chunking) when all ``queries`` fit, else a multiple of 64 (>= 64).
    ``bytes_per_query``: bytes one query row costs across the batch and heads (scores and their
    cast copy)."""
    budget = fraction * free_bytes
    if queries * bytes_per_query <= budget:
        return None
    return max(64, int(budget // bytes_per_query) // 64 * 64)
