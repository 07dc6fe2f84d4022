"""DEIS multistep (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential
Integrator", ICLR 2023), in the log-rho form diffusers implements.

With rho = sigma_t / alpha_t and y = x / alpha_t, the probability-flow ODE of a VP model is
dy / drho = eps(x, t) (the paper's rho time change, behind its rho-AB-DEIS). One step from rho_s
to rho_t integrates that exactly after replacing eps by the polynomial through the last k noise
predictions, here a polynomial in log rho rather than rho (an Adams-Bashforth-type multistep
method, k = 1..3):

    x_t = alpha_t (x_s / alpha_s + sum_j c_j eps_j),
    c_j = integral from rho_s to rho_t of l_j(log rho) d rho,

l_j being the Lagrange basis polynomial of node j. k = 1 is DDIM (= DPM-Solver-1).
"""

from __future__ import annotations

import numpy as np

from ..config import is_int, is_number
from ..errors import ConfigError, InputError
from .base import (
    COMMON_DEFAULTS,
    SIGMA_SPACING_DEFAULTS,
    SchedulerOutput,
    sigma_spacing,
    threshold_sample,
    train_sigmas,
)
from .dpm_solver import DPMSolverMultistepScheduler, alpha_sigma, data_prediction

ONE, TWO = np.float32(1.0), np.float32(2.0)

# Names of sibling solvers' options that diffusers maps onto DEIS' only choice.
ALGORITHM_ALIASES = ("dpmsolver", "dpmsolver++")
SOLVER_ALIASES = ("midpoint", "heun", "bh1", "bh2")


def _antiderivative_linear(r, log_r, log_b, log_others):
    """F(r) with F' = l(log r), l(L) = (L - c) / (b - c) (2 nodes, b = this node's log rho):
    since int log r dr = r (log r - 1),  F(r) = r (log r - c - 1) / (b - c)."""
    (c,) = log_others
    return r * (log_r - c - ONE) / (log_b - c)


def _antiderivative_quadratic(r, log_r, log_b, log_others):
    """F(r) with F' = l(log r), l(L) = (L - c)(L - d) / ((b - c)(b - d)) (3 nodes). With
    int L^2 dr = r (L^2 - 2 L + 2) and int L dr = r (L - 1):
    F(r) = r (c (d - L + 1) - d L + d + L^2 - 2 L + 2) / ((b - c)(b - d)), L = log r."""
    c, d = log_others
    L = log_r
    return r * (c * (d - L + ONE) - d * L + d + L * L - TWO * L + TWO) / ((log_b - c) * (log_b - d))


ANTIDERIVATIVES = {2: _antiderivative_linear, 3: _antiderivative_quadratic}


def lagrange_weights(rho_t, nodes):
    """c_j = F_j(rho_t) - F_j(rho_s) for each node j of ``nodes`` = (rho_s, rho_s1, ...), newest
    first; F_j integrates node j's Lagrange basis polynomial in log rho (float32 scalars).

    The other nodes are listed cyclically after j, diffusers' argument order: the formulas are
    not symmetric in float32, and F(rho_t) - F(rho_s) cancels badly for small steps."""
    k = len(nodes)
    antiderivative = ANTIDERIVATIVES[k]
    # numpy's float32 log, as diffusers (np.log of its 0-d tensors), not base.rounded's
    logs = [np.log(r) for r in nodes]
    log_t = np.log(rho_t)
    weights = []
    for j in range(k):
        others = [logs[(j + m) % k] for m in range(1, k)]
        end = antiderivative(rho_t, log_t, logs[j], others)
        start = antiderivative(nodes[0], logs[0], logs[j], others)
        weights.append(end - start)
    return weights


class DEISMultistepScheduler(DPMSolverMultistepScheduler):
    """Multistep DEIS of order 1-3 on noise predictions (``algorithm_type="deis"``,
    ``solver_type="logrho"``, the only ones diffusers has; its aliases map onto them).

    Timesteps and sigmas come from DPMSolverMultistepScheduler's ``set_timesteps`` (same
    spacings and Karras / exponential / beta code), with DEIS' own ends: Karras timesteps are
    always rounded, and the sigma after the last step is the smallest training sigma, or with
    respaced sigmas their last one again (so that last step leaves the sample as it is, as in
    diffusers).
    """

    DEFAULTS = {
        **COMMON_DEFAULTS,
        "timestep_spacing": "linspace",
        "solver_order": 2,
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "deis",
        "solver_type": "logrho",
        "lower_order_final": True,
        **SIGMA_SPACING_DEFAULTS,
        # Not in diffusers' DEIS signature, but its from_config keeps them from another
        # scheduler's config and its Karras / exp / beta ramps read them (hasattr): honoured.
        "sigma_min": None,
        "sigma_max": None,
    }
    UNSUPPORTED = ("use_flow_sigmas", "use_dynamic_shifting")

    def __init__(self, **config):
        cfg = dict(config)
        if cfg.get("algorithm_type") in ALGORITHM_ALIASES:
            cfg["algorithm_type"] = "deis"
        if cfg.get("solver_type") in SOLVER_ALIASES:
            cfg["solver_type"] = "logrho"
        # Scheduler's constructor, not DPM-Solver's: its algorithm / final-sigma checks differ
        super(DPMSolverMultistepScheduler, self).__init__(**cfg)
        self._check_options()
        # DPM-Solver's set_timesteps clips timesteps below lambda_min_clipped; DEIS has no
        # such option (-inf: nothing clipped), any table of the right length will do
        self.lambda_t = np.zeros(len(self.alphas_cumprod))

    def _check_options(self):
        cfg, name = self.config, type(self).__name__
        if cfg.algorithm_type != "deis":
            raise ConfigError(f"{name}: algorithm_type={cfg.algorithm_type!r}: expected 'deis' "
                              f"(or {', '.join(ALGORITHM_ALIASES)}, mapped to it)")  # fmt: skip
        if cfg.solver_type != "logrho":
            raise ConfigError(f"{name}: solver_type={cfg.solver_type!r}: expected 'logrho' "
                              f"(or {', '.join(SOLVER_ALIASES)}, mapped to it)")  # fmt: skip
        if not (is_int(cfg.solver_order) and 1 <= cfg.solver_order <= 3):
            raise ConfigError(f"{name}: solver_order={cfg.solver_order!r}: expected 1, 2 or 3")
        for key in ("thresholding", "lower_order_final", *SIGMA_SPACING_DEFAULTS):
            if not isinstance(cfg[key], (bool, np.bool_)):
                raise ConfigError(f"{name}: {key}={cfg[key]!r}: expected true or false")
        for key in ("sigma_min", "sigma_max", "dynamic_thresholding_ratio", "sample_max_value"):
            value = cfg[key]
            unset = value is None and key in ("sigma_min", "sigma_max")
            if not unset and not (is_number(value) and value > 0):
                raise ConfigError(f"{name}: {key}={value!r}: expected a positive number")

    # ------------------------------------------------------------------ schedule

    def set_timesteps(self, num_inference_steps: int):
        """DPM-Solver's spacings and respaced sigmas with DEIS' ends (see the class docstring).
        A repeated sigma (linspace rounding, e.g. 1000 steps) is refused for orders >= 2: two
        equal interpolation nodes divide by log rho_s - log rho_s1 = 0 (NaN in diffusers)."""
        super().set_timesteps(num_inference_steps)
        nodes = self.sigmas[: len(self.timesteps)]  # (n,) the sigmas steps start from
        if self.config.solver_order >= 2 and np.any(nodes[1:] == nodes[:-1]):
            t = self.timesteps[1:][nodes[1:] == nodes[:-1]][0]
            raise InputError(
                f"num_inference_steps={num_inference_steps} with timestep_spacing="
                f"{self.config.timestep_spacing!r} repeats timestep {t}: a multistep DEIS "
                "update cannot use two equal nodes; use fewer steps or 'trailing' spacing"
            )

    def _round_karras_timesteps(self) -> bool:
        return True  # DEIS rounds Karras timesteps for every beta schedule

    def _final_sigma(self, sigmas) -> float:
        """The sigma after the last step: the last Karras / exponential / beta sigma again,
        else sigma at t = 0."""
        if sigma_spacing(self.config):
            return float(sigmas[-1])
        return float(train_sigmas(self.alphas_cumprod[:1])[0])

    # ------------------------------------------------------------------ solver

    def _convert(self, model_output, sample, i):
        """Model output at step i -> (eps, x_0). As diffusers, eps is recomputed from the
        (thresholded) x_0 even for epsilon models: the round trip is not exact in float32."""
        cfg = self.config
        alpha, sigma = alpha_sigma(self.sigmas[i])
        x0 = data_prediction(cfg.prediction_type, model_output, sample, alpha, sigma)
        if cfg.thresholding:
            x0 = threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        return (sample - alpha * x0) / sigma, x0

    def _order_now(self, i) -> int:
        """min(solver_order, warm-up outputs available, steps left if lower_order_final);
        diffusers lowers the order at the end only for fewer than 15 steps."""
        cfg, n = self.config, len(self.timesteps)
        order = min(cfg.solver_order, self.lower_order_nums + 1)
        if cfg.lower_order_final and n < 15:
            order = min(order, n - i)
        return order

    def _first_order(self, x, eps, i):
        """DEIS-1 = DDIM, in exponential-integrator form (diffusers' arithmetic):
        x_t = (alpha_t / alpha_s) x - sigma_t (e^h - 1) eps,  h = lambda_t - lambda_s;
        equal to alpha_t (x / alpha_s + (rho_t - rho_s) eps), as sigma_t e^h = alpha_t rho_s."""
        (a_t, s_t, l_t), (a_s, _, l_s) = self._lams([i + 1, i])
        h = l_t - l_s
        return a_t / a_s * x - s_t * (np.exp(h) - ONE) * eps

    def _multistep(self, x, i, order):
        """x_t = alpha_t (x_s / alpha_s + sum_j c_j eps_j), eps_0 the newest (orders 2, 3)."""
        coefs = [alpha_sigma(self.sigmas[j]) for j in range(i + 1, i - order, -1)]
        rho_t, *nodes = [s / a for a, s in coefs]  # rho = sigma / alpha, as diffusers
        (a_t, _), (a_s, _) = coefs[0], coefs[1]
        eps = self.model_outputs[::-1]  # [eps_0, eps_1, ...] newest first, each (B, C, H, W)
        y = x / a_s
        for c, e in zip(lagrange_weights(rho_t, nodes), eps):
            y = y + c * e
        return a_t * y

    def step(self, model_output, timestep, sample, **_):
        """One DEIS step (deterministic: eta / rng / noise are accepted and ignored).
        1. convert the output to eps; 2. push it to the history; 3. update of ``_order_now``
        (order 1: DDIM)."""
        self._require_timesteps()
        self._init_index(timestep)
        i = self._step_index
        eps, x0 = self._convert(model_output, sample, i)
        self.model_outputs = self.model_outputs[1:] + [eps]
        order = self._order_now(i)
        x = sample.astype(np.promote_types(sample.dtype, np.float32), copy=False)  # float16 up
        prev = self._first_order(x, eps, i) if order == 1 else self._multistep(x, i, order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self._step_index += 1
        return SchedulerOutput(prev.astype(model_output.dtype, copy=False), x0)
