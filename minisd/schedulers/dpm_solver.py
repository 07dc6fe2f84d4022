"""DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022: "DPM-Solver", NeurIPS 2022, and
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models")."""

from __future__ import annotations

import numpy as np

from ..backend import array_module
from ..errors import ConfigError, InputError
from .base import (
    COMMON_DEFAULTS,
    SIGMA_SPACING_DEFAULTS,
    Scheduler,
    SchedulerOutput,
    StepIndexed,
    as_index,
    bcast,
    check_num_steps,
    draw_noise,
    rounded,
    sigma_spacing,
    sigma_to_t,
    spaced_sigmas,
    threshold_sample,
    train_sigmas,
)


def alpha_sigma(sigma):
    """VP coefficients from the VE sigma: alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t;
    lambda_t = log(alpha_t / sigma_t) is the half log-SNR of Lu et al."""
    alpha = np.float32(1) / np.sqrt(sigma * sigma + np.float32(1))
    return alpha, sigma * alpha


def _exp(x):
    """e^x of a float32 scalar, correctly rounded as torch's (see ``base.rounded``)."""
    return rounded(np.exp, x)


def _grow(h):
    """sqrt(e^{2h} - 1): the noise scale (over sigma_t) of the noise-space SDE step."""
    return np.sqrt(_exp(np.float32(2.0) * h) - np.float32(1.0))


def data_prediction(kind: str, model_output, sample, alpha, sigma):
    """x_0 from the model output of prediction type ``kind``, x_t = alpha x_0 + sigma eps."""
    if kind == "epsilon":
        return (sample - sigma * model_output) / alpha
    if kind == "sample":
        return model_output
    return alpha * sample - sigma * model_output  # v_prediction


def noise_prediction(kind: str, model_output, sample, alpha, sigma):
    """eps from the model output of prediction type ``kind``, x_t = alpha x_0 + sigma eps."""
    if kind == "epsilon":
        return model_output
    if kind == "sample":
        return (sample - alpha * model_output) / sigma
    return alpha * model_output + sigma * sample  # v_prediction


ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")


class DPMSolverMultistepScheduler(StepIndexed, Scheduler):
    """Multistep DPM-Solver(++) of order 1-3.

    ``algorithm_type="dpmsolver++"`` works on data predictions x_0 (DPM-Solver++ Alg. 2),
    ``"dpmsolver"`` on noise predictions (DPM-Solver eq. 3.7 / multistep Alg. 2 of the ++ paper).
    ``"sde-dpmsolver++"`` ("DPM++ 2M SDE") and ``"sde-dpmsolver"`` solve the reverse SDE instead
    of the probability-flow ODE (++ paper, Sec. 5 / App. B): the same exponential integrator with
    the linear term's decay doubled, plus fresh noise of the variance the SDE injects over the
    step. They draw one float32 standard-normal tensor of the model output's shape on every
    step, as diffusers does; ``sde-dpmsolver`` has no third-order update (as in diffusers).
    """

    DEFAULTS = {
        **COMMON_DEFAULTS,
        "timestep_spacing": "linspace",
        "solver_order": 2,
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        **SIGMA_SPACING_DEFAULTS,
        "sigma_min": None,
        "sigma_max": None,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "rescale_betas_zero_snr": False,
    }

    UNSUPPORTED = ("use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting")

    def __init__(self, **config):
        # Configs of related samplers (UniPC's solver types, DEIS' algorithm type) are mapped
        # to DPM-Solver's own, as diffusers maps them.
        config = dict(config)
        if config.get("solver_type") in ("logrho", "bh1", "bh2"):
            config["solver_type"] = "midpoint"
        if config.get("algorithm_type") == "deis":
            config["algorithm_type"] = "dpmsolver++"
        super().__init__(**config)
        cfg = self.config
        if cfg.algorithm_type not in ALGORITHMS:
            raise ConfigError(f"algorithm_type={cfg.algorithm_type!r}: expected one of "
                              f"{list(ALGORITHMS)}")  # fmt: skip
        if cfg.solver_type not in ("midpoint", "heun"):
            raise ConfigError(f"solver_type={cfg.solver_type!r}: expected 'midpoint' or 'heun'")
        if not self._data_space and cfg.final_sigmas_type == "zero":
            raise ConfigError(f"final_sigmas_type='zero' needs a data-prediction algorithm_type "
                              f"('dpmsolver++' or 'sde-dpmsolver++'), not "
                              f"{cfg.algorithm_type!r}")  # fmt: skip
        if cfg.algorithm_type == "sde-dpmsolver" and cfg.solver_order == 3:
            raise ConfigError("solver_order=3 with algorithm_type='sde-dpmsolver': no third-"
                              "order SDE update in noise space (diffusers has none)")  # fmt: skip
        if cfg.final_sigmas_type not in ("zero", "sigma_min"):
            raise ConfigError(f"final_sigmas_type={cfg.final_sigmas_type!r}: expected "
                              "'zero' or 'sigma_min'")  # fmt: skip
        if cfg.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = np.float32(2**-24)
        a = self.alphas_cumprod
        self.lambda_t = np.log(np.sqrt(a)) - np.log(np.sqrt(np.float32(1) - a))  # (T,)

    def set_timesteps(self, num_inference_steps: int):
        cfg = self.config
        n_train = int(cfg.num_train_timesteps)
        n = check_num_steps(num_inference_steps, n_train)
        # timesteps with lambda below lambda_min_clipped are cut (cosine schedules)
        lam_min = cfg.get("lambda_min_clipped", -float("inf"))
        clipped = int(np.searchsorted(self.lambda_t[::-1], lam_min))
        last = n_train - clipped
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64)
            ts = ts + cfg.steps_offset
        elif cfg.timestep_spacing == "trailing":
            ts = np.arange(last, 0, -n_train / n).round().astype(np.int64) - 1
        else:
            raise ConfigError(f"timestep_spacing={cfg.timestep_spacing!r}: expected "
                              "'linspace', 'leading' or 'trailing'")  # fmt: skip
        table = train_sigmas(self.alphas_cumprod)  # (T,)
        kind = sigma_spacing(cfg)
        if kind is not None:
            sigmas, ts = self._respaced(kind, table, n)
        else:
            sigmas = np.interp(ts, np.arange(0, len(table)), table)
        self.sigmas = np.concatenate([sigmas, [self._final_sigma(sigmas)]]).astype(np.float32)
        self.timesteps = ts.astype(np.int64)
        self.num_inference_steps = len(ts)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self._step_index = self._begin_index = None

    def _init_index(self, timestep):
        """Step position from the first timestep seen (second match if repeated; the last
        step if absent, as diffusers), or from ``set_begin_index``."""
        if self._step_index is not None:
            return
        if self.begin_index is not None:
            self._step_index = self._begin_index
            return
        ts = self.timesteps
        if len(ts) > 1 and ts[0] == ts[1] == as_index(timestep):
            raise InputError(
                f"{type(self).__name__}: the schedule starts with timestep {ts[0]} twice "
                "(Karras, exponential or beta sigmas crowded at the top of the training table, "
                "e.g. sigma_max too high or the cosine schedule), so the first step would be "
                "taken as the second and the run would step past the end (as in diffusers); "
                "lower sigma_max or use fewer steps"
            )
        self._step_index = self._index_of(timestep)

    def _index_of(self, timestep) -> int:
        hits = np.nonzero(self.timesteps == as_index(timestep))[0]
        if len(hits) == 0:
            return len(self.timesteps) - 1
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _respaced(self, kind: str, table, n: int):
        """(sigmas, timesteps) (n,) float64 of Karras (eq. 5), exponential or beta spacing over
        the whole training table (or the config's sigma_min / sigma_max), mapped back to
        fractional timesteps; diffusers rounds Karras ones (``_round_karras_timesteps``), not
        the others, which ``set_timesteps``' int64 cast then truncates (as torch's)."""
        sigmas = spaced_sigmas(kind, table[::-1], n, self.config)
        ts = np.array([sigma_to_t(s, np.log(table)) for s in sigmas])
        if kind == "karras" and self._round_karras_timesteps():
            ts = ts.round()
        return sigmas, ts

    def _round_karras_timesteps(self) -> bool:
        return self.config.beta_schedule != "squaredcos_cap_v2"

    def _final_sigma(self, sigmas) -> float:
        """The sigma after the last step: 0, or the smallest training sigma."""
        if self.config.final_sigmas_type == "zero":
            return 0.0
        return float(train_sigmas(self.alphas_cumprod[:1])[0])

    @property
    def _data_space(self) -> bool:
        """True for the ++ variants, which integrate data predictions x_0 (else noise eps)."""
        return self.config.algorithm_type.endswith("++")

    def _convert(self, model_output, sample, i):
        """Model output -> x_0 (the ++ variants) or eps (dpmsolver, sde-dpmsolver) at step i."""
        cfg = self.config
        alpha, sigma = alpha_sigma(self.sigmas[i])
        kind = cfg.prediction_type
        if cfg.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, :3]
        if self._data_space:
            x0 = data_prediction(kind, model_output, sample, alpha, sigma)
            if cfg.thresholding:
                x0 = threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            return x0
        eps = noise_prediction(kind, model_output, sample, alpha, sigma)
        if cfg.thresholding:
            x0 = (sample - sigma * eps) / alpha
            x0 = threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            eps = (sample - alpha * x0) / sigma
        return eps

    def _lams(self, idx):
        """(alpha, sigma, lambda) at each sigma index in idx."""
        out = []
        for j in idx:
            a, s = alpha_sigma(self.sigmas[j])
            with np.errstate(divide="ignore"):
                out.append((a, s, rounded(np.log, a) - rounded(np.log, s)))
        return out

    def step(self, model_output, timestep, sample, *, rng=None, noise=None, **_):
        """1. convert the output; 2. shift the history; 3. (SDE variants) draw the step's noise;
        4. update of order min(solver_order, warm-up count), lowered near the end as diffusers.
        ``noise``: the SDE variants' standard-normal tensor (else drawn from ``rng``)."""
        self._require_timesteps()
        cfg = self.config
        self._init_index(timestep)
        i, n = self._step_index, len(self.timesteps)
        lower_final = i == n - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15)
            or cfg.final_sigmas_type == "zero"
        )  # fmt: skip
        lower_second = i == n - 2 and cfg.lower_order_final and n < 15
        m = self._convert(model_output, sample, i)
        self.model_outputs = self.model_outputs[1:] + [m]
        x = sample.astype(np.float32)
        z = None
        if cfg.algorithm_type.startswith("sde"):  # (B, C, H, W) float32, every step
            z = draw_noise(model_output, rng=rng, noise=noise, dtype=np.float32)
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_final:
            prev = self._first_order(x, m, i, z)
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or lower_second:
            prev = self._second_order(x, i, z)
        else:
            prev = self._third_order(x, i, z)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self._step_index += 1
        x0 = m if self._data_space else None
        return SchedulerOutput(prev.astype(model_output.dtype, copy=False), x0)

    def _first_order(self, x, m, i, z):
        """DPM-Solver-1 = DDIM (++ paper eq. 5), h = lambda_t - lambda_s:
        ++: x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) x0;
        eps: x_t = (alpha_t / alpha_s) x - sigma_t (e^{h} - 1) eps;
        sde++: x_t = (sigma_t / sigma_s) e^{-h} x + alpha_t (1 - e^{-2h}) x0
                     + sigma_t sqrt(1 - e^{-2h}) z;
        sde: x_t = (alpha_t / alpha_s) x - 2 sigma_t (e^{h} - 1) eps
                   + sigma_t sqrt(e^{2h} - 1) z."""
        (a_t, s_t, l_t), (a_s, s_s, l_s) = self._lams([i + 1, i])
        h = l_t - l_s
        one, two = np.float32(1.0), np.float32(2.0)
        kind = self.config.algorithm_type
        if kind == "dpmsolver++":
            return s_t / s_s * x - a_t * (_exp(-h) - one) * m
        if kind == "dpmsolver":
            return a_t / a_s * x - s_t * (_exp(h) - one) * m
        if kind == "sde-dpmsolver++":
            decay = one - _exp(-two * h)  # 1 - e^{-2h}: the SDE's doubled decay
            return s_t / s_s * _exp(-h) * x + a_t * decay * m + s_t * np.sqrt(decay) * z
        return a_t / a_s * x - two * (s_t * (_exp(h) - one)) * m + s_t * _grow(h) * z

    def _second_order(self, x, i, z):
        """Multistep 2nd order (++ paper Alg. 2): D0 = m0, D1 = (m0 - m1) / r0, r0 = h_0 / h;
        midpoint: - 0.5 alpha_t (e^{-h} - 1) D1; heun: + alpha_t ((e^{-h} - 1) / h + 1) D1.
        The SDE variants: the first-order SDE step plus their D1 term (see the code)."""
        (a_t, s_t, l_t), (a_0, s_0, l_0), (_, _, l_1) = self._lams([i + 1, i, i - 1])
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h0 = l_t - l_0, l_0 - l_1
        r0 = h0 / h
        d0, d1 = m0, (np.float32(1.0) / r0) * (m0 - m1)
        one, two, half = np.float32(1.0), np.float32(2.0), np.float32(0.5)
        midpoint = self.config.solver_type == "midpoint"
        kind = self.config.algorithm_type
        if kind == "dpmsolver++":
            em = _exp(-h) - one
            if midpoint:
                return s_t / s_0 * x - a_t * em * d0 - half * (a_t * em) * d1
            return s_t / s_0 * x - a_t * em * d0 + a_t * (em / h + one) * d1
        if kind == "dpmsolver":
            ep = _exp(h) - one
            if midpoint:
                return a_t / a_0 * x - s_t * ep * d0 - half * (s_t * ep) * d1
            return a_t / a_0 * x - s_t * ep * d0 - s_t * (ep / h - one) * d1
        if kind == "sde-dpmsolver++":
            decay = one - _exp(-two * h)
            base = s_t / s_0 * _exp(-h) * x + a_t * decay * d0
            c1 = half * (a_t * decay) if midpoint else a_t * (decay / (-two * h) + one)
            return base + c1 * d1 + s_t * np.sqrt(decay) * z
        ep = _exp(h) - one
        base = a_t / a_0 * x - two * (s_t * ep) * d0
        c1 = s_t * ep if midpoint else two * (s_t * (ep / h - one))
        return base - c1 * d1 + s_t * _grow(h) * z

    def _third_order(self, x, i, z):
        """Multistep 3rd order (DPM-Solver eq. / ++ appendix): D1 and D2 from three outputs."""
        lams = self._lams([i + 1, i, i - 1, i - 2])
        (a_t, s_t, l_t), (a_0, s_0, l_0), (_, _, l_1), (_, _, l_2) = lams
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        h, h0, h1 = l_t - l_0, l_0 - l_1, l_1 - l_2
        r0, r1 = h0 / h, h1 / h
        one, two, half = np.float32(1.0), np.float32(2.0), np.float32(0.5)
        d1_0, d1_1 = (one / r0) * (m0 - m1), (one / r1) * (m1 - m2)
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = one / (r0 + r1) * (d1_0 - d1_1)
        kind = self.config.algorithm_type
        if kind == "dpmsolver++":
            em = _exp(-h) - one
            return (s_t / s_0 * x - a_t * em * m0 + a_t * (em / h + one) * d1
                    - a_t * ((em + h) / (h * h) - half) * d2)  # fmt: skip
        if kind == "dpmsolver":
            ep = _exp(h) - one
            return (a_t / a_0 * x - s_t * ep * m0 - s_t * (ep / h - one) * d1
                    - s_t * ((ep - h) / (h * h) - half) * d2)  # fmt: skip
        decay = one - _exp(-two * h)  # sde-dpmsolver++ (sde-dpmsolver is refused at init)
        c2 = a_t * ((decay - two * h) / ((two * h) ** 2) - half)
        return (s_t / s_0 * _exp(-h) * x + a_t * decay * m0
                + a_t * (decay / (-two * h) + one) * d1 + c2 * d2
                + s_t * np.sqrt(decay) * z)  # fmt: skip

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = alpha_t x_0 + sigma_t eps, alpha/sigma from this schedule's sigma at t. As
        diffusers: with a begin index (img2img, inpainting) the sigma is that of the current
        step (the begin index before the first step), else looked up like ``_init_index``."""
        xp = array_module(original_samples)
        ts = np.asarray(timesteps.get() if hasattr(timesteps, "get") else timesteps).reshape(-1)
        if self.begin_index is None:
            idx = [self._index_of(t) for t in ts]
        else:
            current = self._begin_index if self._step_index is None else self._step_index
            idx = [current] * len(ts)
        sig = self.sigmas[idx].astype(original_samples.dtype)  # (B,)
        a = 1 / np.sqrt(sig * sig + 1)  # (B,)
        nd = original_samples.ndim
        return bcast(xp.asarray(a), nd) * original_samples + bcast(xp.asarray(sig * a), nd) * noise
