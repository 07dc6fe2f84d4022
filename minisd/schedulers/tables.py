"""Scheduler tables: beta schedules, timestep spacings, sigma tables and their Karras /
exponential / beta respacings (with the Beta quantile function these need), re-exported by base.

Precision policy (why the tables are float32): diffusers keeps ``betas`` / ``alphas_cumprod`` /
``sigmas`` in float32 torch tensors and does the per-step scalar arithmetic (``alpha_prod_t **
0.5`` ...) on float32 0-d tensors. To reach bit-level parity we mirror that: tables are numpy
float32 arrays, per-step scalars are ``np.float32`` (NEP 50 keeps float32 op python-float in
float32), and the set-up code that diffusers runs in numpy float64 (sigma interpolation, Karras
ramps) runs in numpy float64 here too. Two torch kernels need care:

* ``torch.linspace(a, b, n, dtype=float32)`` computes ``fma(step, i, a)`` from the float32 ``a``,
  ``b`` and ``step = (b - a) / (n - 1)``, from the start for the first half and from the end for
  the second half (:func:`linspace_f32`).
* ``torch.cumprod`` on the CPU accumulates in float64 and rounds every partial product to
  float32 (:func:`cumprod_f32`).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError, InputError

# ----------------------------------------------------------------------------- beta schedules


def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)``, bit for bit (see module doc)."""
    a, b = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([a], dtype=np.float32)
    step = np.float64((b - a) / np.float32(n - 1))  # float32 step, exact in float64
    i = np.arange(n, dtype=np.float64)  # (n,)
    # a + step * i is exact in float64 (24 + 11 bits), so one rounding = torch's fma
    head = np.float64(a) + step * i
    tail = np.float64(b) - step * (n - 1 - i)
    return np.where(i < n // 2, head, tail).astype(np.float32)  # (n,)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 vector on the CPU (float64 accumulator)."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2),
    beta_i = min(1 - alpha_bar((i+1)/n) / alpha_bar(i/n), max_beta), s = 0.008."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=np.float32)  # (n,)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Algorithm 1: shift/scale sqrt(alpha_bar) so the last step has SNR 0."""
    abar_sqrt = np.sqrt(cumprod_f32(np.float32(1.0) - betas))  # (n,)
    a0, aT = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - aT) * (a0 / (a0 - aT))
    abar = abar_sqrt * abar_sqrt
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])  # (n,)
    return (np.float32(1.0) - alphas).astype(np.float32)


def make_betas(cfg) -> np.ndarray:
    """beta_1..beta_T (float32) from ``beta_schedule`` / ``trained_betas``."""
    n = int(cfg.num_train_timesteps)
    if cfg.trained_betas is not None:
        try:
            betas = np.asarray(cfg.trained_betas, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise ConfigError(
                f"trained_betas: expected a list of numbers, got {cfg.trained_betas!r:.60}"
            ) from None
    elif cfg.beta_schedule == "linear":  # DDPM (Ho et al. 2020), sec. 4
        betas = linspace_f32(cfg.beta_start, cfg.beta_end, n)
    elif cfg.beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
        betas = linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, n) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    else:
        raise ConfigError(
            f"beta_schedule={cfg.beta_schedule!r}: expected 'linear', 'scaled_linear' or "
            "'squaredcos_cap_v2'"
        )
    if betas.shape != (n,) or not np.all((betas >= 0) & (betas < 1)):  # (NaN fails too)
        what = "trained_betas" if cfg.trained_betas is not None else "beta_start / beta_end"
        raise ConfigError(
            f"{what}: the beta schedule must be {n} values (num_train_timesteps) in [0, 1); "
            f"got {betas.size} in [{betas.min(initial=np.inf):g}, {betas.max(initial=-np.inf):g}]"
        )
    if cfg.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas


# ----------------------------------------------------------------------------- timesteps


def spaced_timesteps(spacing: str, n_train: int, n: int, steps_offset: int = 0) -> np.ndarray:
    """Descending timesteps (float64, not yet rounded for linspace) as diffusers' spacings.

    leading:  0, r, 2r, ... with r = n_train // n, plus steps_offset (DDIM paper, SD default)
    trailing: n_train, n_train - r, ... minus 1, r = n_train / n (Lin et al. 2024, table 2)
    linspace: n points from 0 to n_train - 1
    """
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (n_train // n))[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(n_train, 0, -n_train / n)) - 1
    raise ConfigError(f"timestep_spacing={spacing!r}: expected 'linspace', 'leading' or 'trailing'")


def rounded_timesteps(config, num_inference_steps) -> tuple[int, np.ndarray]:
    """(n, timesteps) of the discrete-time samplers (DDPM, DDIM, PLMS): the checked step count
    and ``spaced_timesteps`` for the config's spacing and offset, rounded to int64 (n,)."""
    n_train = int(config.num_train_timesteps)
    n = check_num_steps(num_inference_steps, n_train)
    ts = spaced_timesteps(config.timestep_spacing, n_train, n, config.steps_offset)
    return n, np.round(ts).astype(np.int64)  # (n,) descending


def check_num_steps(n, n_train: int, name: str = "num_inference_steps") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise InputError(f"{name}={n!r}: expected a positive integer")
    if n < 1:
        raise InputError(f"{name}={n}: must be at least 1")
    if n > n_train:
        raise InputError(f"{name}={n}: cannot exceed the model's num_train_timesteps={n_train}")
    return int(n)


# ----------------------------------------------------------------------------- sigma tables


def sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """The fractional training timestep whose sigma is ``sigma``: linear interpolation of
    log sigma between the two neighbouring entries of the (float32) training table."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas  # (T,)
    low = min(int(np.cumsum(dists >= 0).argmax()), len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]  # float32, as diffusers
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return float((1 - w) * low + w * (low + 1))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5:
    sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, n)  # (n,)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho  # (n,)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every training step (float32)."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


# ----------------------------------------------------------------------------- sigma spacings

# diffusers' config flags for the spacings of the inference sigmas (at most one may be set)
SIGMA_SPACINGS = {
    "use_karras_sigmas": "karras",
    "use_exponential_sigmas": "exponential",
    "use_beta_sigmas": "beta",
}
SIGMA_SPACING_DEFAULTS = {key: False for key in SIGMA_SPACINGS}  # for a class's DEFAULTS


def sigma_spacing(cfg) -> str | None:
    """The inference sigmas' spacing from the config's ``use_*_sigmas`` flags: "karras",
    "exponential", "beta", or None (the timestep spacing's own sigmas). More than one set is a
    ConfigError, as in diffusers (a ValueError there)."""
    on = [key for key in SIGMA_SPACINGS if cfg.get(key)]
    if len(on) > 1:
        raise ConfigError(
            f"{' and '.join(f'{k}={cfg[k]!r}' for k in on)}: only one of "
            f"{', '.join(SIGMA_SPACINGS)} can be set"
        )
    return SIGMA_SPACINGS[on[0]] if on else None


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """k-diffusion's ``get_sigmas_exponential`` in float64, as diffusers' sigma schedulers'
    ``_convert_to_exponential``: n sigmas evenly spaced in log sigma,
    sigma_i = exp(log max + i/(n-1) (log min - log max)). (edm.py has the float32 variant of
    diffusers' EDM schedulers.)"""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))  # (n,)


def beta_sigmas(sigma_min, sigma_max, n: int, alpha: float = 0.6, beta: float = 0.6):
    """Lee et al. 2024, "Beta Sampling is All You Need": the sampling times are quantiles of a
    Beta(alpha, beta) distribution (0.6, 0.6: dense at both ends of the schedule),
    sigma_i = min + F^{-1}(1 - i/(n-1)) (max - min), F the Beta CDF (:func:`beta_ppf`), as
    diffusers' ``_convert_to_beta`` (which calls scipy.stats.beta.ppf)."""
    p = 1 - np.linspace(0, 1, n)  # (n,) from 1 down to 0
    return sigma_min + beta_ppf(p, alpha, beta) * (sigma_max - sigma_min)  # (n,)


def spaced_sigmas(kind: str, in_sigmas, n: int, cfg, *, config_bounds: bool = True):
    """n sigmas of spacing ``kind`` (Karras eq. 5 with rho = 7, exponential or beta) from
    sigma_max down to sigma_min: the config's ``sigma_min`` / ``sigma_max`` when set (and
    ``config_bounds``: diffusers' LMS and DPM++ SDE Karras ramps ignore them), else
    ``in_sigmas[-1]`` / ``in_sigmas[0]`` (in_sigmas descending)."""
    lo = cfg.get("sigma_min") if config_bounds else None
    hi = cfg.get("sigma_max") if config_bounds else None
    lo = float(in_sigmas[-1]) if lo is None else lo
    hi = float(in_sigmas[0]) if hi is None else hi
    convert = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}
    return convert[kind](lo, hi, n)  # (n,) float64


# ----------------------------------------------------------------------------- Beta quantiles

_TINY = 1e-300  # Lentz's guard against a zero denominator
_EPS = 2.0**-53
_NORMAL = np.finfo(np.float64).tiny  # smallest normal float64


def _beta_cf(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """The continued fraction of I_x(a, b) (Abramowitz & Stegun 26.5.8),

        I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * 1 / (1 + d_1 / (1 + d_2 / (1 + ...))),
        d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)),  d_{2m} = m(b-m) x / ((a+2m-1)(a+2m)),

    evaluated by the modified Lentz method (Numerical Recipes, 3rd ed., 5.2 and ``betacf`` of
    6.4), elementwise over x (float64). Converges fast for x < (a + 1) / (a + b + 2)."""
    c = np.ones_like(x)
    d = 1 - (a + b) * x / (a + 1)
    d = 1 / np.where(np.abs(d) < _TINY, _TINY, d)
    h = d.copy()
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # fmt: skip
            d = 1 + num * d
            d = 1 / np.where(np.abs(d) < _TINY, _TINY, d)
            c = 1 + num / c
            c = np.where(np.abs(c) < _TINY, _TINY, c)
            h = h * (d * c)
        if np.all(np.abs(d * c - 1) <= 4 * _EPS):  # a few ulp: the last factor is 1
            return h
    raise ArithmeticError(f"incomplete beta continued fraction: no convergence (a={a}, b={b})")


def _log_beta(a: float, b: float) -> float:
    """log B(a, b) = log(Gamma(a) Gamma(b) / Gamma(a + b)): from math.gamma (a few ulp, relative)
    while it cannot overflow; lgamma's differences are off by ulp of the lgamma values."""
    if a + b < 170:
        return math.log(math.gamma(a) / math.gamma(a + b) * math.gamma(b))
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _log_pow_over(z: np.ndarray, c: float, log_z: np.ndarray, t: np.ndarray) -> np.ndarray:
    """log(z^c / t), to a few ulp where both are normal numbers (c log z alone would carry an
    error of |c log z| ulp into the ratio), else c log z - log t."""
    power = np.power(z, c)
    normal = (power >= _NORMAL) & (t >= _NORMAL)
    with np.errstate(divide="ignore"):
        return np.where(normal, np.log(np.where(normal, power, 1.0) / t), c * log_z - np.log(t))


def _tail_ratio(z, a: float, b: float, t, log_beta: float, upper: bool):
    """(g, s) for 0 < z <= 1/2: g = log(T(z) / t) with T = I_z(a, b) (lower tail) or, if
    ``upper``, T = 1 - I_z(a, b) = I_{1-z}(b, a); s = d log T / d log z. float64, elementwise.

    The continued fraction gives I_z(a, b) for z < (a+1)/(a+b+2) and I_{1-z}(b, a) beyond
    (where each converges fast, Numerical Recipes' ``betai``); the tail asked for is that value
    V or 1 - V. d I_z / dz = z^(a-1) (1-z)^(b-1) / B(a, b)."""
    log_z, log_w = np.log(z), np.log1p(-z)  # w = 1 - z
    direct = z < (a + 1) / (a + b + 2)  # else the fraction of I_w(b, a)
    cf = np.empty_like(z)
    cf[direct] = _beta_cf(a, b, z[direct]) / a
    cf[~direct] = _beta_cf(b, a, 1 - z[~direct]) / b
    log_v_over_t = _log_pow_over(z, a, log_z, t) + b * log_w - log_beta + np.log(cf)
    as_is = direct != upper  # T is the fraction's value V itself, else 1 - V
    with np.errstate(divide="ignore", over="ignore"):  # (v is used only where it is <= 1)
        v = np.exp(a * log_z + b * log_w - log_beta) * cf
        g = np.where(as_is, log_v_over_t, np.log1p(-np.where(as_is, 0.0, v)) - np.log(t))
    slope = np.exp(a * log_z + (b - 1) * log_w - log_beta - (g + np.log(t)))
    return g, -slope if upper else slope


def _solve_tail(t: np.ndarray, a: float, b: float, upper: bool) -> np.ndarray:
    """z in (0, 1/2] with T(z) = t (see :func:`_tail_ratio`), vectorized over t.

    Newton's method on g(z) = log(T(z) / t) in log z, z <- z exp(-g / (d g / d log z)), which
    keeps full relative precision down to tiny z (where I_z ~ z^a / (a B)), safeguarded by a
    bracket [lo, hi]: a step leaving it goes to the geometric midpoint of z and the bracket's
    end instead. Starts at the small-z solution (t a B(a, b))^(1/a) of the lower tail, or at
    1/2. Newton converges quadratically: a step below 1e-9 (relative) lands within rounding
    of the root and is the last; a bracket narrower than 2 ulp ends it too."""
    log_beta = _log_beta(a, b)
    z = np.full_like(t, 0.5)
    if not upper:
        z = np.clip(np.exp((np.log(t) + math.log(a) + log_beta) / a), _NORMAL, 0.5)
    lo, hi = np.full_like(z, _NORMAL), np.full_like(z, 0.5)
    todo = np.ones(z.shape, bool)
    for _ in range(200):
        zt, lot, hit = z[todo], lo[todo], hi[todo]
        g, slope = _tail_ratio(zt, a, b, t[todo], log_beta, upper)
        high = g > 0 if not upper else g < 0  # z above the root
        lot = np.where(~high & (g != 0), np.maximum(lot, zt), lot)
        hit = np.where(high, np.minimum(hit, zt), hit)
        step = g / slope
        new = zt * np.exp(-step)
        newton = (new <= hit) & (new >= lot)
        new = np.where(new > hit, np.sqrt(zt) * np.sqrt(hit), new)  # (no underflow)
        new = np.where(new < lot, np.sqrt(zt) * np.sqrt(lot), new)
        done = (g == 0) | (newton & (np.abs(step) < 1e-9)) | (hit - lot <= 2 * _EPS * zt)
        z[todo] = np.where(g == 0, zt, new)
        lo[todo], hi[todo] = lot, hit
        todo[np.nonzero(todo)[0][done]] = False
        if not todo.any():
            return z
    raise ArithmeticError(f"Beta({a}, {b}) quantile: Newton iteration did not converge")


def beta_ppf(p, a: float, b: float) -> np.ndarray:
    """The quantile function F^{-1}(p) of the Beta(a, b) distribution (float64, elementwise;
    scipy.stats.beta.ppf without scipy): x with I_x(a, b) = p, I the regularized incomplete
    beta function. F^{-1}(0) = 0 and F^{-1}(1) = 1 exactly; NaN outside [0, 1].

    The unknown solved for is the smaller of x and 1 - x (so it keeps its relative precision),
    from the smaller of the tails p and 1 - p (so does the equation): x <= 1/2 (p <= I_{1/2})
    from I_x(a, b) = p or 1 - I_x(a, b) = 1 - p, else y = 1 - x from the same equations of
    Beta(b, a), since I_x(a, b) = 1 - I_{1-x}(b, a)."""
    if not (a > 0 and b > 0):
        raise ValueError(f"beta_ppf: a={a!r}, b={b!r}: both must be positive")
    p = np.asarray(p, dtype=np.float64)
    flat = p.reshape(-1)
    x = np.where((flat >= 0) & (flat <= 1), flat, np.nan)  # 0, 1 and NaN stay as they are
    inner = (flat > 0) & (flat < 1)
    log_beta = _log_beta(a, b)
    g_half, _ = _tail_ratio(np.array([0.5]), a, b, np.array([1.0]), log_beta, False)
    p_half = math.exp(g_half[0])  # I_{1/2}(a, b)
    for y_side, (c, d) in ((False, (a, b)), (True, (b, a))):
        for upper in (False, True):
            pick = inner & ((flat > p_half) == y_side) & ((flat > 0.5) == (upper != y_side))
            t = np.minimum(flat[pick], 1 - flat[pick])  # the smaller tail, exact (p <= 1/2)
            z = _solve_tail(t, c, d, upper)
            x[pick] = 1 - z if y_side else z
    return x.reshape(p.shape)
