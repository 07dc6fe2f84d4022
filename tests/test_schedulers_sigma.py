"""Euler, Euler-ancestral, Heun and LMS (sigma parametrization): trajectories vs diffusers."""

import itertools

import numpy as np
import pytest
from refharness import need
from test_schedulers_base import (
    BETAS,
    COS_TOL,
    LONG_TOL,
    PREDS,
    SPACINGS,
    TRAJ_TOL,
    ref_scheduler,
    run_pair,
    start_sample,
)

import minisd.schedulers as ms

# LMS: diffusers integrates the Lagrange weights with scipy's quad on float32 node values
# (~1e-7 relative off the exact integral we use); that shifts sample-prediction runs by <2e-6.
LMS_TOL = 3e-6


def grid(preds, karras=(False, True), ns=(1, 2, 7, 25), other_ns=(2, 25)):
    """Every spacing x beta schedule x prediction type; all step counts for epsilon, a subset
    for the others. Karras sigmas on the linear and SD schedules only: on the cosine schedule
    they start at sigma_max ~ 2e4, where a 1-ulp change of the input already moves diffusers'
    own output by >1e-5 (ill-conditioned, not a parity question)."""
    return [
        (b, s, p, k, n)
        for b, s, p, k, n in itertools.product(BETAS, SPACINGS, preds, karras, ns)
        if (p == "epsilon" or n in other_ns) and not (k and b == "cos")
    ]


def cfg_of(beta, spacing, pred, karras):
    cfg = {**BETAS[beta], "timestep_spacing": spacing, "prediction_type": pred}
    if karras:
        cfg["use_karras_sigmas"] = True
    return cfg


@pytest.mark.parametrize("beta,spacing,pred,karras,n", grid(PREDS))
def test_euler(beta, spacing, pred, karras, n):
    cfg = cfg_of(beta, spacing, pred, karras)
    tol = COS_TOL if beta == "cos" else TRAJ_TOL
    run_pair("EulerDiscreteScheduler", ms.EulerDiscreteScheduler, cfg, n, tol=tol)


@pytest.mark.parametrize("beta,spacing,pred,karras,n", grid(PREDS))
def test_heun(beta, spacing, pred, karras, n):
    cfg = cfg_of(beta, spacing, pred, karras)
    tol = COS_TOL if beta == "cos" else TRAJ_TOL
    run_pair("HeunDiscreteScheduler", ms.HeunDiscreteScheduler, cfg, n, tol=tol)


@pytest.mark.parametrize("beta,spacing,pred,karras,n", grid(PREDS, ns=(1, 7, 25), other_ns=(7,)))
def test_lms(beta, spacing, pred, karras, n):
    cfg = cfg_of(beta, spacing, pred, karras)
    tol = max(COS_TOL, LMS_TOL) if beta == "cos" else LMS_TOL
    run_pair("LMSDiscreteScheduler", ms.LMSDiscreteScheduler, cfg, n, tol=tol)


@pytest.mark.parametrize(
    "beta,spacing,pred,karras,n", grid(["epsilon", "v_prediction"], karras=(False,))
)
def test_euler_ancestral_same_noise(monkeypatch, beta, spacing, pred, karras, n):
    cfg = cfg_of(beta, spacing, pred, karras)
    run_pair("EulerAncestralDiscreteScheduler", ms.EulerAncestralDiscreteScheduler, cfg, n,
             noisy=True, monkeypatch=monkeypatch)  # fmt: skip


@pytest.mark.parametrize(
    "name,cls_name,kw",
    [
        ("EulerDiscreteScheduler", "EulerDiscreteScheduler", {}),
        ("HeunDiscreteScheduler", "HeunDiscreteScheduler", {}),
        ("LMSDiscreteScheduler", "LMSDiscreteScheduler", {"tol": LMS_TOL}),
    ],
)
def test_1000_steps(name, cls_name, kw):
    cfg = {**BETAS["sd"], "timestep_spacing": "leading", "steps_offset": 0}
    kw = {"tol": LONG_TOL, **kw}
    n = {"EulerDiscreteScheduler": 1000, "HeunDiscreteScheduler": 500}.get(name, 200)
    run_pair(name, getattr(ms, cls_name), cfg, n, **kw)  # LMS: diffusers' quad is slow


def test_euler_a_1000_steps(monkeypatch):
    run_pair("EulerAncestralDiscreteScheduler", ms.EulerAncestralDiscreteScheduler,
             BETAS["sd"], 1000, noisy=True, monkeypatch=monkeypatch, tol=LONG_TOL)  # fmt: skip


@pytest.mark.parametrize("extra", [{"s_churn": 0.5, "s_noise": 1.01}, {"s_churn": 80.0}])
def test_euler_churn_same_noise(monkeypatch, extra):
    run_pair("EulerDiscreteScheduler", ms.EulerDiscreteScheduler, BETAS["sd"], 10, noisy=True,
             monkeypatch=monkeypatch, step_kw=extra)  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [
        {"final_sigmas_type": "sigma_min"},
        {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    ],
)
def test_euler_options(extra):
    run_pair("EulerDiscreteScheduler", ms.EulerDiscreteScheduler, {**BETAS["sd"], **extra}, 9)


def test_heun_clip_sample():
    cfg = {
        **BETAS["sd"],
        "clip_sample": True,
        "clip_sample_range": 0.8,
        "prediction_type": "sample",
    }
    run_pair("HeunDiscreteScheduler", ms.HeunDiscreteScheduler, cfg, 7)


NAMES4 = ["EulerDiscreteScheduler", "HeunDiscreteScheduler",
          "LMSDiscreteScheduler", "EulerAncestralDiscreteScheduler"]  # fmt: skip


@pytest.mark.parametrize("name", NAMES4)
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_init_sigma_scale_and_add_noise(name, spacing):
    """init_noise_sigma, scale_model_input and add_noise (img2img: begin_index) as diffusers."""
    torch = need("torch")
    cfg = {**BETAS["sd"], "timestep_spacing": spacing}
    ref, ours = ref_scheduler(name, cfg), getattr(ms, name).from_config(cfg)
    ref.set_timesteps(20)
    ours.set_timesteps(20)
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    assert np.float32(ours.init_noise_sigma) == np.float32(ref.init_noise_sigma)
    x, eps = start_sample(seed=1), start_sample(seed=2)
    t = np.repeat(ours.timesteps[4:5], 2)
    want = ref.add_noise(torch.from_numpy(x), torch.from_numpy(eps), torch.from_numpy(t))
    np.testing.assert_array_equal(ours.add_noise(x, eps, t), want.numpy())
    ref.set_begin_index(6)
    ours.set_begin_index(6)
    want = ref.add_noise(torch.from_numpy(x), torch.from_numpy(eps), torch.from_numpy(t))
    np.testing.assert_array_equal(ours.add_noise(x, eps, t), want.numpy())
    got = ours.scale_model_input(x, ours.timesteps[6])
    want = ref.scale_model_input(torch.from_numpy(x), ref.timesteps[6]).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-7)
