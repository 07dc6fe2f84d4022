"""DEIS multistep: trajectories against diffusers, options and errors, add_noise, the loop."""

import itertools
import logging

import numpy as np
import pytest
from refharness import need, rel_err
from test_schedulers_base import (
    BETAS,
    COS_TOL,
    LONG_TOL,
    PREDS,
    SPACINGS,
    TRAJ_TOL,
    ref_scheduler,
    run_ours,
    run_pair,
    run_ref,
    standin,
    start_sample,
)
from test_schedulers_dpm_unipc import MULTI_TOL

from minisd.errors import ConfigError, InputError
from minisd.schedulers import sample_loop
from minisd.schedulers.deis import DEISMultistepScheduler

REF = "DEISMultistepScheduler"
VARIANTS = {
    "2": {},  # diffusers' default: solver_order=2, lower_order_final=True
    "1": {"solver_order": 1},
    "3": {"solver_order": 3},
    "3_nolof": {"solver_order": 3, "lower_order_final": False},
    "2_karras": {"use_karras_sigmas": True},
    "3_karras": {"solver_order": 3, "use_karras_sigmas": True},  # 25 steps: a 3rd-order last step
}

# Orders 1-2 agree to TRAJ_TOL (measured <= 4.2e-7). Third-order weights are differences of
# antiderivatives over (log-rho gap)^2, which amplifies 1-ulp rho differences (measured
# <= 8.1e-7): MULTI_TOL, as DPM-Solver / UniPC of order 3.
# 1000 steps of order 2: each weight F(rho_t) - F(rho_s) is 1e4-6e4 times smaller than the
# antiderivatives it cancels (~1/h^2, h ~ 5e-3 the log-rho step), so a 1-ulp rho difference
# moves it by far more than an ulp; measured 5.7e-6 (and diffusers' own float32 result is
# 7.7e-5 from its float64 evaluation).
DEIS_LONG_TOL = 1.5e-5


def cases():
    """The default variant over the whole grid (non-epsilon outputs on 2 and 25 steps); the
    order variants on linear / SD betas (cosine too for epsilon), 7 (lower_order_final acts
    below 15 steps) and 25 steps; Karras (which ignores the spacing) on 1, 7 and 25 steps."""
    out = []
    for b, s, p, n in itertools.product(BETAS, SPACINGS, PREDS, [1, 2, 7, 25]):
        if p == "epsilon" or n in (2, 25):
            out.append((b, s, p, "2", n))
    for v, b, s, p, n in itertools.product(
        ["1", "3", "3_nolof"], BETAS, SPACINGS, ["epsilon", "v_prediction"], [7, 25]
    ):
        if b != "cos" or p == "epsilon":
            out.append((b, s, p, v, n))
    for v, b, p, n in itertools.product(
        ["2_karras", "3_karras"], ["linear", "sd"], ["epsilon", "v_prediction"], [1, 7, 25]
    ):
        out.append((b, "leading", p, v, n))
    return out


def float64_ref(cfg, n, x):
    """diffusers' DEIS evaluated in float64 on the same (float32) sigmas: the exact solver."""
    ref = ref_scheduler(REF, cfg)
    set_timesteps = ref.set_timesteps

    def set_timesteps_f64(num, *a, **k):
        set_timesteps(num, *a, **k)
        ref.sigmas = ref.sigmas.double()

    ref.set_timesteps = set_timesteps_f64
    return run_ref(ref, n, x.astype(np.float64))[1]


def conditioned_tol(cfg, n, base):
    """max(base, 4 x how far diffusers' own float32 trajectory is from its float64 one).

    DEIS integrates eps: a v / x_0 output converted to eps = (x - alpha x_0) / sigma and
    integrated from t = 999 cancels terms of size ~ |x| / alpha_999 (1/alpha: ~15 for SD betas,
    ~160 linear, ~2e4 cosine), so 1-ulp coefficient differences move diffusers' own result by
    up to 3e-2 (cosine). Ours is then held to the accuracy diffusers itself reaches
    (measured ratio <= 2.1)."""
    x = start_sample()
    ref32 = run_ref(ref_scheduler(REF, cfg), n, x)[1]
    spread = max(rel_err(a, b) for a, b in zip(ref32, float64_ref(cfg, n, x)))
    return max(base, 4 * spread)


@pytest.mark.parametrize("beta,spacing,pred,variant,n", cases())
def test_deis(beta, spacing, pred, variant, n):
    cfg = {**BETAS[beta], "timestep_spacing": spacing, "prediction_type": pred,
           **VARIANTS[variant]}  # fmt: skip
    tol = COS_TOL if beta == "cos" else MULTI_TOL if variant.startswith("3") else TRAJ_TOL
    if pred != "epsilon":
        tol = conditioned_tol(cfg, n, tol)
    run_pair(REF, DEISMultistepScheduler, cfg, n, tol=tol)


def test_1000_steps():
    cfg = {**BETAS["sd"], "timestep_spacing": "trailing"}  # linspace / leading repeat steps
    run_pair(REF, DEISMultistepScheduler, cfg, 1000, tol=DEIS_LONG_TOL)


def test_long_run_third_order():
    """Third order over many small steps is ill-conditioned in float32 (weights ~ 1/h^2 that
    cancel): diffusers' own result drifts from its float64 evaluation by 2e-5 at 50 steps,
    1.4e-4 at 100, 7e-4 at 200, so ours is held to the accuracy diffusers reaches."""
    cfg = {**BETAS["sd"], "timestep_spacing": "trailing", "solver_order": 3}
    tol = conditioned_tol(cfg, 200, LONG_TOL)
    assert tol > 1e-4  # the reason for the loose bound (else LONG_TOL would do)
    run_pair(REF, DEISMultistepScheduler, cfg, 200, tol=tol)


def test_thresholding():
    """Dynamic thresholding of x_0 before it is turned back into eps (orders 1-3 all used)."""
    cfg = {**BETAS["linear"], "thresholding": True, "sample_max_value": 1.2, "solver_order": 3}
    run_pair(REF, DEISMultistepScheduler, cfg, 12, tol=TRAJ_TOL)
    x = start_sample()
    _, on, x0s = run_ours(DEISMultistepScheduler.from_config(cfg), 12, x)
    _, off, _ = run_ours(DEISMultistepScheduler.from_config({**cfg, "thresholding": False}), 12, x)
    assert rel_err(on[-1], off[-1]) > 0.1  # it acts on this run
    assert all(np.abs(x0).max() <= 1 + 1e-6 for x0 in x0s)  # clip(x0, -s, s) / s


def test_karras_sigma_bounds():
    """sigma_min / sigma_max: not in diffusers' DEIS signature, but its from_config keeps them
    (e.g. from a DPM-Solver config) and its Karras ramp reads them; so does ours."""
    cfg = {**BETAS["sd"], "use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0,
           "solver_order": 3}  # fmt: skip
    run_pair(REF, DEISMultistepScheduler, cfg, 10, tol=MULTI_TOL)
    s = DEISMultistepScheduler.from_config(cfg)
    s.set_timesteps(10)
    np.testing.assert_allclose(s.sigmas[[0, -2, -1]], [10.0, 0.05, 0.05], rtol=1e-6)


def test_add_noise_and_begin_index():
    """add_noise looks sigma up by timestep, or uses begin_index / the current step index."""
    torch = need("torch")
    cfg = {**BETAS["sd"], "solver_order": 3}
    ref, ours = ref_scheduler(REF, cfg), DEISMultistepScheduler.from_config(cfg)
    x, eps = start_sample(seed=3), start_sample(seed=4)

    def both(t):
        want = ref.add_noise(torch.from_numpy(x), torch.from_numpy(eps), torch.from_numpy(t))
        got = ours.add_noise(x, eps, t)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)
        return got

    for s in (ref, ours):
        s.set_timesteps(20)
    looked_up = both(ours.timesteps[[3, 11]])
    for s in (ref, ours):
        s.set_begin_index(5)
    at_begin = both(ours.timesteps[[3, 11]])  # both rows at sigma[5], whatever t says
    np.testing.assert_array_equal(at_begin, ours.add_noise(x, eps, ours.timesteps[[5, 5]]))
    assert rel_err(at_begin, looked_up) > 1e-3
    ref.step(torch.from_numpy(eps), ref.timesteps[5], torch.from_numpy(x))
    ours.step(eps, ours.timesteps[5], x)
    assert ours.step_index == ref.step_index == 6 and ours.begin_index == 5
    both(ours.timesteps[[0, 1]])  # now at the current step, 6


@pytest.mark.parametrize("start", [0, 4])
def test_img2img_flow(start):
    """diffusers' img2img protocol: trimmed timesteps, set_begin_index, add_noise, loop."""
    torch = need("torch")
    cfg = {**BETAS["sd"], "solver_order": 3, "timestep_spacing": "leading"}
    x0, noise = start_sample(seed=5), start_sample(seed=6)

    ref = ref_scheduler(REF, cfg)
    ref.set_timesteps(10)
    ref.set_begin_index(start)
    ts = ref.timesteps[start:]
    xt = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ts[:1].repeat(2))
    for t in ts:
        xt = ref.step(torch.from_numpy(standin(xt.numpy(), int(t))), t, xt).prev_sample

    ours = DEISMultistepScheduler.from_config(cfg)
    ours.set_timesteps(10)
    ours.set_begin_index(start)
    ts = ours.timesteps[start:]
    x = ours.add_noise(x0, noise, np.repeat(ts[:1], 2))
    for t in ts:
        x = ours.step(standin(x, int(t)), t, x).prev_sample
    assert rel_err(x, xt.numpy()) <= MULTI_TOL


def test_options_and_errors():
    for key in ("use_flow_sigmas", "use_dynamic_shifting"):
        with pytest.raises(ConfigError, match=key):
            DEISMultistepScheduler.from_config({key: True})
    bad = [
        ({"prediction_type": "flow_prediction"}, "prediction_type='flow_prediction'"),
        ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type='sde-dpmsolver\\+\\+'"),
        ({"solver_type": "bh3"}, "solver_type='bh3'"),
        ({"solver_order": 4}, "solver_order=4"),
        ({"solver_order": "2"}, "solver_order='2'"),
        ({"solver_order": True}, "solver_order=True"),
        ({"lower_order_final": "yes"}, "lower_order_final='yes'"),
        ({"sigma_min": -1.0}, "sigma_min=-1.0"),
        ({"sample_max_value": "1"}, "sample_max_value='1'"),
        ({"beta_schedule": "cubic"}, "beta_schedule='cubic'"),
    ]
    for cfg, message in bad:
        with pytest.raises(ConfigError, match=message):
            DEISMultistepScheduler.from_config(cfg)
    s = DEISMultistepScheduler()
    x = start_sample()
    with pytest.raises(InputError, match="set_timesteps"):
        s.step(x, 999, x)
    for n in (0, 1001, 2.5):
        with pytest.raises(InputError, match="num_inference_steps"):
            s.set_timesteps(n)
    with pytest.raises(ConfigError, match="timestep_spacing='odd'"):
        DEISMultistepScheduler(timestep_spacing="odd").set_timesteps(5)


def test_repeated_timesteps_refused():
    """linspace rounding repeats t = 500 at 1000 steps: diffusers' order-2 update divides by a
    zero log-rho gap (NaN from there on); ours refuses the schedule, order 1 runs it."""
    cfg = {**BETAS["sd"], "timestep_spacing": "linspace"}
    _, out, _ = run_ref(ref_scheduler(REF, cfg), 1000, start_sample())
    assert not np.isfinite(out[-1]).all()
    with pytest.raises(InputError, match="repeats timestep 500"):
        DEISMultistepScheduler.from_config(cfg).set_timesteps(1000)
    run_pair(REF, DEISMultistepScheduler, {**cfg, "solver_order": 1}, 1000, tol=LONG_TOL)


def test_config_aliases_and_foreign_configs(caplog):
    """Other solvers' algorithm / solver types map onto DEIS' as in diffusers; a diffusers DEIS
    config and SD's PNDM config load (unknown-to-us keys noted at INFO, never WARNING)."""
    cfg = {"algorithm_type": "dpmsolver++", "solver_type": "bh2"}
    ref, ours = ref_scheduler(REF, cfg), DEISMultistepScheduler.from_config(cfg)
    for key, want in (("algorithm_type", "deis"), ("solver_type", "logrho")):
        assert ours.config[key] == ref.config[key] == want
    sd15 = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "set_alpha_to_one": False,
            "steps_offset": 1, **BETAS["sd"]}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="minisd.schedulers"):
        for given in (dict(ref_scheduler(REF, {}).config), sd15):
            ours, ref = DEISMultistepScheduler.from_config(given), ref_scheduler(REF, given)
            ours.set_timesteps(10)
            ref.set_timesteps(10)
            np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
            np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "skip_prk_steps" in caplog.text


def test_sample_loop(xp):
    """The shared loop (eta / rng passed and ignored) on the device path too, thresholding's
    quantile included; the pipeline's attributes; pred_original_sample is the model's x_0."""
    cfg = {**BETAS["sd"], "prediction_type": "sample", "solver_order": 3}
    s = DEISMultistepScheduler.from_config({**cfg, "thresholding": True})
    assert s.order == 1 and s.init_noise_sigma == 1.0
    x = start_sample((1, 2, 4, 4))

    def model(x_in, t):
        return xp.asarray(standin(np.asarray(x_in.get() if hasattr(x_in, "get") else x_in), t))

    def unscaled(i, t, z):
        assert s.scale_model_input(z, t) is z

    out = sample_loop(s, model, xp.asarray(x), num_inference_steps=6, eta=0.5,
                      rng=np.random.default_rng(0), callback=unscaled)  # fmt: skip
    assert out.shape == x.shape and out.dtype == np.float32
    ref = sample_loop(DEISMultistepScheduler.from_config({**cfg, "thresholding": True}), standin,
                      x, num_inference_steps=6)  # fmt: skip
    got = out.get() if hasattr(out, "get") else np.asarray(out)
    assert rel_err(got, ref) <= 1e-5
    s = DEISMultistepScheduler.from_config(cfg)
    s.set_timesteps(6)
    x_dev = xp.asarray(x)
    out = model(x_dev, s.timesteps[0])
    assert s.step(out, s.timesteps[0], x_dev).pred_original_sample is out  # a sample model's
