"""cast: change the float dtype of a checkpoint (fp32 / fp16 / bf16), streaming.

Integer tensors are kept. float16 overflow (|x| >= 65520 becomes inf) is warned about, naming
the key. bfloat16 is written with our own round-to-nearest-even of the float32 bits (numpy has
no bfloat16), which matches torch's ``.to(torch.bfloat16)`` bit for bit.

Every input file is validated before anything is written; a folder is built aside and moved into
place when complete (see weights_tools.output), so a failed cast leaves ``out`` as it was.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .folders import is_pipeline_folder, weights_paths
from .output import building_folder, check_out_file, check_out_folder, path_arg
from .stream import FLOAT_TAGS, Lazy, LazyFile, cast_array, target_tag, write_tensors


def cast(path, out, dtype):
    """Cast a .safetensors file, or every weights file of a diffusers pipeline folder (configs
    and tokenizer are copied), to ``dtype``. Returns {"tensors": n, "cast": n_float}."""
    tag = target_tag(dtype)
    path = path_arg(path, "path")
    path_arg(out, "out")
    if is_pipeline_folder(path):
        return _cast_folder(path, check_out_folder(out, "out"), tag)
    src = LazyFile(path)
    return _cast_file(src, check_out_file(out, "out"), tag)


def _cast_folder(path, out, tag):
    paths = weights_paths(path)
    srcs = {p: LazyFile(p) for p in paths.values()}  # every header validated before writing
    total = {"tensors": 0, "cast": 0}
    with building_folder(out) as tmp:
        if path.resolve() != out.resolve():
            _copy_others(path, tmp, skip={p.name for p in paths.values()}, avoid=(tmp, out))
        for p, src in srcs.items():
            done = _cast_file(src, tmp / p.relative_to(path), tag)
            total = {k: total[k] + done[k] for k in total}
    return total


def _copy_others(folder, dest, skip, avoid):
    """Copy ``folder`` (configs, tokenizer, ...) into ``dest``, without the files named in
    ``skip`` and without the folders ``avoid`` (the output, when it lies inside ``folder``)."""
    avoid = {a.resolve() for a in avoid}

    def ignore(d, names):
        return [n for n in names if n in skip or (Path(d) / n).resolve() in avoid]

    shutil.copytree(folder, dest, dirs_exist_ok=True, ignore=ignore)


def _cast_file(src, out, tag):
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
