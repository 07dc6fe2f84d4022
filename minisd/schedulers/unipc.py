"""UniPC multistep predictor-corrector (Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified
Predictor-Corrector Framework for Fast Sampling of Diffusion Models")."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .base import SchedulerOutput, rounded, sigma_spacing
from .dpm_solver import (
    DPMSolverMultistepScheduler,
    alpha_sigma,
    data_prediction,
    noise_prediction,
)


class UniPCMultistepScheduler(DPMSolverMultistepScheduler):
    """UniP-p predictor (Alg. 2 of the paper) with the UniC corrector (Alg. 1) applied to the
    incoming sample before every step but the first. ``predict_x0=True`` is the data-prediction
    form (the UniPC counterpart of DPM-Solver++); B(h) = h (bh1) or e^h - 1 (bh2).

    Timesteps and sigmas are those of DPMSolverMultistepScheduler (same spacing code).
    """

    DEFAULTS = {
        **{k: v for k, v in DPMSolverMultistepScheduler.DEFAULTS.items()
           if k not in ("algorithm_type", "euler_at_final", "lambda_min_clipped",
                        "variance_type")},
        "solver_type": "bh2",
        "predict_x0": True,
        "disable_corrector": [],
        "solver_p": None,
    }  # fmt: skip
    UNSUPPORTED = ("use_flow_sigmas", "use_dynamic_shifting", "shift_terminal")

    def __init__(self, **config):
        cfg = dict(config)
        if cfg.get("solver_type") in ("midpoint", "heun", "logrho"):
            cfg["solver_type"] = "bh2"  # diffusers does the same swap
        super(DPMSolverMultistepScheduler, self).__init__(**cfg)
        if self.config.solver_type not in ("bh1", "bh2"):
            raise ConfigError(f"solver_type={self.config.solver_type!r}: expected bh1 or bh2")
        if self.config.solver_p is not None:
            raise ConfigError("solver_p: an external predictor is not supported")
        if self.config.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = np.float32(2**-24)
        self.lambda_t = np.zeros(len(self.alphas_cumprod))  # no clipping (lambda_min = -inf)

    def _round_karras_timesteps(self) -> bool:
        return True  # UniPC rounds Karras timesteps for every beta schedule

    def _final_sigma(self, sigmas) -> float:
        if self.config.final_sigmas_type == "sigma_min" and sigma_spacing(self.config):
            return float(sigmas[-1])  # diffusers' UniPC: the last Karras / exp / beta sigma
        return super()._final_sigma(sigmas)

    def set_timesteps(self, num_inference_steps: int):
        super().set_timesteps(num_inference_steps)
        self.timestep_list = [None] * self.config.solver_order
        self.last_sample = None
        self.this_order = None

    def _convert(self, model_output, sample, i):
        alpha, sigma = alpha_sigma(self.sigmas[i])
        kind = self.config.prediction_type
        if self.config.predict_x0:
            x0 = data_prediction(kind, model_output, sample, alpha, sigma)
            if self.config.thresholding:
                from .base import threshold_sample

                c = self.config
                x0 = threshold_sample(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
            return x0
        return noise_prediction(kind, model_output, sample, alpha, sigma)

    def _bh(self, t_idx, s_idx, others, order):
        """Shared set-up of UniP / UniC: h, rks, D1s, the phi recursion b and R (paper eq. 8)."""
        (a_t, s_t, l_t), (a_s, s_s, l_s) = self._lams([t_idx, s_idx])
        h = l_t - l_s
        m0 = self.model_outputs[-1]
        rks, d1s = [], []
        for k, si in enumerate(others, start=1):
            ((_, _, l_i),) = self._lams([si])
            rk = (l_i - l_s) / h
            rks.append(rk)
            d1s.append((self.model_outputs[-(k + 1)] - m0) / rk)
        dtype = np.result_type(h)  # the sigma table's: float32 (float64 tables: float64)
        rks.append(dtype.type(1.0))
        rks = np.array(rks, dtype=dtype)  # (order,)
        hh = -h if self.config.predict_x0 else h
        h_phi_1 = rounded(np.expm1, hh)
        h_phi_k = h_phi_1 / hh - dtype.type(1)
        b_h = hh if self.config.solver_type == "bh1" else rounded(np.expm1, hh)
        R, b, fact = [], [], 1
        for k in range(1, order + 1):
            R.append(rks ** dtype.type(k - 1))
            b.append(h_phi_k * dtype.type(fact) / b_h)
            fact *= k + 1
            h_phi_k = h_phi_k / hh - dtype.type(1 / fact)
        R, b = np.stack(R), np.array(b, dtype=dtype)  # (order, order), (order,)
        return (a_t, s_t, a_s, s_s), h_phi_1, b_h, R, b, d1s, m0

    def _update(self, x, coefs, h_phi_1, b_h, m0, res):
        a_t, s_t, a_s, s_s = coefs
        if self.config.predict_x0:
            return s_t / s_s * x - a_t * h_phi_1 * m0 - a_t * b_h * res
        return a_t / a_s * x - s_t * h_phi_1 * m0 - s_t * b_h * res

    def _predict(self, x, order):
        """UniP-p (Alg. 2): x_t = DDIM part - B(h) sum_k rho_k D1_k."""
        i = self._step_index
        coefs, h_phi_1, b_h, R, b, d1s, m0 = self._bh(i + 1, i, range(i - 1, i - order, -1), order)
        res = 0
        if d1s:
            rhos = (
                np.array([0.5], np.float32) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
            )
            for rho, d in zip(rhos.astype(x.dtype), d1s):
                res = res + rho * d
        return self._update(x, coefs, h_phi_1, b_h, m0, res).astype(x.dtype, copy=False)

    def _correct(self, model_t, last_sample, this_sample, order):
        """UniC (Alg. 1): re-solve the last step with the fresh output model_t included."""
        i = self._step_index
        others = range(i - 2, i - 1 - order, -1)
        coefs, h_phi_1, b_h, R, b, d1s, m0 = self._bh(i, i - 1, others, order)
        rhos = np.array([0.5], np.float32) if order == 1 else np.linalg.solve(R, b)
        rhos = rhos.astype(this_sample.dtype)
        res = 0
        for rho, d in zip(rhos[:-1], d1s):
            res = res + rho * d
        res = res + rhos[-1] * (model_t - m0)
        out = self._update(last_sample, coefs, h_phi_1, b_h, m0, res)
        return out.astype(last_sample.dtype, copy=False)

    def step(self, model_output, timestep, sample, **_):
        """1. UniC-correct the incoming sample with this output (not on the first step);
        2. push the converted output; 3. UniP-predict the next sample."""
        self._require_timesteps()
        cfg = self.config
        self._init_index(timestep)
        i = self._step_index
        use_corrector = (
            i > 0 and (i - 1) not in cfg.disable_corrector and self.last_sample is not None
        )
        m = self._convert(model_output, sample, i)
        if use_corrector:
            sample = self._correct(m, self.last_sample, sample, self.this_order)
        self.model_outputs = self.model_outputs[1:] + [m]
        self.timestep_list = self.timestep_list[1:] + [timestep]
        order = cfg.solver_order
        if cfg.lower_order_final:
            order = min(order, len(self.timesteps) - i)
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev = self._predict(sample, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self._step_index += 1
        x0 = m if cfg.predict_x0 else None
        return SchedulerOutput(prev, x0)
