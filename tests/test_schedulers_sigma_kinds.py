"""Exponential and beta sigmas (diffusers' ``use_exponential_sigmas`` / ``use_beta_sigmas``) in
every scheduler whose diffusers class has them, and the Beta quantile function beta sigmas need.

* ``tables.beta_ppf`` (minisd's own: no scipy at run time) against scipy.stats.beta.ppf, and
  where scipy's own quantiles are inexact (far tails) by the round trip through
  scipy.special.betainc: relative error <= 1e-12 (measured <= 7.9e-15 against scipy, 2.2e-14
  in the tails' round trip).
* The float64 ramps against diffusers' own ``_convert_to_exponential`` / ``_convert_to_beta``
  on the same input sigmas: exponential bit for bit, beta <= 1e-12 (scipy's ppf vs ours).
* Whole schedules (set_timesteps) over beta schedules x spacings x step counts x sigma bounds /
  final sigmas. DPM-Solver, DEIS, UniPC (ramps over the whole training table): float32 sigmas
  bit for bit, integer timesteps equal (not rounded, then truncated by the int64 cast).
  Euler, Heun, LMS, DPM2 (ramps between the ends of the spaced schedule): sigmas within 1
  float32 ulp, fractional timesteps within 2 ulp: torch's float32 training-sigma table differs
  from the exactly rounded one in a few entries (1 ulp), which may be the schedule's ends, and
  t interpolates its log (as for Karras sigmas).
* Trajectories through test_schedulers_base.run_pair (float32, the families' own bounds), and
  in float64 on float64 sigma tables given to both sides (F64_TOL = 1e-10: the same formulas;
  DPM-Solver multistep rounds the sample to float32 in both libraries: ROUNDS_TO_F32), with
  the stand-in network of test_schedulers_edm.
"""

import itertools

import numpy as np
import pytest
import test_schedulers_base as tsb
from refharness import need, rel_err
from test_schedulers_base import BETAS, SPACINGS, TRAJ_TOL, patch_randn, run_pair
from test_schedulers_dpm_unipc import MULTI_TOL
from test_schedulers_edm import edm_model, run_mine
from test_schedulers_kdpm2 import FEW_STEPS_TOL, patch_ancestral_randn
from test_schedulers_sigma import LMS_TOL

import minisd.schedulers as ms
from minisd.errors import ConfigError, InputError
from minisd.schedulers.tables import SIGMA_SPACINGS, beta_ppf, spaced_sigmas

PPF_TOL = 1e-12
F64_TOL = 1e-10
KINDS = ["use_exponential_sigmas", "use_beta_sigmas"]
SIGMA_FAMILY = ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"]  # fmt: skip
DPM_FAMILY = ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
              "DEISMultistepScheduler", "UniPCMultistepScheduler"]  # fmt: skip
NAMES = SIGMA_FAMILY + DPM_FAMILY
DPM2_A = "KDPM2AncestralDiscreteScheduler"
# classes with diffusers' final_sigmas_type (the others end at 0, DEIS on its last sigma)
FINAL_SIGMAS = ("EulerDiscreteScheduler", *DPM_FAMILY[:2], "UniPCMultistepScheduler")
# float32 trajectory bounds, as the families' own tests (sigma/kdpm2/dpm_unipc_tests)
TOL = {"LMSDiscreteScheduler": LMS_TOL, "DPMSolverMultistepScheduler": MULTI_TOL,
       "UniPCMultistepScheduler": MULTI_TOL}  # fmt: skip


# ----------------------------------------------------------------------------- Beta quantiles

AB = [(0.6, 0.6), (0.5, 0.5), (1.0, 1.0), (2.0, 5.0), (5.0, 2.0), (0.3, 3.0), (10.0, 10.0),
      (50.0, 0.8), (1.5, 0.7)]  # fmt: skip


@pytest.mark.parametrize("a,b", AB)
def test_beta_ppf_matches_scipy(a, b):
    stats = need("scipy.stats")
    rng = np.random.default_rng(0)
    p = np.concatenate([np.linspace(0, 1, 2001), rng.random(3000), 10.0 ** -np.arange(1, 13),
                        1 - 10.0 ** -np.arange(1, 13)])  # fmt: skip
    got, want = beta_ppf(p, a, b), stats.beta.ppf(p, a, b)
    inner = (p > 0) & (p < 1)
    err = np.abs(got[inner] - want[inner]) / want[inner]
    assert err.max() <= PPF_TOL, (p[inner][err.argmax()], err.max())
    assert got[p == 0].tolist() == [0.0] and got[p == 1].tolist() == [1.0]


@pytest.mark.parametrize("a,b", AB)
def test_beta_ppf_tails_round_trip(a, b):
    """Far lower tails, where scipy's own ppf is off by up to 99% (Beta(3, 0.3) at p = 3e-51):
    the CDF (scipy.special.betainc) of our quantile gives p back. Upper tails by the symmetry
    F^{-1}(1 - q; a, b) = 1 - F^{-1}(q; b, a) (1 - 2^-k: exact; x near 1 cannot resolve more)."""
    special = need("scipy.special")
    p = 10.0 ** -np.arange(1.0, 101.0, 0.5)
    p = p[p > special.betainc(a, b, 1e-300)]  # quantiles above the normal range
    assert np.max(np.abs(special.betainc(a, b, beta_ppf(p, a, b)) / p - 1)) <= PPF_TOL
    q = 2.0 ** -np.arange(2.0, 53.0)
    np.testing.assert_allclose(beta_ppf(1 - q, a, b), 1 - beta_ppf(q, b, a), rtol=1e-15)


def test_beta_ppf_edges():
    x = beta_ppf(np.array([[0.0, 1.0], [-0.1, np.nan]]), 0.6, 0.6)
    assert x.shape == (2, 2) and x[0].tolist() == [0.0, 1.0] and np.isnan(x[1]).all()
    assert beta_ppf(0.5, 0.6, 0.6) == pytest.approx(0.5, rel=1e-15)  # symmetric: the median
    np.testing.assert_allclose(beta_ppf([0.25, 0.75], 1.0, 1.0), [0.25, 0.75], rtol=1e-15)
    with pytest.raises(ValueError, match="positive"):
        beta_ppf(0.5, 0.0, 1.0)


# ----------------------------------------------------------------------------- ramps


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bounds", [{}, {"sigma_min": 0.05, "sigma_max": 20}])
def test_ramps_match_diffusers(name, kind, bounds):
    """The float64 ramps of diffusers' own class (its sigma_min / sigma_max reading included)
    on the same input sigmas: exponential bit for bit, beta to the ppf's accuracy."""
    need("scipy.stats")
    ref = tsb.ref_scheduler(name, {kind: True, **bounds})
    ours = getattr(ms, name).from_config({kind: True, **bounds})
    in_sigmas = np.geomspace(157.4, 0.0292, 30)
    for n in (1, 2, 7, 25):
        convert = ref._convert_to_exponential if "exp" in kind else ref._convert_to_beta
        want = convert(in_sigmas=in_sigmas, num_inference_steps=n)
        got = spaced_sigmas(SIGMA_SPACINGS[kind], in_sigmas, n, ours.config)
        if "exp" in kind:
            np.testing.assert_array_equal(got, want)
        else:
            assert got[0] == want[0] and got[-1] == want[-1]
            assert rel_err(got, want) <= PPF_TOL
        assert got[0] == pytest.approx(bounds.get("sigma_max", 157.4), rel=1e-14)


def test_lms_karras_ignores_sigma_bounds_exponential_reads_them():
    """diffusers' LMS Karras ramp spans the schedule's own ends; its exponential / beta ramps
    read sigma_min / sigma_max from a config that carries them (another class's)."""
    for kind, first in [("use_karras_sigmas", None), ("use_exponential_sigmas", 10.0)]:
        cfg = {**BETAS["sd"], kind: True, "sigma_min": 0.1, "sigma_max": 10.0}
        ref, ours = tsb.ref_scheduler("LMSDiscreteScheduler", cfg), ms.LMSDiscreteScheduler(**cfg)
        ref.set_timesteps(6)
        ours.set_timesteps(6)
        np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
        assert (ours.sigmas[0] == np.float32(10.0)) == (first is not None)


# ----------------------------------------------------------------------------- schedules


def schedule_cases(name):
    extras = [{}, {"sigma_min": 0.1, "sigma_max": 10.0}]
    if name in FINAL_SIGMAS:
        extras.append({"final_sigmas_type": "sigma_min"})
    return itertools.product(BETAS, extras, SPACINGS, [1, 2, 7, 25, 100])


def compare_schedules(ref, name, cfg, n):
    """``ref``: diffusers' scheduler built from ``cfg`` but the spacing (set here: its
    constructor builds a 1000-step schedule, up to 0.3 s)."""
    ref.register_to_config(timestep_spacing=cfg["timestep_spacing"])
    ours = getattr(ms, name).from_config(cfg)
    ref.set_timesteps(n)
    try:
        ours.set_timesteps(n)
    except InputError as e:  # DPM2 a: sigma_down cancels to 0 in float32 (diffusers: NaN)
        assert name == DPM2_A and "cancels to 0" in str(e) and cfg["beta_schedule"] != "linear"
        return
    # 1 ulp where the schedule's ends are entries of torch's float32 table (module doc)
    tol = 0 if name in DPM_FAMILY else 2.0**-23
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=tol, atol=0)
    ts, want = np.asarray(ours.timesteps), ref.timesteps.numpy()
    assert ts.dtype == want.dtype
    if ts.dtype.kind == "i":
        np.testing.assert_array_equal(ts, want)
    else:  # t interpolates log sigma in that table (DPM2's midpoints: 3 ulp, log_midpoint)
        np.testing.assert_allclose(ts, want, rtol=2.5e-7 if ts.dtype == np.float32 else 1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_schedules_match_diffusers(name, kind):
    need("scipy.stats")
    ref = None
    for beta, extra, spacing, n in schedule_cases(name):
        cfg = {"beta_schedule": "linear", **BETAS[beta], kind: True, **extra}
        if spacing == SPACINGS[0] and n == 1:
            ref = tsb.ref_scheduler(name, cfg)
        compare_schedules(ref, name, {**cfg, "timestep_spacing": spacing}, n)


@pytest.mark.parametrize("name", NAMES)
def test_one_spacing_at_most(name):
    """Two of use_karras / use_exponential / use_beta_sigmas: a ConfigError naming both, as
    diffusers' ValueError; use_flow_sigmas stays refused where diffusers has it."""
    cls = getattr(ms, name)
    for pair in itertools.combinations(["use_karras_sigmas", *KINDS], 2):
        with pytest.raises(ConfigError, match=f"{pair[0]}=True and {pair[1]}=True: only one"):
            cls.from_config(dict.fromkeys(pair, True))
        need("diffusers")
        with pytest.raises(ValueError, match="Only one of"):
            tsb.ref_scheduler(name, dict.fromkeys(pair, True))
    if name in DPM_FAMILY:
        with pytest.raises(ConfigError, match="use_flow_sigmas"):
            cls.from_config({"use_flow_sigmas": True})
    assert cls.from_config({"use_beta_sigmas": False, "use_karras_sigmas": True}).config


# ----------------------------------------------------------------------------- trajectories


def trajectory_cases():
    """Per class and kind: SD's betas on each spacing (epsilon, 7 steps), 2 and 25 steps, and
    v_prediction; the linear schedule. No cosine: the respaced sigmas start near sigma ~ 2e4
    (DPM family: its whole table), ill-conditioned as Karras sigmas there (test_schedulers_sigma).
    """
    rows = [("sd", s, "epsilon", 7) for s in SPACINGS]
    rows += [("sd", "leading", "epsilon", 2), ("sd", "trailing", "v_prediction", 25),
             ("linear", "linspace", "epsilon", 25)]  # fmt: skip
    return [(name, kind, *row) for name in NAMES for kind in KINDS for row in rows]


def traj_tol(name, n):
    if name == "KDPM2DiscreteScheduler" and n == 2:
        return FEW_STEPS_TOL  # see test_schedulers_kdpm2
    return TOL.get(name, TRAJ_TOL)


@pytest.mark.parametrize("name,kind,beta,spacing,pred,n", trajectory_cases())
def test_trajectory_float32(monkeypatch, name, kind, beta, spacing, pred, n):
    cfg = {**BETAS[beta], "timestep_spacing": spacing, "prediction_type": pred, kind: True}
    noisy = name == DPM2_A
    if noisy:
        patch_ancestral_randn(monkeypatch)
    run_pair(name, getattr(ms, name), cfg, n, noisy=noisy, monkeypatch=monkeypatch,
             tol=traj_tol(name, n))  # fmt: skip


def f64_tables(ref, ours):
    """After each set_timesteps: diffusers' sigma tables in float64 and the same numbers for
    ours, so both evaluate the same formulas on the same numbers (their float32 tables are
    compared above). DPM2 keeps its per-step sigmas apart: mapped from diffusers' layout and
    checked against ours first (its midpoints: within 3 float32 ulp, kdpm2.log_midpoint)."""
    ref_set, ours_set = ref.set_timesteps, ours.set_timesteps

    def ref_f64(n, *a, **k):
        ref_set(n, *a, **k)
        for key in ("sigmas", "sigmas_interpol", "sigmas_up", "sigmas_down"):
            if hasattr(ref, key):
                setattr(ref, key, getattr(ref, key).double())

    def ours_f64(n):
        ours_set(n)
        ours.sigmas, ours.timesteps = ref.sigmas.numpy(), ref.timesteps.numpy()
        if hasattr(ours, "_mid"):  # [s_0, s_1, s_1, ...] layouts: every other entry
            sig = ref.sigmas.numpy()[0::2][: n + 1]
            up = getattr(ref, "sigmas_up", None)
            mid = ref.sigmas_interpol.numpy()[0::2][:n] if up is not None else None
            mid = ref.sigmas_interpol.numpy()[2::2][:n] if mid is None else mid
            target = sig[1:] if up is None else ref.sigmas_down.numpy()[0::2][:n]
            mapped = {"_sig": sig, "_mid": mid, "_target": target}
            if up is not None:
                mapped["_up"] = up.numpy()[0::2][:n]
            for key, value in mapped.items():
                np.testing.assert_allclose(getattr(ours, key), value, rtol=4e-7, err_msg=key)
                setattr(ours, key, value)

    ref.set_timesteps, ours.set_timesteps = ref_f64, ours_f64


# diffusers' DPM-Solver multistep step rounds the sample to float32 whatever its dtype (so does
# minisd's), and torch multiplies that float32 tensor by 0-d float64 coefficients (sigma_t /
# sigma_s) in float32 where numpy does it in float64: float32-level differences on float64
# tables (measured worst 4.5e-7), which float32 tables (every real run) do not have. (Euler
# rounds too; its one such product is evaluated in float32 as torch's.)
ROUNDS_TO_F32 = {"DPMSolverMultistepScheduler": TRAJ_TOL}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pred,n", [("epsilon", 7), ("v_prediction", 25)])
def test_trajectory_float64(monkeypatch, name, kind, pred, n):
    cfg = {**BETAS["sd"], "timestep_spacing": "leading", "prediction_type": pred, kind: True}
    x = tsb.start_sample(dtype=np.float64)
    noises = None
    if name == DPM2_A:
        patch_randn(monkeypatch)
        patch_ancestral_randn(monkeypatch)
        rng = np.random.default_rng(123)
        noises = [rng.standard_normal(x.shape).astype(np.float32) for _ in range(2 * n)]
    ref, ours = tsb.ref_scheduler(name, cfg), getattr(ms, name).from_config(cfg)
    f64_tables(ref, ours)
    _, want, _ = tsb.run_ref(ref, n, x, noises, model=edm_model)
    _, got, _ = run_mine(ours, n, x, noises)
    assert len(got) == len(want)
    tol = ROUNDS_TO_F32.get(name, F64_TOL)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype == np.float64
        assert rel_err(a, b) <= tol, f"call {i}: {rel_err(a, b):.2e}"
