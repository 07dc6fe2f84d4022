"""Scheduler foundations: beta tables, config handling, errors, add_noise / get_velocity.

Also home of the trajectory harness the per-family test files import (``run_pair``): both
schedulers are built from the same config dict and driven by the same deterministic stand-in
model, eps = tanh(x) cos(t / 100) + 0.1 x, through diffusers' pipeline loop.
"""

import logging

import numpy as np
import pytest
from refharness import need, rel_err

import minisd.schedulers as ms
from minisd.errors import ConfigError, InputError
from minisd.schedulers import base

# Relative error bounds for whole float32 trajectories. Per-step arithmetic mirrors diffusers
# operation by operation (float32 tables and scalars), so most runs agree to a few ulp; the
# residue comes from torch's float32 sqrt/exp on 0-d tensors, which are not correctly rounded
# (1 ulp off on ~0.6% of inputs on this AVX-512 CPU) while numpy's are. Those 1-ulp coefficient
# differences accumulate: over 1000 steps to ~1.2e-6 (LONG_TOL), and they are amplified by
# 1/sqrt(abar_t) in the x_0 estimate at high noise (X0_TOL, relative to the sample's scale).
TRAJ_TOL = 1e-6
LONG_TOL = 3e-6
# The cosine schedule spans sigma ~ 2e4 (t = 999, abar ~ 2e-9) down to ~1e-3: 1-ulp
# coefficient differences move its trajectories by up to ~6e-6 (Heun + Karras, 7 steps).
COS_TOL = 1e-5
X0_TOL = 2e-5  # 1/sqrt(abar_999) ~ 160 for linear betas: ~1e-5 from 1 ulp

# The grid the per-family trajectory tests run over: beta schedules (SD's scaled_linear with
# its steps_offset), timestep spacings and prediction types.
BETAS = {
    "linear": {},
    "sd": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
           "steps_offset": 1},
    "cos": {"beta_schedule": "squaredcos_cap_v2"},
}  # fmt: skip
SPACINGS = ["leading", "trailing", "linspace"]
PREDS = ["epsilon", "v_prediction", "sample"]


def standin(x, t):
    """The stand-in model: float32 in, float32 out, smooth and t-dependent."""
    c = np.float32(np.cos(float(t) / 100.0))
    return (np.tanh(x) * c + np.float32(0.1) * x).astype(x.dtype)


def start_sample(shape=(2, 3, 4, 5), seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def ref_scheduler(name, cfg):
    diffusers = need("diffusers")
    return getattr(diffusers, name).from_config(dict(cfg))


def run_ref(sched, n, x, noises=None, step_kw=None, model=standin):
    """diffusers' loop; returns (timesteps, [prev_sample per step], [x0 per step])."""
    torch = need("torch")
    sched.set_timesteps(n)
    ts = sched.timesteps.numpy().copy()
    xt = torch.from_numpy(x.copy()) * sched.init_noise_sigma
    outs, x0s = [], []
    for i, t in enumerate(sched.timesteps):
        xin = sched.scale_model_input(xt, t)
        eps = torch.from_numpy(model(xin.numpy(), t.item()))
        kw = dict(step_kw or {})
        if noises is not None:
            kw["generator"] = _Replay(noises, i)
        res = sched.step(eps, t, xt, **kw)
        xt = res.prev_sample
        outs.append(xt.numpy().copy())
        x0 = getattr(res, "pred_original_sample", None)
        x0s.append(None if x0 is None else x0.numpy().copy())
    return ts, outs, x0s


class _Replay:
    """Stands in for a torch.Generator: diffusers' randn_tensor is monkeypatched to read it."""

    def __init__(self, noises, i):
        self.noises, self.i = noises, i


def run_ours(sched, n, x, noises=None, step_kw=None, model=standin):
    sched.set_timesteps(n)
    ts = np.asarray(sched.timesteps).copy()
    xt = x.copy() * np.float32(sched.init_noise_sigma)
    outs, x0s = [], []
    for i, t in enumerate(sched.timesteps):
        xin = sched.scale_model_input(xt, t)
        eps = model(xin, t)
        kw = dict(step_kw or {})
        if noises is not None:
            kw["noise"] = noises[i]
        res = sched.step(eps, t, xt, **kw)
        xt = res.prev_sample
        outs.append(np.asarray(xt).copy())
        x0s.append(None if res.pred_original_sample is None else res.pred_original_sample.copy())
    return ts, outs, x0s


class CountingRng:
    """A numpy Generator that records every draw's (shape, dtype) in ``calls``."""

    def __init__(self, seed=0):
        self.calls, self.rng = [], np.random.default_rng(seed)

    def standard_normal(self, shape, dtype):
        self.calls.append((tuple(shape), np.dtype(dtype)))
        return self.rng.standard_normal(shape, np.float32).astype(dtype)  # float16 too


def patch_randn(monkeypatch):
    """Make diffusers' randn_tensor return the tensors the _Replay generator carries."""
    torch = need("torch")
    import diffusers.utils.torch_utils as tu

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        assert isinstance(generator, _Replay), "a step drew noise without our generator"
        a = generator.noises[generator.i]
        assert tuple(a.shape) == tuple(shape)
        return torch.from_numpy(a.copy()).to(dtype)

    import importlib
    import pkgutil

    import diffusers.schedulers as pkg

    # every scheduler module that imported randn_tensor by name (torch-only ones: not flax)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("scheduling_") and not info.name.endswith("_flax"):
            try:
                m = importlib.import_module(f"diffusers.schedulers.{info.name}")
            except ImportError:  # optional dependencies (torchsde, scipy, ...)
                continue
            if hasattr(m, "randn_tensor"):
                monkeypatch.setattr(m, "randn_tensor", fake)
    monkeypatch.setattr(tu, "randn_tensor", fake)


def run_pair(ref_name, ours_cls, cfg, n, *, noisy=False, monkeypatch=None, step_kw=None,
             ours_kw=None, shape=(2, 3, 4, 5), tol=TRAJ_TOL, x0_tol=None,
             model=standin):  # fmt: skip
    """Run both schedulers from ``cfg`` for ``n`` steps and compare every step."""
    x = start_sample(shape)
    noises = None
    if noisy:
        patch_randn(monkeypatch)
        rng = np.random.default_rng(123)
        noises = [rng.standard_normal(shape).astype(np.float32) for _ in range(3 * n + 8)]
    ref = ref_scheduler(ref_name, cfg)
    ours = ours_cls.from_config(cfg)
    ts_r, out_r, x0_r = run_ref(ref, n, x, noises, step_kw, model)
    ts_o, out_o, x0_o = run_ours(ours, n, x, noises, {**(step_kw or {}), **(ours_kw or {})}, model)
    assert ts_o.dtype.kind == ts_r.dtype.kind, (ts_o.dtype, ts_r.dtype)
    if ts_o.dtype.kind == "i":
        np.testing.assert_array_equal(ts_o, ts_r, err_msg="timesteps differ")
    else:  # fractional (Karras) timesteps: torch's float32 sqrt is not correctly rounded
        np.testing.assert_allclose(ts_o, ts_r, rtol=1e-6, err_msg="timesteps differ")
    assert len(out_o) == len(out_r)
    worst = 0.0
    for i, (a, b) in enumerate(zip(out_o, out_r)):
        assert a.dtype == b.dtype, f"step {i}: dtype {a.dtype} != {b.dtype}"
        err = rel_err(a, b)
        assert err <= tol, f"step {i} (t={ts_r[i]}): prev_sample rel. error {err:.2e} > {tol}"
        worst = max(worst, err)
        if x0_r[i] is not None:  # relative to the sample's scale (x_0 is tiny next to x_T)
            scale = max(np.abs(x0_r[i]).max(), np.abs(b).max())
            err0 = np.abs(x0_o[i].astype(np.float64) - x0_r[i]).max() / scale
            lim = x0_tol or X0_TOL
            assert err0 <= lim, f"step {i}: pred_original_sample error {err0:.2e} > {lim}"
    assert np.isfinite(out_o[-1]).all()
    return worst


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "linear", "num_train_timesteps": 37, "beta_end": 0.3},
        {"rescale_betas_zero_snr": True, "beta_schedule": "scaled_linear"},
        {"trained_betas": list(np.linspace(1e-4, 0.05, 50)), "num_train_timesteps": 50},
    ],
)
def test_tables_bitwise(cfg):
    """betas and alphas_cumprod equal diffusers' float32 tensors bit for bit."""
    ref = ref_scheduler("DDIMScheduler", cfg)
    ours = ms.DDIMScheduler.from_config(cfg)
    if cfg.get("rescale_betas_zero_snr"):  # goes through torch's float32 sqrt: a few ulp
        np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6)
        return
    np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())


def test_linspace_f32_matches_torch():
    torch = need("torch")
    for a, b, n in [(1e-4, 0.02, 1000), (-6, 6, 999), (0.3, 0.1, 7), (0, 1, 2), (5, 5, 1)]:
        ref = torch.linspace(a, b, n, dtype=torch.float32).numpy()
        np.testing.assert_array_equal(base.linspace_f32(a, b, n), ref)


def test_config_unknown_keys_noted(caplog, tmp_path):
    cfg = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "bogus_key": 3,
           "beta_schedule": "scaled_linear"}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="minisd.schedulers"):
        s = ms.DDIMScheduler.from_config(cfg)
    assert s.config.beta_schedule == "scaled_linear"
    assert "skip_prk_steps" in caplog.text and "bogus_key" in caplog.text
    assert "_class_name" not in caplog.text
    assert any(r.levelno == logging.WARNING and "bogus_key" in r.message for r in caplog.records)
    assert not hasattr(s.config, "bogus_key")
    # a path to scheduler_config.json, or its folder, works too
    import json

    (tmp_path / "scheduler_config.json").write_text(json.dumps(cfg))
    for p in (tmp_path, tmp_path / "scheduler_config.json", str(tmp_path)):
        assert ms.DDIMScheduler.from_config(p).config.beta_schedule == "scaled_linear"
    with pytest.raises(TypeError):
        s.config["beta_schedule"] = "linear"


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="beta_schedule"):
        ms.DDIMScheduler.from_config({"beta_schedule": "cubic"})
    with pytest.raises(ConfigError, match="timestep_spacing"):
        ms.DDIMScheduler.from_config({"timestep_spacing": "odd"}).set_timesteps(5)
    with pytest.raises(ConfigError, match="prediction_type"):
        ms.PNDMScheduler.from_config({"prediction_type": "sample"})
    with pytest.raises(ConfigError, match="scheduler_config.json"):
        ms.DDIMScheduler.from_config(tmp_path)
    (tmp_path / "scheduler_config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="scheduler_config.json"):
        ms.DDIMScheduler.from_config(tmp_path)


@pytest.mark.parametrize("name", ["DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler"])
@pytest.mark.parametrize(
    "bad, message",
    [
        ({"steps_offset": 1000}, "steps_offset=1000"),  # would index past alphas_cumprod
        ({"steps_offset": "1"}, "steps_offset='1'"),
        ({"num_train_timesteps": 0}, "num_train_timesteps=0"),
        ({"num_train_timesteps": "1000"}, "num_train_timesteps='1000'"),
        ({"beta_start": "0.1"}, "beta_start='0.1'"),
        ({"beta_end": 2.0}, r"beta_start / beta_end: .* in \[0, 1\)"),  # NaN images otherwise
        ({"trained_betas": [0.1] * 10}, "must be 1000 values"),
        ({"trained_betas": "abc"}, "trained_betas: expected a list of numbers"),
    ],
)
def test_config_values_checked(name, bad, message):
    with pytest.raises(ConfigError, match=message):
        getattr(ms, name).from_config(bad)


ALL = [
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "PLMSScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
    "LMSDiscreteScheduler", "UniPCMultistepScheduler",
]  # fmt: skip


@pytest.mark.parametrize("name", ALL)
def test_step_count_errors(name):
    s = getattr(ms, name).from_config({})
    x = start_sample()
    with pytest.raises(InputError, match="set_timesteps"):
        s.step(x, 999, x)
    with pytest.raises(InputError, match="num_inference_steps"):
        s.set_timesteps(0)
    with pytest.raises(InputError, match="num_inference_steps"):
        s.set_timesteps(1001)
    with pytest.raises(InputError, match="num_inference_steps"):
        s.set_timesteps(2.5)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_add_noise_and_velocity(name, dtype):
    torch = need("torch")
    cfg = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    ref = ref_scheduler(name, cfg)
    ours = getattr(ms, name).from_config(cfg)
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((5, 4, 3, 3)).astype(dtype)
    eps = rng.standard_normal((5, 4, 3, 3)).astype(dtype)
    t = np.array([0, 1, 500, 998, 999], dtype=np.int64)
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t))
    np.testing.assert_array_equal(ours.add_noise(x0, eps, t), want.numpy())
    if hasattr(ref, "get_velocity"):
        want = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t))
        np.testing.assert_array_equal(ours.get_velocity(x0, eps, t), want.numpy())


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_draw_noise_draws_torch_s_numbers_in_every_dtype(dtype):
    """A step's noise from minisd.rng is what diffusers' randn_tensor(shape, dtype=...) draws
    from a seeded torch.Generator, float16 included (torch's float16 normals are not its
    float32 ones rounded once 16 or more are drawn)."""
    torch = need("torch")
    from minisd.rng import TorchGenerator
    from minisd.schedulers.base import draw_noise

    like = np.zeros((2, 3, 4, 5), dtype)
    got = draw_noise(like, rng=TorchGenerator(3))
    want = torch.randn(like.shape, dtype=getattr(torch, dtype),
                       generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert got.dtype == like.dtype
    np.testing.assert_array_equal(got, want.numpy())
    assert draw_noise(like, rng=np.random.default_rng(0)).dtype == like.dtype  # numpy: cast
