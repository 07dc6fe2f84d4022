"""DPM2 and DPM2-ancestral samplers ("DPM2" and "DPM2 a" in A1111's web UI).

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", sec. 3
and Algorithm 2 with the midpoint in log sigma, as k-diffusion's ``sample_dpm_2`` /
``sample_dpm_2_ancestral`` implement it. On the sigma parametrization x = x_0 + sigma eps the
probability-flow ODE is dx/dsigma = (x - D(x, sigma)) / sigma, D the model's x_0 estimate.
Solver step i goes from sigma_i towards a target sigma_t with two model calls:

1. at (x, sigma_i):     d = (x - D(x, sigma_i)) / sigma_i,  x' = x + (sigma_mid - sigma_i) d
2. at (x', sigma_mid):  d' = (x' - D(x', sigma_mid)) / sigma_mid,
                        x_next = x + (sigma_t - sigma_i) d'   (the midpoint slope, from x)

with sigma_mid = sqrt(sigma_i sigma_t), the midpoint in log sigma. DPM2: sigma_t = sigma_{i+1}.
DPM2-a: sigma_t = sigma_down, then fresh noise of std sigma_up is added (k-diffusion's
get_ancestral_step, eta = 1). The last step (sigma_{i+1} = 0, no midpoint in log sigma) is one
Euler step with one model call, so n steps make 2n - 1 model calls.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .base import (
    SIGMA_SPACING_DEFAULTS,
    SchedulerOutput,
    SigmaScheduler,
    as_index_f,
    check_num_steps,
    draw_noise,
    sigma_to_t,
    train_sigmas,
)
from .euler import SIGMA_DEFAULTS, sigma_schedule


def log_midpoint(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sqrt(a b) = exp((log a + log b) / 2), elementwise; 0 where a or b is 0. float32 (n,).

    Evaluated as diffusers does, ``torch.lerp(log a, log b, 0.5)`` = log b - (log b - log a) / 2
    in float32, with correctly rounded log and exp: within 3 ulp of diffusers' values (torch's
    float32 log / exp are not correctly rounded), where a float32 sqrt(a b) is up to 11 ulp off.
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    out = np.zeros(a.shape, np.float32)
    ok = (a > 0) & (b > 0)
    log_a = np.log(a[ok].astype(np.float64)).astype(np.float32)
    log_b = np.log(b[ok].astype(np.float64)).astype(np.float32)
    mid = log_b - (log_b - log_a) * np.float32(0.5)  # exact halving: one rounding, as torch
    out[ok] = np.exp(mid.astype(np.float64)).astype(np.float32)
    return out


def interleave(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """[f0, s0, f1, s1, ...] from two arrays of equal length."""
    return np.stack([first, second], axis=1).reshape(-1)


class _DPM2Base(SigmaScheduler):
    """Shared schedule and two-call step; subclasses choose sigma_t (and add noise).

    ``timesteps`` = [t_0, t_mid_0, t_1, t_mid_1, ..., t_mid_{n-2}, t_{n-1}] (2n - 1 calls, as
    diffusers), t_mid the fractional timestep of sigma_mid (log-sigma interpolation of the
    training table). Model call 2i is solver step i's first call, 2i + 1 its second.
    ``sigmas`` keeps diffusers' layout [s_0, s_1, s_1, ..., s_n, s_n, s_n] (2n + 2), read by
    ``add_noise`` by call index and by ``init_noise_sigma``.
    """

    DEFAULTS = {
        **SIGMA_DEFAULTS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        **SIGMA_SPACING_DEFAULTS,
        "sigma_min": None,  # Karras / exp / beta bounds: diffusers' KDPM2 reads them if present
        "sigma_max": None,
    }
    PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers: "sample" not implemented
    order = 2

    def _targets(self, sig: np.ndarray):
        """(sigma_t, sigma_up) per solver step, float32 (n,) each, from sigma_0..sigma_n."""
        raise NotImplementedError

    def set_timesteps(self, num_inference_steps: int):
        n = check_num_steps(num_inference_steps, int(self.config.num_train_timesteps))
        ts, sigmas = sigma_schedule(self, n)  # (n,) float32, float64 if respaced
        if self.config.use_karras_sigmas:  # diffusers' KDPM2 rounds its Karras timesteps
            ts = np.round(ts)  # (not Euler's, nor its own exponential / beta ones)
        sig = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # (n + 1,) ..., sigma_n = 0
        target, up = self._targets(sig)  # (n,), (n,)
        mid = log_midpoint(sig[:-1], target)  # (n,); 0 on the last step: Euler, one call
        log_table = np.log(train_sigmas(self.alphas_cumprod))  # (T,) float32
        t_mid = np.array([sigma_to_t(m, log_table) for m in mid[:-1]])  # (n - 1,)
        calls = np.concatenate([ts[:1], interleave(t_mid, ts[1:])])  # (2n - 1,)
        self.timesteps = calls.astype(ts.dtype)
        self.sigmas = np.concatenate([sig[:1], sig[1:].repeat(2), sig[-1:]])  # (2n + 2,)
        self._sig, self._target, self._mid, self._up = sig, target, mid, up
        self.num_inference_steps = n
        self._step_index = self._begin_index = None
        self._x_first = None  # the sample at the start of the solver step, between its calls

    def index_for_timestep(self, timestep) -> int:
        """Position of ``timestep`` in ``timesteps``: its first match at a solver step's first
        call (an even position), else diffusers' rule (the second match if there are two).

        Deliberate difference: diffusers always takes the second match, which here can only
        skip a solver step: rounded Karras timesteps repeat (t_0 = t_1 = 999 on the cosine
        schedule), and diffusers then starts at step 1 and ends in NaN.
        Where a midpoint's timestep equals t_{i+1} (DPM2-a), both rules pick t_{i+1}'s call.
        """
        self._require_timesteps()
        t = np.float64(as_index_f(timestep))
        hits = np.nonzero(self.timesteps.astype(np.float64) == t)[0]
        first_calls = hits[hits % 2 == 0]
        if len(first_calls):
            return int(first_calls[0])
        return super().index_for_timestep(timestep)

    @property
    def state_in_first_order(self) -> bool:
        """True when the next call is a solver step's first (at sigma_i)."""
        return self._x_first is None

    def _sigma_seen(self) -> np.float32:
        """The noise level of the sample the model is (or was just) called on."""
        i = self._step_index // 2
        return self._sig[i] if self.state_in_first_order else self._mid[i]

    def scale_model_input(self, sample, timestep=None):
        """c_in(sigma) = 1 / sqrt(sigma^2 + 1), sigma = sigma_i or sigma_mid for the 2nd call."""
        self._init_step_index(timestep)
        sigma = self._sigma_seen()
        return sample / np.sqrt(sigma * sigma + np.float32(1.0)).astype(sample.dtype)

    def _x0(self, model_output, sample, sigma):
        if self.config.prediction_type == "epsilon":  # x = x_0 + sigma eps
            return sample - sigma * model_output
        # v_prediction (Salimans & Ho 2022) for a model fed c_in x = x / sqrt(sigma^2 + 1):
        # x_0 = -sigma / sqrt(sigma^2 + 1) v + x / (sigma^2 + 1)
        return model_output * (-sigma / np.sqrt(sigma * sigma + 1)) + sample / (sigma * sigma + 1)

    def step(self, model_output, timestep, sample, *, rng=None, noise=None, **_):
        """One model call's update (see the module doc): the first call of solver step i
        returns x' at sigma_mid, the second x_next. Computed in the sample's dtype."""
        self._init_step_index(timestep)
        i = self._step_index // 2
        sigma = self._sigma_seen()  # (scalar) sigma_i or sigma_mid
        x0 = self._x0(model_output, sample, sigma)  # (B, C, H, W)
        d = (sample - x0) / sigma  # dx/dsigma at the point the model saw
        if self.state_in_first_order:
            self._x_first = sample
            prev = sample + d * (self._mid[i] - sigma)
        else:
            x, self._x_first = self._x_first, None
            prev = x + d * (self._target[i] - self._sig[i])
            prev = self._add_noise_up(prev, i, model_output, rng, noise)
        self._step_index += 1
        return SchedulerOutput(prev.astype(sample.dtype, copy=False), x0)

    def _add_noise_up(self, prev, i, like, rng, noise):
        return prev


class KDPM2DiscreteScheduler(_DPM2Base):
    """DPM2 (k-diffusion's ``sample_dpm_2``): deterministic, sigma_t = sigma_{i+1}."""

    def _targets(self, sig):
        target = sig[1:]  # (n,)
        return target, np.zeros_like(target)


class KDPM2AncestralDiscreteScheduler(_DPM2Base):
    """DPM2-ancestral (k-diffusion's ``sample_dpm_2_ancestral``, eta = 1): the step
    sigma_i -> sigma_{i+1} splits into a deterministic DPM2 step to sigma_down and fresh noise
    of std sigma_up, sigma_up^2 + sigma_down^2 = sigma_{i+1}^2:

        sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2),  sigma_down = sqrt(s'^2 - sigma_up^2)

    (s = sigma_i, s' = sigma_{i+1}). Randomness: one standard-normal tensor of model_output's
    shape and dtype on every solver step's second call (n - 1 per run; none on the last,
    one-call step where sigma_up = 0), drawn after the deterministic update, as diffusers.
    """

    def _targets(self, sig):
        s, s_next = sig[:-1], sig[1:]  # (n,) float32, as diffusers' float32 tensors
        up = np.sqrt(s_next * s_next * (s * s - s_next * s_next) / (s * s))
        with np.errstate(invalid="ignore"):
            down = np.sqrt(s_next * s_next - up * up)  # = s'^2 / s, with diffusers' rounding
        bad = np.nonzero(~(down[:-1] > 0))[0]  # NaN too
        if len(bad):  # diffusers: NaN from here on
            i = int(bad[0])
            raise InputError(
                f"{type(self).__name__}: {len(s)} steps take sigma from {s[i]:.4g} to "
                f"{s_next[i]:.4g} in one step, where sigma_down = sqrt(s'^2 - sigma_up^2) "
                "cancels to 0 in float32; use more steps or timestep_spacing='leading'"
            )
        return down, up

    def _add_noise_up(self, prev, i, like, rng, noise):
        z = draw_noise(like, rng=rng, noise=noise)  # (B, C, H, W), model_output's dtype
        return prev + z * self._up[i]
