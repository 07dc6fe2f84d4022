"""PLMS as in the original CompVis latent-diffusion code (ldm/models/diffusion/plms.py), after
Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds".

Each solver step is DDIM's deterministic update (DDIM eq. 12, eta = 0) fed with a combination
e' of noise predictions:

* step 1, pseudo improved Euler (PNDM eq. 9 with Heun's rule): x' = ddim(x_t, e_t),
  e_next = model(x', t_next), e' = (e_t + e_next) / 2 -- two model calls;
* step 2: e' = (3 e_t - e_{t+1}) / 2                               (2nd order Adams-Bashforth)
* step 3: e' = (23 e_t - 16 e_{t+1} + 5 e_{t+2}) / 12              (3rd order)
* later:  e' = (55 e_t - 59 e_{t+1} + 37 e_{t+2} - 9 e_{t+3}) / 24 (4th order, PNDM eq. 12)

where e_{t+k} are the model outputs at the k previous steps (at the true samples x_t, not the
first step's x'). For epsilon models on evenly spaced timesteps this is mathematically diffusers'
PNDM with ``skip_prk_steps`` (the tests check it). They differ for n = 1 (ldm still makes the
second call), for v / sample models (ldm converts each output to eps before combining; diffusers
combines raw outputs), and for uneven spacings (diffusers' corrector uses t_1 + T // n for t_0).

Loop protocol: ``timesteps`` holds n + 1 entries [t_0, t_1, t_1, t_2, ..., t_{n-1}] (for n = 1:
[t_0, t_0], as ldm evaluates e_next at t_next = t_0). The first ``step`` returns the pseudo
sample x' as ``prev_sample`` (feed it to the model at the next timestep, as usual); the second
``step`` receives e_next and returns the real x_{t_1}. Everything else is one call per step.

Timesteps follow the config's spacing (SD: "leading" + steps_offset=1 = ldm's
make_ddim_timesteps "uniform" + 1 when n divides 1000). The step after the last goes to
``alphas_cumprod[0]`` (``set_alpha_to_one=False``, ldm's ``ddim_alphas_prev``) unless the
config sets it to one. Coefficients are computed in the sample's dtype (float64 samples give a
float64 solver).
"""

from __future__ import annotations

import numpy as np

from .base import COMMON_DEFAULTS, Scheduler, SchedulerOutput, rounded_timesteps
from .ddim import x0_and_eps


class PLMSScheduler(Scheduler):
    DEFAULTS = {**COMMON_DEFAULTS, "set_alpha_to_one": False}

    def set_timesteps(self, num_inference_steps: int):
        n, base = rounded_timesteps(self.config, num_inference_steps)  # (n,) descending
        self.base_timesteps = base
        self.num_inference_steps = n
        self.set_begin_index(0)

    def set_begin_index(self, begin_index: int = 0):
        """Start at base step ``begin_index`` (img2img: skip the first steps). Rebuilds
        ``timesteps`` as [b_i, b_{i+1}, b_{i+1}, b_{i+2}, ...]: read them again afterwards."""
        self._require_base()
        i = int(begin_index)
        base = self.base_timesteps
        second = base[i + 1 : i + 2] if i + 1 < len(base) else base[i : i + 1]
        self.timesteps = np.concatenate([base[i : i + 1], second, base[i + 1 :]])  # (n - i + 1,)
        self._begin, self._calls, self._old_eps, self._pending = i, 0, [], None

    def _require_base(self):
        if getattr(self, "base_timesteps", None) is None:
            self._require_timesteps()

    def _abar_pair(self, i: int, dtype):
        """(abar at base step i, abar at the step after it) in ``dtype``."""
        cast = np.dtype(dtype).type
        a_t = cast(self.alphas_cumprod[self.base_timesteps[i]])
        if i + 1 < len(self.base_timesteps):
            a_prev = cast(self.alphas_cumprod[self.base_timesteps[i + 1]])
        else:
            a_prev = cast(1.0) if self.config.set_alpha_to_one else cast(self.alphas_cumprod[0])
        return a_t, a_prev

    def _ddim(self, x, e, i):
        """x_prev = sqrt(a') x0 + sqrt(1 - a') e, x0 = (x - sqrt(1 - a) e) / sqrt(a) (DDIM eq.
        12, eta = 0), with e the combined eps; returns (x_prev, x0)."""
        a_t, a_prev = self._abar_pair(i, x.dtype)
        one = a_t.dtype.type(1)
        x0 = (x - np.sqrt(one - a_t) * e) / np.sqrt(a_t)
        return np.sqrt(a_prev) * x0 + np.sqrt(one - a_prev) * e, x0

    def _eps(self, model_output, x, t):
        """Model output at timestep t -> eps (epsilon / v_prediction / sample)."""
        a_t = x.dtype.type(self.alphas_cumprod[t])
        return x0_and_eps(self.config.prediction_type, model_output, x, a_t)[1]

    def step(self, model_output, timestep, sample, **_):
        """Consume the model output for ``timesteps[k]`` (k = number of calls so far)."""
        self._require_timesteps()
        k = self._calls
        self._calls += 1
        if k == 0:  # 1a. first model call: Euler predictor x' (pseudo improved Euler)
            i = self._begin
            e_t = self._eps(model_output, sample, self.base_timesteps[i])
            x_pred, x0 = self._ddim(sample, e_t, i)
            self._pending = (sample, e_t)
            return SchedulerOutput(x_pred.astype(sample.dtype, copy=False), x0)
        if k == 1:  # 1b. corrector: e' = (e_t + e(x', t_next)) / 2, restart from x_t
            x_t, e_t = self._pending
            self._pending = None
            e_next = self._eps(model_output, sample, self.timesteps[1])  # at t_next
            prev, x0 = self._ddim(x_t, (e_t + e_next) / 2, self._begin)
            self._old_eps = [e_t]
            return SchedulerOutput(prev.astype(x_t.dtype, copy=False), x0)
        i = self._begin + k - 1  # base step index
        e_t = self._eps(model_output, sample, self.base_timesteps[i])
        old = self._old_eps
        if len(old) == 1:  # 2. Adams-Bashforth, orders 2, 3, 4
            e = (3 * e_t - old[-1]) / 2
        elif len(old) == 2:
            e = (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e = (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        prev, x0 = self._ddim(sample, e, i)
        self._old_eps = (old + [e_t])[-3:]
        return SchedulerOutput(prev.astype(sample.dtype, copy=False), x0)
