"""EDM samplers (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"): the shared machinery (sigma schedules, preconditioning, step index, add_noise) and
diffusers' ``EDMEulerScheduler``. The multistep DPM-Solver++ on top of it is ``edm_dpm.py``.

EDM models are trained on the variance-exploding process x_sigma = x_0 + sigma n, n ~ N(0, I),
over continuous sigma (no beta table). The network F is wrapped as (eq. 7; Table 1, "Ours")

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)),
    c_skip = sigma_d^2 / (sigma^2 + sigma_d^2),   c_in = 1 / sqrt(sigma^2 + sigma_d^2),
    c_out = +-sigma sigma_d / sqrt(sigma^2 + sigma_d^2),   c_noise = ln(sigma) / 4,

so ``timesteps`` (what the UNet is given) are the float32 c_noise values of the schedule's
sigmas (-1.55 ... 1.10 for sigma in [0.002, 80]). c_out's sign is + for prediction_type
"epsilon" (EDM's own F; Playground v2.5) and - for "v_prediction" (CosXL), as diffusers.

Precision, as diffusers': the Euler scheduler builds its Karras sigmas in float64, the DPM
solver in float32 (a float32 ramp), the exponential schedule in float32 (torch.linspace, exp);
each is then a float32 table. Per-step coefficients are float32 scalars of that table, and a
scalar meets an array as torch's 0-d tensor meets a tensor: in the array's dtype (``_as``).
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import array_module
from ..config import is_int, is_number
from ..errors import ConfigError, InputError
from .base import (
    Config,
    Scheduler,
    SchedulerOutput,
    StepIndexed,
    bcast,
    check_num_steps,
    draw_noise,
    linspace_f32,
    split_config,
)

EDM_DEFAULTS = {
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "sigma_data": 0.5,
    "sigma_schedule": "karras",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "rho": 7.0,
    "final_sigmas_type": "zero",
}

# EDM's sigmas are continuous: any step count is allowed (as diffusers)
NO_STEP_LIMIT = math.inf


def _as(c, like):
    """The scalar ``c`` in ``like``'s dtype: torch computes a 0-d tensor times a tensor (of the
    same kind) in the tensor's dtype, where numpy would promote to the wider of the two."""
    return like.dtype.type(c)


def karras_schedule(ramp, sigma_min, sigma_max, rho):
    """Karras et al. 2022, eq. 5, at ramp positions u in [0, 1] (u = i / (n - 1)):
    sigma(u) = (sigma_max^(1/rho) + u (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    The base is computed in ``ramp``'s dtype (python scalars cast to it, as torch's), the power
    through float64 and rounded to that dtype."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    base = hi + ramp * (lo - hi)  # (n,) in ramp's dtype
    return (base.astype(np.float64) ** rho).astype(ramp.dtype)  # (n,)


def exponential_sigmas(n, sigma_min, sigma_max):
    """k-diffusion's ``get_sigmas_exponential`` (the schedule of CosXL): n sigmas evenly spaced
    in log sigma from sigma_max down to sigma_min, float32 as diffusers' torch.linspace + exp."""
    logs = linspace_f32(math.log(sigma_min), math.log(sigma_max), n)  # (n,) ascending
    return np.exp(logs.astype(np.float64)).astype(np.float32)[::-1].copy()  # (n,) descending


def c_noise(sigmas):
    """The noise conditioning c_noise = ln(sigma) / 4 (Table 1), the model's timesteps."""
    logs = np.log(sigmas.astype(np.float64)).astype(sigmas.dtype)  # correctly rounded log
    return sigmas.dtype.type(0.25) * logs  # (n,)


def preconditioning(sigma, sigma_data, prediction_type):
    """(c_skip, c_out, c_in) at the scalar ``sigma``, in its dtype (eq. 7, Table 1):
    c_skip = sigma_d^2 / (sigma^2 + sigma_d^2), c_out = +-sigma sigma_d / sqrt(sigma^2 +
    sigma_d^2) (- for v_prediction), c_in = 1 / sqrt(sigma^2 + sigma_d^2). Operation by
    operation as diffusers (torch's ``scalar / tensor`` is reciprocal(tensor) * scalar)."""
    dt = sigma.dtype.type
    sd2 = dt(sigma_data**2)
    var = sigma * sigma + sd2
    root = np.sqrt(var)
    c_skip = (dt(1) / var) * sd2
    signed = sigma if prediction_type == "epsilon" else -sigma
    c_out = signed * dt(sigma_data) / root
    return c_skip, c_out, dt(1) / root


class EDMScheduler(StepIndexed, Scheduler):
    """What diffusers' EDM schedulers share: config (no betas), sigma schedule and c_noise
    timesteps, ``init_noise_sigma``, ``scale_model_input`` (c_in), the denoiser D (eq. 7),
    the step index with ``set_begin_index`` (img2img), and ``add_noise`` (x_0 + sigma n)."""

    DEFAULTS = EDM_DEFAULTS
    PREDICTION_TYPES = ("epsilon", "v_prediction")

    def __init__(self, **config):
        # no Scheduler.__init__: EDM models have no beta / alpha_bar tables (nor has diffusers)
        self.config = Config(split_config(type(self).__name__, self.DEFAULTS, config))
        self._validate()
        self.timesteps = self.sigmas = self.num_inference_steps = None
        self._step_index = self._begin_index = None

    def _validate(self):
        cfg, name = self.config, type(self).__name__
        for key in ("sigma_min", "sigma_max", "sigma_data", "rho"):
            v = cfg[key]
            if not (is_number(v) and v > 0):
                raise ConfigError(f"{name}: {key}={v!r}: expected a finite number > 0")
        if not cfg.sigma_min < cfg.sigma_max:
            raise ConfigError(f"{name}: sigma_min={cfg.sigma_min!r} must be < "
                              f"sigma_max={cfg.sigma_max!r}")  # fmt: skip
        n_train = cfg.num_train_timesteps
        if not (is_int(n_train) and n_train > 0):
            raise ConfigError(f"{name}: num_train_timesteps={n_train!r}: expected an int > 0")
        choices = {
            "sigma_schedule": ("karras", "exponential"),
            "final_sigmas_type": ("zero", "sigma_min"),
            "prediction_type": self.PREDICTION_TYPES,
        }
        for key, allowed in choices.items():
            if cfg[key] not in allowed:
                raise ConfigError(f"{name}: {key}={cfg[key]!r}: expected one of {list(allowed)}")

    @property
    def init_noise_sigma(self) -> float:
        """sqrt(sigma_max^2 + 1), as diffusers (not sigma_max itself: 0.008% more at 80)."""
        return (self.config.sigma_max**2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int):
        """n sigmas from sigma_max down to sigma_min (``_schedule``), the final sigma after them
        (0, or sigma_min: ``_final_sigma``), and timesteps = c_noise(sigmas)."""
        n = check_num_steps(num_inference_steps, NO_STEP_LIMIT)
        sigmas = self._schedule(n)  # (n,) float32
        self.timesteps = c_noise(sigmas)  # (n,) float32
        last = self._final_sigma(sigmas) if self.config.final_sigmas_type == "sigma_min" else 0
        self.sigmas = np.concatenate([sigmas, np.float32([last])])  # (n + 1,) float32
        self.num_inference_steps = n
        self._step_index = self._begin_index = None

    def _schedule(self, n):
        """The n sigmas of the configured schedule, float32 (subclasses choose the precision)."""
        cfg = self.config
        if cfg.sigma_schedule == "exponential":
            return exponential_sigmas(n, cfg.sigma_min, cfg.sigma_max)
        ramp = np.linspace(0, 1, n)  # (n,) float64, as diffusers' EDMEulerScheduler
        return karras_schedule(ramp, cfg.sigma_min, cfg.sigma_max, cfg.rho).astype(np.float32)

    def _final_sigma(self, sigmas):
        """final_sigmas_type="sigma_min": the schedule's last sigma (EDMEulerScheduler)."""
        return sigmas[-1]

    def scale_model_input(self, sample, timestep=None):
        """The network's input c_in(sigma) x (Table 1), sigma of the current step."""
        self._init_step_index(timestep)
        _, _, c_in = preconditioning(self.sigmas[self._step_index], self.config.sigma_data,
                                     self.config.prediction_type)  # fmt: skip
        return sample * _as(c_in, sample)

    def denoised(self, model_output, sample, sigma):
        """D(x; sigma) = c_skip x + c_out F (eq. 7): the x_0 estimate from the output F."""
        cfg = self.config
        c_skip, c_out, _ = preconditioning(sigma, cfg.sigma_data, cfg.prediction_type)
        return _as(c_skip, sample) * sample + _as(c_out, model_output) * model_output

    def add_noise(self, original_samples, noise, timesteps):
        """x_sigma = x_0 + sigma n (the EDM forward process), sigma of ``timesteps`` looked up
        in this schedule; with a begin index (img2img, inpainting) the current step's sigma
        (the begin index before the first step), as diffusers."""
        self._require_timesteps()
        xp = array_module(original_samples)
        ts = np.asarray(timesteps.get() if hasattr(timesteps, "get") else timesteps).reshape(-1)
        if self._begin_index is None:
            idx = [self.index_for_timestep(t) for t in ts]
        else:
            current = self._begin_index if self._step_index is None else self._step_index
            idx = [current] * len(ts)
        sigma = xp.asarray(self.sigmas[idx].astype(original_samples.dtype))  # (B,)
        return original_samples + noise * bcast(sigma, original_samples.ndim)

    def get_velocity(self, sample, noise, timesteps):
        name = type(self).__name__
        raise InputError(f"{name}: EDM schedulers have no get_velocity (nor have diffusers'): "
                         "there is no alpha_bar table to form v with")  # fmt: skip


def _is_integer_timestep(t) -> bool:
    """An integer index (python / numpy int, integer array), which diffusers refuses too."""
    kind = getattr(getattr(t, "dtype", None), "kind", None)
    return (isinstance(t, int) and not isinstance(t, bool)) or kind in ("i", "u")


class EDMEulerScheduler(EDMScheduler):
    """Euler on the EDM probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, with the
    optional churn of Karras et al. 2022, Algorithm 2 (s_churn = 0: deterministic), as
    diffusers' EDMEulerScheduler. One model call per step; ``s_churn > 0`` draws one
    standard-normal tensor of the model output's shape and dtype on each step whose sigma lies
    in [s_tmin, s_tmax]. Computed in float32 whatever the sample dtype, as diffusers."""

    def step(self, model_output, timestep, sample, *, s_churn=0.0, s_tmin=0.0,
             s_tmax=float("inf"), s_noise=1.0, rng=None, noise=None, **_):  # fmt: skip
        """1. Alg. 2's churn: gamma = min(s_churn / n, sqrt(2) - 1) for sigma in [s_tmin,
           s_tmax], sigma_hat = sigma (1 + gamma), x += s_noise sqrt(sigma_hat^2 - sigma^2) z;
        2. x_0 = D(x; sigma_hat) (eq. 7);
        3. Alg. 2's Euler step (without its second-order correction):
           x_next = x + (sigma_next - sigma_hat) (x - x_0) / sigma_hat."""
        if _is_integer_timestep(timestep):
            raise InputError(f"timestep={timestep!r}: an integer index; pass one of "
                             f"{type(self).__name__}.timesteps (float c_noise values)")  # fmt: skip
        self._init_step_index(timestep)
        i = self._step_index
        x = sample.astype(np.float32)  # diffusers upcasts (a float64 sample is rounded too)
        sigma = self.sigmas[i]
        gamma = 0.0
        if s_tmin <= sigma <= s_tmax:
            gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1)
        sigma_hat = sigma * sigma.dtype.type(gamma + 1)
        if gamma > 0:  # 1. one noise tensor, model_output's shape and dtype
            z = draw_noise(model_output, rng=rng, noise=noise) * s_noise
            x = x + z * _as(np.sqrt(sigma_hat * sigma_hat - sigma * sigma), z)
        x0 = self.denoised(model_output, x, sigma_hat)  # 2.
        d = (x - x0) / _as(sigma_hat, x0)  # 3. the ODE slope
        prev = x + d * _as(self.sigmas[i + 1] - sigma_hat, d)
        self._step_index += 1
        return SchedulerOutput(prev.astype(model_output.dtype, copy=False), x0)
