"""DDIM sampler (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models")."""

from __future__ import annotations

import numpy as np

from .base import (
    COMMON_DEFAULTS,
    Scheduler,
    SchedulerOutput,
    as_index,
    clip_x0,
    draw_noise,
    rounded_timesteps,
)


def x0_and_eps(kind: str, model_output, sample, abar_t):
    """(x_0, eps) from the model output for prediction type ``kind`` (DDIM eq. 9 / v-param)."""
    sa, sb = np.sqrt(abar_t), np.sqrt(np.float32(1) - abar_t)
    if kind == "epsilon":
        return (sample - sb * model_output) / sa, model_output
    if kind == "sample":
        return model_output, (sample - sa * model_output) / sb
    # v_prediction (Salimans & Ho 2022): x_0 = sqrt(abar) x - sqrt(1-abar) v, eps = ... + ...
    return sa * sample - sb * model_output, sa * model_output + sb * sample


class DDIMScheduler(Scheduler):
    """Generalized (non-Markovian) sampler of DDIM eq. 12; eta = 0 is deterministic.

    Like diffusers, the previous timestep is always t - num_train_timesteps // n, whatever the
    spacing. Randomness (eta > 0 only): one standard-normal tensor of model_output's shape per
    step, drawn in model_output's dtype, after the deterministic update.
    """

    DEFAULTS = {
        **COMMON_DEFAULTS,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "rescale_betas_zero_snr": False,
    }

    def __init__(self, **config):
        super().__init__(**config)
        # alpha_bar "before" step 0: 1 (SD) or alpha_bar_0
        one = np.float32(1.0)
        self.final_alpha_cumprod = one if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int):
        self.num_inference_steps, self.timesteps = rounded_timesteps(
            self.config, num_inference_steps
        )

    def _abar(self, t: int):
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def step(
        self, model_output, timestep, sample, *, eta=0.0, use_clipped_model_output=False,
        rng=None, noise=None, **_,
    ):  # fmt: skip
        """One step x_t -> x_{t_prev} of DDIM eq. 12:

        x_prev = sqrt(abar_prev) x0  +  sqrt(1 - abar_prev - sigma_t^2) eps  +  sigma_t z,
        sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)  (eq. 16)
        """
        self._require_timesteps()
        t = as_index(timestep)
        prev_t = t - int(self.config.num_train_timesteps) // self.num_inference_steps
        abar_t, abar_prev = self._abar(t), self._abar(prev_t)
        # 1. predicted x_0 and eps ("predicted x_0" term of eq. 12)
        x0, eps = x0_and_eps(self.config.prediction_type, model_output, sample, abar_t)
        # 2. clip / threshold x_0
        x0 = clip_x0(x0, self.config)
        # 3. sigma_t (eq. 16)
        one = np.float32(1)
        var = (one - abar_prev) / (one - abar_t) * (one - abar_t / abar_prev)
        std = eta * np.sqrt(var)
        if use_clipped_model_output:  # re-derive eps from the clipped x_0 (as Glide does)
            eps = (sample - np.sqrt(abar_t) * x0) / np.sqrt(one - abar_t)
        # 4. "direction pointing to x_t" and the deterministic part of eq. 12
        direction = np.sqrt(one - abar_prev - std * std) * eps
        prev = np.sqrt(abar_prev) * x0 + direction
        # 5. random noise (eta > 0)
        if eta > 0:
            z = draw_noise(model_output, rng=rng, noise=noise)
            prev = prev + std * z
        return SchedulerOutput(prev.astype(sample.dtype, copy=False), x0)
