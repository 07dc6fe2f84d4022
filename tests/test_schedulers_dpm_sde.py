"""DPM++ SDE (DPMSolverSDEScheduler): trajectories, img2img and the pipeline against diffusers
with the same Brownian noise; the law of minisd's own noise sampler.

diffusers draws the SDE's noise from torchsde's Brownian tree, which minisd does not reproduce
(it samples its own path: dpm_sde.BrownianBridgeNoise). The parity tests replace diffusers'
BrownianTreeNoiseSampler by a table of noise tensors keyed on (sigma, sigma_next) and give
minisd the same table: both must ask for the same increments in the same order and give the
same trajectories: float32 on the stock tables (TRAJ_TOL; torch's float32 sqrt is not correctly
rounded, not even on vectors: its training sigma table differs from the exact one in 4 of 1000
entries) and float64 on float64 sigma tables given to both sides (1e-10: the same formulas).
"""

import itertools

import numpy as np
import pytest
from pipelines import build
from refharness import assert_rel, need, rel_err
from test_schedulers_base import BETAS, LONG_TOL, SPACINGS, TRAJ_TOL, CountingRng, standin
from test_schedulers_base import start_sample as sample

import minisd
import minisd.schedulers as ms
from minisd.errors import ConfigError, InputError
from minisd.rng import TorchGenerator
from minisd.schedulers import dpm_sde
from minisd.schedulers.dpm_sde import BrownianBridgeNoise, DPMSolverSDEScheduler

F64_TOL = 1e-10
# options read only by set_timesteps / step: set on a cached diffusers scheduler (its
# constructor builds a 1000-step schedule, 0.7 s)
LATE = {"timestep_spacing": "linspace", "prediction_type": "epsilon",
        "use_karras_sigmas": False, "steps_offset": 0}  # fmt: skip
_REFS = {}


def sde_module():
    return need("torchsde", "diffusers.schedulers.scheduling_dpmsolver_sde")[1]


def ref_scheduler(cfg):
    early = {k: v for k, v in cfg.items() if k not in LATE}
    key = repr(sorted(early.items()))
    if key not in _REFS:
        _REFS[key] = sde_module().DPMSolverSDEScheduler.from_config(early)
    ref = _REFS[key]
    ref.register_to_config(**{k: cfg.get(k, v) for k, v in LATE.items()})
    return ref


class KeyedNoise:
    """Noise tensors keyed on (sigma, sigma_next) and shape, sigmas matched to 1e-5 relative
    (the libraries' float32 scalars may differ by an ulp); ``log``: the keys asked for, in
    order. After ``replay()`` every key must be known (minisd asks for what diffusers did)."""

    def __init__(self, seed=123):
        self.tables, self.log = {}, []  # shape -> (keys (k, 2), [tensor per key])
        self.rng, self.frozen = np.random.default_rng(seed), False

    def __call__(self, sigma, sigma_next, shape):
        key, shape = np.array([float(sigma), float(sigma_next)]), tuple(shape)
        keys, values = self.tables.get(shape, (np.zeros((0, 2)), []))
        hit = np.nonzero((np.abs(keys - key) <= 1e-5 * key).all(axis=1))[0]
        if len(hit) == 0:
            assert not self.frozen, f"noise asked for at {key}, which diffusers never asked for"
            values.append(self.rng.standard_normal(shape))
            self.tables[shape] = np.vstack([keys, key]), values
            hit = [len(values) - 1]
        self.log.append((shape, int(hit[0])))
        return values[hit[0]]

    def replay(self):
        self.frozen, asked, self.log = True, self.log, []
        return asked

    def sampler(self, like):
        return lambda a, b: self(a, b, like.shape).astype(like.dtype)


def patch_tree(monkeypatch, keyed):
    """diffusers' BrownianTreeNoiseSampler -> ``keyed``; returns the seeds it was built with."""
    torch, mod = need("torch"), sde_module()
    seeds = []

    class Tree:
        def __init__(self, x, sigma_min, sigma_max, seed=None, transform=None):
            self.x = x
            seeds.append(seed)

        def __call__(self, sigma, sigma_next):
            got = keyed(sigma, sigma_next, tuple(self.x.shape))
            return torch.from_numpy(got).to(self.x.dtype)

    monkeypatch.setattr(mod, "BrownianTreeNoiseSampler", Tree)
    return seeds


def run_ref(ref, n, x, *, f64=False, begin=None, step_kw=None):
    """diffusers' loop from x (or img2img from (x_0, noise) at ``begin``); ``f64``: its sigma
    table in float64. Returns (timesteps, [prev_sample per call], [x_0 per call])."""
    torch = need("torch")
    ref.set_timesteps(n)
    if f64:
        ref.sigmas = ref.sigmas.double()
    outs, x0s = [], []
    if begin is None:
        xt = torch.from_numpy(x.copy()) * ref.init_noise_sigma
    else:  # img2img: x is (x_0, noise)
        ref.set_begin_index(begin)
        t0 = ref.timesteps[begin : begin + 1].repeat(len(x[0]))
        xt = ref.add_noise(torch.from_numpy(x[0]), torch.from_numpy(x[1]), t0)
    for t in ref.timesteps[begin or 0 :]:
        out = torch.from_numpy(standin(ref.scale_model_input(xt, t).numpy(), t.item()))
        res = ref.step(out, t, xt, **(step_kw or {}))
        xt = res.prev_sample
        outs.append(xt.numpy().copy())
        x0s.append(res.pred_original_sample.numpy().copy())
    return ref.timesteps.numpy().copy(), outs, x0s


def run_ours(ours, n, x, *, tables=None, begin=None, step_kw=None):
    """As run_ref; ``tables``: diffusers' (float64) sigmas and timesteps, given to ours."""
    ours.set_timesteps(n)
    if tables is not None:
        ours.sigmas, ours.timesteps = (a.numpy().copy() for a in tables)
    if begin is None:
        xt = x * ours.init_noise_sigma  # a python float, as the pipeline's
    else:
        ours.set_begin_index(begin)
        xt = ours.add_noise(x[0], x[1], np.repeat(ours.timesteps[begin : begin + 1], len(x[0])))
    outs, x0s = [], []
    for t in ours.timesteps[begin or 0 :]:
        res = ours.step(standin(ours.scale_model_input(xt, t), t), t, xt, **(step_kw or {}))
        xt = res.prev_sample
        outs.append(xt)
        x0s.append(res.pred_original_sample)
    return ours.timesteps, outs, x0s


def pair(monkeypatch, cfg, n, *, f64=False, dtype=np.float32, begin=None, s_noise=1.0,
         tol=TRAJ_TOL):  # fmt: skip
    """Both trajectories on the same keyed noise; every prev_sample and x_0 compared."""
    keyed = KeyedNoise()
    patch_tree(monkeypatch, keyed)
    x = sample(dtype=np.float64 if f64 else dtype)
    if begin is not None:
        x = (x, sample(seed=5, dtype=x.dtype))
    ref, ours = ref_scheduler(cfg), DPMSolverSDEScheduler.from_config(cfg)
    ts_r, out_r, x0_r = run_ref(ref, n, x, f64=f64, begin=begin, step_kw={"s_noise": s_noise})
    asked = keyed.replay()
    kw = {"s_noise": s_noise, "noise_sampler": keyed.sampler(out_r[0])}
    tables = (ref.sigmas, ref.timesteps) if f64 else None
    ts_o, out_o, x0_o = run_ours(ours, n, x, tables=tables, begin=begin, step_kw=kw)
    assert keyed.log == asked and len(asked) == 2 * (len(out_r) // 2)
    assert ts_o.dtype == ts_r.dtype == np.float64
    np.testing.assert_allclose(ts_o, ts_r, rtol=1e-6, err_msg="timesteps")
    worst = 0.0
    for i, (a, b, a0, b0) in enumerate(zip(out_o, out_r, x0_o, x0_r, strict=True)):
        assert a.dtype == b.dtype, f"call {i}: {a.dtype} != {b.dtype}"
        worst = max(worst, rel_err(a, b))
        assert worst <= tol, f"call {i} (t={ts_r[i]}): prev_sample rel. error {worst:.2e}"
        scale = max(np.abs(b0).max(), np.abs(b).max())  # x_0 is small next to x_T
        assert np.abs(a0 - b0).max() / scale <= tol, f"call {i}: pred_original_sample"
    assert np.isfinite(out_o[-1]).all()
    return worst


def grid():
    """Every beta schedule x spacing x Karras; 1, 2, 7, 25 steps for epsilon, 2 and 25 for v."""
    return [
        (b, s, p, k, n)
        for b, s, p, k, n in itertools.product(
            BETAS, SPACINGS, ["epsilon", "v_prediction"], [False, True], [1, 2, 7, 25]
        )
        if p == "epsilon" or n in (2, 25)
    ]


@pytest.mark.parametrize("beta,spacing,pred,karras,n", grid())
@pytest.mark.parametrize("f64", [False, True], ids=["f32", "f64"])
def test_trajectories(monkeypatch, beta, spacing, pred, karras, n, f64):
    cfg = {**BETAS[beta], "timestep_spacing": spacing, "prediction_type": pred,
           "use_karras_sigmas": karras}  # fmt: skip
    pair(monkeypatch, cfg, n, f64=f64, tol=F64_TOL if f64 else TRAJ_TOL)


@pytest.mark.parametrize("f64", [False, True], ids=["f32", "f64"])
def test_long_run(monkeypatch, f64):
    """500 steps = 999 model calls (and 998 noise tensors)."""
    pair(monkeypatch, BETAS["sd"], 500, f64=f64, tol=F64_TOL if f64 else LONG_TOL)


@pytest.mark.parametrize("s_noise", [0.0, 0.5, 1.3])
def test_s_noise(monkeypatch, s_noise):
    pair(monkeypatch, {**BETAS["sd"], "use_karras_sigmas": True}, 9, s_noise=s_noise)


def test_float64_samples_on_float32_tables(monkeypatch):
    """diffusers' own float64 run: float32 coefficients on float64 samples."""
    pair(monkeypatch, {**BETAS["sd"], "prediction_type": "v_prediction"}, 12, dtype=np.float64)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("f64", [False, True], ids=["f32", "f64"])
def test_img2img(monkeypatch, spacing, f64):
    """The pipeline protocol for strength 0.6 of 10 steps: set_begin_index(2 * 4) (order 2),
    add_noise at that timestep, the remaining 11 calls; as diffusers."""
    cfg = {**BETAS["sd"], "timestep_spacing": spacing}
    pair(monkeypatch, cfg, 10, begin=8, f64=f64, tol=F64_TOL if f64 else TRAJ_TOL)


def test_tables_and_scaling():
    """sigmas (torch's float32 sqrt: within 1 ulp), init_noise_sigma, scale_model_input on a
    step's first call (sigma_i) and second (sigma_mid), add_noise by timestep."""
    torch = need("torch")
    for spacing in SPACINGS:
        cfg = {**BETAS["sd"], "timestep_spacing": spacing}
        ref, ours = ref_scheduler(cfg), DPMSolverSDEScheduler.from_config(cfg)
        ref.set_timesteps(20)
        ours.set_timesteps(20)
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1.2e-7)
        assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-7)
        x, eps = sample(seed=1), sample(seed=2)
        tx, teps = torch.from_numpy(x), torch.from_numpy(eps)
        for i in (0, 6):  # first calls: looked up by timestep
            t = np.repeat(ours.timesteps[i : i + 1], 2)
            want = ref.add_noise(tx, teps, torch.from_numpy(t)).numpy()
            np.testing.assert_allclose(ours.add_noise(x, eps, t), want, rtol=3e-7)
        scaled = []
        for k in (0, 1):
            scaled.append(ours.scale_model_input(x, ours.timesteps[k]))
            want = ref.scale_model_input(tx, ref.timesteps[k]).numpy()
            np.testing.assert_allclose(scaled[-1], want, rtol=3e-7)
            ours.step(x * 0.1, ours.timesteps[k], x, noise=eps)
            ref.noise_sampler = lambda a, b, z=teps: z
            ref.step(tx * 0.1, ref.timesteps[k], tx)
        assert np.abs(scaled[1] - scaled[0]).max() > 0.01 * np.abs(scaled[0]).max()


# ----------------------------------------------------------------------------- noise


def test_noise_sampler_seed_reaches_diffusers_tree(monkeypatch):
    """diffusers builds its tree with the config's seed (one tree per image for a list)."""
    seeds = patch_tree(monkeypatch, KeyedNoise())
    for seed in (7, [7, 8]):
        run_ref(ref_scheduler({"noise_sampler_seed": seed}), 3, sample())
    assert seeds == [7, [7, 8]]


def test_noise_sampler_seed():
    """An int seed: a path drawn from minisd.rng's TorchGenerator(seed), whatever step's rng;
    one seed per image: row b is the single-seed run of image b."""
    x = sample((2, 3, 4, 5))

    def final(seed, shape=x.shape, rng=None):
        s = DPMSolverSDEScheduler(noise_sampler_seed=seed)
        return ms.sample_loop(s, standin, x[: shape[0]], num_inference_steps=6, rng=rng)

    a = final(7, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(a, final(7, rng=np.random.default_rng(1)))
    np.testing.assert_array_equal(a, final(None, rng=TorchGenerator(7)))
    assert rel_err(final(8), a) > 1e-2
    rows = final([7, 8])
    np.testing.assert_array_equal(rows[:1], final(7, shape=(1,)))
    assert rel_err(rows[1:], a[1:]) > 1e-2
    with pytest.raises(InputError, match="2 generators for a batch of 1"):
        final([7, 8], shape=(1,))
    for bad in (1.5, "7", True, [], [1, "a"], 2**64):
        with pytest.raises(ConfigError, match="noise_sampler_seed"):
            DPMSolverSDEScheduler(noise_sampler_seed=bad)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_draws(dtype):
    """One standard-normal draw per model call but the last (none at the first point of the
    path), float32 for float16 / float32 samples; ``noise=`` replaces a call's increment."""
    n, rng, drawn_at = 5, CountingRng(), []
    out = ms.sample_loop(DPMSolverSDEScheduler(), standin, sample((1, 2, 3, 3), dtype=dtype),
                         num_inference_steps=n, rng=rng,
                         callback=lambda i, t, z: drawn_at.append(len(rng.calls)))  # fmt: skip
    draw = np.float64 if dtype == np.float64 else np.float32
    assert rng.calls == [((1, 2, 3, 3), np.dtype(draw))] * (2 * n - 2)
    assert drawn_at == [*range(1, 2 * n - 1), 2 * n - 2] and out.dtype == dtype
    s, y = DPMSolverSDEScheduler(), sample((1, 2, 3, 3))
    got = []
    for z in (0.0, 1.0):
        s.set_timesteps(n)
        got.append(s.step(y * 0.1, s.timesteps[0], y, noise=np.full_like(y, z)).prev_sample)
    lam = -np.log(s.sigmas[:2].astype(np.float64))
    sig, mid = np.exp(-lam[0]), np.exp(-(lam[0] + lam[1]) / 2)
    np.testing.assert_allclose(got[1] - got[0], mid * np.sqrt(1 - mid**2 / sig**2), rtol=1e-5)


def bridge_queries(sampler, sigmas):
    """The scheduler's queries: per step (s, s_mid), then (s, s_next); also (s_mid, s_next).
    Returns three (steps, N) arrays of normalized increments."""
    mid, full, rest = [], [], []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        m = np.sqrt(s * s_next)
        mid.append(sampler(s, m))
        full.append(sampler(s, s_next))
        rest.append(sampler(m, s_next))
    return np.array(mid, np.float64), np.array(full, np.float64), np.array(rest, np.float64)


def test_brownian_bridge_is_one_brownian_path():
    """Normalized increments are N(0, 1); those of disjoint intervals are independent; the
    half-step increments add up to the whole step's (one path); a point queried between two
    known ones comes from the Brownian bridge (the same law). 5 sigma bounds, N = 2e5."""
    N, sig = 200_000, np.array([14.6, 6.0, 2.0, 0.5, 0.03])
    counting = CountingRng(0)
    walk = BrownianBridgeNoise(np.zeros(N, np.float32), rng=counting)
    mid, full, rest = bridge_queries(walk, sig)
    assert len(counting.calls) == 2 * (len(sig) - 1)  # rest: both ends known, no draw
    s, s_next = sig[:-1, None], sig[1:, None]
    m = np.sqrt(s * s_next)
    np.testing.assert_allclose(np.sqrt(s - m) * mid + np.sqrt(m - s_next) * rest,
                               np.sqrt(s - s_next) * full, atol=2e-6)  # fmt: skip
    corr_expected = np.sqrt((s - m) / (s - s_next))[:, 0]  # 0.6 to 0.98 here
    bridge = BrownianBridgeNoise(np.zeros(N), rng=np.random.default_rng(1))
    steps = list(zip(sig[:-1], sig[1:]))
    full_b = np.array([bridge(a, b) for a, b in steps[::-1]])[::-1]  # lowest sigma first
    mid_b = np.array([bridge(a, np.sqrt(a * b)) for a, b in steps])  # then bridges between
    for z in (mid, full, rest, mid_b, full_b):
        assert np.abs(z.mean(axis=1)).max() < 5 / np.sqrt(N)
        assert np.abs(z.var(axis=1) - 1).max() < 5 * np.sqrt(2 / N)
    for a, b in [(mid, full), (mid_b, full_b)]:
        corr = [np.corrcoef(u, v)[0, 1] for u, v in zip(a, b)]
        np.testing.assert_allclose(corr, corr_expected, atol=5 / np.sqrt(N))
    independent = [(mid[1], rest[1]), (full[0], full[1]), (full[1], mid[2]), (rest[0], full[3]),
                   (full_b[0], full_b[2])]  # fmt: skip
    for i, (a, b) in enumerate(independent):
        assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(N), i
    walk.forget_above(0.5)
    assert walk._t[-1] == 0.5 and len(walk._t) == 3  # 0.03, sqrt(0.015), 0.5
    assert np.all(walk(0.5, 0.5) == 0)


def test_gaussian_data_reaches_its_law():
    """With the exact eps-predictor of data N(mu, s^2), 50 Karras steps from N(0, sigma_max^2)
    noise end at the data's mean and spread (errors measured within 0.3% / 1.0% of s, seeds 0
    and 1). Fresh independent noise on each call instead of one path gives -7% in the spread,
    noise 10% too strong or weak +9% / -11%."""
    mu, s, N = 0.5, 0.3, 40_000
    sched = ms.get_scheduler("dpmpp_sde_karras", BETAS["sd"])
    abar = sched.alphas_cumprod.astype(np.float64)
    log_sig = 0.5 * np.log((1 - abar) / abar)  # (T,)

    def model(x, t):
        a = 1 / (1 + np.exp(2 * np.interp(float(t), np.arange(len(abar)), log_sig)))
        return (np.sqrt(1 - a) * (x - np.sqrt(a) * mu) / (a * s**2 + 1 - a)).astype(x.dtype)

    x = sample((1, 1, 1, N), seed=3)
    out = ms.sample_loop(sched, model, x, num_inference_steps=50, rng=TorchGenerator(0))
    assert abs(out.mean() - mu) < 0.02 * s and abs(out.std() - s) < 0.03 * s


# ----------------------------------------------------------------------------- API, backends


def test_config():
    """diffusers' defaults; its options minisd lacks are ConfigErrors naming the key."""
    ref, ours = sde_module().DPMSolverSDEScheduler(), DPMSolverSDEScheduler()
    for key in ours.config:
        assert ours.config[key] == ref.config[key], key
    assert ours.order == ref.order == 2
    for key in ("use_exponential_sigmas", "use_beta_sigmas"):
        with pytest.raises(ConfigError, match=key):
            DPMSolverSDEScheduler.from_config({key: True})
    with pytest.raises(ConfigError, match="prediction_type='sample'"):
        DPMSolverSDEScheduler(prediction_type="sample")  # diffusers: NotImplementedError
    with pytest.raises(ConfigError, match="timestep_spacing='odd'"):
        DPMSolverSDEScheduler(timestep_spacing="odd").set_timesteps(5)
    s, x = DPMSolverSDEScheduler(), sample()
    with pytest.raises(InputError, match="set_timesteps"):
        s.step(x, 999, x)
    for bad in (0, 1001, 2.5):
        with pytest.raises(InputError, match="num_inference_steps"):
            s.set_timesteps(bad)
    s.set_timesteps(4)
    assert len(s.timesteps) == 7 and len(s.sigmas) == 8
    with pytest.raises(InputError, match="timestep=5"):
        s.scale_model_input(x, 5)
    assert type(ms.get_scheduler("dpmpp_sde_karras")).__name__ == "DPMSolverSDEScheduler"
    assert ms.get_scheduler("dpmpp_sde_karras").config.use_karras_sigmas


def test_sample_loop_numpy_and_cupy(xp):
    """minisd's loop on cupy (fake_cupy on the CPU) draws the same noise on the host: the same
    result as on numpy."""
    x = sample((1, 2, 4, 4))

    def model(x_in, t):
        return xp.asarray(standin(np.asarray(x_in.get() if hasattr(x_in, "get") else x_in), t))

    out = ms.sample_loop(ms.get_scheduler("dpmpp_sde", BETAS["sd"]), model, xp.asarray(x),
                         num_inference_steps=6, eta=1.0, rng=TorchGenerator(0))  # fmt: skip
    host = out.get() if hasattr(out, "get") else out
    ref = ms.sample_loop(ms.get_scheduler("dpmpp_sde", BETAS["sd"]), standin, x,
                         num_inference_steps=6, rng=TorchGenerator(0))  # fmt: skip
    assert host.dtype == np.float32 and np.isfinite(ref).all()
    assert np.abs(host - ref).max() <= 1e-5 * np.abs(ref).max()


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    sde_module()  # skip (or fail in CI) without torchsde, before building anything
    folder = tmp_path_factory.mktemp("sde") / "sd1"
    return build("sd1", folder), minisd.StableDiffusion.from_pretrained(folder)


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_sde_karras"])
def test_pipeline_same_noise(monkeypatch, pipes, name):
    """txt2img with the same latents and img2img with the same seed (VAE sample and forward
    noise from minisd.rng's TorchGenerator), the SDE noise keyed as above: diffusers' results."""
    torch, diffusers = need("torch", "diffusers")
    from PIL import Image

    ref, ours = pipes
    keyed = KeyedNoise()
    patch_tree(monkeypatch, keyed)
    monkeypatch.setattr(dpm_sde, "BrownianBridgeNoise", lambda like, rng=None: keyed.sampler(like))
    sched = sde_module().DPMSolverSDEScheduler.from_config(ref.scheduler.config,
                                                           **ms.NAMES[name][1])  # fmt: skip
    parts = {**ref.components, "scheduler": sched}
    t2i, i2i = (
        diffusers.StableDiffusionPipeline(**parts),
        diffusers.StableDiffusionImg2ImgPipeline(**parts),
    )
    lat = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    kw = dict(prompt="a cat", num_inference_steps=4, guidance_scale=6.0, output_type="latent")
    t2i_kw = dict(kw, height=64, width=64, num_images_per_prompt=2)
    i2i_kw = dict(kw, image=image, strength=0.6)
    with torch.no_grad():
        expect = [
            t2i(**t2i_kw, latents=torch.from_numpy(lat)).images.numpy(),
            i2i(**i2i_kw, generator=torch.Generator().manual_seed(3)).images.numpy(),
        ]
    asked = keyed.replay()
    got = [
        ours(**t2i_kw, latents=lat, scheduler=name, progress=False),
        ours(**i2i_kw, seed=3, scheduler=name, progress=False),
    ]
    assert keyed.log == asked and len(asked) == 2 * 3 + 2 * 1  # 4 steps; img2img: 2 of them
    for g, e, what in zip(got, expect, ["txt2img", "img2img"]):
        assert_rel(g, e, 1e-4, f"{name} {what}")


def test_pipeline_seeded(tiny_sd1_files):
    """minisd's own Brownian noise through the pipeline (a weights_tools.make_tiny folder: no
    reference package needed): seeded, finite, and the seed matters."""
    ours = minisd.StableDiffusion.from_pretrained(tiny_sd1_files[0])
    kw = dict(prompt="a cat", num_inference_steps=3, height=64, width=32, output_type="np",
              scheduler="dpmpp_sde", progress=False)  # fmt: skip
    a, b, c = ours(**kw, seed=1), ours(**kw, seed=1), ours(**kw, seed=2)
    assert a.shape == (1, 64, 32, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
