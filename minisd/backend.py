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
