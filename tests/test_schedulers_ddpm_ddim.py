"""DDPM and DDIM: whole trajectories against diffusers (same config dicts, same injected noise)."""

import itertools

import numpy as np
import pytest
from refharness import need
from test_schedulers_base import LONG_TOL, PREDS, SPACINGS, run_pair, standin

import minisd.schedulers as ms
from minisd.rng import TorchGenerator

BETAS = {
    "linear": {},
    "sd": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
           "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False},
    "cos": {"beta_schedule": "squaredcos_cap_v2"},
}  # fmt: skip
GRID = list(itertools.product(BETAS, SPACINGS, PREDS, [1, 2, 7, 25]))


@pytest.mark.parametrize("beta,spacing,pred,n", GRID)
def test_ddim_trajectory(beta, spacing, pred, n):
    cfg = {**BETAS[beta], "timestep_spacing": spacing, "prediction_type": pred}
    run_pair("DDIMScheduler", ms.DDIMScheduler, cfg, n)


@pytest.mark.parametrize("spacing,n", [("leading", 50), ("trailing", 1000), ("linspace", 1000)])
def test_ddim_long(spacing, n):
    cfg = {**BETAS["sd"], "timestep_spacing": spacing, "steps_offset": 0}
    run_pair("DDIMScheduler", ms.DDIMScheduler, cfg, n, tol=LONG_TOL)


@pytest.mark.parametrize(
    "extra",
    [
        {"thresholding": True, "sample_max_value": 1.5},
        {"clip_sample": True, "clip_sample_range": 0.5},
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    ],
)
def test_ddim_options(extra):
    cfg = {**BETAS["sd"], "prediction_type": "v_prediction", **extra}
    run_pair("DDIMScheduler", ms.DDIMScheduler, cfg, 10)


@pytest.mark.parametrize("eta,n", [(1.0, 7), (0.5, 25), (0.3, 1)])
def test_ddim_eta_same_noise(monkeypatch, eta, n):
    run_pair("DDIMScheduler", ms.DDIMScheduler, BETAS["sd"], n, noisy=True,
             monkeypatch=monkeypatch, step_kw={"eta": eta})  # fmt: skip


VARIANCES = ["fixed_small", "fixed_small_log", "fixed_large"]


@pytest.mark.parametrize(
    "beta,spacing,pred,var,n",
    [(b, s, p, v, n) for b, s, p, v, n in itertools.product(BETAS, SPACINGS, PREDS, VARIANCES,
                                                             [1, 2, 7, 25])
     if (n in (1, 25)) or (p == "epsilon")],
)  # fmt: skip
def test_ddpm_trajectory_same_noise(monkeypatch, beta, spacing, pred, var, n):
    cfg = {**BETAS[beta], "timestep_spacing": spacing, "prediction_type": pred,
           "variance_type": var}  # fmt: skip
    run_pair("DDPMScheduler", ms.DDPMScheduler, cfg, n, noisy=True, monkeypatch=monkeypatch)


def learned_model(x, t):
    """A 2C-channel output (eps, variance interpolation v in [-1, 1]) like DDPM cat-256's UNet."""
    return np.concatenate([standin(x, t), np.tanh(x)], axis=1)


@pytest.mark.parametrize("var", ["learned_range", "learned"])
def test_ddpm_learned_variance(monkeypatch, var):
    """google/ddpm-cat-256's scheduler: linear betas, learned_range variance, clip_sample."""
    cfg = {"variance_type": var, "clip_sample": True, "timestep_spacing": "leading"}
    if var == "learned":  # diffusers returns the raw channel as variance; keep it positive
        model = lambda x, t: np.concatenate([standin(x, t), 0.01 + 0 * x], axis=1)  # noqa: E731
    else:
        model = learned_model
    run_pair("DDPMScheduler", ms.DDPMScheduler, cfg, 25, noisy=True, monkeypatch=monkeypatch,
             model=model)  # fmt: skip


def test_ddpm_1000_steps(monkeypatch):
    run_pair("DDPMScheduler", ms.DDPMScheduler, {"timestep_spacing": "leading"}, 1000,
             noisy=True, monkeypatch=monkeypatch, tol=LONG_TOL)  # fmt: skip


def test_ddpm_fixed_large_log_is_finite():
    """diffusers takes the sqrt of a log variance here (NaN); ours uses exp(log var / 2)."""
    s = ms.DDPMScheduler.from_config({"variance_type": "fixed_large_log"})
    s.set_timesteps(5)
    x = np.ones((1, 2, 2, 2), np.float32)
    out = s.step(x * 0, s.timesteps[0], x, noise=np.ones_like(x)).prev_sample
    beta = 1 - s.alphas_cumprod[s.timesteps[0]] / s.alphas_cumprod[s.timesteps[1]]
    assert np.isfinite(out).all()
    # with eps = 0 and clip at 1: x_0 = x / sqrt(abar) clipped to 1, mean + sqrt(beta) * 1
    mean = s.step(x * 0, s.timesteps[0], x, noise=np.zeros_like(x)).prev_sample
    np.testing.assert_allclose(out - mean, np.sqrt(beta), rtol=1e-6)


def test_torch_compatible_rng_whole_trajectory():
    """With minisd.rng, seeds give diffusers' exact noise."""
    torch = need("torch")
    from test_schedulers_base import ref_scheduler, start_sample

    for name, step_kw in [("DDPMScheduler", {}), ("DDIMScheduler", {"eta": 1.0}),
                          ("EulerAncestralDiscreteScheduler", {})]:  # fmt: skip
        ref, ours = ref_scheduler(name, {}), getattr(ms, name).from_config({})
        ref.set_timesteps(10)
        ours.set_timesteps(10)
        x = start_sample()
        xr, xo = torch.from_numpy(x) * ref.init_noise_sigma, x * np.float32(ours.init_noise_sigma)
        g, rng = torch.Generator().manual_seed(7), TorchGenerator(7)
        for t_r, t_o in zip(ref.timesteps, ours.timesteps):
            e = standin(ref.scale_model_input(xr, t_r).numpy(), t_r.item())
            xr = ref.step(torch.from_numpy(e), t_r, xr, generator=g, **step_kw).prev_sample
            e = standin(ours.scale_model_input(xo, t_o), t_o)
            xo = ours.step(e, t_o, xo, rng=rng, **step_kw).prev_sample
        np.testing.assert_allclose(xo, xr.numpy(), rtol=0, atol=1e-5 * np.abs(xo).max())
