"""Scheduler tables: beta schedules, timestep spacings, sigma tables (re-exported by base).

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
