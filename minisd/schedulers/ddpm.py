"""DDPM ancestral sampler (Ho et al. 2020, "Denoising Diffusion Probabilistic Models")."""

from __future__ import annotations

import numpy as np

from ..backend import array_module
from ..errors import ConfigError
from .base import (
    COMMON_DEFAULTS,
    Scheduler,
    SchedulerOutput,
    as_index,
    clip_x0,
    draw_noise,
    rounded,
    rounded_timesteps,
)

VARIANCE_TYPES = (
    "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range",
)  # fmt: skip


class DDPMScheduler(Scheduler):
    """Ancestral sampling of p(x_{t-1} | x_t) with the posterior mean of DDPM eq. 7.

    Randomness: one standard-normal tensor of model_output's shape per step with t > 0 (none
    on the final step), drawn in model_output's dtype, as diffusers.
    """

    DEFAULTS = {
        **COMMON_DEFAULTS,
        "variance_type": "fixed_small",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "rescale_betas_zero_snr": False,
    }

    def _validate(self):
        super()._validate()
        if self.config.variance_type not in VARIANCE_TYPES:
            raise ConfigError(
                f"variance_type={self.config.variance_type!r}: expected one of {VARIANCE_TYPES}"
            )

    def set_timesteps(self, num_inference_steps: int):
        self.num_inference_steps, self.timesteps = rounded_timesteps(
            self.config, num_inference_steps
        )

    def previous_timestep(self, t: int) -> int:
        """The next entry of ``timesteps`` after t (-1 after the last one)."""
        pos = int(np.nonzero(self.timesteps == t)[0][0])
        return int(self.timesteps[pos + 1]) if pos + 1 < len(self.timesteps) else -1

    def _alphas(self, t: int, prev_t: int):
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else np.float32(1.0)
        return abar_t, abar_prev

    def _variance(self, t: int, prev_t: int, predicted_variance=None):
        """Posterior variance beta~_t (DDPM eq. 7) or its variants, per ``variance_type``."""
        abar_t, abar_prev = self._alphas(t, prev_t)
        beta_t = np.float32(1) - abar_t / abar_prev  # beta of the (strided) step
        var = (np.float32(1) - abar_prev) / (np.float32(1) - abar_t) * beta_t  # beta~_t
        var = max(var, np.float32(1e-20))
        kind = self.config.variance_type
        if kind == "fixed_small":
            return var
        if kind == "fixed_small_log":  # returns the standard deviation
            return rounded(np.exp, np.float32(0.5) * rounded(np.log, var))
        if kind == "fixed_large":
            return beta_t
        if kind == "fixed_large_log":
            return rounded(np.log, beta_t)
        if kind == "learned":
            return predicted_variance
        # learned_range (Nichol & Dhariwal 2021, eq. 15): log variance interpolated by v
        frac = (predicted_variance + 1) / 2
        return frac * rounded(np.log, beta_t) + (1 - frac) * rounded(np.log, var)

    def step(self, model_output, timestep, sample, *, eta=0.0, rng=None, noise=None, **_):
        """One ancestral step x_t -> x_{t-1}. ``eta`` is accepted for a uniform loop and unused.

        1. x_0 estimate from the model output (DDPM eq. 15 for epsilon).
        2. optional clipping / dynamic thresholding of x_0.
        3. posterior mean mu~_t(x_t, x_0) (DDPM eq. 7).
        4. add sigma_t z (DDPM Algorithm 2, line 4) unless t is the last step.
        """
        self._require_timesteps()
        xp = array_module(sample)
        t = as_index(timestep)
        prev_t = self.previous_timestep(t)
        c = sample.shape[1]
        predicted_variance = None
        if model_output.shape[1] == 2 * c and self.config.variance_type in (
            "learned",
            "learned_range",
        ):
            model_output, predicted_variance = model_output[:, :c], model_output[:, c:]
        abar_t, abar_prev = self._alphas(t, prev_t)
        beta_prod_t, beta_prod_prev = np.float32(1) - abar_t, np.float32(1) - abar_prev
        alpha_t = abar_t / abar_prev
        beta_t = np.float32(1) - alpha_t
        # 1. x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)       (DDPM eq. 15)
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(abar_t)
        elif kind == "sample":
            x0 = model_output
        else:  # v_prediction: x_0 = sqrt(abar) x_t - sqrt(1 - abar) v
            x0 = np.sqrt(abar_t) * sample - np.sqrt(beta_prod_t) * model_output
        # 2. keep x_0 in range
        x0 = clip_x0(x0, self.config)
        # 3. mu~ = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0
        #        + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t      (DDPM eq. 7)
        x0_coef = np.sqrt(abar_prev) * beta_t / beta_prod_t
        xt_coef = np.sqrt(alpha_t) * beta_prod_prev / beta_prod_t
        prev = x0_coef * x0 + xt_coef * sample
        # 4. x_{t-1} = mu~ + sigma_t z
        if t > 0:
            z = draw_noise(model_output, rng=rng, noise=noise)
            var = self._variance(t, prev_t, predicted_variance)
            if self.config.variance_type == "fixed_small_log":
                prev = prev + var * z
            elif self.config.variance_type == "fixed_large_log":
                # diffusers takes sqrt of this log variance (NaN); we use std = exp(log var / 2)
                prev = prev + rounded(np.exp, np.float32(0.5) * var) * z
            elif self.config.variance_type == "learned_range":
                prev = prev + xp.exp(0.5 * var) * z
            else:
                prev = prev + (np.sqrt(var) if predicted_variance is None else xp.sqrt(var)) * z
        return SchedulerOutput(prev.astype(sample.dtype, copy=False), x0)
