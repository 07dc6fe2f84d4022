"""Euler and Euler-ancestral samplers on the sigma parametrization x = x_0 + sigma eps
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models")."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .base import (
    COMMON_DEFAULTS,
    SIGMA_SPACING_DEFAULTS,
    SchedulerOutput,
    SigmaScheduler,
    check_num_steps,
    draw_noise,
    sigma_spacing,
    sigma_to_t,
    spaced_sigmas,
    train_sigmas,
)

SIGMA_DEFAULTS = {**COMMON_DEFAULTS, "timestep_spacing": "linspace"}


def float_timesteps(cfg, n: int) -> np.ndarray:
    """Descending float32 timesteps for the sigma-based schedulers (diffusers' variant)."""
    n_train = int(cfg.num_train_timesteps)
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1].copy()  # (n,)
    if cfg.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (n_train // n)).round()[::-1].astype(np.float32)
        return ts + np.float32(cfg.steps_offset)
    if cfg.timestep_spacing == "trailing":
        return np.arange(n_train, 0, -n_train / n).round().astype(np.float32) - np.float32(1)
    raise ConfigError(
        f"timestep_spacing={cfg.timestep_spacing!r}: expected 'linspace', 'leading' or 'trailing'"
    )


def sigma_schedule(sched, n: int):
    """(timesteps, sigmas without the final entry) as float arrays, optionally respaced.

    sigma(t) interpolates the training table linearly in t. Karras (eq. 5, rho = 7), exponential
    or beta sigmas (``tables.spaced_sigmas``) span [sigma_min, sigma_max] of that interpolated
    schedule, or the config's bounds (diffusers' LMS Karras ramp ignores them:
    ``KARRAS_CONFIG_BOUNDS``), and are mapped back to fractional timesteps through log sigma.
    """
    cfg = sched.config
    ts = float_timesteps(cfg, n)
    table = train_sigmas(sched.alphas_cumprod)  # (T,) float32
    log_table = np.log(table)
    sigmas = np.interp(ts, np.arange(0, len(table)), table)  # (n,) float64
    kind = sigma_spacing(cfg)
    if kind is not None:
        bounds = kind != "karras" or getattr(sched, "KARRAS_CONFIG_BOUNDS", True)
        sigmas = spaced_sigmas(kind, sigmas, n, cfg, config_bounds=bounds)
        ts = np.array([sigma_to_t(s, log_table) for s in sigmas])  # (n,) float64
    return ts, sigmas


# sigma spacings of diffusers' DPM++ SDE that minisd's (dpm_sde.py) does not implement yet
SIGMA_UNSUPPORTED = ("use_exponential_sigmas", "use_beta_sigmas")


class EulerDiscreteScheduler(SigmaScheduler):
    """Karras et al. 2022, Algorithm 2 with s_churn = 0 by default (deterministic Euler)."""

    DEFAULTS = {
        **SIGMA_DEFAULTS,
        "interpolation_type": "linear",
        **SIGMA_SPACING_DEFAULTS,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False,
    }

    def __init__(self, **config):
        super().__init__(**config)
        if self.config.rescale_betas_zero_snr:  # diffusers: keep the last sigma finite
            self.alphas_cumprod[-1] = np.float32(2**-24)
        if self.config.interpolation_type != "linear":
            raise ConfigError(f"interpolation_type={self.config.interpolation_type!r}: "
                              "only 'linear' is supported")  # fmt: skip
        if self.config.timestep_type != "discrete":
            raise ConfigError(f"timestep_type={self.config.timestep_type!r}: "
                              "only 'discrete' is supported")  # fmt: skip

    def set_timesteps(self, num_inference_steps: int):
        n = check_num_steps(num_inference_steps, int(self.config.num_train_timesteps))
        ts, sigmas = sigma_schedule(self, n)
        kind = self.config.final_sigmas_type
        if kind == "zero":
            last = 0.0
        elif kind == "sigma_min":
            last = train_sigmas(self.alphas_cumprod[:1])[0]
        else:
            raise ConfigError(f"final_sigmas_type={kind!r}: expected 'zero' or 'sigma_min'")
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)  # (n + 1,)
        self.timesteps = ts.astype(np.float32)  # (n,)
        self.num_inference_steps = n
        self._step_index = self._begin_index = None

    def step(self, model_output, timestep, sample, *, s_churn=0.0, s_tmin=0.0,
             s_tmax=float("inf"), s_noise=1.0, rng=None, noise=None, **_):  # fmt: skip
        """1. optional churn: sigma_hat = sigma (1 + gamma), x += sqrt(sigma_hat^2 - sigma^2) z;
        2. x_0 estimate (epsilon: x - sigma_hat eps; v: Salimans & Ho);
        3. d = (x - x_0) / sigma_hat (Karras eq. 7's ODE slope), x_next = x + (sigma_next -
           sigma_hat) d. Computed in float32 whatever the sample dtype, as diffusers."""
        self._init_step_index(timestep)
        out_dtype = model_output.dtype
        x = sample.astype(np.float32)
        sigma = self.sigmas[self._step_index]
        gamma = 0.0
        if s_tmin <= sigma <= s_tmax:
            gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1)
        sigma_hat = sigma * np.float32(gamma + 1)
        if gamma > 0:  # one noise tensor, model_output's shape and dtype
            z = draw_noise(model_output, rng=rng, noise=noise) * s_noise
            x = x + z * np.sqrt(sigma_hat * sigma_hat - sigma * sigma)
        kind = self.config.prediction_type
        if kind == "sample":
            x0 = model_output
        elif kind == "epsilon":
            x0 = x - sigma_hat * model_output
        else:  # v_prediction: x_0 = -sigma / sqrt(sigma^2+1) v + x / (sigma^2 + 1)
            # x / (sigma^2 + 1) in x's float32, as torch's float32 tensor over a 0-d scalar
            c = x.dtype.type(sigma * sigma + 1)
            x0 = model_output * (-sigma / np.sqrt(sigma * sigma + 1)) + x / c
        d = (x - x0) / sigma_hat
        dt = self.sigmas[self._step_index + 1] - sigma_hat
        prev = (x + d * dt).astype(out_dtype, copy=False)
        self._step_index += 1
        return SchedulerOutput(prev, x0)


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Euler step to sigma_down, then fresh noise of std sigma_up (k-diffusion's
    sample_euler_ancestral): sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2), sigma_down =
    sqrt(s'^2 - sigma_up^2). Randomness: one standard-normal tensor of model_output's shape
    and dtype on EVERY step (the last one too, where sigma_up = 0), as diffusers."""

    PREDICTION_TYPES = ("epsilon", "v_prediction")
    DEFAULTS = {**SIGMA_DEFAULTS, "rescale_betas_zero_snr": False}

    def __init__(self, **config):
        super().__init__(**config)
        if self.config.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = np.float32(2**-24)

    def set_timesteps(self, num_inference_steps: int):
        n = check_num_steps(num_inference_steps, int(self.config.num_train_timesteps))
        ts = float_timesteps(self.config, n)
        table = train_sigmas(self.alphas_cumprod)  # (T,)
        sigmas = np.interp(ts, np.arange(0, len(table)), table)  # (n,)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # (n + 1,)
        self.timesteps = ts
        self.num_inference_steps = n
        self._step_index = self._begin_index = None

    def step(self, model_output, timestep, sample, *, rng=None, noise=None, **_):
        self._init_step_index(timestep)
        out_dtype = model_output.dtype
        x = sample.astype(np.float32)
        s = self.sigmas[self._step_index]
        s_next = self.sigmas[self._step_index + 1]
        # 1. x_0 estimate
        if self.config.prediction_type == "epsilon":
            x0 = x - s * model_output
        else:
            x0 = model_output * (-s / np.sqrt(s * s + 1)) + x / (s * s + 1)
        # 2. split the step: deterministic part to sigma_down, noise of std sigma_up
        sigma_up = np.sqrt(s_next * s_next * (s * s - s_next * s_next) / (s * s))
        sigma_down = np.sqrt(s_next * s_next - sigma_up * sigma_up)
        d = (x - x0) / s
        prev = x + d * (sigma_down - s)
        z = draw_noise(model_output, rng=rng, noise=noise)
        prev = (prev + z * sigma_up).astype(out_dtype, copy=False)
        self._step_index += 1
        return SchedulerOutput(prev, x0)
