"""DPM-Solver(++) multistep and UniPC: trajectories against diffusers; factory and loop."""

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
    CountingRng,
    ref_scheduler,
    run_pair,
    standin,
    start_sample,
)

import minisd.schedulers as ms
from minisd.errors import ConfigError, InputError

# Solver variants; the eps-space ones ("dpmsolver", predict_x0=False, bh1) need a nonzero final
# sigma: with sigma_last = 0 their last step is 0 * inf = NaN in diffusers too.
DPM_VARIANTS = {
    "2m": {},
    "2m_karras": {"use_karras_sigmas": True},
    "3m_heun": {"solver_order": 3, "solver_type": "heun"},
    "3m_nolof": {"solver_order": 3, "lower_order_final": False},
    "eps_space": {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    "eps_space_3h": {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
                     "solver_order": 3, "solver_type": "heun"},
}  # fmt: skip
UNIPC_VARIANTS = {
    "bh2": {},
    "bh2_karras": {"use_karras_sigmas": True},
    "bh2_3": {"solver_order": 3},
    "bh1": {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    "noise_pred": {"predict_x0": False, "final_sigmas_type": "sigma_min", "solver_order": 3},
    "no_corrector": {"disable_corrector": [0, 1, 2]},
}


# Multistep solvers of order 3 combine three outputs with weights ~ 1/(r0 (r0 + r1)), which
# amplifies the 1-ulp coefficient differences a little beyond TRAJ_TOL (measured <= 1.3e-6).
MULTI_TOL = 2e-6
EPS_SPACE = ("eps_space", "eps_space_3h", "noise_pred")


def cases(variants, default):
    """The default variant over everything; the others on fewer step counts. Noise-space
    variants only with epsilon prediction: converting a v / x_0 output to eps divides by
    sigma_t ~ 1e-2 at the end and multiplies by ~1e2 at t = 999, so a 1-ulp input change
    already moves diffusers' own result by ~1e-5."""
    out = []
    for b, s, p, v, n in itertools.product(BETAS, SPACINGS, PREDS, variants, [1, 2, 7, 25]):
        if v == default and p != "epsilon" and n not in (2, 25):
            continue
        if v != default and (n not in (7, 25) or b == "cos" or (p == "sample")):
            continue
        if v in EPS_SPACE and p != "epsilon":
            continue
        if b == "cos" and "karras" in v:
            continue  # ill-conditioned at sigma ~ 2e4 (see test_schedulers_sigma.grid)
        out.append((b, s, p, v, n))
    return out


@pytest.mark.parametrize("beta,spacing,pred,variant,n", cases(DPM_VARIANTS, "2m"))
def test_dpm_solver(beta, spacing, pred, variant, n):
    cfg = {**BETAS[beta], "timestep_spacing": spacing, "prediction_type": pred,
           **DPM_VARIANTS[variant]}  # fmt: skip
    tol = COS_TOL if beta == "cos" else MULTI_TOL
    run_pair("DPMSolverMultistepScheduler", ms.DPMSolverMultistepScheduler, cfg, n, tol=tol)


@pytest.mark.parametrize("beta,spacing,pred,variant,n", cases(UNIPC_VARIANTS, "bh2"))
def test_unipc(beta, spacing, pred, variant, n):
    cfg = {**BETAS[beta], "timestep_spacing": spacing, "prediction_type": pred,
           **UNIPC_VARIANTS[variant]}  # fmt: skip
    tol = COS_TOL if beta == "cos" else MULTI_TOL
    run_pair("UniPCMultistepScheduler", ms.UniPCMultistepScheduler, cfg, n, tol=tol)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_1000_steps(name):
    cfg = {**BETAS["sd"], "timestep_spacing": "trailing"}  # leading: 1000 // 1001 = 0
    run_pair(name, getattr(ms, name), cfg, 1000, tol=LONG_TOL)


def test_dpm_thresholding_and_lambda_clip():
    cfg = {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1,
           "thresholding": True, "sample_max_value": 1.2, "prediction_type": "sample"}  # fmt: skip
    run_pair("DPMSolverMultistepScheduler", ms.DPMSolverMultistepScheduler, cfg, 12, tol=COS_TOL)


def test_dpm_add_noise():
    torch = need("torch")
    ref = ref_scheduler("DPMSolverMultistepScheduler", BETAS["sd"])
    ours = ms.DPMSolverMultistepScheduler.from_config(BETAS["sd"])
    ref.set_timesteps(20)
    ours.set_timesteps(20)
    x, eps = start_sample(seed=3), start_sample(seed=4)
    t = ours.timesteps[[3, 11]]
    want = ref.add_noise(torch.from_numpy(x), torch.from_numpy(eps), torch.from_numpy(t))
    np.testing.assert_allclose(ours.add_noise(x, eps, t), want.numpy(), rtol=1e-6, atol=1e-6)


# The SDE variants ("DPM++ 2M SDE"): one float32 noise tensor per step, replayed into diffusers'
# randn_tensor so both draw the same numbers at the same steps.
SDE_VARIANTS = {
    "sde_2m": {"algorithm_type": "sde-dpmsolver++"},
    "sde_2m_karras": {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    "sde_2m_heun": {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
    "sde_3m": {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    "sde_3m_nolof": {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                     "lower_order_final": False},
    "sde_eps": {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"},
    "sde_eps_heun": {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min",
                     "solver_type": "heun"},
}  # fmt: skip


def sde_cases():
    out = []
    for b, s, p, v, n in itertools.product(BETAS, SPACINGS, PREDS, SDE_VARIANTS, [1, 2, 7, 25]):
        if (v != "sde_2m" or p != "epsilon") and (n not in (7, 25) or s == "leading"):
            continue
        if (v.startswith("sde_eps") and p != "epsilon") or (b == "cos" and "karras" in v):
            continue  # see cases()
        out.append((b, s, p, v, n))
    return out


@pytest.mark.parametrize("beta,spacing,pred,variant,n", sde_cases())
def test_dpm_solver_sde_same_noise(monkeypatch, beta, spacing, pred, variant, n):
    cfg = {**BETAS[beta], "timestep_spacing": spacing, "prediction_type": pred,
           **SDE_VARIANTS[variant]}  # fmt: skip
    tol = COS_TOL if beta == "cos" else MULTI_TOL
    run_pair("DPMSolverMultistepScheduler", ms.DPMSolverMultistepScheduler, cfg, n,
             noisy=True, monkeypatch=monkeypatch, tol=tol)  # fmt: skip


def test_dpm_solver_sde_long(monkeypatch):
    cfg = {**BETAS["sd"], "timestep_spacing": "trailing", "algorithm_type": "sde-dpmsolver++"}
    run_pair("DPMSolverMultistepScheduler", ms.DPMSolverMultistepScheduler, cfg, 300,
             noisy=True, monkeypatch=monkeypatch, tol=LONG_TOL)  # fmt: skip


def test_dpm_solver_sde_draws_float32_every_step():
    """Noise is drawn on every step (the last too), float32 whatever the sample dtype, from the
    rng passed to step; an explicit ``noise=`` is used instead of drawing."""

    s = ms.DPMSolverMultistepScheduler.from_config({"algorithm_type": "sde-dpmsolver++"})
    rng = CountingRng()
    x = start_sample((1, 2, 3, 3)).astype(np.float16)
    out = ms.sample_loop(s, lambda z, t: z * 0.1, x, num_inference_steps=4, rng=rng)
    assert rng.calls == [((1, 2, 3, 3), np.dtype(np.float32))] * 4
    assert out.dtype == np.float16 and np.isfinite(out).all()
    s.set_timesteps(3)
    t, y = s.timesteps[0], start_sample((1, 2, 3, 3))
    a = s.step(y * 0.1, t, y, noise=np.zeros_like(y)).prev_sample
    s.set_timesteps(3)
    b = s.step(y * 0.1, t, y, noise=np.ones_like(y)).prev_sample
    assert np.abs(a - b).min() > 0.1  # the noise enters with weight sigma_t sqrt(1 - e^{-2h})


@pytest.mark.parametrize(
    "name",
    ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
     "DPMSolverSinglestepScheduler"],
)  # fmt: skip
def test_repeated_first_timestep_is_refused_before_any_step(name):
    """Karras sigmas above the training table's largest repeat t = 999; diffusers then takes the
    first step as the second and fails with an IndexError after the whole run. minisd refuses
    at the first step; with fewer steps (no repeat) the same config runs."""
    cfg = {**BETAS["sd"], "use_karras_sigmas": True, "sigma_max": 30.0}
    s = getattr(ms, name).from_config(cfg)
    with pytest.raises(InputError, match="starts with timestep 999 twice"):
        ms.sample_loop(s, standin, start_sample(), num_inference_steps=8)  # [999, 999, 879..
    out = ms.sample_loop(s, standin, start_sample(), num_inference_steps=5)  # [999, 915, ..
    assert np.isfinite(out).all()


def test_unsupported_options_are_config_errors():
    with pytest.raises(ConfigError, match="algorithm_type='dpmsolver\\+\\+\\+'"):
        ms.DPMSolverMultistepScheduler.from_config({"algorithm_type": "dpmsolver+++"})
    with pytest.raises(ConfigError, match="solver_order=3 with algorithm_type='sde-dpmsolver'"):
        ms.DPMSolverMultistepScheduler.from_config(
            {"algorithm_type": "sde-dpmsolver", "solver_order": 3, "final_sigmas_type": "sigma_min"}
        )
    with pytest.raises(ConfigError, match="final_sigmas_type='zero'.*'sde-dpmsolver'"):
        ms.DPMSolverMultistepScheduler.from_config({"algorithm_type": "sde-dpmsolver"})
    with pytest.raises(ConfigError, match="use_flow_sigmas"):
        ms.UniPCMultistepScheduler.from_config({"use_flow_sigmas": True})
    with pytest.raises(ConfigError, match="solver_p"):
        ms.UniPCMultistepScheduler.from_config({"solver_p": object()})


# ----------------------------------------------------------------------------- factory, loop

SD15 = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}  # fmt: skip

NAME_TO_REF = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {}),
    "dpmpp_3s": ("DPMSolverSinglestepScheduler", {"solver_order": 3}),
    "deis": ("DEISMultistepScheduler", {}),
}


@pytest.mark.parametrize("name", sorted(NAME_TO_REF))
def test_get_scheduler_matches_from_config(name):
    """get_scheduler(name, SD's scheduler_config) == diffusers' Cls.from_config(config)."""
    cls_name, extra = NAME_TO_REF[name]
    ours = ms.get_scheduler(name, SD15)
    assert type(ours).__name__ == cls_name
    ref = ref_scheduler(cls_name, {**SD15, **extra})
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    np.testing.assert_allclose(np.asarray(ours.timesteps, np.float64),
                               ref.timesteps.numpy().astype(np.float64), rtol=1e-6)  # fmt: skip
    for key in ("beta_schedule", "steps_offset", "prediction_type", "timestep_spacing"):
        if key in ours.config:
            assert ours.config[key] == ref.config[key], key


def test_get_scheduler_other_names_and_errors():
    assert isinstance(ms.get_scheduler("plms", SD15), ms.PLMSScheduler)
    assert isinstance(ms.get_scheduler("euler_a"), ms.EulerAncestralDiscreteScheduler)
    s = ms.get_scheduler("dpmpp_2m_karras", SD15)
    assert s.config.use_karras_sigmas and s.config.solver_order == 2
    assert s.config.algorithm_type == "dpmsolver++"
    ddim_cfg = {k: v for k, v in SD15.items() if k != "skip_prk_steps"}  # SD2 ships DDIM's
    assert ms.get_scheduler("pndm", ddim_cfg).config.skip_prk_steps is True
    with pytest.raises(InputError, match="scheduler='k_lms'"):
        ms.get_scheduler("k_lms", SD15)


@pytest.mark.parametrize("name", sorted(ms.NAMES))
def test_sample_loop_runs_every_scheduler(name, xp):
    """The one loop drives every scheduler; on cupy too (where a GPU exists). EDM samplers
    take EDM configs only (test_schedulers_edm): their defaults here."""
    cfg = None if ms.NAMES[name][0].startswith("EDM") else SD15
    s = ms.get_scheduler(name, cfg)
    x = start_sample((1, 2, 4, 4))
    seen = []

    def model(x_in, t):
        return xp.asarray(standin(np.asarray(x_in.get() if hasattr(x_in, "get") else x_in), t))

    rng = np.random.default_rng(0)
    out = ms.sample_loop(s, model, xp.asarray(x), num_inference_steps=6, rng=rng,
                         callback=lambda i, t, z: seen.append(i))  # fmt: skip
    assert out.shape == x.shape and out.dtype == np.float32
    assert bool(xp.isfinite(out).all())
    assert seen == list(range(len(s.timesteps)))
    two_calls = name == "heun" or name.startswith(("dpm2", "dpmpp_sde"))  # 2n - 1 calls
    assert len(s.timesteps) == (11 if two_calls else {"plms": 7, "pndm": 7}.get(name, 6))
    if xp is not np:  # cupy == numpy (the same draws: noise is drawn on the host)
        ref = ms.sample_loop(ms.get_scheduler(name, cfg), standin, x, num_inference_steps=6,
                             rng=np.random.default_rng(0))  # fmt: skip
        assert np.abs(out.get() - ref).max() <= 1e-5 * np.abs(ref).max()
