"""Latent Consistency Model sampler (Luo et al. 2023, arXiv:2310.04378).

A consistency model maps any point x_t of a probability-flow ODE trajectory straight to its
origin x_0 (Song et al. 2023, "Consistency Models", sec. 3). It is parametrized so that the
boundary condition f(x, 0) = x holds by construction (CM sec. 3, LCM sec. 3):

    f(x_t, t) = c_skip(t) x_t + c_out(t) F(x_t, t),

    c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2),      c_skip(0) = 1
    c_out(t)  = s t / sqrt((s t)^2 + sigma_data^2),            c_out(0)  = 0

with sigma_data = 0.5, s = ``timestep_scaling`` (10: c_skip ~ 0 and c_out ~ 1 already at t = 1)
and F the model's x_0 estimate in its prediction type (LCM sec. 4.2 for epsilon). These are
diffusers' (and the LCM authors' code's) scalings: c_out has no sigma_data factor.

Multistep sampling (LCM Algorithm 1, "Multistep Latent Consistency Sampling"; CM Algorithm 1),
with timesteps tau_1 > ... > tau_N:

    x_0^(i)       = f(x_{tau_i}, tau_i)                                              (denoise)
    x_{tau_{i+1}} = sqrt(abar_{tau_{i+1}}) x_0^(i) + sqrt(1 - abar_{tau_{i+1}}) z,  z ~ N(0, I)

and the last step returns x_0^(N) itself (no noise; one-step sampling is just f(x_T, T)).

Timesteps (LCM sec. 4.3, "skipping-step"): distillation used the ``original_inference_steps``
(50) timesteps k - 1, 2k - 1, ..., with k = num_train_timesteps // original_inference_steps;
inference takes ``num_inference_steps`` of them, evenly spaced in index from the top. Unlike the
other schedulers, ``timestep_spacing`` and ``steps_offset`` are not read (as in diffusers), nor
is ``set_alpha_to_one``: diffusers reads it only after a negative custom timestep, which minisd
refuses.

Precision: tables and per-step scalars are float32, as diffusers' torch tensors. c_skip is
bit-identical to diffusers', c_out too at timestep_scaling = 10 (else <= 2 ulp); sqrt(abar) is
correctly rounded here, 1 ulp off torch's (MKL) sqrt for ~0.6% of values. float64 samples meet
the same float32 scalars (exact in float64), as in torch.
"""

from __future__ import annotations

import logging

import numpy as np

from ..config import check_numbers, is_number
from ..errors import ConfigError, InputError
from .base import (
    COMMON_DEFAULTS,
    Scheduler,
    SchedulerOutput,
    StepIndexed,
    as_index,
    check_num_steps,
    clip_x0,
    draw_noise,
)
from .ddim import x0_and_eps

logger = logging.getLogger("minisd.schedulers")

SIGMA_DATA = np.float32(0.5)

CONSISTENCY_DEFAULTS = {  # LCMScheduler's and TCDScheduler's (SD's betas)
    **COMMON_DEFAULTS,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}


class LCMSchedulerOutput(SchedulerOutput):
    """``prev_sample`` and the consistency function's x_0 estimate, ``pred_original_sample``,
    also readable under diffusers' name ``denoised``."""

    @property
    def denoised(self):
        return self.pred_original_sample


def boundary_scalings(timestep: int, scaling: float):
    """(c_skip, c_out) at a discrete timestep, as float32 scalars (the diffusers float32 path:
    its timesteps are int64 tensors, so s t is a float32 tensor)."""
    st = np.float32(timestep) * np.float32(scaling)
    d = st * st + SIGMA_DATA * SIGMA_DATA  # (s t)^2 + sigma_data^2
    return SIGMA_DATA * SIGMA_DATA / d, st / np.sqrt(d)


def distillation_timesteps(n_train: int, original_steps: int, strength: float) -> np.ndarray:
    """The skipping-step schedule k i - 1 for i = 1 .. floor(original_steps * strength),
    ascending; strength < 1 keeps its low-noise part (img2img)."""
    k = n_train // original_steps
    count = int(original_steps * strength)  # python float product, as diffusers
    return np.arange(1, count + 1, dtype=np.int64) * k - 1  # (count,)


def pick_evenly(desc: np.ndarray, n: int) -> np.ndarray:
    """``n`` entries of the descending ``desc`` at indices floor(i L / n), i = 0 .. n-1, computed
    as numpy's linspace (its rounding gives other indices than exact integer division for
    ~14000 of the (L, n) pairs below 1000, so it is part of the schedule's definition)."""
    idx = np.floor(np.linspace(0, len(desc), num=n, endpoint=False)).astype(np.int64)
    return desc[idx]  # (n,)


class LCMScheduler(StepIndexed, Scheduler):
    """Multistep consistency sampling (see the module doc).

    Randomness: one standard-normal tensor of model_output's shape per step except the last,
    drawn in the dtype of the denoised sample (sample's and model_output's promoted), as
    diffusers. ``step`` returns ``pred_original_sample`` = diffusers' ``denoised``.
    """

    DEFAULTS = CONSISTENCY_DEFAULTS

    def __init__(self, **config):
        super().__init__(**config)
        self.custom_timesteps = False

    def _validate(self):
        super()._validate()
        name, cfg = type(self).__name__, self.config
        check_numbers(name, cfg, ints=("original_inference_steps",),
                      floats=("timestep_scaling", "clip_sample_range"))  # fmt: skip
        if cfg.timestep_scaling <= 0:
            raise ConfigError(f"{name}: timestep_scaling={cfg.timestep_scaling!r}: must be > 0")

    # ------------------------------------------------------------------------- timesteps

    def set_timesteps(
        self, num_inference_steps=None, *, timesteps=None, strength=1.0,
        original_inference_steps=None,
    ):  # fmt: skip
        """Either ``num_inference_steps`` steps from the skipping-step schedule, or the custom
        descending ``timesteps``; ``strength`` < 1 keeps the low-noise part (img2img)."""
        if (num_inference_steps is None) == (timesteps is None):
            raise InputError(
                f"num_inference_steps={num_inference_steps!r}, timesteps={timesteps!r}: pass "
                "exactly one of them"
            )
        n_train = int(self.config.num_train_timesteps)
        orig = self.config.original_inference_steps  # checked here: an argument may replace it
        if original_inference_steps is not None:
            orig = original_inference_steps
        orig = check_num_steps(orig, n_train, "original_inference_steps")
        if not (is_number(strength) and 0 < strength <= 1):
            raise InputError(f"strength={strength!r}: expected a number in (0, 1]")
        origin = distillation_timesteps(n_train, orig, strength)  # (L,) ascending
        if timesteps is not None:
            ts = check_custom(timesteps, n_train)  # (m,)
            self.num_inference_steps, self.custom_timesteps = len(ts), True  # (untrimmed count)
            ts = custom_schedule(type(self).__name__, ts, origin, orig, strength, n_train)
        else:
            n = check_num_steps(num_inference_steps, n_train)
            if n > len(origin):
                raise InputError(
                    f"num_inference_steps={n}: more than the {len(origin)} timesteps of "
                    f"original_inference_steps={orig} x strength={strength}; use at most "
                    f"{len(origin)} steps, or a strength of at least {n / orig}"
                )
            self.num_inference_steps = n
            ts = pick_evenly(origin[::-1], n)
        self.timesteps = ts
        self._step_index = self._begin_index = None

    # ------------------------------------------------------------------------- sampling

    def step(self, model_output, timestep, sample, *, rng=None, noise=None, **_):
        """One multistep consistency step (module doc): denoise x_{tau_i} with the boundary
        scalings, then re-noise to tau_{i+1}; the last entry of ``timesteps`` is not re-noised.

        Deliberate difference: diffusers re-noises unless step_index == num_inference_steps - 1,
        so with custom timesteps trimmed by strength < 1 its last ``prev_sample`` is noised
        again at the last timestep (its pipelines decode ``denoised``, which is unaffected).
        """
        self._require_timesteps()
        self._init_step_index(timestep)
        i, t = self._step_index, as_index(timestep)
        dtype = np.result_type(sample.dtype, model_output.dtype)  # torch's promotion
        # 1. the model's x_0 estimate F (DDIM eq. 9 for epsilon), clipped / thresholded
        kind, abar_t = self.config.prediction_type, self.alphas_cumprod[t]
        x0 = clip_x0(x0_and_eps(kind, model_output, sample, abar_t)[0], self.config)
        # 2. consistency function f = c_skip x_t + c_out F (boundary condition f(x, 0) = x)
        c_skip, c_out = boundary_scalings(t, self.config.timestep_scaling)
        denoised = (c_out * x0 + c_skip * sample).astype(dtype, copy=False)
        # 3. re-noise to the next timestep: x = sqrt(abar') x_0 + sqrt(1 - abar') z
        if i >= len(self.timesteps) - 1:
            prev = denoised
        else:
            abar = self.alphas_cumprod[self.timesteps[i + 1]]
            z = draw_noise(model_output, rng=rng, noise=noise, dtype=dtype)
            prev = np.sqrt(abar) * denoised + np.sqrt(np.float32(1) - abar) * z
            prev = prev.astype(dtype, copy=False)
        self._step_index += 1
        return LCMSchedulerOutput(prev, denoised)


def check_custom(timesteps, n_train: int) -> np.ndarray:
    """Custom timesteps as an int64 array (m,), refused (InputError) unless they are integers,
    strictly descending and in [0, num_train_timesteps) (diffusers checks the last two only,
    and a negative one indexes alphas_cumprod from the end there)."""
    host = timesteps.get() if hasattr(timesteps, "get") else timesteps
    try:
        raw = np.asarray(host)
    except ValueError:  # ragged lists
        raw = np.asarray([])
    ok = raw.dtype.kind in "iu" or (raw.dtype.kind == "f" and np.isfinite(raw).all())
    if not ok or raw.ndim != 1 or raw.size == 0 or np.any(raw.astype(np.int64) != raw):
        raise InputError(f"timesteps={timesteps!r}: expected a non-empty list of integers")
    ts = raw.astype(np.int64)
    if np.any(np.diff(ts) >= 0):
        raise InputError(f"timesteps={ts.tolist()}: must be strictly descending")
    if ts[0] >= n_train or ts[-1] < 0:
        raise InputError(f"timesteps={ts.tolist()}: must lie in [0, num_train_timesteps={n_train})")
    return ts


def custom_schedule(name, ts, origin, orig, strength, n_train) -> np.ndarray:
    """Checked custom timesteps ``ts`` cut for ``strength`` as diffusers' img2img does (their
    last int(m strength) entries), with diffusers' three warnings: a full-strength schedule that
    does not start at T - 1, entries (but the first) off the distillation schedule ``origin``,
    more entries than ``orig`` = original_inference_steps."""
    if strength == 1.0 and ts[0] != n_train - 1:
        logger.warning(
            "%s: custom timesteps start at %d, not num_train_timesteps - 1 = %d; results may "
            "be poor", name, ts[0], n_train - 1,
        )  # fmt: skip
    off = sorted(set(ts[1:].tolist()) - set(origin.tolist()), reverse=True)
    if off:
        logger.warning("%s: custom timesteps %s are not on the distillation schedule", name, off)
    if len(ts) > orig:
        logger.warning(
            "%s: %d custom timesteps exceed original_inference_steps=%d", name, len(ts), orig
        )
    kept = min(int(len(ts) * strength), len(ts))
    if kept == 0:
        raise InputError(
            f"strength={strength}: keeps none of the {len(ts)} custom timesteps (need "
            f"strength >= {1 / len(ts):g})"
        )
    return ts[len(ts) - kept :]  # (kept,)
