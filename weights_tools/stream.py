"""Streaming safetensors writer and dtype casts (bf16 with round-to-nearest-even).

The header is written first from names, dtypes and shapes only; tensors follow one by one, so a
conversion holds at most one converted tensor in memory besides its memory-mapped sources. The
file is written under a temporary name (``<name>.partial``) and renamed when complete: a crash
never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import warnings
from pathlib import Path

import numpy as np

from minisd.errors import InputError, WeightsError
from minisd.weights import DTYPES, read_header

# Names accepted for cast targets -> safetensors tag.
CAST_TAGS = {
    "fp32": "F32",
    "float32": "F32",
    "fp16": "F16",
    "float16": "F16",
    "bf16": "BF16",
    "bfloat16": "BF16",
}
FLOAT_TAGS = ("F64", "F32", "F16", "BF16")
FP16_MAX = 65504.0
FP16_INF = 65520.0  # the smallest magnitude that rounds to inf in float16 (RNE)


def tag_of(array):
    """safetensors tag of a numpy array (bf16 data is carried as uint16 bits: tag it BF16
    explicitly with :func:`cast_array`)."""
    for tag, dt in DTYPES.items():
        if tag != "BF16" and array.dtype == dt:
            return tag
    raise WeightsError(f"cannot write dtype {array.dtype}")


def target_tag(dtype):
    """ "fp16" / "float16" / ... -> "F16"; raises InputError naming the argument."""
    tag = CAST_TAGS.get(str(dtype).lower())
    if tag is None:
        raise InputError(f"dtype={dtype!r}: expected one of fp32, fp16, bf16")
    return tag


def float32_to_bf16_bits(x):
    """Round float32 values to bfloat16, returned as uint16 bit patterns.

    Round to nearest, ties to even, on the float32 bits: add 0x7FFF plus the lowest kept bit,
    then drop the low 16 bits. Overflow rounds to +-inf as it should; NaNs are kept quiet NaNs
    (the addition could otherwise carry a NaN's payload into the sign or exponent).
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)  # keep sign, set quiet bit
    return rounded


def bf16_bits_to_float32(bits):
    """Exact widening of bf16 bit patterns to float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def cast_array(raw, source_tag, tag=None, name="", path=""):
    """Cast one stored tensor to safetensors dtype ``tag`` (None: keep it).

    ``raw``: the stored values (bf16 as uint16 bits, see LazyFile.raw). Non-float tensors are
    kept. Returns ``(array to write, tag)``, bf16 as uint16 bits. Warns when finite values
    overflow float16.
    """
    if source_tag not in FLOAT_TAGS or tag is None or tag == source_tag:
        return raw, source_tag
    values = bf16_bits_to_float32(raw) if source_tag == "BF16" else np.asarray(raw)
    if tag == "BF16":  # float64 goes through float32 first (a double rounding, < 1 bf16 ulp)
        return float32_to_bf16_bits(values.astype(np.float32, copy=False)), "BF16"
    with np.errstate(over="ignore"):  # float16 overflow is reported below, by key
        out = values.astype(DTYPES[tag])
    if tag == "F16":
        big = int(np.count_nonzero(np.isfinite(values) & (np.abs(values) >= FP16_INF)))
        if big:
            warnings.warn(
                f"{path}: key {name!r}: {big} values exceed the float16 range (max 65504) and "
                "become inf",
                stacklevel=3,
            )
    return out, tag


class LazyFile:
    """A validated safetensors file, memory-mapped; tensors are read one at a time.

    ``raw(name)`` returns the stored values without conversion (bf16 as uint16 bits), so
    conversions copy bf16 exactly. ``release(name)`` drops that tensor's pages from memory
    (they are re-read from the file if used again), which keeps a streaming conversion's
    resident memory near one tensor.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.tensors, self.metadata, _, size = read_header(path)  # validates; refuses pickles
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def __contains__(self, name):
        return name in self.tensors

    def tag(self, name):
        return self.tensors[name][0]

    def shape(self, name):
        return self.tensors[name][1]

    def raw(self, name):
        tag, shape, begin, end = self.tensors[name]
        dt = DTYPES[tag]
        return np.frombuffer(
            self.map, dtype=dt, count=(end - begin) // dt.itemsize, offset=begin
        ).reshape(shape)

    def value(self, name):
        """The tensor as minisd.weights.load_file returns it (bf16 widened to float32)."""
        a = self.raw(name)
        return bf16_bits_to_float32(a) if self.tag(name) == "BF16" else a

    def release(self, name):
        if self.map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, begin, end = self.tensors[name]
        start = begin - begin % mmap.PAGESIZE
        if end > start:
            self.map.madvise(mmap.MADV_DONTNEED, start, end - start)


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor.

    ``entries``: [(name, tag, shape)] in file order. ``write(name, array)`` must follow that
    order. Use as a context manager: on error the partial file is removed.
    """

    def __init__(self, path, entries, metadata=None):
        self.path = Path(path)
        self.entries = list(entries)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        header, offset = {}, 0
        for name, tag, shape in self.entries:
            n = int(np.prod(shape, dtype=np.int64)) * DTYPES[tag].itemsize
            header[name] = {
                "dtype": tag,
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, as the reference writer does
        self.file, self.next = None, 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
            self.file.write(len(raw).to_bytes(8, "little") + raw)
        except OSError as e:
            self._fail(e)

    def write(self, name, array):
        if self.next >= len(self.entries) or self.entries[self.next][0] != name:
            raise WeightsError(f"{self.path}: tensor {name!r} written out of order")
        _, tag, shape = self.entries[self.next]
        a = np.asarray(array)
        a = a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
        if a.dtype != DTYPES[tag] or a.shape != tuple(shape):
            raise WeightsError(
                f"{self.path}: key {name!r}: got {a.dtype} {a.shape}, header says {tag} {shape}"
            )
        try:
            self.file.write(memoryview(a.astype(a.dtype.newbyteorder("<"), copy=False)).cast("B"))
        except OSError as e:  # e.g. the disk is full
            self._fail(e)
        self.next += 1

    def close(self):
        if self.next != len(self.entries):
            missing = self.entries[self.next][0]
            self.abort()
            raise WeightsError(f"{self.path}: tensor {missing!r} was never written")
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self._fail(e)

    def abort(self):
        """Close and remove the temporary file (the final name is left as it was)."""
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)

    def _fail(self, error):
        self.abort()
        raise WeightsError(f"{self.path}: cannot write it ({error.strerror or error})") from error

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
            return False
        self.abort()
        return False


class Lazy:
    """A tensor computed when it is written; ``release()`` then frees its sources' pages."""

    def __init__(self, produce, release=None):
        self.produce, self.release = produce, release or (lambda: None)

    def __call__(self):
        return self.produce()


def write_tensors(path, items, metadata=None):
    """Write ``[(name, tag, shape, value)]`` as one safetensors file, streaming.

    ``value`` is an array already in dtype ``tag`` or a zero-argument function returning it,
    called only when that tensor is written (so one converted tensor is alive at a time); a
    :class:`Lazy` value is released once its bytes are written.
    """
    items = list(items)
    with SafetensorsWriter(path, [(n, t, s) for n, t, s, _ in items], metadata) as w:
        for name, _, _, value in items:
            w.write(name, value() if callable(value) else value)
            if isinstance(value, Lazy):
                value.release()
