"""DPM++ SDE ("DPM++ SDE" in A1111's web UI): diffusers' ``DPMSolverSDEScheduler``, k-diffusion's
``sample_dpmpp_sde`` with r = 1/2 and eta = 1.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", the second-order singlestep solver (2S, Alg. 1) in data prediction, on the sigma
parametrization x = x_0 + sigma eps of Karras et al. 2022 ("Elucidating the Design Space of
Diffusion-Based Generative Models"), made stochastic as k-diffusion's ancestral samplers are:
each sub-step goes deterministically to sigma_down and adds fresh noise of std sigma_up. With
alpha = 1 the time variable is lambda = -log sigma (the half log-SNR) and the first-order
DPM-Solver++ update from sigma to sigma_d (D the model's x_0 estimate at (x, sigma)) is

    x_d = (sigma_d / sigma) x - expm1(lambda - lambda_d) D
        = (sigma_d / sigma) x + (1 - sigma_d / sigma) D.

Solver step i, sigma_i -> sigma_{i+1}, h = lambda_{i+1} - lambda_i, s = lambda_i + h / 2 (so
sigma_s = sqrt(sigma_i sigma_{i+1})), two model calls:

1. D_i = D(x_i, sigma_i); split sigma_i -> sigma_s into (sigma_down, sigma_up) (below);
   x' = (sigma_down / sigma_i) x_i + (1 - sigma_down / sigma_i) D_i + sigma_up z_1
2. D' = D(x', sigma_s); split sigma_i -> sigma_{i+1} likewise, and from x_i again:
   x_{i+1} = (sigma_down' / sigma_i) x_i + (1 - sigma_down' / sigma_i) D' + sigma_up' z_2

with the ancestral split sigma_up = min(s', sqrt(s'^2 (s^2 - s'^2) / s^2)), sigma_down =
sqrt(s'^2 - sigma_up^2) (s = from, s' = to), and z_k = (W(to) - W(from)) / sqrt|to - from| the
normalized increments of ONE Brownian path W on the sigma axis: both start at sigma_i, so z_1 and
z_2 are correlated (corr = sqrt((sigma_i - sigma_s) / (sigma_i - sigma_{i+1}))). The last step
(sigma_{i+1} = 0) is one Euler call, x = D. diffusers draws W from torchsde's Brownian tree;
minisd samples the same process with :class:`BrownianBridgeNoise` (NumPy, seeded from the
pipeline's rng), so its noise has the right law but not torchsde's numbers.
"""

from __future__ import annotations

import bisect
import math

import numpy as np

from ..backend import array_module
from ..errors import ConfigError, InputError
from ..rng import make_rng, standard_normal
from .base import (
    SchedulerOutput,
    SigmaScheduler,
    check_num_steps,
    draw_noise,
    karras_sigmas,
    rounded,
    sigma_to_t,
    spaced_timesteps,
    train_sigmas,
)
from .euler import SIGMA_DEFAULTS, SIGMA_UNSUPPORTED
from .kdpm2 import interleave


class BrownianBridgeNoise:
    """``noise(sigma, sigma_next)`` = (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma| for
    one Brownian path W on the sigma axis, sampled lazily: each new point is drawn given its
    known neighbours (Markov property), so any sequence of queries sees one consistent path.

    A point beyond the known ones: W(u) = W(nearest) + sqrt|u - nearest| z. Between known points
    l < u < r, the Brownian bridge: W(u) ~ N(W_l + (u - l) / (r - l) (W_r - W_l),
    (u - l) (r - u) / (r - l)). The first point is W = 0 (only increments matter). z is one
    standard-normal tensor of ``like``'s shape from ``rng`` (minisd.rng's helpers: float32 for
    float16 / float32 samples, float64 for float64), or one per row from a list of generators.
    A sampler's queries walk down the sigma axis, so each of its calls draws once (none at the
    first point). The path is kept in float64 on ``like``'s device; results are ``like``'s dtype.

    Unlike torchsde's Brownian tree, W is not a fixed function of sigma for a seed: the same
    seed with another step count gives another path.
    """

    def __init__(self, like, rng=None):
        self.xp = array_module(like)
        self.shape, self.dtype = tuple(like.shape), np.dtype(like.dtype)
        self.draw_dtype = np.float64 if self.dtype == np.float64 else np.float32
        self.per_row = isinstance(rng, (list, tuple))
        if self.per_row and len(rng) != self.shape[0]:
            raise InputError(f"rng: {len(rng)} generators for a batch of {self.shape[0]}")
        rngs = list(rng) if self.per_row else [rng]
        self.rngs = [np.random.default_rng() if r is None else r for r in rngs]
        self._t, self._w = [], []  # known points, ascending sigma; W there, float64 (shape)

    def _z(self):
        """One standard-normal tensor (float64, on the device)."""
        if not self.per_row:
            z = standard_normal(self.rngs[0], self.shape, self.draw_dtype)  # (B, C, H, W)
        else:  # one generator per row
            row = (1,) + self.shape[1:]
            z = np.concatenate([standard_normal(r, row, self.draw_dtype) for r in self.rngs])
        return self.xp.asarray(z).astype(np.float64)

    def at(self, u: float):
        """W(u), drawing it if it is new."""
        ts, ws = self._t, self._w
        i = bisect.bisect_left(ts, u)
        if i < len(ts) and ts[i] == u:
            return ws[i]
        if not ts:
            w = self.xp.zeros(self.shape, np.float64)
        elif i == 0:  # below every known point
            w = ws[0] + math.sqrt(ts[0] - u) * self._z()
        elif i == len(ts):  # above every known point
            w = ws[-1] + math.sqrt(u - ts[-1]) * self._z()
        else:  # Brownian bridge between ts[i - 1] < u < ts[i]
            lo, hi = ts[i - 1], ts[i]
            mean = ws[i - 1] + ((u - lo) / (hi - lo)) * (ws[i] - ws[i - 1])
            w = mean + math.sqrt((u - lo) * (hi - u) / (hi - lo)) * self._z()
        ts.insert(i, u)
        ws.insert(i, w)
        return w

    def __call__(self, sigma, sigma_next):
        a, b = float(sigma), float(sigma_next)
        if a == b:  # no increment (diffusers: 0 / 0)
            return self.xp.zeros(self.shape, self.dtype)
        wa, wb = self.at(a), self.at(b)
        return ((wb - wa) * (1.0 / math.sqrt(abs(b - a)))).astype(self.dtype)

    def forget_above(self, sigma):
        """Drop the points above ``sigma`` (the sampler will not query there again): a long run
        keeps O(1) tensors instead of two per step."""
        keep = bisect.bisect_right(self._t, float(sigma))
        del self._t[keep:], self._w[keep:]


def ancestral_split(sigma_from, sigma_to):
    """(sigma_up, sigma_down) of k-diffusion's get_ancestral_step (eta = 1), in the scalars'
    precision: sigma_up^2 + sigma_down^2 = sigma_to^2, sigma_down = sigma_to^2 / sigma_from."""
    s, s2 = sigma_from, sigma_to
    up = min(s2, np.sqrt(s2 * s2 * (s * s - s2 * s2) / (s * s)))
    return up, np.sqrt(s2 * s2 - up * up)


class DPMSolverSDEScheduler(SigmaScheduler):
    """Two model calls per solver step, listed in ``timesteps`` as diffusers does (as DPM2):
    [t_0, t_mid_0, t_1, t_mid_1, ..., t_mid_{n-2}, t_{n-1}] (2n - 1 calls, float64), t_mid the
    fractional timestep of sigma_mid = sqrt(sigma_i sigma_{i+1}). ``sigmas`` = diffusers' layout
    [s_0, s_1, s_1, ..., s_{n-1}, s_{n-1}, 0] (float32, 2n), read by every call as diffusers
    reads it (so a float64 table gives a float64 solver).

    Noise (see the module doc): ``step(noise=array)`` gives a call's normalized increment
    itself; else ``step(noise_sampler=fn)`` or the attribute ``noise_sampler`` (any callable
    (sigma, sigma_next) -> array of the sample's shape, reset to None by ``set_timesteps``);
    else a :class:`BrownianBridgeNoise` built at the first call that needs noise, drawing from
    the config's ``noise_sampler_seed`` (an int, or one per image) through minisd.rng's
    torch-compatible generator, or else from ``step``'s ``rng`` (the pipeline's seeded
    generator; diffusers draws an unseeded tree there). One draw per model call but the last.
    """

    DEFAULTS = {
        **SIGMA_DEFAULTS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "use_karras_sigmas": False,
        "noise_sampler_seed": None,
    }
    UNSUPPORTED = SIGMA_UNSUPPORTED
    PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers: "sample" not implemented
    order = 2

    def __init__(self, **config):
        super().__init__(**config)
        seed = self.config.noise_sampler_seed
        seeds = seed if isinstance(seed, (list, tuple)) else [seed]
        if seed is not None and not (seeds and all(_is_seed(s) for s in seeds)):
            raise ConfigError(f"noise_sampler_seed={seed!r}: expected None, an integer seed "
                              "or a list of them (one per image)")  # fmt: skip
        self.noise_sampler = None

    def set_timesteps(self, num_inference_steps: int):
        n = check_num_steps(num_inference_steps, int(self.config.num_train_timesteps))
        cfg = self.config
        ts = spaced_timesteps(cfg.timestep_spacing, int(cfg.num_train_timesteps), n,
                              cfg.steps_offset)  # (n,) float64, as diffusers' numpy  # fmt: skip
        table = train_sigmas(self.alphas_cumprod)  # (T,) float32
        log_table = np.log(table)  # (T,) float32 (numpy's log, as diffusers)
        sigmas = np.interp(ts, np.arange(0, len(table)), table)  # (n,) float64
        if cfg.use_karras_sigmas:  # Karras et al. eq. 5 between this schedule's ends
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), n)
            ts = np.array([sigma_to_t(s, log_table) for s in sigmas])  # (n,)
        lam = -np.log(sigmas)  # (n,) lambda_i = -log sigma_i, float64
        sig_mid = np.exp(-(lam[:-1] + np.diff(lam) * 0.5))  # (n - 1,) sqrt(s_i s_{i+1})
        t_mid = np.array([sigma_to_t(s, log_table) for s in sig_mid])  # (n - 1,)
        self.timesteps = np.concatenate([ts[:1], interleave(t_mid, ts[1:])])  # (2n - 1,)
        sig = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # (n + 1,)
        self.sigmas = np.concatenate([sig[:1], sig[1:-1].repeat(2), sig[-1:]])  # (2n,)
        self.num_inference_steps = n
        self._step_index = self._begin_index = None
        self._x_first = self._mid_sigma = None  # between a solver step's two calls
        self.noise_sampler = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next call is a solver step's first (at sigma_i)."""
        return self._x_first is None

    def scale_model_input(self, sample, timestep=None):
        """c_in(sigma) = 1 / sqrt(sigma^2 + 1), sigma = sigma_i, or sigma_mid on the 2nd call."""
        self._init_step_index(timestep)
        s = self.sigmas[self._step_index] if self.state_in_first_order else self._mid_sigma
        return sample / np.sqrt(s * s + 1).astype(sample.dtype)

    def _x0(self, model_output, sample, sigma):
        if self.config.prediction_type == "epsilon":  # x = x_0 + sigma eps
            return sample - sigma * model_output
        # v_prediction (Salimans & Ho 2022) for a model fed c_in x = x / sqrt(sigma^2 + 1):
        # x_0 = -sigma / sqrt(sigma^2 + 1) v + x / (sigma^2 + 1)
        return model_output * (-sigma / np.sqrt(sigma * sigma + 1)) + sample / (sigma * sigma + 1)

    def step(self, model_output, timestep, sample, *, s_noise=1.0, rng=None, noise=None,
             noise_sampler=None, **_):  # fmt: skip
        """One model call's update (module doc): the first call of solver step i returns x' at
        sigma_mid, the second x_{i+1}. Scalars in the sigma table's precision (float32, exp /
        log correctly rounded as torch's nearly always are), arrays in the sample's dtype."""
        self._init_step_index(timestep)
        i, first = self._step_index, self.state_in_first_order
        sigma, sigma_next = self.sigmas[i : i + 2] if first else self.sigmas[i - 1 : i + 1]
        if sigma_next == 0:  # last step: Euler to sigma = 0, i.e. x = D
            x0 = self._x0(model_output, sample, sigma)
            prev = sample + (sample - x0) / sigma * (sigma_next - sigma)
        else:
            lam, sigma_from, sigma_to, sigma_in = self._sub_step(sigma, sigma_next, first)
            x0 = self._x0(model_output, sample, sigma_in)
            x = sample if first else self._x_first  # both calls step from x_i
            prev, up = self._dpm_update(x, x0, lam, sigma_from, sigma_to)
            z = self._noise(x, sigma_from, sigma_to, rng, noise, noise_sampler)
            prev = prev + z * s_noise * up
            self._x_first, self._mid_sigma = (x, sigma_to) if first else (None, None)
            if not first and hasattr(self.noise_sampler, "forget_above"):
                self.noise_sampler.forget_above(sigma_to)  # later steps query below it
        self._step_index += 1
        return SchedulerOutput(prev.astype(sample.dtype, copy=False), x0)

    @staticmethod
    def _sub_step(sigma, sigma_next, first):
        """(lambda_i, sigma_from, sigma_to, sigma the model saw) of this call, lambda = -log
        sigma: the first call goes to the midpoint lambda_i + h / 2, the second to sigma_next.
        As diffusers: sigma_from = e^{-lambda_i}, not sigma itself (a float32 round trip)."""
        lam, lam_next = -rounded(np.log, sigma), -rounded(np.log, sigma_next)
        lam_mid = lam + (lam_next - lam) * 0.5
        sigma_mid = rounded(np.exp, -lam_mid)  # sqrt(sigma_i sigma_{i+1})
        sigma_to = sigma_mid if first else rounded(np.exp, -lam_next)
        return lam, rounded(np.exp, -lam), sigma_to, sigma if first else sigma_mid

    @staticmethod
    def _dpm_update(x, x0, lam, sigma_from, sigma_to):
        """First-order DPM-Solver++ from sigma_from to sigma_down (lambda_d = -log sigma_down):
        x_d = (sigma_d / sigma_from) x - expm1(lambda - lambda_d) x_0, diffusers' operations;
        returns (x_d, sigma_up)."""
        up, down = ancestral_split(sigma_from, sigma_to)
        with np.errstate(divide="ignore"):  # sigma_down = 0 (float32 cancellation): x_d = x_0
            lam_down = -rounded(np.log, down)
        ratio = rounded(np.exp, -lam_down) / sigma_from
        return ratio * x - rounded(np.expm1, lam - lam_down) * x0, up

    def _noise(self, like, sigma_from, sigma_to, rng, noise, noise_sampler):
        """The normalized Brownian increment over [sigma_to, sigma_from] (class doc)."""
        if noise is not None:
            return draw_noise(like, noise=noise)
        if noise_sampler is not None:
            return noise_sampler(sigma_from, sigma_to)
        if self.noise_sampler is None:
            seed = self.config.noise_sampler_seed
            if seed is not None:  # diffusers' fixed tree seed (or one per image)
                rng = [make_rng(s) for s in seed] if isinstance(seed, (list, tuple)) else (
                    make_rng(seed))  # fmt: skip
            self.noise_sampler = BrownianBridgeNoise(like, rng=rng)
        return self.noise_sampler(sigma_from, sigma_to)


def _is_seed(s) -> bool:
    return isinstance(s, (int, np.integer)) and not isinstance(s, bool) and -(2**63) <= s < 2**64
