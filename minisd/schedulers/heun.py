"""Heun's 2nd-order sampler (Karras et al. 2022, Algorithm 1, deterministic)."""

from __future__ import annotations

import numpy as np

from ..backend import array_module
from .base import SIGMA_SPACING_DEFAULTS, SchedulerOutput, SigmaScheduler, check_num_steps
from .euler import SIGMA_DEFAULTS, sigma_schedule


class HeunDiscreteScheduler(SigmaScheduler):
    """Two model calls per solver step, listed in ``timesteps`` as diffusers does:
    timesteps = [t_0, t_1, t_1, t_2, t_2, ..., t_{n-1}, t_{n-1}] and sigmas likewise doubled.

    First call (Euler predictor, Alg. 1 lines 5-7): d = (x - x_0) / sigma, x' = x + (s' - s) d.
    Second call at (x', s'): d' = (x' - x_0') / s', x_next = x + (s' - s) (d + d') / 2 (line 8).
    When s' = 0 the second call is still made, as in diffusers.
    """

    DEFAULTS = {
        **SIGMA_DEFAULTS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        **SIGMA_SPACING_DEFAULTS,
        "sigma_min": None,  # Karras / exp / beta bounds: diffusers' Heun reads them if present
        "sigma_max": None,
        "clip_sample": False,
        "clip_sample_range": 1.0,
    }
    order = 2

    def set_timesteps(self, num_inference_steps: int):
        n = check_num_steps(num_inference_steps, int(self.config.num_train_timesteps))
        ts, sigmas = sigma_schedule(self, n)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # (n + 1,)
        self.sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])  # (2n,)
        ts = np.asarray(ts)
        self.timesteps = np.concatenate([ts[:1], ts[1:].repeat(2)]).astype(np.float32)  # (2n-1,)
        self.num_inference_steps = n
        self._step_index = self._begin_index = None
        self.prev_derivative = self.dt = self.sample = None

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    def step(self, model_output, timestep, sample, **_):
        self._init_step_index(timestep)
        xp = array_module(sample)
        i = self._step_index
        first = self.state_in_first_order
        sigma, sigma_next = (
            (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        )
        # 1. x_0 estimate at the point the model just saw (sigma, or sigma_next on call 2)
        s_in = sigma if first else sigma_next
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = sample - s_in * model_output
        elif kind == "v_prediction":
            x0 = model_output * (-s_in / np.sqrt(s_in * s_in + 1)) + sample / (s_in * s_in + 1)
        else:
            x0 = model_output
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = xp.clip(x0, -r, r)
        # 2. predictor (store state) or corrector (average the slopes, restart from x)
        if first:
            d = (sample - x0) / sigma
            dt = sigma_next - sigma
            self.prev_derivative, self.dt, self.sample = d, dt, sample
        else:
            d = (self.prev_derivative + (sample - x0) / sigma_next) / 2
            dt, sample = self.dt, self.sample
            self.prev_derivative = self.dt = self.sample = None
        prev = sample + d * dt
        self._step_index += 1
        return SchedulerOutput(prev.astype(sample.dtype, copy=False), x0)
