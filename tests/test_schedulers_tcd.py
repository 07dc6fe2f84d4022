"""TCD (strategic stochastic sampling): timesteps, trajectories, seeded noise, img2img and
errors against diffusers' TCDScheduler."""

import itertools
import logging

import numpy as np
import pytest
import test_schedulers_base as tsb
from refharness import need, rel_err
from test_schedulers_base import PREDS, TRAJ_TOL, run_ours, run_ref, standin, start_sample

from minisd.errors import ConfigError, InputError
from minisd.rng import TorchGenerator
from minisd.schedulers import sample_loop
from minisd.schedulers.tcd import TCDScheduler

REF = "TCDScheduler"
BETAS = {
    "sd": {},  # TCD's defaults: SD's scaled_linear 0.00085 .. 0.012
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "cos": {"beta_schedule": "squaredcos_cap_v2"},
}
GAMMAS = [0.0, 0.3, 1.0]
# Measured (float32, max over steps of max|ours - ref| / max|ref|): bit for bit up to 8 steps
# (sd and cosine schedules; linear 2.1e-7), 5.5e-7 at 50 steps, 1.0e-6 at 1000 steps. The
# residue is torch's float32 0-d sqrt, 1 ulp off for a few coefficients (numpy's is exact).


def pinned(sched, **kw):
    """``sched`` whose ``set_timesteps(n)`` (as run_ref / run_ours call it) also passes ``kw``;
    custom ``timesteps`` replace n."""
    plain = sched.set_timesteps

    def set_timesteps(n):
        return plain(**kw) if "timesteps" in kw else plain(n, **kw)

    sched.set_timesteps = set_timesteps
    return sched


def run_both(monkeypatch, cfg, n, gamma, *, x=None, tol=TRAJ_TOL, **ts_kw):
    """Both schedulers from ``cfg`` for ``n`` steps (or ``ts_kw``'s custom timesteps), the same
    stand-in model and the same replayed noise; every step compared. Returns the worst error."""
    tsb.patch_randn(monkeypatch)
    x = start_sample() if x is None else x
    rng = np.random.default_rng(123)
    noises = [rng.standard_normal(x.shape).astype(np.float32) for _ in range(1001)]
    ref = pinned(tsb.ref_scheduler(REF, cfg), **ts_kw)
    ours = pinned(TCDScheduler.from_config(cfg), **ts_kw)
    ts_r, out_r, _ = run_ref(ref, n, x, noises, {"eta": gamma})
    ts_o, out_o, _ = run_ours(ours, n, x, noises, {"eta": gamma})
    np.testing.assert_array_equal(ts_o, ts_r)
    assert ts_o.dtype == np.int64 and len(out_o) == len(out_r) == len(ts_r)
    errs = [rel_err(a, b) for a, b in zip(out_o, out_r)]
    assert [a.dtype for a in out_o] == [b.dtype for b in out_r]
    assert max(errs) <= tol, f"worst step {int(np.argmax(errs))}: {max(errs):.2e} > {tol}"
    assert np.isfinite(out_o[-1]).all()
    return max(errs)


# ----------------------------------------------------------------------------- timesteps


def outcome(sched, **kw):
    """The timesteps (and step count) ``set_timesteps(**kw)`` gives, or "refused"."""
    try:
        sched.set_timesteps(**kw)
    except (ValueError, ConfigError):  # minisd's InputError is a ValueError
        return "refused"
    return np.asarray(sched.timesteps).tolist(), sched.num_inference_steps


TS_CONFIGS = [
    {},
    {"timestep_spacing": "trailing", "steps_offset": 1},  # TCD reads neither
    {"timestep_spacing": "linspace", "original_inference_steps": 7},  # k = 142
    {"original_inference_steps": 4},
    {"original_inference_steps": 1000},  # k = 1
    {"num_train_timesteps": 100, "original_inference_steps": 30},
]


@pytest.mark.parametrize("cfg", TS_CONFIGS)
def test_timesteps_match(cfg):
    """Every (n, original_inference_steps, strength) combination: the same timesteps and step
    count as diffusers, or refused exactly where diffusers raises ValueError."""
    ref, ours = tsb.ref_scheduler(REF, cfg), TCDScheduler.from_config(cfg)
    counts = {"same": 0, "refused": 0}
    for orig, strength, n in itertools.product(
        [None, 4, 50, 200, 2000],
        [1.0, 0.99, 0.75, 0.5, 0.3, 0.02],
        [1, 2, 3, 4, 6, 8, 13, 25, 49, 50, 51, 150, 1000, 1001],
    ):
        kw = {"num_inference_steps": n, "original_inference_steps": orig, "strength": strength}
        want, got = outcome(ref, **kw), outcome(ours, **kw)
        assert got == want, kw
        counts["refused" if got == "refused" else "same"] += 1
    assert min(counts.values()) > 20, counts


def test_default_schedule_by_hand():
    """k = 1000 // 50 = 20: origin 19, 39, ..., 999; 4 steps take indices 0, 12, 25, 37 of it
    reversed. With original_inference_steps passed, the origin is every timestep 0 .. 999."""
    s = TCDScheduler.from_config({})
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 759, 499, 259]
    s.set_timesteps(4, original_inference_steps=50)
    assert s.timesteps.tolist() == [999, 749, 499, 249]
    s.set_timesteps(2, strength=0.5)  # origin 19 .. 499
    assert s.timesteps.tolist() == [499, 259] and s.num_inference_steps == 2


CUSTOM = [
    [999, 759, 499, 259],
    [999, 500, 10, 0],
    [800, 400],  # does not start at 999: a warning when strength = 1
    [999],
    [999, 998, 997, 996, 995, 994, 993, 992],
    list(range(999, -1, -3)),  # 334 > 50 original steps: a warning
]


@pytest.mark.parametrize("ts", CUSTOM)
@pytest.mark.parametrize("strength", [1.0, 0.75, 0.5, 0.3])
@pytest.mark.parametrize("orig", [None, 10])
def test_custom_timesteps_match(monkeypatch, caplog, ts, strength, orig):
    """Custom schedules: the same kept timesteps, step count and warnings as diffusers; where
    strength keeps none diffusers returns an empty schedule and minisd refuses."""
    import diffusers.schedulers.scheduling_tcd as mod

    warned = []
    monkeypatch.setattr(mod.logger, "warning", lambda msg, *a: warned.append(msg))
    kw = {"timesteps": ts, "strength": strength, "original_inference_steps": orig}
    ref, ours = tsb.ref_scheduler(REF, {}), TCDScheduler.from_config({})
    want = outcome(ref, **kw)
    with caplog.at_level(logging.WARNING, logger="minisd.schedulers"):
        got = outcome(ours, **kw)
    if got == "refused":
        assert want[0] == [] and int(len(ts) * strength) == 0
        return
    assert got == want and ours.custom_timesteps
    assert len(caplog.records) == len(warned)
    assert all(r.message.startswith("TCDScheduler: ") for r in caplog.records)


@pytest.mark.parametrize(
    "kw, diffusers_error, message",
    [
        ({"timesteps": [1, 2]}, ValueError, "descending"),
        ({"timesteps": [999, 500, 500]}, ValueError, "descending"),
        ({"timesteps": [1000, 5]}, ValueError, r"\[0, num_train_timesteps=1000\)"),
        ({"timesteps": []}, IndexError, "non-empty"),
        ({"timesteps": [10, -1]}, None, r"\[0, num_train"),  # diffusers: abar[-1] = abar_999
        ({"timesteps": [10.5, 3]}, None, "integers"),
        ({"timesteps": [10, 3], "num_inference_steps": 2}, ValueError, "exactly one"),
        ({}, ValueError, "exactly one"),
        ({"num_inference_steps": 0}, ZeroDivisionError, "num_inference_steps=0"),
        ({"num_inference_steps": 2.5}, TypeError, "num_inference_steps=2.5"),
        ({"num_inference_steps": 1001}, ValueError, "num_inference_steps=1001"),
        ({"num_inference_steps": 51}, ValueError, "num_inference_steps=51"),
        ({"num_inference_steps": 4, "strength": 0}, ValueError, "strength=0"),
        ({"num_inference_steps": 4, "strength": 1.5}, None, "strength=1.5"),  # t = 1479
        ({"num_inference_steps": 4, "strength": float("nan")}, ValueError, "strength=nan"),
        ({"num_inference_steps": 4, "original_inference_steps": 0}, ValueError, "steps=0"),
    ],
)
def test_set_timesteps_errors(kw, diffusers_error, message):
    """InputErrors naming the argument; diffusers raises ValueError / crashes / accepts."""
    ref = tsb.ref_scheduler(REF, {})
    if diffusers_error is None:
        ref.set_timesteps(**kw)
    else:
        with pytest.raises(diffusers_error):
            ref.set_timesteps(**kw)
    with pytest.raises(InputError, match=message):
        TCDScheduler.from_config({}).set_timesteps(**kw)


# ----------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_trajectory(monkeypatch, beta, pred, gamma, n):
    cfg = {**BETAS[beta], "prediction_type": pred}
    run_both(monkeypatch, cfg, n, gamma)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_trajectory_50_steps(monkeypatch, gamma, pred):
    """Measured <= 5.5e-7."""
    run_both(monkeypatch, {"prediction_type": pred}, 50, gamma)


@pytest.mark.parametrize("cfg", [{}, {"original_inference_steps": 1000}])
def test_1000_steps(monkeypatch, cfg):
    """Every training timestep (k = 1, or original_inference_steps passed). Measured 1.0e-6."""
    kw = {} if cfg else {"original_inference_steps": 1000}
    run_both(monkeypatch, cfg, 1000, 0.3, tol=tsb.LONG_TOL, **kw)


@pytest.mark.parametrize(
    "extra",
    [
        {"clip_sample": True, "clip_sample_range": 0.1},  # diffusers' TCD never clips x_0 ...
        {"thresholding": True, "dynamic_thresholding_ratio": 0.5, "sample_max_value": 1.1},
        {"set_alpha_to_one": False},  # ... and never reads the final alpha
        {"timestep_spacing": "trailing", "steps_offset": 1, "timestep_scaling": 1.0},
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
        {"num_train_timesteps": 100, "trained_betas": list(np.linspace(1e-3, 0.1, 100))},
    ],
)
@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_options(monkeypatch, extra, gamma):
    """Measured <= 4.8e-7."""
    run_both(monkeypatch, extra, 6, gamma)


@pytest.mark.parametrize("gamma", [0.3, 0.33, 0.5])
def test_s_floored_in_float32(monkeypatch, gamma):
    """s = floor((1 - gamma) t') from a float32 product as torch: 0.7 * 90 is 62.99... in
    float64 but 63 in float32; these t' are where the two disagree for gamma 0.3 / 0.33."""
    ts = [999, 900, 730, 700, 690, 360, 350, 180, 170, 90, 0]
    run_both(monkeypatch, {}, None, gamma, timesteps=ts)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_custom_timesteps_trajectory(monkeypatch, strength):
    """Custom schedule cut by strength: diffusers still draws (and adds zero-weight) noise on
    the last kept step, since its last-step test counts the uncut schedule."""
    ts = [999, 879, 759, 639, 499, 379, 259, 139]
    run_both(monkeypatch, {}, None, 0.3, timesteps=ts, strength=strength)


def test_float64(monkeypatch):
    """float64 samples with float32 coefficients, as diffusers' float32 0-d tensors promote:
    bit for bit over 8 steps; 1.6e-7 over 50, the float32 runs' 1-ulp sqrt residue (so float64
    parity is bounded by the float32 coefficients, not by 1e-10)."""
    x = start_sample(dtype=np.float64)
    run_both(monkeypatch, {"prediction_type": "v_prediction"}, 8, 0.3, x=x, tol=1e-15)
    run_both(monkeypatch, {}, 50, 0.3, x=x, tol=TRAJ_TOL)


def test_pred_noised_sample():
    """pred_noised_sample (x_s) as diffusers'; pred_original_sample is x_0 = (x - sigma eps) /
    alpha; a gamma = 0 step's prev_sample is x_s itself."""
    torch = need("torch")
    ref, ours = tsb.ref_scheduler(REF, {}), TCDScheduler.from_config({})
    x = start_sample()
    eps = standin(x, 999)
    for gamma in (0.3, 0.0):
        ref.set_timesteps(4)
        ours.set_timesteps(4)
        r = ref.step(torch.from_numpy(eps), ref.timesteps[1], torch.from_numpy(x), eta=gamma)
        o = ours.step(eps, ours.timesteps[1], x, eta=gamma, noise=np.zeros_like(x))
        assert rel_err(o.pred_noised_sample, r.pred_noised_sample.numpy()) <= 1e-7
    abar = np.float64(ours.alphas_cumprod[759])
    x0 = (x - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
    assert rel_err(o.pred_original_sample, x0) <= 1e-6
    np.testing.assert_array_equal(o.prev_sample, o.pred_noised_sample)


# ----------------------------------------------------------------------------- noise


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1, 2, 3)])  # torch's >= 16 / < 16 paths
@pytest.mark.parametrize("gamma", [0.3, 1.0])
def test_torch_generator(shape, gamma):
    """diffusers with torch.Generator().manual_seed(7) == minisd with TorchGenerator(7)."""
    torch = need("torch")
    ref, ours = tsb.ref_scheduler(REF, {}), TCDScheduler.from_config({})
    x = start_sample(shape)
    kw = {"eta": gamma}
    _, want, _ = run_ref(ref, 6, x, step_kw={**kw, "generator": torch.Generator().manual_seed(7)})
    _, got, _ = run_ours(ours, 6, x, step_kw={**kw, "rng": TorchGenerator(7)})
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert len(got) == 6 and max(errs) <= TRAJ_TOL, errs  # measured 0
    _, plain, _ = run_ours(TCDScheduler.from_config({}), 6, x, step_kw={"eta": 0.0})
    assert rel_err(got[-1], plain[-1]) > 1e-3  # the noise mattered


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_draws(dtype):
    """One draw of model_output's shape and dtype per step but the last, none at gamma = 0;
    ``noise=`` enters as sqrt(1 - abar_t' / abar_s) z."""
    x = start_sample((1, 2, 3, 3)).astype(dtype)
    for gamma, draws in [(0.3, 4), (0.0, 0), (1.0, 4)]:
        rng = tsb.CountingRng()
        out = sample_loop(TCDScheduler.from_config({}), standin, x, num_inference_steps=5,
                          eta=gamma, rng=rng)  # fmt: skip
        assert rng.calls == [((1, 2, 3, 3), np.dtype(dtype))] * draws and out.dtype == dtype
    # a custom schedule cut by strength draws on its last step too (diffusers' last-step test
    # counts the uncut 8 steps; that draw gets weight 0 as t' = s = 0): seeded runs stay in step
    s, rng = TCDScheduler.from_config({}), tsb.CountingRng()
    s.set_timesteps(timesteps=[999, 879, 759, 639, 499, 379, 259, 139], strength=0.5)
    sample_loop(s, standin, x, eta=0.3, rng=rng)
    assert len(rng.calls) == len(s.timesteps) == 4
    s, y = TCDScheduler.from_config({}), start_sample((1, 2, 3, 3))
    outs = []
    for z in (np.zeros_like(y), np.ones_like(y)):
        s.set_timesteps(5)  # 999, 799, 599, 399, 199: t' = 799, s = floor(0.3 * 799) = 239
        outs.append(s.step(standin(y, 999), 999, y, eta=0.7, noise=z).prev_sample)
    ratio = np.float64(s.alphas_cumprod[799]) / np.float64(s.alphas_cumprod[239])
    np.testing.assert_allclose(outs[1] - outs[0], np.sqrt(1 - ratio), rtol=1e-5)


def test_img2img(monkeypatch):
    """The pipeline protocol: set_begin_index(3) of 8, add_noise at timesteps[3], 5 steps with
    noise; the same as diffusers, and the same again when the start is found by timestep."""
    torch = need("torch")
    tsb.patch_randn(monkeypatch)
    x0, eps = start_sample(seed=1), start_sample(seed=2)
    noises = [start_sample(seed=10 + i) for i in range(5)]
    for begin in (True, False):
        ref, ours = tsb.ref_scheduler(REF, {}), TCDScheduler.from_config({})
        for s in (ref, ours):
            s.set_timesteps(8)
            if begin:
                s.set_begin_index(3)
        assert ours.begin_index == (3 if begin else None) and ours.step_index is None
        t0 = np.repeat(ours.timesteps[3:4], 2)
        xr = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t0))
        xo = ours.add_noise(x0, eps, t0)
        np.testing.assert_array_equal(xo, xr.numpy())
        for i, (t_r, t) in enumerate(zip(ref.timesteps[3:], ours.timesteps[3:])):
            kw = {"generator": tsb._Replay(noises, i)}
            xr = ref.step(torch.from_numpy(standin(xr.numpy(), t)), t_r, xr, **kw).prev_sample
            xo = ours.step(standin(xo, t), t, xo, noise=noises[i]).prev_sample
            assert ours.step_index == ref.step_index == 4 + i
        assert rel_err(xo, xr.numpy()) <= TRAJ_TOL  # measured 0


def test_begin_index_wins_over_lookup():
    """As diffusers: with a begin index the first step is that entry whatever the timestep
    (t = 500 is not in the schedule; t' is timesteps[2] = 499); without one, an InputError."""
    torch = need("torch")
    ref, ours = tsb.ref_scheduler(REF, {}), TCDScheduler.from_config({})
    x = start_sample()
    for s in (ref, ours):
        s.set_timesteps(4)
        s.set_begin_index(1)
    want = ref.step(torch.from_numpy(standin(x, 500)), 500, torch.from_numpy(x), eta=0.0)
    got = ours.step(standin(x, 500), 500, x, eta=0.0)
    assert ours.step_index == ref.step_index == 2
    assert rel_err(got.prev_sample, want.prev_sample.numpy()) <= TRAJ_TOL  # measured 0
    ours.set_timesteps(4)  # clears the begin index
    with pytest.raises(InputError, match="timestep=500"):
        ours.step(standin(x, 500), 500, x)


def test_sample_loop(xp):
    """minisd's loop (eta / rng as the pipeline passes them) on numpy, fake_cupy and cupy: the
    device result equals numpy's (noise is drawn on the host)."""
    x = start_sample((1, 2, 4, 4))

    def model(x_in, t):
        return xp.asarray(standin(np.asarray(x_in.get() if hasattr(x_in, "get") else x_in), t))

    out = sample_loop(TCDScheduler.from_config({}), model, xp.asarray(x), num_inference_steps=4,
                      eta=0.3, rng=np.random.default_rng(0))  # fmt: skip
    host = out.get() if hasattr(out, "get") else np.asarray(out)
    want = sample_loop(TCDScheduler.from_config({}), standin, x, num_inference_steps=4,
                       eta=0.3, rng=np.random.default_rng(0))  # fmt: skip
    assert type(out) is type(xp.asarray(x)) and host.dtype == np.float32
    assert np.isfinite(want).all() and rel_err(host, want) <= 1e-6


# ----------------------------------------------------------------------------- config / errors


def test_config():
    """diffusers' keys and defaults; bad values are ConfigErrors naming the key."""
    ref, ours = tsb.ref_scheduler(REF, {}), TCDScheduler.from_config({})
    assert set(ours.config) == {k for k in ref.config if not k.startswith("_")}
    for key in ours.config:
        assert ours.config[key] == ref.config[key], key
    assert ours.order == 1 and ours.init_noise_sigma == 1.0
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    for bad, message in [
        ({"original_inference_steps": 0}, "original_inference_steps=0"),
        ({"original_inference_steps": "50"}, "original_inference_steps='50'"),
        ({"timestep_scaling": "x"}, "timestep_scaling='x'"),
        ({"prediction_type": "flow"}, "prediction_type='flow'"),
        ({"beta_schedule": "cubic"}, "beta_schedule='cubic'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TCDScheduler.from_config(bad)
    s = TCDScheduler.from_config({"original_inference_steps": 2000})  # diffusers: at set_timesteps
    with pytest.raises(ConfigError, match="original_inference_steps=2000"):
        s.set_timesteps(4)
    s.set_timesteps(4, original_inference_steps=2000)  # the config value is not used then
    assert s.timesteps.tolist() == [999, 749, 499, 249]


def test_step_errors():
    s, x = TCDScheduler.from_config({}), start_sample()
    with pytest.raises(InputError, match="set_timesteps"):
        s.step(x, 999, x)
    s.set_timesteps(4)
    for bad in (-0.1, 1.5, float("nan"), "0.3"):  # diffusers asserts 0 <= eta <= 1
        with pytest.raises(InputError, match="eta="):
            s.step(x, 999, x, eta=bad)
    with pytest.raises(InputError, match="timestep=5"):
        s.step(x, 5, x)
    assert s.step_index is None
    s.step(x, 999, x)
    assert s.step_index == 1
