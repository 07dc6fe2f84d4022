"""DPM2 and DPM2-ancestral (KDPM2 / KDPM2Ancestral): trajectories, noise, img2img vs diffusers."""

import itertools

import numpy as np
import pytest
import test_schedulers_base as tsb
from refharness import need, rel_err
from test_schedulers_base import (
    BETAS,
    COS_TOL,
    LONG_TOL,
    SPACINGS,
    TRAJ_TOL,
    CountingRng,
    run_ours,
    run_pair,
    run_ref,
    standin,
    start_sample,
)

import minisd.schedulers as ms
from minisd.errors import ConfigError, InputError
from minisd.rng import TorchGenerator
from minisd.schedulers.kdpm2 import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler

DPM2, DPM2_A = "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"
CLASSES = {DPM2: KDPM2DiscreteScheduler, DPM2_A: KDPM2AncestralDiscreteScheduler}

# DPM2 with 2 steps goes from sigma_max (15-25) to sigma_min (0.03) in one step: x ~ 40 cancels
# to ~8. Its sigma_mid = sqrt(sigma_max sigma_min) comes from torch's float32 log / exp, which
# are not correctly rounded (ours is within 2 ulp of it), and moving diffusers' own sigma_mid by
# 1 ulp moves its result by 5.4e-6 (SD schedule, linspace); worst measured here 5.9e-6.
FEW_STEPS_TOL = 1.5e-5


_REFS = {}


@pytest.fixture(autouse=True)
def cached_reference(monkeypatch):
    """diffusers' KDPM2 constructors build a 1000-step schedule (0.1-0.3 s) and run_pair builds
    one per run: keep one per config for this module. Safe: their set_timesteps(n) resets all
    per-run state (stored sample, step index, begin index)."""
    build = tsb.ref_scheduler

    def cached(name, cfg):
        key = (name, repr(sorted(cfg.items())))
        if key not in _REFS:
            _REFS[key] = build(name, cfg)
        return _REFS[key]

    monkeypatch.setattr(tsb, "ref_scheduler", cached)


def patch_ancestral_randn(monkeypatch):
    """run_pair's replay patches diffusers' randn_tensor where its other samplers import it;
    route the KDPM2-ancestral module's own import to it too (looked up when called)."""
    import diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete as mod
    import diffusers.utils.torch_utils as tu

    monkeypatch.setattr(mod, "randn_tensor", lambda *a, **kw: tu.randn_tensor(*a, **kw))


def steep(beta, spacing):
    """The cosine schedule starting at t = 999: sigma_0 ~ 2e4."""
    return beta == "cos" and spacing != "leading"


def grid(ancestral):
    """Beta schedules x spacings x prediction types, with and without Karras sigmas; 1, 2, 7,
    25 steps for epsilon, 2 and 25 for v (without Karras: the two options touch disjoint code,
    and each diffusers config costs 0.3 s to build). Left out: Karras on the cosine schedule
    (ill-conditioned, as in test_schedulers_sigma); v_prediction from sigma_0 ~ 2e4 (moving
    diffusers' own sigma_mid by 1 ulp moves its result by up to 7e-4); DPM2-a from
    sigma_0 ~ 2e4 with 2 or 7 steps, where diffusers' sigma_down cancels to 0 (NaN; minisd
    refuses: test_ancestral_underflow)."""
    out = []
    for b, s, p, k, n in itertools.product(
        BETAS, SPACINGS, ["epsilon", "v_prediction"], [False, True], [1, 2, 7, 25]
    ):
        skip = (p == "v_prediction" and (n in (1, 7) or k)) or (k and b == "cos")
        skip |= steep(b, s) and (p == "v_prediction" or (ancestral and n in (2, 7)))
        if not skip:
            out.append((b, s, p, k, n))
    return out


def cfg_of(beta, spacing, pred, karras):
    cfg = {**BETAS[beta], "timestep_spacing": spacing, "prediction_type": pred}
    return {**cfg, "use_karras_sigmas": True} if karras else cfg


def tol_of(name, beta, n):
    if beta == "cos":
        return COS_TOL
    return FEW_STEPS_TOL if name == DPM2 and n == 2 else TRAJ_TOL


@pytest.mark.parametrize("beta,spacing,pred,karras,n", grid(ancestral=False))
def test_dpm2(beta, spacing, pred, karras, n):
    cfg = cfg_of(beta, spacing, pred, karras)
    run_pair(DPM2, KDPM2DiscreteScheduler, cfg, n, tol=tol_of(DPM2, beta, n))


@pytest.mark.parametrize("beta,spacing,pred,karras,n", grid(ancestral=True))
def test_dpm2_ancestral_same_noise(monkeypatch, beta, spacing, pred, karras, n):
    """The same noise tensor for the same model call: the draws line up one for one."""
    patch_ancestral_randn(monkeypatch)
    cfg = cfg_of(beta, spacing, pred, karras)
    run_pair(DPM2_A, KDPM2AncestralDiscreteScheduler, cfg, n, noisy=True,
             monkeypatch=monkeypatch, tol=tol_of(DPM2_A, beta, n))  # fmt: skip


@pytest.mark.parametrize("name", [DPM2, DPM2_A])
def test_long_run(monkeypatch, name):
    """500 steps = 999 model calls."""
    patch_ancestral_randn(monkeypatch)
    cfg = {**BETAS["sd"], "steps_offset": 0}
    run_pair(name, CLASSES[name], cfg, 500, noisy=name == DPM2_A, monkeypatch=monkeypatch,
             tol=LONG_TOL)  # fmt: skip


@pytest.mark.parametrize("name", [DPM2, DPM2_A])
def test_karras_sigma_bounds_from_config(monkeypatch, name):
    """diffusers' KDPM2 reads sigma_min / sigma_max when a config carries them (Euler's)."""
    patch_ancestral_randn(monkeypatch)
    cfg = {**BETAS["sd"], "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}
    run_pair(name, CLASSES[name], cfg, 6, noisy=name == DPM2_A, monkeypatch=monkeypatch)
    ours = CLASSES[name].from_config(cfg)
    ours.set_timesteps(6)
    assert ours.sigmas[0] == pytest.approx(10.0, rel=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1, 2, 3)])  # torch's >= 16 / < 16 paths
def test_ancestral_torch_generator(shape):
    """diffusers with torch.Generator(seed) == minisd with TorchGenerator(seed): the same draws
    in the same order, so seeded A1111 / diffusers images reproduce."""
    torch = need("torch")
    cfg = BETAS["sd"]
    ref = tsb.ref_scheduler(DPM2_A, cfg)
    ours = KDPM2AncestralDiscreteScheduler.from_config(cfg)
    x = start_sample(shape)
    _, expect, _ = run_ref(ref, 8, x, step_kw={"generator": torch.Generator().manual_seed(7)})
    _, got, _ = run_ours(ours, 8, x, step_kw={"rng": TorchGenerator(7)})
    errs = [rel_err(g, e) for g, e in zip(got, expect)]
    assert len(got) == 15 and max(errs) <= TRAJ_TOL, errs


def test_ancestral_draws():
    """One draw of model_output's shape and dtype per two-call step (n - 1), none on the first
    calls or the last (one-call) step; ``noise=`` replaces the draw and enters as sigma_up z."""

    s = KDPM2AncestralDiscreteScheduler.from_config(BETAS["sd"])
    rng, drawn_at = CountingRng(), []
    out = ms.sample_loop(s, standin, start_sample((1, 2, 3, 3)), num_inference_steps=5, rng=rng,
                         callback=lambda i, t, z: drawn_at.append(len(rng.calls)))  # fmt: skip
    assert rng.calls == [((1, 2, 3, 3), np.dtype(np.float32))] * 4
    assert drawn_at == [0, 1, 1, 2, 2, 3, 3, 4, 4]  # after each second call
    assert np.isfinite(out).all()
    s.set_timesteps(5)
    y = start_sample((1, 2, 3, 3))
    a = s.step(y * 0.1, s.timesteps[0], y, noise=np.full_like(y, 9.0)).prev_sample
    assert not s.state_in_first_order
    b0 = s.step(a * 0.1, s.timesteps[1], a, noise=np.zeros_like(y)).prev_sample
    s.set_timesteps(5)
    a2 = s.step(y * 0.1, s.timesteps[0], y, noise=np.zeros_like(y)).prev_sample
    b1 = s.step(a * 0.1, s.timesteps[1], a2, noise=np.ones_like(y)).prev_sample
    np.testing.assert_array_equal(a, a2)  # the first call ignores noise
    sig, sig_next = np.float64(s.sigmas[0]), np.float64(s.sigmas[1])
    sigma_up = np.sqrt(sig_next**2 * (sig**2 - sig_next**2) / sig**2)
    np.testing.assert_allclose(b1 - b0, sigma_up, rtol=1e-5)


@pytest.mark.parametrize("name", [DPM2, DPM2_A])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_sigmas_scaling_and_add_noise(name, spacing):
    """sigmas, init_noise_sigma, scale_model_input (both calls of a step) and add_noise by
    timestep (runs start at a solver step's first call: test_index_for_timestep) or by begin
    index (img2img), as diffusers."""
    torch = need("torch")
    cfg = {**BETAS["sd"], "timestep_spacing": spacing}
    ref, ours = tsb.ref_scheduler(name, cfg), CLASSES[name].from_config(cfg)
    ref.set_timesteps(20)
    ours.set_timesteps(20)
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    assert np.float32(ours.init_noise_sigma) == np.float32(ref.init_noise_sigma)
    x, eps = start_sample(seed=1), start_sample(seed=2)
    tx, teps = torch.from_numpy(x), torch.from_numpy(eps)
    for i in range(0, len(ours.timesteps), 2):  # by timestep (no begin index); see below
        t = np.repeat(ours.timesteps[i : i + 1], 2)
        want = ref.add_noise(tx, teps, torch.from_numpy(ref.timesteps.numpy()[[i, i]]))
        np.testing.assert_array_equal(ours.add_noise(x, eps, t), want.numpy())
    ref.set_begin_index(12)
    ours.set_begin_index(12)
    t = np.repeat(ours.timesteps[12:13], 2)
    want = ref.add_noise(tx, teps, torch.from_numpy(ref.timesteps.numpy()[[12, 12]]))
    np.testing.assert_array_equal(ours.add_noise(x, eps, t), want.numpy())
    scaled = []
    for k in (12, 13):  # a first call (at sigma_i), then a second (at sigma_mid)
        scaled.append(ours.scale_model_input(x, ours.timesteps[k]))
        want = ref.scale_model_input(tx, ref.timesteps[k]).numpy()
        np.testing.assert_allclose(scaled[-1], want, rtol=3e-7)
        ours.step(x * 0.1, ours.timesteps[k], x, noise=eps)
        ref.step(tx * 0.1, ref.timesteps[k], tx)
    assert np.abs(scaled[1] - scaled[0]).max() > 0.01 * np.abs(scaled[0]).max()


@pytest.mark.parametrize("name", [DPM2, DPM2_A])
def test_img2img(monkeypatch, name):
    """The pipeline protocol for strength 0.6 of 10 steps: begin at model call 2 * 4 (order
    2), add_noise there, run the remaining 11 calls; as diffusers."""
    torch = need("torch")
    tsb.patch_randn(monkeypatch)
    patch_ancestral_randn(monkeypatch)
    ref, ours = tsb.ref_scheduler(name, BETAS["sd"]), CLASSES[name].from_config(BETAS["sd"])
    x0, eps = start_sample(seed=1), start_sample(seed=2)
    noises = [start_sample(seed=10 + i) for i in range(11)]
    for s in (ref, ours):
        s.set_timesteps(10)
        s.set_begin_index(8)
    ts_ref, ts = ref.timesteps[8:], ours.timesteps[8:]
    assert len(ts) == 11
    xr = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), ts_ref[:1].repeat(2))
    xo = ours.add_noise(x0, eps, np.repeat(ts[:1], 2))
    np.testing.assert_array_equal(xo, xr.numpy())
    for i, (t_ref, t) in enumerate(zip(ts_ref, ts)):
        out = torch.from_numpy(standin(ref.scale_model_input(xr, t_ref).numpy(), t_ref.item()))
        kw = {"generator": tsb._Replay(noises, i)} if name == DPM2_A else {}
        xr = ref.step(out, t_ref, xr, **kw).prev_sample
        out = standin(ours.scale_model_input(xo, t), t)
        xo = ours.step(out, t, xo, noise=noises[i]).prev_sample
    assert rel_err(xo, xr.numpy()) <= TRAJ_TOL


@pytest.mark.parametrize("name", [DPM2, DPM2_A])
def test_index_for_timestep(name):
    """Where a run starting at t_i begins: as diffusers. DPM2-a's sigma_mid equals sigma_{i+1}
    up to rounding, so its midpoint timesteps often repeat t_{i+1} (both rules then take
    t_{i+1}'s own call); which ones repeat exactly depends on the last bit of sigma_mid, so
    lookups of midpoint timesteps themselves are not compared."""
    repeats = 0
    for spacing in SPACINGS:
        cfg = {**BETAS["sd"], "timestep_spacing": spacing}
        ref, ours = tsb.ref_scheduler(name, cfg), CLASSES[name].from_config(cfg)
        ref.set_timesteps(12)
        ours.set_timesteps(12)
        got = [ours.index_for_timestep(t) for t in ours.timesteps[::2]]
        assert got == [ref.index_for_timestep(t) for t in ref.timesteps[::2]]
        assert got == list(range(0, 23, 2))
        repeats += len(ours.timesteps) - len(np.unique(ours.timesteps))
    assert (repeats > 0) == (name == DPM2_A)


@pytest.mark.parametrize("name", [DPM2, DPM2_A])
def test_repeated_first_timestep(monkeypatch, name):
    """Deliberate difference: on the cosine schedule with Karras sigmas t_0 = t_1 = 999 after
    rounding; diffusers' lookup starts at solver step 1 and ends in NaN, minisd's at step 0:
    the run diffusers makes when told to begin at 0."""
    tsb.patch_randn(monkeypatch)
    patch_ancestral_randn(monkeypatch)
    cfg = {**BETAS["cos"], "timestep_spacing": "trailing", "use_karras_sigmas": True}
    ref, ours = tsb.ref_scheduler(name, cfg), CLASSES[name].from_config(cfg)
    x = start_sample()
    noises = [start_sample(seed=10 + i) for i in range(13)]
    lost = run_ref(ref, 7, x, noises if name == DPM2_A else None)[1]
    assert not np.isfinite(lost[-1]).all() and ref.timesteps[0] == ref.timesteps[2] == 999
    ours.set_timesteps(7)
    assert ref.index_for_timestep(ref.timesteps[0]) == 2 and ours.index_for_timestep(999) == 0
    set_timesteps = ref.set_timesteps

    def and_begin(n, *a, **kw):
        set_timesteps(n, *a, **kw)
        ref.set_begin_index(0)

    monkeypatch.setattr(ref, "set_timesteps", and_begin)
    expect = run_ref(ref, 7, x, noises if name == DPM2_A else None)[1]
    got = run_ours(ours, 7, x, noises)[1]
    assert max(rel_err(g, e) for g, e in zip(got, expect)) <= COS_TOL


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ancestral_underflow(monkeypatch, spacing):
    """From sigma_0 ~ 2e4 (cosine schedule) a few steps make sigma_{i+1} << sigma_i, and
    sigma_down = sqrt(s'^2 - sigma_up^2) cancels to 0 in float32: diffusers returns NaN,
    minisd raises InputError, for exactly the same step counts."""
    tsb.patch_randn(monkeypatch)
    patch_ancestral_randn(monkeypatch)
    cfg = {**BETAS["cos"], "timestep_spacing": spacing}
    ref = tsb.ref_scheduler(DPM2_A, cfg)
    ours = KDPM2AncestralDiscreteScheduler.from_config(cfg)
    x, refused = start_sample((1, 1, 2, 2)), []
    for n in range(1, 12):
        _, outs, _ = run_ref(ref, n, x, noises=[np.zeros_like(x)] * 2 * n)
        try:
            ours.set_timesteps(n)
        except InputError as e:
            assert "sigma_down" in str(e) and "more steps" in str(e)
            refused.append(n)
        assert (n in refused) == (not np.isfinite(outs[-1]).all()), n
    assert len(refused) >= 4 and 1 not in refused


@pytest.mark.parametrize("name", [DPM2, DPM2_A])
def test_sample_loop_numpy_and_cupy(name, xp):
    """minisd's one loop (eta / rng keywords as the pipeline passes them), on cupy too: the
    same result as the numpy loop (noise is drawn on the host)."""
    s = CLASSES[name].from_config(BETAS["sd"])
    x = start_sample((1, 2, 4, 4))

    def model(x_in, t):
        return xp.asarray(standin(np.asarray(x_in.get() if hasattr(x_in, "get") else x_in), t))

    out = ms.sample_loop(s, model, xp.asarray(x), num_inference_steps=6, eta=1.0,
                         rng=np.random.default_rng(0))  # fmt: skip
    assert len(s.timesteps) == 11 and s.order == 2
    assert out.shape == x.shape and out.dtype == np.float32
    host = out.get() if hasattr(out, "get") else out
    ref = ms.sample_loop(CLASSES[name].from_config(BETAS["sd"]), standin, x,
                         num_inference_steps=6, rng=np.random.default_rng(0))  # fmt: skip
    assert np.isfinite(ref).all() and np.abs(host - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("name", [DPM2, DPM2_A])
def test_float16_sample(name):
    s = CLASSES[name].from_config(BETAS["sd"])
    x = start_sample((1, 2, 4, 4))
    half = ms.sample_loop(s, standin, x.astype(np.float16), num_inference_steps=6,
                          rng=np.random.default_rng(0))  # fmt: skip
    full = ms.sample_loop(s, standin, x, num_inference_steps=6, rng=np.random.default_rng(0))
    assert half.dtype == np.float16
    assert rel_err(half.astype(np.float32), full) <= 5e-3


@pytest.mark.parametrize("name", [DPM2, DPM2_A])
def test_config(name):
    """diffusers' defaults; its options minisd lacks are ConfigErrors naming the key; bad values
    are clear errors."""
    cls = CLASSES[name]
    ref, ours = tsb.ref_scheduler(name, {}), cls.from_config({})
    for key in ours.config:
        if key not in ("sigma_min", "sigma_max"):  # read only when a config carries them
            assert ours.config[key] == ref.config[key], key
    for key in ("use_exponential_sigmas", "use_beta_sigmas"):  # one spacing at most
        with pytest.raises(ConfigError, match=key):
            cls.from_config({key: True, "use_karras_sigmas": True})
        assert cls.from_config({key: False}).order == 2
    with pytest.raises(ConfigError, match="prediction_type='sample'"):
        cls.from_config({"prediction_type": "sample"})  # diffusers: NotImplementedError
    with pytest.raises(ConfigError, match="beta_schedule='cubic'"):
        cls.from_config({"beta_schedule": "cubic"})
    with pytest.raises(ConfigError, match="timestep_spacing='odd'"):
        cls.from_config({"timestep_spacing": "odd"}).set_timesteps(5)
    s, x = cls.from_config({}), start_sample()
    with pytest.raises(InputError, match="set_timesteps"):
        s.step(x, 999, x)
    with pytest.raises(InputError, match="set_timesteps"):
        assert s.init_noise_sigma
    for bad in (0, 1001, 2.5):
        with pytest.raises(InputError, match="num_inference_steps"):
            s.set_timesteps(bad)
    s.set_timesteps(4)
    with pytest.raises(InputError, match="timestep=5"):
        s.scale_model_input(x, 5)
