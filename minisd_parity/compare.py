"""Per-layer comparison: forward hooks on the reference, minisd.trace() on ours."""

from __future__ import annotations

import contextlib

import numpy as np


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|, computed in float64 on the CPU."""
    from minisd.backend import to_numpy

    a = to_numpy(ours).astype(np.float64)
    b = to_numpy(ref).astype(np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape {a.shape} != reference shape {b.shape}")
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / (scale if scale > 0 else 1.0))


def first_tensor(out):
    """The first tensor of a module output (tensor, tuple/list, or a HF ModelOutput)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            t = first_tensor(o)
            if t is not None:
                return t
        return None
    if hasattr(out, "to_tuple"):
        return first_tensor(out.to_tuple())
    return None


@contextlib.contextmanager
def collect_outputs(module, names=None):
    """Forward hooks on every named submodule; yields {name: numpy output (first tensor)}."""
    acts = {}
    keep = None if names is None else set(names)
    handles = []
    for name, sub in module.named_modules():
        if not name or (keep is not None and name not in keep):
            continue

        def hook(_m, _inp, out, name=name):
            t = first_tensor(out)
            if t is not None:
                acts[name] = t.detach().cpu().numpy().copy()

        handles.append(sub.register_forward_hook(hook))
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


def text_model_names(acts):
    """transformers 5's CLIPTextModel hooks name modules without the ``text_model.`` level that
    SD checkpoints and minisd's trace use; add it (not to CLIPTextModelWithProjection's
    ``text_projection``, which sits beside the text model)."""
    top = ("text_model.", "text_projection")
    return {(k if k.startswith(top) else "text_model." + k): v for k, v in acts.items()}


def time_proj_bound(t):
    """max |ours - torch| of the UNet's time_proj, a float32 precision island of diffusers
    (tests/test_unet.py explains it): 1-2 ulp of sin/cos values, plus t * ulp(frequency)."""
    return 2.5e-7 + float(np.max(t)) * 2.0**-23


def layer_table(ours: dict, ref: dict, tol: float, bounds=None):
    """Rows (name, shape, max-abs, relative, cosine, ok) in reference order, and the first
    layer whose relative error exceeds ``tol`` (``bounds[name]`` where given: precision
    islands) (None if all pass). Reference modules minisd does not trace (e.g. diffusers'
    shared ``nonlinearity`` called twice per block) get NaN errors and ok=None: not compared,
    neither passing nor failing."""
    bounds = bounds or {}
    rows, first = [], None
    for name, r in ref.items():
        if name not in ours:
            rows.append((name, r.shape, np.nan, np.nan, np.nan, None))
            continue
        a = np.asarray(ours[name], dtype=np.float64).reshape(r.shape)
        b = r.astype(np.float64)
        diff = np.abs(a - b).max()
        rel = diff / max(np.abs(b).max(), 1e-300)
        cos = float(a.ravel() @ b.ravel() / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))
        ok = bool(rel <= bounds.get(name, tol))
        rows.append((name, r.shape, float(diff), float(rel), cos, ok))
        if not ok and first is None:
            first = name
    return rows, first
