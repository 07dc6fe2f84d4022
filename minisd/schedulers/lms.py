"""Linear multistep (LMS) sampler on the sigma ODE dx/dsigma = (x - x_0) / sigma
(Karras et al. 2022 eq. 7; k-diffusion's sample_lms, after Crowson)."""

from __future__ import annotations

import numpy as np

from .base import SIGMA_SPACING_DEFAULTS, SchedulerOutput, SigmaScheduler, check_num_steps
from .euler import SIGMA_DEFAULTS, sigma_schedule


def lms_coefficient(sigmas, order: int, i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial l_j through the
    nodes sigma_i, sigma_{i-1}, ..., sigma_{i-order+1} (l_j = 1 at sigma_{i-j}, 0 elsewhere).

    Exact polynomial integration in float64; diffusers integrates numerically (scipy quad, on
    float32 node values), which agrees to ~1e-7 relative."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-nodes[k], 1.0]) / (nodes[j] - nodes[k])
    antider = poly.integ()
    return float(antider(float(sigmas[i + 1])) - antider(float(sigmas[i])))


class LMSDiscreteScheduler(SigmaScheduler):
    """x_{i+1} = x_i + sum_j c_j d_{i-j}, d = (x - x_0) / sigma, with c_j the integrated
    Lagrange weights of the last ``order`` (<= 4) slopes on the nonuniform sigma grid."""

    DEFAULTS = {
        **SIGMA_DEFAULTS,
        **SIGMA_SPACING_DEFAULTS,
        # Not in diffusers' LMS signature, but its from_config keeps them from another
        # scheduler's config and its exponential / beta ramps read them (hasattr); its Karras
        # ramp does not (always the schedule's own ends).
        "sigma_min": None,
        "sigma_max": None,
    }
    KARRAS_CONFIG_BOUNDS = False

    def set_timesteps(self, num_inference_steps: int):
        n = check_num_steps(num_inference_steps, int(self.config.num_train_timesteps))
        ts, sigmas = sigma_schedule(self, n)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # (n + 1,)
        self.timesteps = np.asarray(ts).astype(np.float32)  # (n,)
        self.num_inference_steps = n
        self._step_index = self._begin_index = None
        self.derivatives = []

    def step(self, model_output, timestep, sample, *, order: int = 4, **_):
        self._init_step_index(timestep)
        i = self._step_index
        sigma = self.sigmas[i]
        # 1. x_0 estimate
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = sample - sigma * model_output
        elif kind == "v_prediction":
            x0 = model_output * (-sigma / np.sqrt(sigma * sigma + 1)) + sample / (sigma * sigma + 1)
        else:
            x0 = model_output
        # 2. slope history (newest last), at most ``order`` entries
        self.derivatives.append((sample - x0) / sigma)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        # 3. multistep update with integrated Lagrange weights
        order = min(i + 1, order)
        coeffs = [lms_coefficient(self.sigmas, order, i, j) for j in range(order)]
        total = 0
        for c, d in zip(coeffs, reversed(self.derivatives)):
            total = total + d.dtype.type(c) * d  # torch rounds the python float to d's dtype
        prev = sample + total
        self._step_index += 1
        return SchedulerOutput(prev.astype(sample.dtype, copy=False), x0)
