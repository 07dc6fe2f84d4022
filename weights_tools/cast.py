"""cast: change the float dtype of a checkpoint (fp32 / fp16 / bf16), streaming.

Integer tensors are kept. float16 overflow (|x| >= 65520 becomes inf) is warned about, naming
the key. bfloat16 is written with our own round-to-nearest-even of the float32 bits (numpy has
no bfloat16), which matches torch's ``.to(torch.bfloat16)`` bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .folders import is_pipeline_folder, weights_paths
from .stream import FLOAT_TAGS, Lazy, LazyFile, cast_array, target_tag, write_tensors


def cast(path, out, dtype):
    """Cast a .safetensors file, or every weights file of a diffusers pipeline folder (configs
    and tokenizer are copied), to ``dtype``. Returns {"tensors": n, "cast": n_float}."""
    tag = target_tag(dtype)
    path, out = Path(path), Path(out)
    if path.is_dir() and is_pipeline_folder(path):
        paths = weights_paths(path)
        if path.resolve() != out.resolve():
            names = {p.name for p in paths.values()}
            shutil.copytree(
                path, out, dirs_exist_ok=True, ignore=lambda d, fs: [f for f in fs if f in names]
            )
        total = {"tensors": 0, "cast": 0}
        for p in paths.values():
            done = _cast_file(p, out / p.relative_to(path), tag)
            total = {k: total[k] + done[k] for k in total}
        return total
    return _cast_file(path, out, tag)


def _cast_file(path, out, tag):
    src = LazyFile(path)
    items, n_float = [], 0
    for name in src.tensors:
        source = src.tag(name)
        n_float += source in FLOAT_TAGS
        out_tag = tag if source in FLOAT_TAGS else source
        items.append((name, out_tag, src.shape(name), _producer(src, name, tag)))
    write_tensors(out, items, metadata=src.metadata)
    return {"tensors": len(items), "cast": n_float}


def _producer(src, name, tag):
    def produce():
        return cast_array(src.raw(name), src.tag(name), tag, name, src.path)[0]

    return Lazy(produce, lambda: src.release(name))
