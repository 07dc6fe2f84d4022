"""DPM-Solver++ multistep in the EDM formulation, as diffusers' EDMDPMSolverMultistepScheduler
(the scheduler Playground v2.5 ships): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", on the sigmas and the denoiser of Karras et al.
2022 (edm.py).

On x_sigma = x_0 + sigma n the solver's variables are alpha_t = 1, sigma_t = sigma and the half
log-SNR lambda_t = log(alpha_t / sigma_t) = -ln sigma; the data prediction is EDM's denoiser
D(x; sigma) = c_skip x + c_out F (eq. 7). With h = lambda_t - lambda_s = ln(sigma_s / sigma_t)
and D_0, D_1 the current and previous data predictions, r = h_prev / h:

    order 1 (DDIM):      x_t = (sigma_t / sigma_s) x_s - (e^{-h} - 1) D_0
    order 2 (midpoint):  x_t = (sigma_t / sigma_s) x_s - (e^{-h} - 1) (D_0 + (D_0 - D_1) / 2r)
    order 3:             Lu et al.'s multistep third order (two divided differences)
    sde-dpmsolver++:     x_t = (sigma_t / sigma_s) e^{-h} x_s + (1 - e^{-2h}) D_0
                               + sigma_t sqrt(1 - e^{-2h}) z    (+ the D_1 term at order 2)

These are minisd's DPM-Solver updates (dpm_solver.py), fed alpha = 1. The last step lands on
sigma = 0 (lambda = +inf, e^{-h} = 0: x_t = D_0) unless final_sigmas_type="sigma_min", whose
final sigma is the schedule's last one again: both end at sigma_min, and in float32 they are
equal, or a few ulp apart either way (h = 0, or h = +-1e-7). That step is taken as the
first-order ODE update without noise, the h -> 0 limit of every order and of the SDE; diffusers
takes its usual update there, which returns NaN for h = 0 at heun's and third order (0 / 0) and
for h < 0 in the SDE (the square root of a negative variance), and agrees with ours to ~h^2
otherwise.
"""

from __future__ import annotations

import numpy as np

from ..config import is_int
from ..errors import ConfigError
from .base import (
    SchedulerOutput,
    as_index_f,
    draw_noise,
    linspace_f32,
    rounded,
    threshold_sample,
)
from .dpm_solver import DPMSolverMultistepScheduler
from .edm import EDM_DEFAULTS, EDMScheduler, exponential_sigmas, karras_schedule

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")


class EDMDPMSolverMultistepScheduler(EDMScheduler):
    """Multistep DPM-Solver++ of order 1-3 on EDM sigmas (midpoint or heun second order).

    ``algorithm_type="sde-dpmsolver++"`` solves the reverse SDE instead of the probability-flow
    ODE (++ paper, Sec. 5) and draws one standard-normal tensor per step, the last one too, in
    the dtype of the x_0 estimate (the sample's and the model output's promoted dtype), as
    diffusers; it has orders 1-2 (diffusers' third-order EDM update has no SDE branch and
    fails). The sample is not upcast (as diffusers); a float16 one is computed in float32
    (numpy's promotion with the float32 coefficients) and returned as float16.
    """

    DEFAULTS = {
        **EDM_DEFAULTS,
        "solver_order": 2,
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
    }

    # DPM-Solver(++)'s updates, written for any (alpha, sigma, lambda) that ``_lams`` gives
    _first_order = DPMSolverMultistepScheduler._first_order
    _second_order = DPMSolverMultistepScheduler._second_order
    _third_order = DPMSolverMultistepScheduler._third_order

    def __init__(self, **config):
        # UniPC's solver types and DEIS' algorithm type map to DPM-Solver's own, as diffusers
        config = dict(config)
        if config.get("solver_type") in ("logrho", "bh1", "bh2"):
            config["solver_type"] = "midpoint"
        if config.get("algorithm_type") == "deis":
            config["algorithm_type"] = "dpmsolver++"
        super().__init__(**config)
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0

    def _validate(self):
        super()._validate()
        cfg, name = self.config, type(self).__name__
        if cfg.algorithm_type not in ALGORITHMS:
            raise ConfigError(f"{name}: algorithm_type={cfg.algorithm_type!r}: expected one of "
                              f"{list(ALGORITHMS)}")  # fmt: skip
        if cfg.solver_type not in ("midpoint", "heun"):
            raise ConfigError(f"{name}: solver_type={cfg.solver_type!r}: expected 'midpoint' "
                              "or 'heun'")  # fmt: skip
        order = cfg.solver_order
        if not (is_int(order) and 1 <= order <= 3):
            raise ConfigError(f"{name}: solver_order={order!r}: expected 1, 2 or 3")
        if cfg.algorithm_type == "sde-dpmsolver++" and order == 3:
            raise ConfigError(f"{name}: solver_order=3 with algorithm_type='sde-dpmsolver++': "
                              "diffusers' EDM solver has no third-order SDE update")  # fmt: skip

    def _schedule(self, n):
        """Karras sigmas from a float32 ramp, in float32 throughout (as diffusers' class)."""
        cfg = self.config
        if cfg.sigma_schedule == "exponential":
            return exponential_sigmas(n, cfg.sigma_min, cfg.sigma_max)
        ramp = linspace_f32(0, 1, n)  # (n,) float32
        return karras_schedule(ramp, cfg.sigma_min, cfg.sigma_max, cfg.rho)

    def _final_sigma(self, sigmas):
        """final_sigmas_type="sigma_min": the config's sigma_min (this class's choice)."""
        return np.float32(self.config.sigma_min)

    def set_timesteps(self, num_inference_steps: int):
        super().set_timesteps(num_inference_steps)
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0

    def index_for_timestep(self, timestep) -> int:
        """As diffusers' DPM-Solver: the second match of a repeated timestep, the last step for
        one that is not in the schedule."""
        hits = np.nonzero(self.timesteps.astype(np.float64) == as_index_f(timestep))[0]
        if len(hits) == 0:
            return len(self.timesteps) - 1
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _lams(self, idx):
        """(alpha, sigma, lambda) = (1, sigma, 0 - ln sigma) at each sigma index (lambda = +inf
        at sigma = 0), in the sigma table's dtype."""
        out = []
        for j in idx:
            s = self.sigmas[j]
            with np.errstate(divide="ignore"):
                out.append((s.dtype.type(1), s, s.dtype.type(0) - rounded(np.log, s)))
        return out

    def _flat(self, i) -> bool:
        """Step i does not lower sigma (lambda_t <= lambda_s, h <= 0)."""
        (_, _, lam_t), (_, _, lam_s) = self._lams([i + 1, i])
        return lam_t <= lam_s

    def _flat_step(self, x, d0, i):
        """The first-order ODE update x_t = (sigma_t / sigma_s) x - (e^{-h} - 1) D_0 with h <= 0,
        noise-free: the h -> 0 limit of every order and of the SDE."""
        (a_t, s_t, l_t), (_, s_s, l_s) = self._lams([i + 1, i])
        return s_t / s_s * x - a_t * (rounded(np.exp, l_s - l_t) - a_t) * d0

    def step(self, model_output, timestep, sample, *, rng=None, noise=None, **_):
        """1. x_0 = D(x; sigma) (eq. 7), dynamically thresholded if configured; 2. shift the
        history; 3. (sde-dpmsolver++) draw the step's noise; 4. update of order
        min(solver_order, steps so far), lowered at the end as diffusers: first order on the
        last step (final sigma 0, euler_at_final, or lower_order_final below 15 steps), at most
        second order on the one before (lower_order_final below 15 steps); a step that does
        not lower sigma is ``_flat_step``.
        ``noise``: the SDE variant's standard-normal tensor (else drawn from ``rng``)."""
        self._init_step_index(timestep)
        cfg = self.config
        i, n = self._step_index, len(self.timesteps)
        lower_final = i == n - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15)
            or cfg.final_sigmas_type == "zero"
        )  # fmt: skip
        lower_second = i == n - 2 and cfg.lower_order_final and n < 15
        x0 = self.denoised(model_output, sample, self.sigmas[i])  # 1.
        if cfg.thresholding:
            x0 = threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        self.model_outputs = self.model_outputs[1:] + [x0]  # 2.
        out_dtype = np.result_type(sample.dtype, model_output.dtype)  # torch's x_0 dtype
        z = None
        if cfg.algorithm_type == "sde-dpmsolver++":  # 3.
            z = draw_noise(x0, rng=rng, noise=noise, dtype=out_dtype)
        if self._flat(i):  # 4. sigma does not decrease: see the module docstring
            prev = self._flat_step(sample, x0, i)
        elif cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_final:
            prev = self._first_order(sample, x0, i, z)
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or lower_second:
            prev = self._second_order(sample, i, z)
        else:
            prev = self._third_order(sample, i, z)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self._step_index += 1
        return SchedulerOutput(prev.astype(out_dtype, copy=False), x0)
