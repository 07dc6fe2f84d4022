"""Reference harness: helpers to compare minisd against diffusers / transformers.

Import torch / diffusers / transformers only through :func:`need`, and find the tools a check
is built with (the host C++ compiler of the fake GPU kernels) through :func:`need_tool`: both
skip the test when the dependency is missing, or fail it when ``MINISD_REQUIRE_REFERENCE=1``
(as CI sets), so no check silently drops out of CI.
"""

from __future__ import annotations

import importlib
import os
import shutil

import numpy as np
import pytest

from minisd_parity.compare import collect_outputs, rel_err, text_model_names  # noqa: F401

REQUIRE = os.environ.get("MINISD_REQUIRE_REFERENCE") == "1"
# Relative error bounds of the project (DESIGN.md): max |ours - ref| / max |ref|.
TOL = {"float64": 1e-10, "float32": 1e-4}
OP_TOL = {"float64": 1e-12, "float32": 1e-5}  # single ops are held tighter


def unavailable(msg):
    """A reference dependency of the test is missing: skip it, or fail it in CI
    (``MINISD_REQUIRE_REFERENCE=1``)."""
    if REQUIRE:
        pytest.fail(msg + " and MINISD_REQUIRE_REFERENCE=1", pytrace=False)
    pytest.skip(msg)


def need(*names):
    """Import reference packages; skip (or fail in CI) when one is missing."""
    mods = []
    for name in names:
        try:
            mods.append(importlib.import_module(name))
        except ImportError as e:
            unavailable(f"reference package {name!r} is not installed ({e})")
    if "torch" in names:
        mods[names.index("torch")].set_num_threads(max(1, os.cpu_count() or 1))
    return mods[0] if len(mods) == 1 else mods


def need_tool(*names, what):
    """The path of the first executable of ``names`` on PATH; skip (or fail in CI) when there
    is none. ``what``: what the tool is for, for the message."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    unavailable(f"{what}: none of {', '.join(names)} is on PATH")


def assert_rel(ours, ref, tol, what=""):
    err = rel_err(ours, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
    return err


def compare_traces(ours: dict, ref: dict, tol: float, names=None):
    """Compare named activations in reference (module) order; report the first divergence."""
    names = list(ref) if names is None else list(names)
    missing = [n for n in names if n not in ours]
    assert not missing, f"minisd did not record {missing[:5]} ({len(missing)} missing)"
    errs = {n: rel_err(ours[n], ref[n]) for n in names}
    bad = [n for n in names if not errs[n] <= tol]
    assert not bad, (
        f"first diverging layer: {bad[0]} (rel. error {errs[bad[0]]:.3e} > {tol:.0e}); "
        f"{len(bad)} of {len(names)} layers over the bound"
    )
    return errs


def torch_dtype(name):
    torch = need("torch")
    return {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16}[name]


def to_torch(a, dtype=None):
    torch = need("torch")
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if dtype is None else t.to(torch_dtype(dtype) if isinstance(dtype, str) else dtype)


def to_np(t):
    return t.detach().cpu().numpy()


def randomize_(module, seed=0):
    """Give every floating parameter and buffer of a torch module a random value.

    Matrices/kernels: N(0, 1/fan_in); 1-D scales named ``weight`` (norms): U(0.5, 1.5);
    other 1-D tensors (biases): N(0, 0.1^2). Nothing keeps its default 1 or 0, so a swapped or
    missing scale/bias shows up in the comparison.
    """
    torch = need("torch")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point():
                continue
            if p.ndim >= 2:
                fan_in = max(1, p[0].numel())
                v = torch.randn(p.shape, generator=g, dtype=torch.float64) / fan_in**0.5
            elif name.endswith("weight"):
                v = 0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64)
            else:
                v = 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.copy_(v.to(p.dtype))
    return module


def save_pretrained(model, folder):
    """Save a diffusers / transformers model as safetensors (config.json + weights)."""
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def rand(*shape, seed=0):
    """Standard-normal float64 test input (numpy's legacy RandomState, fixed by ``seed``)."""
    return np.random.RandomState(seed).standard_normal(shape)


def diffusers_models(ref_cache, class_name, configs, prefix, *, seed):
    """A getter name -> (randomized float32 ``diffusers.<class_name>(**configs[name])``, its
    save_pretrained folder ``ref_cache / f"{prefix}_{name}"``), each built once."""
    cache = {}

    def get(name):
        if name not in cache:
            torch, diffusers = need("torch", "diffusers")
            torch.manual_seed(0)
            model = getattr(diffusers, class_name)(**configs[name])
            ref = randomize_(model, seed=seed).eval()
            cache[name] = (ref, save_pretrained(ref, ref_cache / f"{prefix}_{name}"))
        return cache[name]

    return get


def copy_model_folder(folder, dst, change=None, config=None):
    """Copy a diffusers model folder to ``dst``, then ``change(flat)`` its weights in place and
    merge ``config`` into its config.json (to build a broken or altered checkpoint).
    Returns (dst, the weights file)."""
    import json

    from minisd.weights import load_file, save_file

    shutil.copytree(folder, dst)
    path = dst / "diffusion_pytorch_model.safetensors"
    if change is not None:
        flat = {k: np.array(v) for k, v in load_file(path).items()}
        change(flat)
        save_file(flat, path)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst, path


def key_error(load, folder, dst, key, change):
    """``load`` of a copy of ``folder`` whose weights ``change`` altered at ``key`` must raise a
    WeightsError naming the key and the weights file; returns its message."""
    import pytest

    from minisd.errors import WeightsError

    dst, path = copy_model_folder(folder, dst, change)
    with pytest.raises(WeightsError, match=key) as e:
        load(dst)
    assert str(path) in str(e.value)
    return str(e.value)
