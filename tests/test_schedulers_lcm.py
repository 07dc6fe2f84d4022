"""LCMScheduler (latent consistency models): timesteps, trajectories, noise, errors vs diffusers.

Every step of LCM draws fresh noise (all but the last), so trajectories are compared with the
same noise replayed into both (``patch_randn``), or with seeded generators (TorchGenerator vs
torch.Generator). ``denoised`` (our ``pred_original_sample``) is compared at every step too.
"""

import itertools
import logging

import numpy as np
import pytest
from refharness import need, rel_err
from test_schedulers_base import CountingRng, _Replay, patch_randn, standin, start_sample

import minisd.schedulers as ms
from minisd.errors import ConfigError, InputError
from minisd.rng import TorchGenerator
from minisd.schedulers.lcm import LCMScheduler, boundary_scalings

# Measured (this CPU, torch 2.x with MKL): float32 trajectories of up to 8 steps, all schedules
# and prediction types, clip / threshold: bit for bit (0.0); 50 steps 3.8e-7, 1000 steps 7.4e-7
# (relative to max |ref|). The only scalars that are not bitwise are sqrt(abar) and
# sqrt(1 - abar): torch's float32 sqrt (MKL) is 1 ulp off the correctly rounded one for ~0.6% of
# inputs, and c_out (2 ulp for a few timesteps when timestep_scaling != 10). float64 samples go
# through the same float32 scalars (exact in float64): bit for bit where those sqrt agree,
# else up to 4e-7 at 1000 steps (9e-8 at 50).
TOL = 1e-6
LONG_TOL = 2e-6
F64_TOL = 1e-12  # where torch's sqrt(abar) agrees with numpy's at every timestep of the run
F64_ULP_TOL = 2e-7  # where it does not

BETAS = {
    "sd": {},  # LCMScheduler's defaults are SD's scaled_linear schedule
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "cos": {"beta_schedule": "squaredcos_cap_v2"},
}
PREDS = ["epsilon", "v_prediction", "sample"]


def ref_lcm(cfg):
    return need("diffusers").LCMScheduler.from_config(dict(cfg))


def trajectories(monkeypatch, cfg, set_kw, *, shape=(2, 3, 4, 5), dtype=np.float32, begin=None):
    """Run diffusers' and our LCM loops from the same start and replayed noise; returns
    (ref, ours), each {"ts", "prev", "den"} per step."""
    torch = need("torch")
    patch_randn(monkeypatch)
    ref, ours = ref_lcm(cfg), LCMScheduler.from_config(cfg)
    rng = np.random.default_rng(5)
    noises = [rng.standard_normal(shape).astype(dtype) for _ in range(1001)]
    runs = []
    for s in (ref, ours):
        s.set_timesteps(**set_kw)
        if begin is not None:
            s.set_begin_index(begin)
        ts = np.asarray(s.timesteps)[begin or 0 :]
        x, prev, den = start_sample(shape, dtype=dtype), [], []
        for i, t in enumerate(ts):
            if s is ref:
                tt = s.timesteps[(begin or 0) + i]
                xt = torch.from_numpy(x)
                e = torch.from_numpy(standin(x, int(t)))
                p, d = s.step(e, tt, xt, generator=_Replay(noises, i), return_dict=False)
                p, d = p.numpy(), d.numpy()
            else:
                out = s.step(standin(x, t), t, x, noise=noises[i])
                p, d = out.prev_sample, out.denoised
            x = p
            prev.append(p.copy())
            den.append(d.copy())
        runs.append({"ts": ts, "prev": prev, "den": den})
    return runs


def assert_same(ref, ours, tol=TOL, steps=None):
    np.testing.assert_array_equal(ours["ts"], ref["ts"])
    assert ours["ts"].dtype == np.int64
    worst = 0.0
    for i in range(len(ref["prev"]) if steps is None else steps):
        for key in ("prev", "den"):
            a, b = ours[key][i], ref[key][i]
            assert a.dtype == b.dtype, (key, i, a.dtype, b.dtype)
            err = rel_err(a, b)
            assert err <= tol, f"step {i} (t={ref['ts'][i]}): {key} rel. error {err:.2e} > {tol}"
            worst = max(worst, err)
    return worst


# ----------------------------------------------------------------------------- timesteps


def expect_same_timesteps(ref, ours, kw):
    """Both accept ``kw`` and agree, or diffusers raises ValueError and we InputError."""
    try:
        ref.set_timesteps(**kw)
    except ValueError:
        with pytest.raises(InputError):
            ours.set_timesteps(**kw)
        return False
    ours.set_timesteps(**kw)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy(), err_msg=str(kw))
    assert ours.num_inference_steps == ref.num_inference_steps, kw
    return True


@pytest.mark.parametrize("cfg", [{}, {"num_train_timesteps": 37}, {"timestep_spacing": "trailing",
                                                                  "steps_offset": 1}])  # fmt: skip
def test_timesteps(cfg):
    """The skipping-step schedule for many (n, original_inference_steps, strength); the grid
    includes the combinations diffusers refuses (n above original_steps x strength, ...).
    timestep_spacing / steps_offset are not read, by either."""
    ref, ours = ref_lcm(cfg), LCMScheduler.from_config(cfg)
    ok = 0
    grid = itertools.product([1, 2, 3, 4, 6, 8, 13, 25, 50, 64],
                             [None, 1, 7, 33, 50, 100, 1000],
                             [1.0, 0.9, 0.8, 0.5, 0.29, 0.25, 0.07])  # fmt: skip
    for n, orig, strength in grid:
        kw = {"num_inference_steps": n, "original_inference_steps": orig, "strength": strength}
        ok += expect_same_timesteps(ref, ours, kw)
    assert ok > 60


def test_timesteps_every_step_count():
    """Every n for the default and a 1000-step distillation schedule (the index rounding of
    numpy's linspace decides a few of them)."""
    ref, ours = ref_lcm({}), LCMScheduler()
    for orig in (50, 1000, 999):
        for n in range(1, orig + 1, 1 if orig == 50 else 7):
            assert expect_same_timesteps(ref, ours, {"num_inference_steps": n,
                                                     "original_inference_steps": orig})  # fmt: skip
    ours.set_timesteps(4)
    assert ours.timesteps.tolist() == [999, 759, 499, 259]  # LCM's usual 4 steps


CUSTOM = [[999, 759, 499, 259], [999, 500, 20, 1, 0], [800, 600], [999], [19],
          list(range(999, 0, -10))]  # fmt: skip


@pytest.mark.parametrize("custom", CUSTOM)
def test_custom_timesteps(custom):
    ref, ours = ref_lcm({}), LCMScheduler()
    for strength in (1.0, 0.75, 0.5, 0.3, 0.26):
        if int(len(custom) * strength) == 0:  # diffusers: an empty schedule
            with pytest.raises(InputError, match="strength"):
                ours.set_timesteps(timesteps=custom, strength=strength)
            continue
        assert expect_same_timesteps(ref, ours, {"timesteps": custom, "strength": strength})
        assert ours.custom_timesteps
    ours.set_timesteps(timesteps=np.array(custom, dtype=np.float64))  # integral floats are fine
    assert ours.timesteps.tolist() == custom


def test_custom_timestep_warnings(caplog):
    """diffusers' three warnings: off the distillation schedule, not starting at T - 1, longer
    than original_inference_steps."""

    def warned(**kw):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="minisd.schedulers"):
            LCMScheduler().set_timesteps(**kw)
        return caplog.text

    assert "[500]" in warned(timesteps=[999, 759, 500, 259])
    text = warned(timesteps=[899, 259], original_inference_steps=1)
    assert "start at 899" in text and "exceed original_inference_steps=1" in text
    assert warned(timesteps=[999, 759, 499, 259]) == ""


# ----------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize("beta,pred,n", itertools.product(BETAS, PREDS, [1, 2, 4, 8]))
def test_trajectory(monkeypatch, beta, pred, n):
    cfg = {**BETAS[beta], "prediction_type": pred}
    ref, ours = trajectories(monkeypatch, cfg, {"num_inference_steps": n})
    assert_same(ref, ours)


@pytest.mark.parametrize(
    "extra,set_kw",
    [
        ({"thresholding": True, "sample_max_value": 1.5}, {"num_inference_steps": 6}),
        ({"clip_sample": True, "clip_sample_range": 0.5}, {"num_inference_steps": 6}),
        ({"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
         {"num_inference_steps": 6}),
        ({"set_alpha_to_one": False, "original_inference_steps": 100},
         {"num_inference_steps": 25}),
        ({}, {"num_inference_steps": 50}),
        ({}, {"num_inference_steps": 1000, "original_inference_steps": 1000}),
        ({}, {"num_inference_steps": 3, "strength": 0.6}),  # img2img
        ({"trained_betas": np.linspace(1e-4, 0.03, 1000).tolist()}, {"num_inference_steps": 4}),
    ],
)  # fmt: skip
def test_trajectory_options(monkeypatch, extra, set_kw):
    ref, ours = trajectories(monkeypatch, extra, set_kw)
    assert_same(ref, ours, tol=LONG_TOL if set_kw["num_inference_steps"] == 1000 else TOL)


@pytest.mark.parametrize("scaling", [10.0, 1.0, 0.1, 0.37])
def test_boundary_condition_small_timesteps(monkeypatch, scaling):
    """Near t = 0, c_skip carries the sample (with scaling 10 it is < 1e-5 from t = 19 up):
    custom timesteps down to 0, where f(x, 0) = x exactly."""
    cfg = {"timestep_scaling": scaling}
    set_kw = {"timesteps": [999, 40, 7, 2, 1, 0]}
    ref, ours = trajectories(monkeypatch, cfg, set_kw)
    assert_same(ref, ours)
    np.testing.assert_array_equal(ours["den"][-1], ours["prev"][-2])  # c_skip(0)=1, c_out(0)=0
    c_skip, c_out = boundary_scalings(1, scaling)
    assert (c_skip >= 0.2) == (scaling <= 1) and c_skip.dtype == c_out.dtype == np.float32


def test_boundary_scalings_match_diffusers():
    """c_skip / c_out as diffusers computes them for the 0-d int64 tensor timesteps its pipelines
    pass: bit for bit at the default timestep_scaling = 10; elsewhere c_out can be 2 ulp off
    (for 3-11 of 1000 timesteps), as torch's 0-d float32 sqrt is not correctly rounded
    (sqrt(16641.25): torch 129.000961, exact 129.000969, nearest float32 129.000977)."""
    torch = need("torch")
    for scaling in (10.0, 1.0, 0.1, 3.7):
        ref = ref_lcm({"timestep_scaling": scaling})
        got, want = np.zeros((2, 1000), np.float32), np.zeros((2, 1000), np.float32)
        for i in range(1000):
            got[:, i] = boundary_scalings(np.int64(i), scaling)
            w = ref.get_scalings_for_boundary_condition_discrete(torch.tensor(i))
            want[:, i] = w[0].item(), w[1].item()
        np.testing.assert_array_equal(got[0], want[0])  # c_skip: no sqrt
        if scaling == 10.0:
            np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[1], want[1], rtol=1.2e-7, atol=0)  # measured: <= 2 ulp


def sqrt_differs(timesteps) -> bool:
    """Whether torch's float32 sqrt(abar_t) or sqrt(1 - abar_t) is not numpy's at a timestep."""
    torch = need("torch")
    abar = LCMScheduler().alphas_cumprod
    for t in timesteps:
        for v in (abar[t], np.float32(1) - abar[t]):
            if torch.tensor(v).sqrt().item() != np.sqrt(v):
                return True
    return False


@pytest.mark.parametrize("n", [8, 50])
def test_float64(monkeypatch, n):
    for pred in PREDS:
        ref, ours = trajectories(monkeypatch, {"prediction_type": pred},
                                 {"num_inference_steps": n}, dtype=np.float64)  # fmt: skip
        tol = F64_ULP_TOL if sqrt_differs(ours["ts"]) else F64_TOL
        assert_same(ref, ours, tol=tol)
        assert ours["prev"][-1].dtype == np.float64


def test_begin_index(monkeypatch):
    """img2img through set_begin_index: the first step is timesteps[begin]; the last step of
    the schedule is the noise-free one."""
    ref, ours = trajectories(monkeypatch, {}, {"num_inference_steps": 8}, begin=3)
    assert_same(ref, ours)
    assert len(ours["prev"]) == 5
    np.testing.assert_array_equal(ours["prev"][-1], ours["den"][-1])


def test_begin_index_wins_over_the_timestep(monkeypatch):
    """With set_begin_index the position comes from it, not from the timestep passed (as in
    diffusers): an off-schedule timestep sets c_skip, c_out and abar_t, the schedule the next
    timestep (here 499, after begin 1)."""
    torch = need("torch")
    patch_randn(monkeypatch)
    ref, ours = ref_lcm({}), LCMScheduler()
    for s in (ref, ours):
        s.set_timesteps(4)
        s.set_begin_index(1)
    x, z = start_sample((1, 2, 4, 4)), start_sample((1, 2, 4, 4), seed=1)
    e = standin(x, 600)
    got = ours.step(e, 600, x, noise=z)
    want = ref.step(torch.from_numpy(e), torch.tensor(600), torch.from_numpy(x),
                    generator=_Replay([z], 0))  # fmt: skip
    assert ours.step_index == 2 and ours.begin_index == 1
    assert rel_err(got.prev_sample, want.prev_sample.numpy()) <= TOL
    assert rel_err(got.denoised, want.denoised.numpy()) <= TOL


def test_custom_with_strength_last_step_is_clean(monkeypatch):
    """Deliberate difference: custom timesteps trimmed by strength keep diffusers'
    num_inference_steps (the untrimmed count), so diffusers re-noises the final sample; minisd
    returns the denoised one there (= diffusers' ``denoised``), equal before that."""
    set_kw = {"timesteps": [999, 759, 499, 259, 19], "strength": 0.6}
    ref, ours = trajectories(monkeypatch, {}, set_kw)
    assert len(ours["prev"]) == 3
    assert_same(ref, ours, steps=2)
    assert rel_err(ours["den"][-1], ref["den"][-1]) <= TOL
    np.testing.assert_array_equal(ours["prev"][-1], ours["den"][-1])
    assert rel_err(ref["prev"][-1], ref["den"][-1]) > 0.03  # diffusers': noised at t = 19


@pytest.mark.parametrize("n,seed", [(4, 7), (8, 0), (1, 3)])
def test_seeded_noise_matches_torch_generator(n, seed):
    """rng=TorchGenerator(seed) draws what diffusers draws from torch.Generator().manual_seed."""
    torch = need("torch")
    ref, ours = ref_lcm({}), LCMScheduler()
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    x = start_sample((1, 4, 8, 8))
    xr, xo = torch.from_numpy(x), x.copy()
    g, rng = torch.Generator().manual_seed(seed), TorchGenerator(seed)
    for t_r, t_o in zip(ref.timesteps, ours.timesteps):
        e = torch.from_numpy(standin(xr.numpy(), t_r.item()))
        xr = ref.step(e, t_r, xr, generator=g).prev_sample
        xo = ours.step(standin(xo, t_o), t_o, xo, rng=rng).prev_sample
    assert rel_err(xo, xr.numpy()) <= TOL
    # the generators are in the same state afterwards: n - 1 draws each
    np.testing.assert_array_equal(rng.standard_normal((20,)), torch.randn(20, generator=g))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_noise_draws(dtype):
    """One draw of model_output's shape per step except the last, in the sample's dtype."""
    s, rng = LCMScheduler(), CountingRng()
    x = start_sample((1, 2, 4, 4)).astype(dtype)
    out = ms.sample_loop(s, standin, x, num_inference_steps=5, rng=rng)
    assert rng.calls == [((1, 2, 4, 4), np.dtype(dtype))] * 4
    assert out.dtype == dtype and np.isfinite(out).all()
    full = ms.sample_loop(LCMScheduler(), standin, x.astype(np.float32), num_inference_steps=5,
                          rng=CountingRng())  # fmt: skip
    assert rel_err(out.astype(np.float32), full) <= (5e-3 if dtype == np.float16 else 0)


def test_mixed_dtypes_follow_torch_promotion():
    """A float16 model output on a float32 sample: diffusers' denoised is float32, and so are its
    noise draw and prev_sample."""
    torch = need("torch")
    ref, ours = ref_lcm({}), LCMScheduler()
    ref.set_timesteps(2)
    ours.set_timesteps(2)
    x, rng = start_sample((1, 2, 4, 4)), CountingRng()
    e = standin(x, 999).astype(np.float16)
    out = ours.step(e, 999, x, rng=rng)
    want = ref.step(torch.from_numpy(e), ref.timesteps[0], torch.from_numpy(x))
    assert rng.calls == [((1, 2, 4, 4), np.dtype(np.float32))]
    assert out.prev_sample.dtype == out.denoised.dtype == np.float32 == want.denoised.numpy().dtype
    # torch rounds sqrt(1 - abar) * eps to float16 (a 0-d float32 tensor does not promote the
    # float16 one); minisd keeps that product in float32: 8.9e-5 apart, float16's precision
    assert rel_err(out.denoised, want.denoised.numpy()) <= 5e-4


def test_sample_loop(xp):
    """The one loop on numpy, fake_cupy and cupy: the device result equals the numpy one."""
    s = LCMScheduler.from_config({"thresholding": True})
    x = start_sample((2, 2, 4, 4))

    def model(x_in, t):
        return xp.asarray(standin(np.asarray(x_in.get() if hasattr(x_in, "get") else x_in), t))

    out = ms.sample_loop(s, model, xp.asarray(x), num_inference_steps=4, eta=0.0,
                         rng=np.random.default_rng(0))  # fmt: skip
    host = out.get() if hasattr(out, "get") else np.asarray(out)
    ref = ms.sample_loop(LCMScheduler.from_config({"thresholding": True}), standin, x,
                         num_inference_steps=4, rng=np.random.default_rng(0))  # fmt: skip
    assert type(out) is not np.ndarray or xp is np  # stays on the device
    assert np.isfinite(ref).all() and np.abs(host - ref).max() <= 1e-6 * np.abs(ref).max()


def test_add_noise_and_step_index():
    torch = need("torch")
    ref, ours = ref_lcm({}), LCMScheduler()
    rng = np.random.default_rng(1)
    x0, eps = rng.standard_normal((2, 3, 4, 4), dtype=np.float32), start_sample((2, 3, 4, 4))
    t = np.array([259, 999])
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t))
    np.testing.assert_array_equal(ours.add_noise(x0, eps, t), want.numpy())
    ours.set_timesteps(4)
    assert ours.step_index is None and ours.begin_index is None
    ours.step(x0, 759, x0, noise=eps)  # starts where its timestep is
    assert ours.step_index == 2 and ours.index_for_timestep(259) == 3
    with pytest.raises(InputError, match="timestep=500"):
        ours.index_for_timestep(500)
    ours.set_begin_index(1)
    ours.set_timesteps(4)  # resets both, as diffusers
    assert ours.step_index is None and ours.begin_index is None


# ----------------------------------------------------------------------------- config, errors


def test_config_defaults_are_diffusers():
    ref, ours = ref_lcm({}), LCMScheduler()
    assert set(ours.config) == {k for k in ref.config if not k.startswith("_")}
    for key in ours.config:
        assert ours.config[key] == ref.config[key], key
    assert ours.order == 1 and ours.init_noise_sigma == 1.0
    ours.set_timesteps(1)
    x = start_sample()
    out = ours.step(x, 999, x)
    assert isinstance(out, ms.SchedulerOutput) and out.denoised is out.pred_original_sample


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"original_inference_steps": 0}, "original_inference_steps=0"),
        ({"original_inference_steps": 2.5}, "original_inference_steps=2.5"),
        ({"timestep_scaling": 0}, "timestep_scaling=0"),
        ({"timestep_scaling": "10"}, "timestep_scaling='10'"),
        ({"prediction_type": "x0"}, "prediction_type='x0'"),
        ({"beta_schedule": "cubic"}, "beta_schedule='cubic'"),
    ],
)
def test_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        LCMScheduler.from_config(bad)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({}, "exactly one"),
        ({"num_inference_steps": 4, "timesteps": [999]}, "exactly one"),
        ({"num_inference_steps": 0}, "num_inference_steps=0"),
        ({"num_inference_steps": 2.5}, "num_inference_steps=2.5"),
        ({"num_inference_steps": 1001}, "num_inference_steps=1001"),
        ({"num_inference_steps": 51}, "num_inference_steps=51"),  # > original_inference_steps
        ({"num_inference_steps": 4, "strength": 0.05}, "strength=0.05"),  # 2 timesteps left
        ({"num_inference_steps": 4, "strength": 0}, "strength=0"),
        ({"num_inference_steps": 4, "strength": 1.5}, "strength=1.5"),  # diffusers: t > 999
        ({"num_inference_steps": 4, "strength": float("nan")}, "strength=nan"),
        ({"num_inference_steps": 4, "original_inference_steps": 0}, "original_inference_steps=0"),
        ({"num_inference_steps": 4, "original_inference_steps": 1001},
         "original_inference_steps=1001"),
        ({"timesteps": []}, "timesteps"),
        ({"timesteps": [999, 999, 500]}, "descending"),
        ({"timesteps": [500, 999]}, "descending"),
        ({"timesteps": [1000, 500]}, r"\[0, num_train_timesteps=1000\)"),
        ({"timesteps": [999, 500, -1]}, r"\[0, num_train_timesteps=1000\)"),
        ({"timesteps": [999, 500.5]}, "integers"),
        ({"timesteps": [[999, 500]]}, "integers"),
        ({"timesteps": ["999"]}, "integers"),
        ({"timesteps": [999, 500], "strength": 0.4}, "strength=0.4"),  # keeps none
    ],
)  # fmt: skip
def test_set_timesteps_errors(kw, message):
    with pytest.raises(InputError, match=message):
        LCMScheduler().set_timesteps(**kw)


def test_original_steps_above_training_steps():
    """A config may name more original steps than the model has (diffusers refuses it in
    set_timesteps too); an explicit argument can replace it. No step before set_timesteps."""
    s, x = LCMScheduler.from_config({"num_train_timesteps": 37}), start_sample()
    with pytest.raises(InputError, match="set_timesteps"):
        s.step(x, 36, x)
    with pytest.raises(InputError, match="original_inference_steps=50: .*num_train_timesteps=37"):
        s.set_timesteps(4)
    s.set_timesteps(4, original_inference_steps=37)
    assert s.timesteps.tolist() == [36, 27, 18, 9]
