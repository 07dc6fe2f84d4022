"""DPM-Solver / DPM-Solver++ singlestep (Lu et al. 2022: "DPM-Solver: A Fast ODE Solver for
Diffusion Probabilistic Model Sampling in Around 10 Steps", NeurIPS 2022, Alg. 1 and 2; and
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Alg. 1 and
the SDE-DPM-Solver++ of its appendix).

A *singlestep* solver of order k takes one large step s -> t with k model calls: the first at
the sample x_s, the others at intermediate points reached from x_s by the lower-order updates.
diffusers (and minisd) spread these calls over k consecutive entries of ``timesteps``: the
schedule's n steps are cut into groups of orders ``1, 2, ..., k`` (:func:`singlestep_orders`);
inside a group every update starts again from the sample cached at the group's first step.

All three variants are exponential integrators in lambda = log(alpha / sigma) (half log-SNR).
With h = lambda_t - lambda_s and D_k ~ h^k d^k m / d lambda^k the Taylor terms of the model
quantity m (x_0 or eps) about s (built from divided differences of the group's outputs):

    x_t = c_x x_s + sum_k w_k D_k (+ c_z z),    w_k = scale * g phi_{k+1}(g),
    phi_1(g) = (e^g - 1) / g,    phi_{k+1}(g) = (phi_k(g) - 1/k!) / g,

    dpmsolver       (eps):  g = h,    scale = -sigma_t,  c_x = alpha_t / alpha_s
    dpmsolver++     (x_0):  g = -h,   scale = -alpha_t,  c_x = sigma_t / sigma_s
    sde-dpmsolver++ (x_0):  g = -2h,  scale = -alpha_t,  c_x = sigma_t / sigma_s e^{-h},
                            c_z = sigma_t sqrt(1 - e^{-2h}),  z ~ N(0, I) drawn every step.

Deliberate differences from diffusers: the SDE third-order "heun" update weights D_2 by the
integral above (diffusers' weight is alpha_t lower: a sign slip on its 1/2); an uneven step count
does not set ``lower_order_final`` for later schedules; thresholding with "dpmsolver" (which
diffusers cannot run) is a ConfigError; float16 is computed in float32.
"""

from __future__ import annotations

import numpy as np

from ..config import check_numbers
from ..errors import ConfigError, InputError
from .base import (
    COMMON_DEFAULTS,
    Scheduler,
    SchedulerOutput,
    check_num_steps,
    draw_noise,
    rounded,
    sigma_spacing,
    threshold_sample,
    train_sigmas,
)
from .dpm_solver import DPMSolverMultistepScheduler, alpha_sigma, data_prediction, noise_prediction

ONE, HALF, TWO = np.float32(1.0), np.float32(0.5), np.float32(2.0)

# diffusers maps the solver / algorithm types of related samplers (UniPC, DEIS) to its own
ALIASES = {
    "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"},
    "algorithm_type": {"deis": "dpmsolver++"},
}
CHOICES = {
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "algorithm_type": ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"),
    "solver_type": ("midpoint", "heun"),
    "solver_order": (1, 2, 3),
    "final_sigmas_type": ("zero", "sigma_min"),
}


def singlestep_orders(n: int, order: int, lower_order_final: bool) -> list[int]:
    """The solver order of each of the n steps (diffusers' ``get_order_list``): groups
    ``1, 2, ..., order`` repeated, an incomplete group at the end; with ``lower_order_final`` a
    complete last group is split into ``1, ..., order - 1`` and a first-order step."""
    groups, rest = divmod(n, order)
    group = list(range(1, order + 1))
    if rest or not lower_order_final or order == 1:
        return group * groups + group[:rest]
    return group * (groups - 1) + group[:-1] + [1]


def phi_weights(g, count: int) -> list:
    """The first ``count`` of g phi_1(g), g phi_2(g), g phi_3(g) for a float32 g (module doc):
    e^g - 1, (e^g - 1) / g - 1, (e^g - 1 - g) / g^2 - 1/2. Only those asked for: towards a
    final sigma of 0, g = -inf and the higher ones are inf / inf."""
    e = rounded(np.exp, g) - ONE
    weights = [e]
    if count > 1:
        weights.append(e / g - ONE)
    if count > 2:
        weights.append((e - g) / (g * g) - HALF)
    return weights


class DPMSolverSinglestepScheduler(DPMSolverMultistepScheduler):
    """Singlestep DPM-Solver of order 1-3: ``algorithm_type`` "dpmsolver++" (data prediction,
    DPM-Solver++(2S) / (3S)), "dpmsolver" (noise prediction, DPM-Solver-2 / -3) or
    "sde-dpmsolver++" (one fresh N(0, I) per step, from ``rng`` or ``noise``).

    ``solver_type`` picks the higher-order terms: "heun" keeps every Taylor term of the group
    (order 3: D_1 and D_2 from both intermediate outputs), "midpoint" the paper's cheaper forms
    (order 2: w_0 / 2 for D_1; order 3: only the last intermediate's difference, DPM-Solver-3).

    Timesteps are always "linspace" spaced (diffusers' singlestep scheduler has no
    ``timestep_spacing``; SD's "leading" + ``steps_offset`` are ignored, as there). The
    begin index, index lookup, final sigma and ``add_noise`` are the multistep scheduler's.
    """

    DEFAULTS = {
        **{k: v for k, v in COMMON_DEFAULTS.items()
           if k not in ("timestep_spacing", "steps_offset")},  # always "linspace"
        **{k: DPMSolverMultistepScheduler.DEFAULTS[k] for k in (
            "solver_order", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
            "algorithm_type", "solver_type", "use_karras_sigmas", "use_exponential_sigmas",
            "use_beta_sigmas", "sigma_min", "sigma_max",
            "final_sigmas_type", "lambda_min_clipped", "variance_type")},
        "lower_order_final": False,  # diffusers' singlestep default (multistep: True)
    }  # fmt: skip
    UNSUPPORTED = ("use_flow_sigmas", "use_dynamic_shifting")
    order = 1  # diffusers' value: one model call per entry of ``timesteps``

    def __init__(self, **config):
        config = dict(config)
        for key, aliases in ALIASES.items():
            if isinstance(config.get(key), str) and config[key] in aliases:
                config[key] = aliases[config[key]]
        # the multistep __init__ refuses the SDE variant: build the tables directly
        Scheduler.__init__(self, **config)
        a = self.alphas_cumprod
        self.lambda_t = np.log(np.sqrt(a)) - np.log(np.sqrt(ONE - a))  # (T,)
        self.sigmas = self.order_list = self.sample = None
        self.model_outputs = [None] * self.config.solver_order

    def _validate(self):
        # no steps_offset check: diffusers' singlestep scheduler has no offset to check
        name, cfg = type(self).__name__, self.config
        check_numbers(name, cfg, ints=("num_train_timesteps",), floats=("beta_start", "beta_end"))
        check_numbers(name, cfg, floats=("sigma_min", "sigma_max"),
                      optional=("sigma_min", "sigma_max"))  # fmt: skip
        for key, options in CHOICES.items():
            value = cfg[key]
            if type(value) is not type(options[0]) or value not in options:
                raise ConfigError(f"{name}: {key}={value!r}: expected one of {list(options)}")
        if cfg.algorithm_type == "dpmsolver" and cfg.final_sigmas_type == "zero":
            raise ConfigError(f"{name}: final_sigmas_type='zero' needs a data-prediction "
                              "algorithm_type ('dpmsolver++' or 'sde-dpmsolver++')")  # fmt: skip
        if cfg.algorithm_type == "dpmsolver" and cfg.thresholding:
            raise ConfigError(f"{name}: thresholding=True is not supported with "
                              "algorithm_type='dpmsolver' (diffusers fails on it)")  # fmt: skip

    def set_timesteps(self, num_inference_steps: int):
        """n "linspace" timesteps from the last training step whose lambda is at least
        ``lambda_min_clipped``, or Karras (eq. 5; rounded timesteps), exponential or beta
        sigmas mapped back to timesteps (the multistep scheduler's); then every step's order."""
        cfg = self.config
        n_train = int(cfg.num_train_timesteps)
        n = check_num_steps(num_inference_steps, n_train)
        clipped = int(np.searchsorted(self.lambda_t[::-1], cfg.lambda_min_clipped))
        ts = np.linspace(0, n_train - 1 - clipped, n + 1).round()[::-1][:-1]  # (n,)
        table = train_sigmas(self.alphas_cumprod)  # (T,) float32
        kind = sigma_spacing(cfg)
        if kind is not None:
            sigmas, ts = self._respaced(kind, table, n)  # (n,), (n,)
        else:
            sigmas = np.interp(ts, np.arange(n_train), table)  # (n,)
        last = self._final_sigma(sigmas)
        self.sigmas = np.append(sigmas, last).astype(np.float32)  # (n + 1,)
        self.timesteps = ts.astype(np.int64)
        self.num_inference_steps = n
        self.order_list = self._order_list(n)
        self.model_outputs = [None] * cfg.solver_order
        self.sample = None
        self._step_index = self._begin_index = None

    def _round_karras_timesteps(self) -> bool:
        return True  # the singlestep class rounds Karras timesteps for every beta schedule

    def _order_list(self, n: int) -> list[int]:
        """As diffusers: a final sigma of 0 is reached by a first-order step. (diffusers also
        sets ``lower_order_final`` for good when n is uneven or the final sigma is 0; neither
        changes this list, but the flag stays set for later schedules there.)"""
        cfg = self.config
        orders = singlestep_orders(n, cfg.solver_order, cfg.lower_order_final)
        if cfg.final_sigmas_type == "zero":
            orders[-1] = 1
        return orders

    def step(self, model_output, timestep, sample, *, eta=0.0, rng=None, noise=None, **_):
        """One entry of ``timesteps``: convert the output, keep it in the group's history and
        move the group's start sample to the next sigma with the step's order. ``eta`` is
        ignored; the SDE variant draws one N(0, I) of the output's shape (``noise`` or ``rng``)."""
        self._require_timesteps()
        self._init_index(timestep)
        i = self._step_index
        if i >= len(self.timesteps):
            raise InputError(f"{type(self).__name__}.step: all {i} steps are done; call "
                             "set_timesteps again")  # fmt: skip
        m = self._convert(model_output, sample, i)  # x_0 or eps at sigma_i
        self.model_outputs = self.model_outputs[1:] + [m]
        z = None
        if self.config.algorithm_type == "sde-dpmsolver++":  # in the dtype torch's x_0 has
            z = draw_noise(
                m, rng=rng, noise=noise, dtype=np.result_type(sample.dtype, model_output.dtype)
            )
        order = self.order_list[i]
        while self.model_outputs[-order] is None:  # img2img may begin inside a group
            order -= 1
        if order == 1:
            self.sample = sample  # a group begins: all its updates start here
        prev = self._update(order, self.sample, i, z)
        self._step_index += 1
        x0 = None if self.config.algorithm_type == "dpmsolver" else m
        return SchedulerOutput(
            prev.astype(np.result_type(sample.dtype, model_output.dtype), copy=False), x0
        )

    def _convert(self, model_output, sample, i):
        """Model output -> x_0 (the "++" types, thresholded if asked) or eps at sigma_i."""
        cfg = self.config
        alpha, sigma = alpha_sigma(self.sigmas[i])
        if cfg.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, :3]  # drop the predicted variance
        if cfg.algorithm_type == "dpmsolver":
            return noise_prediction(cfg.prediction_type, model_output, sample, alpha, sigma)
        x0 = data_prediction(cfg.prediction_type, model_output, sample, alpha, sigma)
        if cfg.thresholding:
            x0 = threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        return x0

    def _lams(self, idx):
        """(alpha, sigma, lambda = log alpha - log sigma) at each sigma index (log 0 = -inf)."""
        pairs = [alpha_sigma(self.sigmas[j]) for j in idx]
        with np.errstate(divide="ignore"):
            return [(a, s, rounded(np.log, a) - rounded(np.log, s)) for a, s in pairs]

    def _update(self, order, x, i, z):
        """x at the group's start s = i + 1 - order -> sigma_{i+1}, from the model outputs at
        s, ..., i (the last ``order`` of the history); z: the SDE's noise or None."""
        start = i + 1 - order
        lams = self._lams(range(start, i + 2))  # (alpha, sigma, lambda) at s, ..., i + 1
        (a_s, s_s, l_s), (a_t, s_t, l_t) = lams[0], lams[-1]
        h = l_t - l_s
        r = [(lam - l_s) / h for _, _, lam in lams[1:-1]]  # intermediate points, in units of h
        kind = self.config.algorithm_type
        if kind == "dpmsolver":
            g, scale, c_x = h, -s_t, a_t / a_s
        elif kind == "dpmsolver++":
            g, scale, c_x = -h, -a_t, s_t / s_s
        else:  # sde-dpmsolver++
            g, scale, c_x = -TWO * h, -a_t, s_t / s_s * rounded(np.exp, -h)
        heun = self.config.solver_type == "heun"
        phis = phi_weights(g, order if heun else min(order, 2))
        w = [scale * v for v in phis]
        m = self.model_outputs[-order:]  # outputs at s, ..., i
        out = c_x * x + w[0] * m[0]  # D_0 = m_s
        for weight, d in higher_terms(w, m, r, heun):
            out = out + weight * d
        if z is not None:  # sigma_t sqrt(1 - e^{-2h}) z
            out = out + s_t * np.sqrt(-phis[0]) * z
        return out


def higher_terms(w, m, r, heun) -> list:
    """[(w_k, D_k)] for k >= 1 from the outputs m at s and the intermediate points (r: their
    lambda - lambda_s in units of h), via divided differences (m_j - m_s) / r_j.
    Order 2: D_1 (midpoint: weight w_0 / 2). Order 3, heun: D_1 = h m', D_2 = h^2 m''
    (exact for a quadratic m); midpoint: w_1 times the last point's difference only."""
    diffs = [(ONE / rj) * (mj - m[0]) for rj, mj in zip(r, m[1:])]
    if len(m) == 1:
        return []
    if len(m) == 2:
        return [(w[1] if heun else HALF * w[0], diffs[0])]
    (ra, rb), (da, db) = r, diffs
    if not heun:
        return [(w[1], db)]
    d1 = (rb * da - ra * db) / (rb - ra)
    d2 = TWO * (db - da) / (rb - ra)
    return [(w[1], d1), (w[2], d2)]
