"""Safetensors weights: a validating, memory-mapped reader and writer; nested parameter dicts.

The safetensors layout (https://github.com/huggingface/safetensors): an 8-byte little-endian
header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, ...}``,
then the raw little-endian tensor bytes. Offsets are relative to the end of the header.
Nothing here ever unpickles: ``.ckpt`` / ``.pt`` / ``.bin`` files are refused.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path

import numpy as np

from .backend import get_xp, resolve_dtype, to_numpy
from .config import is_int
from .errors import WeightsError

# safetensors dtype tag -> (numpy dtype used to read the bytes, bytes per element)
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # no numpy bf16: read as uint16, widened to float32 on load
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
NP_TO_TAG = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def refuse_pickle(path) -> None:
    """Raise for pickle-based checkpoints, which can run arbitrary code when loaded."""
    if str(path).endswith(PICKLE_SUFFIXES):
        raise WeightsError(
            f"{path}: pickle checkpoints (.ckpt/.pt/.bin) are never loaded, since unpickling can "
            "run arbitrary code. Convert it once, in an environment you trust, e.g. "
            "`python -c \"import torch, safetensors.torch as st; sd = torch.load('in.ckpt', "
            "weights_only=True)['state_dict']; st.save_file({k: v.contiguous() for k, v in "
            "sd.items()}, 'out.safetensors')\"`, then load the .safetensors file."
        )


def read_header(path):
    """Validate and return ``(tensors, metadata, data_start, file_size)`` of a safetensors file.

    tensors: {name: (tag, shape, begin, end)} with absolute byte offsets.
    """
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    size = path.stat().st_size
    if size < 8:
        raise WeightsError(f"{path}: file is empty or truncated ({size} bytes)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER or 8 + n > size:
            raise WeightsError(f"{path}: header length {n} is beyond the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    tensors = {name: _check_entry(path, name, e, start, size) for name, e in header.items()}
    _check_overlaps(path, tensors)
    return tensors, meta, start, size


def _check_entry(path, name, e, start, size):
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
        raise WeightsError(f"{path}: key {name!r}: entry needs dtype, shape and data_offsets")
    tag, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(tag, str) or tag not in DTYPES:
        raise WeightsError(f"{path}: key {name!r}: unsupported dtype {tag!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(map(is_int, offs))):
        raise WeightsError(f"{path}: key {name!r}: data_offsets must be two integers")
    if not (isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)):
        raise WeightsError(f"{path}: key {name!r}: bad shape {shape!r}")
    begin, end = start + offs[0], start + offs[1]
    if offs[0] < 0 or end < begin or end > size:
        raise WeightsError(
            f"{path}: key {name!r}: data offsets {offs} lie outside the file "
            f"(data section is {size - start} bytes; the file may be truncated)"
        )
    nbytes = math.prod(shape) * DTYPES[tag].itemsize  # Python ints: no overflow
    if nbytes != end - begin:
        raise WeightsError(
            f"{path}: key {name!r}: shape {shape} x {tag} needs {nbytes} bytes, "
            f"offsets give {end - begin}"
        )
    return tag, tuple(shape), begin, end


def _check_overlaps(path, tensors):
    spans = sorted((b, e, k) for k, (_, _, b, e) in tensors.items() if e > b)
    for (_, e0, k0), (b1, _, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise WeightsError(f"{path}: tensors {k0!r} and {k1!r} overlap in the file")


def load_file(path, *, dtype=None, device="cpu", keys=None):
    """Read a safetensors file into a flat ``{name: array}`` dict.

    On the CPU without a dtype change, arrays are read-only memory-mapped views (no copy until
    used). bf16 is widened to float32. ``dtype`` casts floating tensors (e.g. "float64").
    """
    tensors, _, _, _ = read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    target = resolve_dtype(dtype) if dtype is not None else None
    xp = get_xp(device)
    out = {}
    for name in tensors if keys is None else keys:
        if name not in tensors:
            raise WeightsError(f"{path}: missing key {name!r}")
        tag, shape, begin, end = tensors[name]
        arr = mm[begin:end].view(DTYPES[tag]).reshape(shape)
        if tag == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        if target is not None and arr.dtype.kind == "f" and arr.dtype != target:
            arr = arr.astype(target)
        out[name] = arr if xp is np else xp.asarray(arr)
    return out


def save_file(flat, path, metadata=None) -> None:
    """Write ``{name: array}`` as safetensors, atomically (temp name, then rename).

    Arrays whose dtype is a structured ``bf16`` marker are not supported; float64/32/16 and ints
    are written as themselves.
    """
    path = Path(path)
    header, offset = {}, 0
    arrays = {}
    for name in sorted(flat):
        a = np.ascontiguousarray(to_numpy(flat[name]))  # CuPy arrays are copied to the host
        tag = NP_TO_TAG.get(a.dtype.name)
        if tag is None:
            raise WeightsError(f"{path}: key {name!r}: cannot write dtype {a.dtype}")
        header[name] = {
            "dtype": tag,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays[name] = a
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep data 8-byte aligned, as the reference writer does
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name in sorted(arrays):
                f.write(arrays[name].astype(arrays[name].dtype.newbyteorder("<"), copy=False).data)
        os.replace(tmp, path)
    except OSError as e:  # a missing folder, a folder of that name, a full disk, ...
        tmp.unlink(missing_ok=True)
        raise WeightsError(f"{path}: cannot write it ({e.strerror or e})") from None


# --------------------------------------------------------------------------- nested params


def nest(flat):
    """``{"a.0.b": x}`` -> ``{"a": {0: {"b": x}}}``; digit segments become int keys."""
    root = {}
    for name, value in flat.items():
        node = root
        parts = [int(p) if p.isdigit() else p for p in name.split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise WeightsError(f"key {name!r}: a tensor is stored at a prefix of it")
        if isinstance(node.get(parts[-1]), dict):
            raise WeightsError(f"key {name!r}: other keys continue it (e.g. {name}.…)")
        node[parts[-1]] = value
    return root


def flatten(nested, prefix=""):
    """Inverse of :func:`nest`."""
    out = {}
    for k, v in nested.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


class RecordingDict(dict):
    """A nested params dict that records the full name of every leaf read through it.

    Used by tests to prove every checkpoint key is used by a forward pass.
    """

    def __init__(self, data, reads=None, prefix=""):
        super().__init__(data)
        self.reads = set() if reads is None else reads
        self.prefix = prefix

    def __getitem__(self, key):
        value = super().__getitem__(key)
        name = f"{self.prefix}{key}"
        if isinstance(value, dict):
            return RecordingDict(value, self.reads, name + ".")
        self.reads.add(name)
        return value

    def get(self, key, default=None):
        return self[key] if key in self else default


def check_keys(flat, expected, source):
    """Compare loaded keys/shapes with ``expected`` {name: shape}; raise on the first problem."""
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise WeightsError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing)")
    unexpected = sorted(set(flat) - set(expected))
    if unexpected:
        raise WeightsError(
            f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)"
        )
    for name, shape in expected.items():
        if tuple(flat[name].shape) != tuple(shape):
            raise WeightsError(
                f"{source}: key {name!r} has shape {tuple(flat[name].shape)}, "
                f"expected {tuple(shape)}"
            )
        dtype = getattr(flat[name], "dtype", None)  # (shape-only stand-ins have none)
        if dtype is not None and np.dtype(dtype).kind != "f" and not name.endswith("position_ids"):
            raise WeightsError(
                f"{source}: key {name!r} is stored as {np.dtype(dtype)}; weights must be "
                "floating point (float16, bfloat16, float32 or float64)"
            )


def find_weights(folder, names=("diffusion_pytorch_model.safetensors", "model.safetensors")):
    """The weights file in a diffusers/transformers component folder (fp16 variants allowed)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: no such model folder")
    for name in names:
        stem = name[: -len(".safetensors")]
        for cand in (name, f"{stem}.fp16.safetensors"):
            if (folder / cand).is_file():
                return folder / cand
    pickles = [p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        refuse_pickle(folder / pickles[0])
    raise WeightsError(f"{folder}: no weights file (looked for {', '.join(names)})")


def read_config(path):
    """Read a JSON config file, with errors that name it."""
    path = Path(path)
    from .errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def load_params(path, *, dtype=None, device="cpu"):
    """Nested params from a safetensors file (see :func:`nest`)."""
    return nest(load_file(path, dtype=dtype, device=device))


# --------------------------------------------------------------------------- cast on read
#
# Memory policy for weights stored narrower than the compute dtype (float16 files, float32
# compute). ``weights=`` of the models' ``from_pretrained``:
#
#   "eager"  (default) every tensor is cast at load: float32 copies in anonymous memory
#            (SD1.5's UNet: 3.4 GB).
#   "lazy"   tensors stay as read-only memory maps of the file, in its dtype; each matrix /
#            kernel is cast when a layer reads it (a transient float32 copy of one layer).
#            File pages count in RSS once touched (1.7 GB for SD1.5's float16 UNet) until
#            :meth:`CastOnRead.release` gives them back (the pipeline does after each phase).
#   "stream" as "lazy", and the pages of each tensor are given back right after it is cast
#            (madvise(MADV_DONTNEED)), so resident weights are bounded by one layer. The next
#            read faults them in again from the kernel's page cache (~0.2 s per SD1.5 UNet call).
#
# Casting float16 -> float32 is exact, so all three give bit-identical outputs. Vectors (norm
# scales, biases) are small and are cast once at load in every mode.

WEIGHT_MODES = ("eager", "lazy", "stream")


def check_weights_mode(weights) -> str:
    if weights not in WEIGHT_MODES:
        from .errors import InputError

        raise InputError(f"weights={weights!r}: expected one of {', '.join(WEIGHT_MODES)}")
    return weights


def release_pages(arr) -> bool:
    """Drop the resident pages of ``arr`` when it is a view of a file memory map (np.memmap):
    the data stays in the file and is faulted in again on the next read. Pages are rounded
    outward (a neighbour's boundary page is re-read too: harmless for a file mapping). Arrays in
    anonymous memory are never touched (DONTNEED would zero them). Returns True if released."""
    mm = getattr(arr, "_mmap", None)
    if mm is None or not isinstance(arr, np.memmap) or arr.nbytes == 0:
        return False
    start = np.frombuffer(mm, dtype=np.uint8).ctypes.data  # address of the mapping
    begin = arr.ctypes.data - start
    page = mmap.PAGESIZE
    lo = begin // page * page
    hi = min(-(-(begin + arr.nbytes) // page) * page, len(mm))
    mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    return True


def _is_float(a) -> bool:
    return a.dtype.kind == "f"


class CastOnRead(dict):
    """Nested params whose matrices stay in the file's dtype and are cast to ``dtype`` when read.

    ``p["to_q"]["weight"]`` returns a ``dtype`` array (a fresh copy unless the stored one is
    already in ``dtype``); ``stream=True`` also releases the stored tensor's file pages after
    copying (see the policy note above). Vectors are cast once, here. Sub-dicts are CastOnRead.
    """

    def __init__(self, data, dtype, *, stream=False):
        self.dtype = resolve_dtype(dtype)
        self.stream = stream
        super().__init__(
            {
                k: CastOnRead(v, dtype, stream=stream)
                if isinstance(v, dict)
                else (v.astype(self.dtype, copy=False) if v.ndim <= 1 and _is_float(v) else v)
                for k, v in data.items()
            }
        )

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if isinstance(value, dict) or not _is_float(value):
            return value  # sub-dicts; integer buffers (position_ids) as stored
        if not self.stream:
            return value.astype(self.dtype, copy=False)
        out = value.astype(self.dtype, copy=True)  # a private copy, then give the pages back
        release_pages(value)
        return out

    def get(self, key, default=None):
        return self[key] if key in self else default

    def raw(self):
        """The stored leaves ``{dotted name: array}`` (file dtype, no cast)."""
        return flatten(self)

    def release(self) -> int:
        """Give back the resident file pages of every stored tensor; returns how many arrays
        were file-backed. Cheap; the next read faults pages in again."""
        return sum(release_pages(v) for v in self.raw().values())


def prepare_weights(flat, *, dtype, device="cpu", weights="eager"):
    """Nested params for a model from a flat ``{name: array}`` in the file's dtype.

    "eager": every array moved to ``device`` and cast to ``dtype`` now (plain dicts).
    "lazy" / "stream": a :class:`CastOnRead` tree (arrays moved to ``device`` in their own
    dtype; on the CPU they stay memory-mapped)."""
    check_weights_mode(weights)
    from .backend import to_device

    if weights == "eager":
        return nest({k: to_device(v, device, dtype) for k, v in flat.items()})
    moved = {k: v if device == "cpu" else to_device(v, device) for k, v in flat.items()}
    return CastOnRead(nest(moved), dtype, stream=weights == "stream")
