"""PNDM (Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on
Manifolds"), as diffusers implements it: Runge-Kutta (PRK) warm-up, then linear multistep (PLMS)
on the transfer function phi of eq. 11. SD configures ``skip_prk_steps=True``, which replaces the
warm-up by one pseudo improved-Euler step (two model calls at the first pair of timesteps)."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .base import COMMON_DEFAULTS, Scheduler, SchedulerOutput, as_index, check_num_steps


def transfer(sample, eps, abar_t, abar_prev):
    """phi(x_t, eps, t, t-d) of PNDM eq. 11 (a DDIM step written with both alphas):

    x_{t-d} = sqrt(a'/a) x_t - (a' - a) eps / (a sqrt(1-a') + sqrt(a (1-a) a')),
    a = abar_t, a' = abar_{t-d}.
    """
    one = np.float32(1)
    sample_coef = np.sqrt(abar_prev / abar_t)
    denom = abar_t * np.sqrt(one - abar_prev) + np.sqrt(abar_t * (one - abar_t) * abar_prev)
    return sample_coef * sample - (abar_prev - abar_t) * eps / denom


class PNDMScheduler(Scheduler):
    PREDICTION_TYPES = ("epsilon", "v_prediction")
    DEFAULTS = {**COMMON_DEFAULTS, "skip_prk_steps": False, "set_alpha_to_one": False}

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = (
            np.float32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        )
        self._reset()

    def _reset(self):
        self.ets, self.counter, self.cur_model_output, self.cur_sample = [], 0, 0, None

    def set_timesteps(self, num_inference_steps: int):
        """PRK: the last 4 base timesteps, each with its half-step, 4 calls per RK step (eq. 13);
        skip_prk_steps: base timesteps with the second one repeated (pseudo improved Euler)."""
        cfg = self.config
        n_train = int(cfg.num_train_timesteps)
        n = check_num_steps(num_inference_steps, n_train)
        if cfg.timestep_spacing == "linspace":
            base = np.linspace(0, n_train - 1, n).round()  # ascending
        elif cfg.timestep_spacing == "leading":
            base = np.arange(0, n) * (n_train // n) + cfg.steps_offset
        elif cfg.timestep_spacing == "trailing":
            base = np.round(np.arange(n_train, 0, -n_train / n))[::-1] - 1
        else:
            from .base import spaced_timesteps

            spaced_timesteps(cfg.timestep_spacing, n_train, n)  # raises ConfigError
        base = base.astype(np.int64)  # (n,) ascending
        if cfg.skip_prk_steps:
            self.prk_timesteps = np.array([], dtype=np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            if n < 4:
                raise InputError(
                    f"num_inference_steps={n}: PNDM with PRK warm-up needs at least 4 steps "
                    "(set skip_prk_steps=True for fewer)"
                )
            half = n_train // n // 2
            prk = base[-4:].repeat(2) + np.tile(np.array([0, half]), 4)  # (8,)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()  # (12,)
            plms = base[:-3][::-1]
        self.plms_timesteps = plms.copy()
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self.num_inference_steps = n
        self._reset()

    def _abar(self, t):
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _prev_sample(self, sample, t, prev_t, eps):
        abar_t, abar_prev = self._abar(t), self._abar(prev_t)
        if self.config.prediction_type == "v_prediction":  # eps = sqrt(a) v + sqrt(1-a) x
            eps = np.sqrt(abar_t) * eps + np.sqrt(np.float32(1) - abar_t) * sample
        return transfer(sample, eps, abar_t, abar_prev)

    def step(self, model_output, timestep, sample, **_):
        self._require_timesteps()
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            prev = self._step_prk(model_output, as_index(timestep), sample)
        else:
            prev = self._step_plms(model_output, as_index(timestep), sample)
        self.counter += 1
        return SchedulerOutput(prev.astype(sample.dtype, copy=False))

    def _step_prk(self, eps, t, sample):
        """Classical RK4 on the ODE of PNDM eq. 12, one model call per stage (eq. 13):
        e = (e1 + 2 e2 + 2 e3 + e4) / 6, stages at t, t - d/2, t - d/2, t - d."""
        delta = int(self.config.num_train_timesteps) // self.num_inference_steps
        prev_t = t - (0 if self.counter % 2 else delta // 2)
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output += 1 / 6 * eps
            self.ets.append(eps)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output += 1 / 3 * eps
        else:
            eps = self.cur_model_output + 1 / 6 * eps
            self.cur_model_output = 0
        cur = self.cur_sample if self.cur_sample is not None else sample
        return self._prev_sample(cur, t, prev_t, eps)

    def _step_plms(self, eps, t, sample):
        """Linear multistep on eps (PNDM eq. 12 with the Adams-Bashforth weights):
        e' = (55 e_t - 59 e_{t-d} + 37 e_{t-2d} - 9 e_{t-3d}) / 24 (lower orders at the start)."""
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise InputError("PNDMScheduler: PLMS steps need the 12 PRK warm-up steps first")
        delta = int(self.config.num_train_timesteps) // self.num_inference_steps
        prev_t = t - delta
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(eps)
        else:  # second call of the pseudo improved Euler step: t is already the next timestep
            prev_t, t = t, t + delta
        e = self.ets
        if len(e) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(e) == 1 and self.counter == 1:
            eps = (eps + e[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(e) == 2:
            eps = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            eps = 1 / 24 * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        return self._prev_sample(sample, t, prev_t, eps)
