"""Scheduler configs shared between classes, as diffusers reads them.

A checkpoint ships one scheduler_config.json (SD1.5: PNDM) and every other sampler is built from
it (``Cls.from_config(pipe.scheduler.config)``), so keys of one class reach another. These tests
pin diffusers' rules for that: in-memory configs' ``_use_default_values``, options another class
ignores, options it maps (a UniPC config into DPM-Solver), and the Karras bounds Heun reads.
"""

import json

import numpy as np
import pytest
from refharness import need, rel_err
from test_schedulers_base import run_ours, run_ref, start_sample

import minisd.schedulers as ms
from minisd.errors import ConfigError

# SD1.5's scheduler_config.json as published (no timestep_spacing key)
SD15_FILE = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}  # fmt: skip
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.mark.parametrize(
    "name", ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"]
)
def test_config_of_a_loaded_diffusers_scheduler(tmp_path, name):
    """A loaded scheduler's config lists in ``_use_default_values`` the keys its file did not
    set; diffusers' from_config drops them, so PNDM's default "leading" spacing does not reach
    classes whose default is "linspace"."""
    diffusers = need("diffusers")
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD15_FILE))
    pndm = diffusers.PNDMScheduler.from_pretrained(tmp_path)
    assert "timestep_spacing" in pndm.config["_use_default_values"]
    ref = getattr(diffusers, name).from_config(pndm.config)
    ref.set_timesteps(10)
    for source in (pndm.config, pndm):  # the config, or the scheduler itself
        ours = getattr(ms, name).from_config(source)
        ours.set_timesteps(10)
        assert ours.config.timestep_spacing == ref.config.timestep_spacing
        np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6)


def test_heun_karras_reads_sigma_bounds():
    diffusers = need("diffusers")
    cfg = {**SD, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}
    x = start_sample()
    _, expect, _ = run_ref(diffusers.HeunDiscreteScheduler.from_config(cfg), 5, x)
    ours = ms.HeunDiscreteScheduler.from_config(cfg)
    _, got, _ = run_ours(ours, 5, x)
    assert ours.sigmas[0] == pytest.approx(10.0, rel=1e-6)
    assert max(rel_err(g, e) for g, e in zip(got, expect)) <= 1e-6


@pytest.mark.parametrize("solver_type", ["bh1", "bh2", "logrho"])
def test_dpm_solver_from_a_unipc_config(solver_type):
    """DPM-Solver takes "midpoint" for UniPC's solver types, as diffusers does."""
    diffusers = need("diffusers")
    cfg = {**SD, "solver_type": solver_type}
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    ours = ms.DPMSolverMultistepScheduler.from_config(cfg)
    assert ours.config.solver_type == ref.config.solver_type == "midpoint"
    x = start_sample()
    _, expect, _ = run_ref(ref, 6, x)
    _, got, _ = run_ours(ours, 6, x)
    assert rel_err(got[-1], expect[-1]) <= 1e-6


def test_unsupported_options_only_refused_where_they_belong():
    """use_lu_lambdas is a DPM-Solver option minisd does not implement: refused there, ignored
    by classes that have no such option (a DPM config builds a DDIM scheduler fine)."""
    flags = {"use_lu_lambdas": True}
    with pytest.raises(ConfigError, match="use_lu_lambdas"):
        ms.DPMSolverMultistepScheduler.from_config(flags)
    for name in ("DDIMScheduler", "PNDMScheduler", "EulerAncestralDiscreteScheduler"):
        assert getattr(ms, name).from_config(flags).config.num_train_timesteps == 1000
    with pytest.raises(ConfigError, match="use_exponential_sigmas"):  # one spacing at most
        ms.EulerDiscreteScheduler.from_config({"use_exponential_sigmas": True,
                                               "use_karras_sigmas": True})  # fmt: skip
    with pytest.raises(ConfigError, match="shift_terminal"):
        ms.UniPCMultistepScheduler.from_config({"shift_terminal": 0.5})


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_multistep_add_noise_lookup(name):
    """Without a begin index, add_noise finds t as step does: the second of a repeated timestep
    (Karras with 100 steps repeats some), the last step for one not in the schedule."""
    diffusers, torch = need("diffusers"), need("torch")
    cfg = {**SD, "use_karras_sigmas": True}
    ref, ours = getattr(diffusers, name).from_config(cfg), getattr(ms, name).from_config(cfg)
    ref.set_timesteps(100)
    ours.set_timesteps(100)
    values, counts = np.unique(ours.timesteps, return_counts=True)
    repeated = values[counts > 1]
    absent = next(t for t in range(1000) if t not in set(ours.timesteps.tolist()))
    assert len(repeated) > 0
    x0, eps = start_sample(seed=1), start_sample(seed=2)
    for t in [int(repeated[0]), int(ours.timesteps[0]), absent]:
        ts = np.asarray([t, t])
        expect = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(ts))
        got = ours.add_noise(x0, eps, ts)
        assert rel_err(got, expect.numpy()) <= 1e-6, t
