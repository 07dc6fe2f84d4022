"""Look inside a model: every named module's output, keyed by its diffusers module path.

    with minisd.trace() as acts:
        unet(sample, t, context)
    acts["down_blocks.1.attentions.0"]

Model code calls ``record(name, x)`` with the module's name relative to the current ``scope``;
models open a scope per submodule (``with scope("down_blocks.1"): ...``). When no trace is
active, ``record`` is a single attribute check and ``scope`` a shared no-op context.
"""

from __future__ import annotations

import contextlib
import sys
import types

_state = {"acts": None, "prefix": [], "filter": None, "copy": True}
_NULL = contextlib.nullcontext()


@contextlib.contextmanager
def trace(names=None, *, copy=True):
    """Collect outputs of named modules into a dict while the block runs.

    names: optional full name, iterable of full names, or predicate, to keep memory small.
    copy: store copies (default), so later in-place updates never change recorded values.
    """
    acts = {}
    saved = dict(_state)
    if isinstance(names, str):  # one name (a set of its characters would match nothing)
        names = [names]
    keep = names if (names is None or callable(names)) else set(names).__contains__
    _state.update(acts=acts, prefix=[], filter=keep, copy=copy)
    try:
        yield acts
    finally:
        _state.clear()
        _state.update(saved)


def active() -> bool:
    return _state["acts"] is not None


def full_name(name: str) -> str:
    return ".".join(_state["prefix"] + [name]) if name else ".".join(_state["prefix"])


def record(name, x):
    """Store ``x`` under the current scope + ``name``; returns ``x`` unchanged."""
    acts = _state["acts"]
    if acts is None:
        return x
    key = full_name(str(name))
    keep = _state["filter"]
    if keep is None or keep(key):
        acts[key] = x.copy() if _state["copy"] and hasattr(x, "copy") else x
    return x


@contextlib.contextmanager
def _push(prefix):
    _state["prefix"].append(str(prefix))
    try:
        yield
    finally:
        _state["prefix"].pop()


def scope(prefix):
    """Context manager prefixing names recorded inside it (no-op when tracing is off)."""
    if _state["acts"] is None:
        return _NULL
    return _push(prefix)


class _CallableModule(types.ModuleType):
    """Lets ``minisd.trace`` be this module (``trace.record``, ``trace.scope``) and also the
    context manager itself (``with minisd.trace() as acts``)."""

    def __call__(self, names=None, *, copy=True):
        return trace(names, copy=copy)


sys.modules[__name__].__class__ = _CallableModule
