"""DPM-Solver(++) singlestep: order lists, trajectories, SDE noise, img2img against diffusers."""

import inspect
import itertools
import logging
import math

import numpy as np
import pytest
from refharness import need, rel_err
from test_schedulers_base import (
    BETAS,
    LONG_TOL,
    PREDS,
    SPACINGS,
    TRAJ_TOL,
    CountingRng,
    ref_scheduler,
    run_pair,
    standin,
    start_sample,
)
from test_schedulers_dpm_unipc import SD15

import minisd.schedulers as ms
from minisd.errors import ConfigError, InputError
from minisd.rng import TorchGenerator
from minisd.schedulers.dpm_singlestep import DPMSolverSinglestepScheduler, phi_weights

REF = "DPMSolverSinglestepScheduler"


def ours(cfg):
    return DPMSolverSinglestepScheduler.from_config(cfg)


# ----------------------------------------------------------------------------- order lists


@pytest.mark.parametrize("order", [1, 2, 3])
def test_order_list_matches_diffusers(order):
    """Every step count up to 13 (and 25, 1000): the split into groups, lower_order_final, the
    first-order final step to sigma 0, and the forced lower_order_final for uneven counts."""
    for n, lof, final in itertools.product(
        [*range(1, 14), 25, 1000], [False, True], ["zero", "sigma_min"]
    ):
        cfg = {"solver_order": order, "lower_order_final": lof, "final_sigmas_type": final}
        ref, s = ref_scheduler(REF, cfg), ours(cfg)
        ref.set_timesteps(n)
        s.set_timesteps(n)
        assert s.order_list == ref.order_list, (n, cfg)
        np.testing.assert_array_equal(s.timesteps, ref.timesteps.numpy(), err_msg=str((n, cfg)))


def test_order_list_examples():
    """A few lists written out: SD's setting (final sigma 0) and an unforced one."""
    s = ours({"solver_order": 3})
    s.set_timesteps(7)
    assert s.order_list == [1, 2, 3, 1, 2, 3, 1]
    s.set_timesteps(6)
    assert s.order_list == [1, 2, 3, 1, 2, 1]
    s = ours({"solver_order": 2, "final_sigmas_type": "sigma_min"})
    s.set_timesteps(4)
    assert s.order_list == [1, 2, 1, 2]
    s.set_timesteps(3)  # uneven: lower_order_final forced (for this schedule only) ...
    assert s.order_list == [1, 2, 1]
    s.set_timesteps(4)  # ... diffusers keeps it forced for later schedules: [1, 2, 1, 1]
    assert s.order_list == [1, 2, 1, 2]


# ----------------------------------------------------------------------------- trajectories

# Variants; the eps-space ones need a nonzero final sigma (diffusers refuses "zero" for them).
VARIANTS = {
    "2s": {},
    "1s": {"solver_order": 1},
    "3s": {"solver_order": 3},
    "2s_heun": {"solver_type": "heun"},
    "3s_heun": {"solver_order": 3, "solver_type": "heun"},
    "2s_karras": {"use_karras_sigmas": True},
    "3s_karras_min": {"solver_order": 3, "use_karras_sigmas": True,
                      "final_sigmas_type": "sigma_min", "solver_type": "heun"},
    "2s_min": {"final_sigmas_type": "sigma_min"},  # ends on an order-2 step for even n
    "3s_min": {"solver_order": 3, "final_sigmas_type": "sigma_min"},  # 3 | n: ends on order 3
    "3s_min_lof": {"solver_order": 3, "final_sigmas_type": "sigma_min",
                   "lower_order_final": True},
    "eps_2s": {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    "eps_3s": {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
               "solver_order": 3},
    "eps_3s_heun": {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
                    "solver_order": 3, "solver_type": "heun"},
}  # fmt: skip
STEPS = [1, 2, 3, 7, 25]  # the order lists differ most for small n


def cases():
    """The default variant over every beta schedule, prediction type and step count, with SD's
    "leading" spacing, and on 7 steps with the other spacings too (both sides ignore
    timestep_spacing: always "linspace"); the other variants with epsilon and v prediction.
    Noise-space variants only with epsilon (see test_schedulers_dpm_unipc.cases); no cosine with
    Karras sigmas: its rounded Karras timesteps repeat 999, so diffusers starts at the second
    entry and runs past the end."""
    out = []
    for b, s, p, v, n in itertools.product(BETAS, SPACINGS, PREDS, VARIANTS, STEPS):
        if s != "leading" and (v != "2s" or n != 7):
            continue
        if v != "2s" and (n == 1 or p == "sample" or (v.startswith("eps") and p != "epsilon")):
            continue
        if b == "cos" and "karras" in v:
            continue
        out.append((b, s, p, v, n))
    return out


# The arithmetic mirrors diffusers' operation by operation on float32 scalars, and exp / log are
# correctly rounded like torch's (dpm_singlestep.rounded), so most trajectories are bit-equal
# (the cosine ones all are); measured worst 4.6e-7 (Karras, whose set-up differs in float64).
@pytest.mark.parametrize("beta,spacing,pred,variant,n", cases())
def test_trajectory(beta, spacing, pred, variant, n):
    cfg = {**BETAS[beta], "timestep_spacing": spacing, "prediction_type": pred,
           **VARIANTS[variant]}  # fmt: skip
    run_pair(REF, DPMSolverSinglestepScheduler, cfg, n, tol=TRAJ_TOL)


@pytest.mark.parametrize("order", [2, 3])
def test_1000_steps(order):  # measured 1.4e-6 (order 2), 1.1e-6 (order 3)
    run_pair(REF, DPMSolverSinglestepScheduler, {**BETAS["sd"], "solver_order": order}, 1000,
             tol=LONG_TOL)  # fmt: skip


def test_thresholding_lambda_clip_and_sigma_bounds():
    cfg = {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "solver_order": 3,
           "thresholding": True, "sample_max_value": 1.2, "prediction_type": "sample"}  # fmt: skip
    s = ours(cfg)
    s.set_timesteps(12)
    assert s.timesteps[0] < 999  # the clip removed the last timesteps
    run_pair(REF, DPMSolverSinglestepScheduler, cfg, 12, tol=TRAJ_TOL)
    # Karras sigma_min / sigma_max: diffusers' from_config keeps these foreign keys and uses them
    cfg = {**BETAS["sd"], "use_karras_sigmas": True, "sigma_min": 0.3, "sigma_max": 8.0}
    s = ours(cfg)
    s.set_timesteps(9)
    np.testing.assert_allclose(s.sigmas[[0, -2]], [8.0, 0.3], rtol=1e-6)
    run_pair(REF, DPMSolverSinglestepScheduler, cfg, 9, tol=TRAJ_TOL)


def test_learned_variance_and_x0():
    """variance_type="learned": the output's extra channels are dropped; pred_original_sample is
    the x_0 the step used (diffusers' singlestep returns none)."""
    cfg = {**BETAS["sd"], "variance_type": "learned_range", "prediction_type": "sample"}
    s = ours(cfg)
    s.set_timesteps(4)
    x = start_sample((1, 3, 4, 4))
    out = np.concatenate([np.tanh(x), np.full_like(x, 1e3)], axis=1)  # (1, 6, 4, 4)
    res = s.step(out, s.timesteps[0], x)
    assert res.prev_sample.shape == x.shape
    np.testing.assert_array_equal(res.pred_original_sample, np.tanh(x))
    assert np.abs(res.prev_sample).max() < 10


# ----------------------------------------------------------------------------- SDE

SDE_VARIANTS = {
    "1s": {"solver_order": 1},
    "2s": {},
    "2s_heun": {"solver_type": "heun"},
    "3s": {"solver_order": 3},
    "3s_min": {"solver_order": 3, "final_sigmas_type": "sigma_min"},
    "2s_karras": {"use_karras_sigmas": True},
}


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variant", sorted(SDE_VARIANTS))
@pytest.mark.parametrize("n", [2, 3, 7, 25])
def test_sde_trajectory(pred, variant, n, monkeypatch):
    """One N(0, I) per step, every step (diffusers' randn_tensor replays the same tensors)."""
    cfg = {**BETAS["sd"], "prediction_type": pred, "algorithm_type": "sde-dpmsolver++",
           **SDE_VARIANTS[variant]}  # fmt: skip
    run_pair(REF, DPMSolverSinglestepScheduler, cfg, n, noisy=True, monkeypatch=monkeypatch,
             tol=TRAJ_TOL)  # fmt: skip


def test_sde_seeded_like_torch():
    """rng=TorchGenerator(seed) draws torch's numbers in diffusers' order: the same trajectory
    as diffusers with torch.Generator().manual_seed(seed)."""
    torch = need("torch")
    cfg = {**BETAS["sd"], "algorithm_type": "sde-dpmsolver++", "solver_order": 3}
    run_pair(REF, DPMSolverSinglestepScheduler, cfg, 8, tol=TRAJ_TOL,
             step_kw={"generator": torch.Generator().manual_seed(7)},
             ours_kw={"rng": TorchGenerator(7)})  # fmt: skip


def test_phi_weights_are_the_integrals():
    """-g phi_{k+1}(g) is the exponential integrator's weight of D_k = h^k m^(k), in units of
    sigma_t (eps) or alpha_t (x_0): (1 / h^k) int_0^h K(h - u) u^k / k! du, with the kernels
    K(v) = -e^v (eps, g = h), e^{-v} (x_0, g = -h), 2 e^{-2v} (SDE, g = -2h)."""
    for h, k in itertools.product([0.05, 0.7, 2.5], range(3)):
        u = np.linspace(0.0, h, 200001)
        taylor = u**k / math.factorial(k) / h**k
        for g, kernel in [(h, lambda v: -np.exp(v)), (-h, lambda v: np.exp(-v)),
                          (-2 * h, lambda v: 2 * np.exp(-2 * v))]:  # fmt: skip
            want = np.trapezoid(kernel(h - u) * taylor, u)
            got = -phi_weights(np.float64(g), 3)[k]
            assert abs(got - want) <= 1e-8 * abs(want), (h, k, g, got, want)


def test_sde_third_order_heun_fixes_diffusers_d2_weight():
    """Deliberate difference: diffusers' SDE third-order "heun" update weights D_2 by
    alpha_t ((1 - e^{-2h} - 2h) / (2h)^2 - 1/2); the integral (test above) is that + 1/2.
    Ours differs from diffusers' update by exactly alpha_t D_2 (D_2 = h^2 m'')."""
    torch = need("torch")
    cfg = {**BETAS["sd"], "algorithm_type": "sde-dpmsolver++", "solver_order": 3,
           "solver_type": "heun"}  # fmt: skip
    ref, s = ref_scheduler(REF, cfg), ours(cfg)
    ref.set_timesteps(10)
    s.set_timesteps(10)
    i = 5  # a group s = 3, 4, 5 -> sigma_6
    m = [start_sample(seed=k) for k in range(3)]  # x_0 estimates at sigma_3, 4, 5
    x, z = start_sample(seed=9), start_sample(seed=10)
    s.model_outputs = list(m)
    got = s._update(3, x, i, z)
    ref._step_index = i
    want = ref.singlestep_dpm_solver_third_order_update(
        [torch.from_numpy(a) for a in m], sample=torch.from_numpy(x), noise=torch.from_numpy(z)
    ).numpy()
    sig = s.sigmas.astype(np.float64)
    lam = -np.log(sig[[3, 4, 5, 6]])  # lambda = log(alpha / sigma) = -log(sigma_VE)
    ra, rb = (lam[1:3] - lam[0]) / (lam[3] - lam[0])
    da, db = (m[1] - m[0]) / ra, (m[2] - m[0]) / rb
    d2 = 2 * (db - da) / (rb - ra)
    alpha_t = 1 / np.sqrt(sig[6] ** 2 + 1)
    assert rel_err(got - want, alpha_t * d2) < 1e-4
    assert np.abs(alpha_t * d2).max() > 0.1 * np.abs(want).max()  # not a negligible term


# ----------------------------------------------------------------------------- img2img, noise


def _img2img(sched, n, begin, x0, eps, torch=None):
    """diffusers' img2img order: set_timesteps, set_begin_index, add_noise at the begin
    timestep, then the loop from there; returns [noised, prev_sample per step]."""
    wrap = (lambda a: torch.from_numpy(a)) if torch else (lambda a: a)
    unwrap = (lambda a: a.numpy()) if torch else (lambda a: a)
    sched.set_timesteps(n)
    sched.set_begin_index(begin)
    ts = sched.timesteps[begin:]
    x = sched.add_noise(wrap(x0), wrap(eps), ts[:1].repeat(len(x0)))  # (B,) begin timestep
    out = [unwrap(x).copy()]
    for t in ts:
        model = standin(unwrap(x), int(t))
        x = sched.step(wrap(model), t, x).prev_sample
        out.append(unwrap(x).copy())
    return out


@pytest.mark.parametrize("order,begin", [(2, 1), (2, 4), (3, 1), (3, 2), (3, 6)])
def test_img2img_begins_inside_a_group(order, begin):
    """A begin index inside a group lowers the first orders (the history is empty) as
    diffusers does; add_noise uses the begin index's sigma."""
    torch = need("torch")
    cfg = {**BETAS["sd"], "solver_order": order}
    x0, eps = start_sample((2, 3, 4, 4), seed=1), start_sample((2, 3, 4, 4), seed=2)
    want = _img2img(ref_scheduler(REF, cfg), 10, begin, x0, eps, torch)
    s = ours(cfg)
    _img2img(s, 7, 0, x0, eps)  # a whole run first: set_timesteps must clear its history
    got = _img2img(s, 10, begin, x0, eps)
    assert len(got) == len(want) == 11 - begin
    for k, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) <= TRAJ_TOL, k


def test_add_noise():
    """By timestep lookup (a repeated one: its second position; an unknown one: the last
    step), with a begin index (before the first step), and after a step (inpainting)."""
    torch = need("torch")
    cfg = {**BETAS["cos"], "use_karras_sigmas": True}
    ref, s = ref_scheduler(REF, cfg), ours(cfg)
    ref.set_timesteps(10)
    s.set_timesteps(10)
    assert list(s.timesteps[:5]) == [999, 999, 999, 998, 998]
    x, eps = start_sample((4, 3, 4, 4), seed=3), start_sample((4, 3, 4, 4), seed=4)
    t = np.array([999, 998, 895, 5])  # sigma indices 1, 4, 7 and (absent) 9

    def both():
        want = ref.add_noise(torch.from_numpy(x), torch.from_numpy(eps), torch.from_numpy(t))
        got = s.add_noise(x, eps, t)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)
        return got

    first = both()
    ref.set_begin_index(6)
    s.set_begin_index(6)
    assert not np.allclose(both(), first)
    model = standin(x, 0)
    ref.step(torch.from_numpy(model), ref.timesteps[6], torch.from_numpy(x))
    s.step(model, s.timesteps[6], x)
    both()  # now at step 7


# ----------------------------------------------------------------------------- config


def test_defaults_match_diffusers():
    """Every option of diffusers' class is implemented with its default, refused, or
    (flow_shift, time_shift_type: flow-sigma settings) ignored."""
    diffusers = need("diffusers")
    params = inspect.signature(diffusers.DPMSolverSinglestepScheduler.__init__).parameters
    theirs = {k: p.default for k, p in params.items() if k != "self"}
    mine = DPMSolverSinglestepScheduler.DEFAULTS
    unsupported = set(DPMSolverSinglestepScheduler.UNSUPPORTED)
    assert set(theirs) - set(mine) == unsupported | {"flow_shift", "time_shift_type"}
    assert set(mine) - set(theirs) == {"sigma_min", "sigma_max"}  # from_config keeps them
    for key in set(mine) & set(theirs):
        assert mine[key] == theirs[key] or (mine[key] is None and theirs[key] is None), key
    assert DPMSolverSinglestepScheduler.order == diffusers.DPMSolverSinglestepScheduler.order


def test_sd_config_and_aliases(caplog):
    """SD's scheduler config: its spacing / offset are foreign keys (noted, dropped), so the
    timesteps are diffusers' linspace ones. UniPC / DEIS types map as in diffusers."""
    with caplog.at_level(logging.INFO, logger="minisd.schedulers"):
        s = ours(SD15)
    assert "timestep_spacing" not in s.config and "steps_offset" in caplog.text
    ref = ref_scheduler(REF, SD15)
    ref.set_timesteps(10)
    s.set_timesteps(10)
    np.testing.assert_array_equal(s.timesteps, ref.timesteps.numpy())
    assert s.timesteps[0] == 999  # leading + offset would start at 901
    s = ours({"solver_type": "bh2", "algorithm_type": "deis"})
    assert (s.config.solver_type, s.config.algorithm_type) == ("midpoint", "dpmsolver++")


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"use_exponential_sigmas": True, "use_beta_sigmas": True},
         "use_exponential_sigmas=True and use_beta_sigmas=True: only one"),
        ({"use_flow_sigmas": True}, "use_flow_sigmas"),
        ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ({"prediction_type": "flow_prediction"}, "prediction_type='flow_prediction'"),
        ({"algorithm_type": "sde-dpmsolver"}, "algorithm_type='sde-dpmsolver'"),
        ({"solver_order": 4}, "solver_order=4"),
        ({"solver_order": 2.0}, "solver_order=2.0"),
        ({"solver_order": True}, "solver_order=True"),
        ({"solver_type": "euler"}, "solver_type='euler'"),
        ({"final_sigmas_type": "last"}, "final_sigmas_type='last'"),
        ({"algorithm_type": "dpmsolver"}, "final_sigmas_type='zero' needs"),
        ({"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "thresholding": True},
         "thresholding=True"),
        ({"sigma_min": "0.1"}, "sigma_min='0.1'"),
        ({"num_train_timesteps": 0}, "num_train_timesteps=0"),
        ({"beta_schedule": "cubic"}, "beta_schedule='cubic'"),
    ],
)  # fmt: skip
def test_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        ours(bad)


def test_step_errors():
    s = ours({})
    x = start_sample()
    with pytest.raises(InputError, match="set_timesteps"):
        s.step(x, 999, x)
    for bad in (0, 1001, 2.5):
        with pytest.raises(InputError, match="num_inference_steps"):
            s.set_timesteps(bad)
    s.set_timesteps(2)
    for t in s.timesteps:
        x = s.step(standin(x, t), t, x).prev_sample
    with pytest.raises(InputError, match="all 2 steps are done"):
        s.step(x, s.timesteps[-1], x)


# ----------------------------------------------------------------------------- loop, backends


@pytest.mark.parametrize("cfg", [{}, {"solver_order": 3, "solver_type": "heun"},
                                 {"algorithm_type": "sde-dpmsolver++"}])  # fmt: skip
def test_sample_loop(cfg, xp):
    """sample_loop drives it on numpy, fake_cupy and cupy; device results equal numpy's; the
    same scheduler re-used gives the same result (set_timesteps resets the group state)."""
    cfg = {**SD15, **cfg}

    def model(x_in, t):
        host = np.asarray(x_in.get() if hasattr(x_in, "get") else x_in)
        return xp.asarray(standin(host, t))

    x = start_sample((1, 2, 4, 4))
    s = ours(cfg)

    def run():
        seen = []
        out = ms.sample_loop(s, model, xp.asarray(x), num_inference_steps=7,
                             rng=np.random.default_rng(0),
                             callback=lambda i, t, z: seen.append(i))  # fmt: skip
        assert seen == list(range(7)) and out.dtype == np.float32
        return np.asarray(out.get() if hasattr(out, "get") else out)

    runs = [run(), run()]
    np.testing.assert_array_equal(runs[0], runs[1])
    ref = ms.sample_loop(ours(cfg), standin, x, num_inference_steps=7,
                         rng=np.random.default_rng(0))  # fmt: skip
    assert np.abs(runs[0] - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_dtypes(dtype):
    """float64 stays float64 (as torch's promotion); float16 is computed in float32 (numpy's
    promotion with the float32 coefficients) and returned as float16."""
    s = ours({"solver_order": 3})
    x = start_sample(dtype=dtype)
    s.set_timesteps(4)
    for t in s.timesteps:
        x = s.step(standin(x, t), t, x).prev_sample
        assert x.dtype == dtype
    assert np.isfinite(x).all()


def test_sde_draws_in_the_model_dtype():
    """diffusers draws the SDE noise in its converted output's dtype: float16 for a float16
    sample and model (numpy would promote x_0 to float32 through the float32 coefficients)."""
    s = DPMSolverSinglestepScheduler.from_config({"algorithm_type": "sde-dpmsolver++"})
    rng = CountingRng()
    x = start_sample((1, 2, 3, 3)).astype(np.float16)
    out = ms.sample_loop(s, lambda z, t: z * np.float16(0.1), x, num_inference_steps=3, rng=rng)
    assert rng.calls == [((1, 2, 3, 3), np.dtype(np.float16))] * 3
    assert out.dtype == np.float16
