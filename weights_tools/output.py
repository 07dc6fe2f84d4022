"""Path arguments, checked before any work, and folders written all at once.

A file is written under a temporary sibling name and renamed when complete (see
:class:`weights_tools.stream.SafetensorsWriter`). A folder is built in a temporary sibling folder
(``<name>.<random>.partial``); when everything is written it is renamed into place, or, when the
folder already exists, its files are moved over the existing ones one by one (files already there
that the command does not write are kept). On any error the temporary folder is removed, so a
failed command leaves the output as it was.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

from minisd.config import path_arg
from minisd.errors import WeightsError


def check_out_file(value, name="out"):
    """The output file path ``value``: not a folder, in a folder that exists."""
    out = path_arg(value, name)
    if out.is_dir():
        raise WeightsError(f"{out}: is a folder; {name} must name a .safetensors file")
    if not out.parent.is_dir():
        what = "is not a folder" if out.parent.exists() else "does not exist"
        raise WeightsError(f"{out}: cannot write {name} there: {out.parent} {what}")
    return out


def check_out_folder(value, name="out_folder"):
    """The output folder path ``value``: a folder or nothing yet, under no existing file."""
    out = path_arg(value, name)
    if out.exists() and not out.is_dir():
        raise WeightsError(f"{out}: exists and is not a folder; {name} must name a folder")
    for parent in out.parents:  # nearest first: the first one that exists must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise WeightsError(f"{out}: cannot create {name} there: {parent} is not a folder")
            break
    return out


@contextmanager
def building_folder(out):
    """Yield a temporary folder to write the contents of folder ``out`` into; they replace
    ``out``'s when the block ends without error, else the temporary folder is removed."""
    out = Path(os.path.abspath(out))  # "." and "x/.." have no name of their own
    if not out.name:
        raise WeightsError(f"{out}: cannot write a model folder over the file system root")
    made = _make_parents(out.parent)
    tmp = out.with_name(f"{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        tmp.mkdir()
        yield tmp
        _commit(tmp, out)
    except OSError as e:
        raise WeightsError(f"{out}: cannot write the folder ({e.strerror or e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.exists():
            for folder in made:  # created for this output only: take them away again
                with suppress(OSError):
                    folder.rmdir()


def _make_parents(folder):
    """Create ``folder`` and its missing parents; return the created ones, deepest first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"{folder}: cannot create the folder ({e.strerror or e})") from e
    return missing


def _commit(tmp, out):
    """Move the finished contents of ``tmp`` into ``out``."""
    if not out.exists():
        os.rename(tmp, out)
        return
    files = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if not p.is_dir())
    for rel in files:  # check every target before moving anything
        dst = out / rel
        between = dst.parents[: len(rel.parts) - 1]  # the folders from out down to dst
        if dst.is_dir() or any(p.exists() and not p.is_dir() for p in between):
            raise WeightsError(f"{dst}: cannot write it: a file or folder is in the way")
    for rel in files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, out / rel)
