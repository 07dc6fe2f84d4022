"""TCD sampler (Zheng et al. 2024, "Trajectory Consistency Distillation", arXiv:2402.19159)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import check_numbers, is_int, is_number
from ..errors import ConfigError, InputError
from .base import Scheduler, SchedulerOutput, StepIndexed, as_index, check_num_steps, draw_noise
from .ddim import x0_and_eps
from .lcm import CONSISTENCY_DEFAULTS, check_custom, custom_schedule, pick_evenly

logger = logging.getLogger("minisd.schedulers")


@dataclass
class TCDSchedulerOutput(SchedulerOutput):
    """``prev_sample``, ``pred_original_sample`` (x_0) and, as diffusers' TCDSchedulerOutput,
    ``pred_noised_sample`` (x_s, the consistency function's jump target before re-noising)."""

    pred_noised_sample: Any = None


class TCDScheduler(StepIndexed, Scheduler):
    """Strategic stochastic sampling of TCD (Zheng et al. 2024, sec. "Strategic Stochastic
    Sampling"), diffusers' ``TCDScheduler``. Notation: abar_t = alphas_cumprod[t],
    alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), gamma = the ``eta`` of ``step``.

    Step i, at t = timesteps[i], with t' = timesteps[i + 1] (t' = 0 after the last entry):

    1. x_0, eps from the model output (epsilon / sample / v_prediction, DDIM eq. 9).
    2. s = floor((1 - gamma) t'): how far below t' the deterministic jump lands.
    3. x_s = alpha_s x_0 + sigma_s eps: the trajectory consistency function f(x_t, t, s) in its
       first-order semi-linear (exponential-integrator) form, TCD sec. "Trajectory Consistency
       Function"; it is DDIM eq. 12 with sigma = 0 from t straight to s.
    4. x_t' = sqrt(abar_t' / abar_s) x_s + sqrt(1 - abar_t' / abar_s) z, z ~ N(0, I): the forward
       process q(x_t' | x_s) (DDPM eq. 2 composed from s up to t') puts noise back to t'.
       Skipped when gamma = 0 (then s = t' and the step is deterministic DDIM) and on the last
       step. gamma = 1 (s = 0): predict x_0, re-noise to t', the multistep consistency sampling
       of consistency models / LCM (without their c_skip / c_out boundary scalings).

    As diffusers 0.42: the last step lands at t' = 0 (x_s with abar_0, not the final alpha of
    ``set_alpha_to_one``); ``clip_sample``, ``thresholding``, ``timestep_spacing``,
    ``steps_offset`` and ``timestep_scaling`` are accepted config keys that TCD never reads.
    Timesteps come from the distillation schedule (``set_timesteps``).

    Precision: float32 tables and float32 scalar coefficients as diffusers' 0-d torch tensors;
    s is floored from a float32 product as torch does (float64 would give s = 62 for
    0.7 * 90, torch 63). float64 samples keep these float32 coefficients (torch promotes the
    0-d float32 tensors to the samples' dtype), so float64 runs agree with diffusers' float64
    runs (to the float32 runs' ~1e-7 residue of torch's 0-d sqrt), not with an exact float64
    computation of the schedule.
    Randomness: one standard-normal tensor of model_output's shape per noisy step, in the
    dtype of x_s (model_output's and sample's result type), only when gamma > 0 and the step
    is not number ``num_inference_steps - 1``.
    """

    DEFAULTS = CONSISTENCY_DEFAULTS

    def __init__(self, **config):
        super().__init__(**config)
        one = np.float32(1.0)  # used only for a negative t', which set_timesteps refuses
        self.final_alpha_cumprod = one if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.custom_timesteps = False

    def _validate(self):
        super()._validate()
        ints, floats = ("original_inference_steps",), ("timestep_scaling",)
        check_numbers(type(self).__name__, self.config, ints=ints, floats=floats)

    # ------------------------------------------------------------------------- timesteps

    def set_timesteps(
        self, num_inference_steps=None, *, timesteps=None, strength=1.0,
        original_inference_steps=None,
    ):  # fmt: skip
        """The inference timesteps, picked from the distillation schedule as diffusers does.

        Distillation schedule ("origin", ascending): without ``original_inference_steps``,
        k i - 1 for i = 1 .. int(N strength) with N = config.original_inference_steps and
        k = num_train_timesteps // N (TCD's skipping step k); with it, every training timestep
        below int(num_train_timesteps strength). ``num_inference_steps`` n: the origin reversed,
        at indices floor(j len / n), j = 0 .. n-1. ``timesteps``: a custom descending list,
        then its last int(len strength) entries (img2img).
        """
        if (num_inference_steps is None) == (timesteps is None):
            got = "neither" if timesteps is None else "both"
            raise InputError(
                f"set_timesteps: pass exactly one of num_inference_steps and timesteps (got {got})"
            )
        if not (is_number(strength) and 0 < strength <= 1):
            raise InputError(f"strength={strength!r}: must be a number in (0, 1]")
        steps, origin = self._origin(original_inference_steps, strength)  # (L,) ascending
        if timesteps is None:
            ts = self._spaced(num_inference_steps, steps, origin, strength)
        else:
            ts = self._custom(timesteps, steps, origin, strength)
        self.timesteps = ts.astype(np.int64)  # (n,) descending
        self._step_index = self._begin_index = None

    def _origin(self, original_inference_steps, strength):
        """(N, origin timesteps ascending) as diffusers' tcd_origin_timesteps."""
        n_train = int(self.config.num_train_timesteps)
        if original_inference_steps is None:
            steps = int(self.config.original_inference_steps)
            if steps > n_train:
                raise ConfigError(
                    f"original_inference_steps={steps}: cannot exceed num_train_timesteps={n_train}"
                )
            k = n_train // steps  # the skipping step k
            return steps, np.arange(1, int(steps * strength) + 1, dtype=np.int64) * k - 1
        if not (is_int(original_inference_steps) and original_inference_steps > 0):
            raise InputError(
                f"original_inference_steps={original_inference_steps!r}: expected a positive "
                "integer"
            )
        return int(original_inference_steps), np.arange(int(n_train * strength), dtype=np.int64)

    def _spaced(self, n, steps, origin, strength):
        n_train = int(self.config.num_train_timesteps)
        n = check_num_steps(n, n_train)
        if len(origin) // n < 1:
            raise InputError(
                f"num_inference_steps={n}: more than the {len(origin)} timesteps of the "
                f"distillation schedule (original_inference_steps={steps} x strength={strength}); "
                "use fewer steps or a higher strength"
            )
        if n > steps:
            raise InputError(
                f"num_inference_steps={n}: cannot exceed original_inference_steps={steps} (the "
                "timesteps are a subset of that schedule)"
            )
        self.num_inference_steps, self.custom_timesteps = n, False
        return pick_evenly(origin[::-1], n)  # (n,)

    def _custom(self, timesteps, steps, origin, strength):
        n_train = int(self.config.num_train_timesteps)
        ts = check_custom(timesteps, n_train)  # (m,)
        self.num_inference_steps, self.custom_timesteps = len(ts), True  # (untrimmed count)
        return custom_schedule(type(self).__name__, ts, origin, steps, strength, n_train)

    # ------------------------------------------------------------------------- step

    def _targets(self, gamma):
        """(t', s) of the current step: the next timestep (0 after the last) and
        s = floor((1 - gamma) t') computed in float32 as torch does."""
        i = self._step_index
        t_next = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else 0
        s = int(np.floor(np.float32(1 - gamma) * np.float32(t_next)))
        return t_next, s

    def step(self, model_output, timestep, sample, *, eta=0.3, rng=None, noise=None, **_):
        """One strategic stochastic sampling step (class docstring) with gamma = ``eta``
        (diffusers' name and default, 0.3; gamma = 0: deterministic)."""
        self._require_timesteps()
        if not (is_number(eta) and 0 <= eta <= 1):
            raise InputError(f"eta={eta!r}: TCD's gamma must be a number in [0, 1]")
        self._init_step_index(timestep)
        t_next, s = self._targets(eta)
        ac = self.alphas_cumprod
        abar_t, abar_next, abar_s = ac[as_index(timestep)], ac[t_next], ac[s]  # float32
        one = np.float32(1)
        # 1. x_0 and eps from the model output
        x0, eps = x0_and_eps(self.config.prediction_type, model_output, sample, abar_t)
        # 2.-3. the consistency function's jump t -> s
        x_s = np.sqrt(abar_s) * x0 + np.sqrt(one - abar_s) * eps
        prev = x_s
        # 4. forward noise s -> t' (gamma > 0; none on the last step)
        if eta > 0 and self._step_index != self.num_inference_steps - 1:
            dtype = np.result_type(model_output.dtype, sample.dtype)  # torch's x_s dtype
            z = draw_noise(model_output, rng=rng, noise=noise, dtype=dtype)
            ratio = abar_next / abar_s
            prev = np.sqrt(ratio) * x_s + np.sqrt(one - ratio) * z
        self._step_index += 1
        return TCDSchedulerOutput(prev.astype(sample.dtype, copy=False), x0, x_s)
