"""Shared scheduler machinery: config handling, noise and thresholding helpers, base classes.

The float32 tables (beta schedules, timestep spacing, sigma tables) and their precision policy
are in :mod:`minisd.schedulers.tables`; every name there is re-exported here.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import array_module
from ..config import check_numbers
from ..errors import ConfigError, InputError
from ..rng import standard_normal
from .tables import (  # noqa: F401
    SIGMA_SPACING_DEFAULTS,
    beta_ppf,
    beta_sigmas,
    betas_for_alpha_bar,
    check_num_steps,
    cumprod_f32,
    exponential_sigmas,
    karras_sigmas,
    linspace_f32,
    make_betas,
    rescale_zero_terminal_snr,
    rounded_timesteps,
    sigma_spacing,
    sigma_to_t,
    spaced_sigmas,
    spaced_timesteps,
    train_sigmas,
)

logger = logging.getLogger("minisd.schedulers")

# Keys some diffusers scheduler accepts; a config for one scheduler is routinely used to build
# another (SD ships a PNDM config), so these are ignored quietly (INFO), others with a WARNING.
KNOWN_ELSEWHERE = {
    "skip_prk_steps", "set_alpha_to_one", "clip_sample", "clip_sample_range", "steps_offset",
    "variance_type", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
    "noise_sampler_seed", "interpolation_type", "timestep_type", "final_sigmas_type",
    "sigma_min", "sigma_max",
    "solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final",
    "lambda_min_clipped", "predict_x0", "disable_corrector", "solver_p", "use_flow_sigmas",
    "flow_shift", "rescale_betas_zero_snr", "use_dynamic_shifting", "time_shift_type",
    "shift_terminal", "trained_betas", "timestep_spacing", "prediction_type",
    "original_inference_steps", "timestep_scaling",
    # EDM's (Karras et al. 2022) keys, and the beta-table keys EDM schedulers have none of
    "sigma_data", "sigma_schedule", "rho", "beta_start", "beta_end", "beta_schedule",
}  # fmt: skip

COMMON_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
}


class Config(dict):
    """A read-only dict with attribute access: ``s.config.beta_schedule``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no key {name!r}") from None

    def _readonly(self, *a, **k):
        raise TypeError("scheduler config is read-only; build a new scheduler instead")

    __setitem__ = __delitem__ = update = pop = setdefault = clear = _readonly  # type: ignore


@dataclass
class SchedulerOutput:
    """What ``step`` returns: the next sample and the model's estimate of x_0 (when defined)."""

    prev_sample: Any
    pred_original_sample: Any = None


def read_config(config) -> dict:
    """A dict from a dict, a Config, or a path to a scheduler_config.json (file or folder)."""
    if isinstance(config, dict):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "scheduler_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read scheduler config ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return data
    raise ConfigError(f"config: expected a dict or a path, got {type(config).__name__}")


def split_config(cls_name: str, defaults: dict, given: dict) -> dict:
    """Defaults updated with the known keys of ``given``; unknown keys are noted and dropped."""
    # diffusers' in-memory configs list the keys that hold the source class's defaults, not a
    # user's choice; from_config drops them so the new class's own defaults apply
    defaulted = set(given.get("_use_default_values") or ())
    given = {k: v for k, v in given.items() if k not in defaulted}
    private = [k for k in given if k.startswith("_")]  # _class_name, _diffusers_version
    unknown = sorted(k for k in given if k not in defaults and k not in private)
    foreign = [k for k in unknown if k in KNOWN_ELSEWHERE]
    strange = [k for k in unknown if k not in KNOWN_ELSEWHERE]
    if foreign:
        logger.info("%s: ignoring config keys used by other schedulers: %s", cls_name, foreign)
    if strange:
        logger.warning("%s: ignoring unknown config keys: %s", cls_name, strange)
    out = dict(defaults)
    out.update({k: v for k, v in given.items() if k in defaults})
    return out


# ----------------------------------------------------------------------------- helpers


def threshold_sample(x, ratio: float, max_value: float):
    """Dynamic thresholding (Saharia et al. 2022, Imagen sec. 2.3): per sample, s = the
    ``ratio`` quantile of |x|, clamped to [1, max_value]; x -> clip(x, -s, s) / s."""
    xp = array_module(x)
    b, c = x.shape[:2]
    flat = x.reshape(b, -1)  # (B, C*H*W)
    s = xp.quantile(xp.abs(flat), ratio, axis=1).astype(flat.dtype)  # (B,)
    s = xp.clip(s, 1, max_value)[:, None]  # (B, 1)
    return (xp.clip(flat, -s, s) / s).reshape(x.shape)  # (B, C, H, W)


def clip_x0(x0, config):
    """x_0 kept in range (DDPM / DDIM): dynamic thresholding if ``config.thresholding``, else
    clipped to [-clip_sample_range, clip_sample_range] if ``config.clip_sample``."""
    if config.thresholding:
        return threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.clip_sample:
        r = config.clip_sample_range
        return array_module(x0).clip(x0, -r, r)
    return x0


def draw_noise(like, *, rng=None, noise=None, dtype=None):
    """One standard-normal tensor of ``like``'s shape, in ``like``'s dtype (or ``dtype``).

    ``noise`` (an explicit array) wins; else ``rng.standard_normal(shape, dtype)`` (a numpy
    Generator, or minisd.rng's torch-compatible one, whose float16 draws are torch's: not the
    float32 ones rounded); else a fresh numpy Generator.
    """
    xp = array_module(like)
    dtype = np.dtype(dtype or like.dtype)
    if noise is not None:
        if tuple(noise.shape) != tuple(like.shape):
            raise InputError(f"noise: shape {tuple(noise.shape)} != sample shape {like.shape}")
        return xp.asarray(noise).astype(dtype, copy=False)
    out = standard_normal(rng, tuple(like.shape), dtype)
    return xp.asarray(out).astype(dtype, copy=False)


def rounded(fn, x):
    """``fn(x)`` (np.exp, np.log, np.expm1) of a float32 (or float64) scalar, correctly rounded
    to its precision (through float64), as torch's float32 exp / log nearly always are (~1% of
    exp results 1 ulp off). numpy's float32 ones are SIMD approximations: on an AVX-512 CPU 1 ulp
    off for ~40% (exp), ~11% (expm1), ~8% (log) of inputs; a 1-ulp lambda moves a 1000-step
    solver's h by ~1e-5 (relative). numpy's float32 sqrt is exact (IEEE), torch's 0-d sqrt not."""
    return np.asarray(x).dtype.type(fn(np.float64(x)))


def as_index(t) -> int:
    """A python int from an int / numpy scalar / 0-d array timestep."""
    return int(np.asarray(t if not hasattr(t, "get") else t.get()).reshape(()))


def bcast(v, ndim: int):
    """(B,) coefficients -> (B, 1, 1, ...) to broadcast against an ndim-dimensional sample."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


# ----------------------------------------------------------------------------- base classes


class Scheduler:
    """Common surface: ``from_config``, ``config``, ``set_timesteps``, ``timesteps``,
    ``init_noise_sigma``, ``scale_model_input``, ``step``, ``add_noise``, ``get_velocity``.

    Loop protocol: call the model once per entry of ``timesteps`` (in order) and pass its output
    to ``step`` with that entry; schedulers that need two model calls per step (Heun, PLMS's
    first step, PNDM's warm-up) list the repeated timesteps themselves. ``order`` is diffusers'
    model calls per solver step (Heun: 2), used to count steps for img2img strength.
    """

    DEFAULTS: dict = COMMON_DEFAULTS
    # Options diffusers' class of the same name has and minisd does not implement: refused when
    # set. (Other classes' options are ignored, as diffusers ignores them: configs are shared.)
    UNSUPPORTED: tuple = ()
    order = 1
    init_noise_sigma = 1.0

    def __init__(self, **config):
        for key in self.UNSUPPORTED:
            if config.get(key):
                raise ConfigError(f"{key}={config[key]!r} is not supported by minisd")
        cfg = split_config(type(self).__name__, self.DEFAULTS, config)
        self.config = Config(cfg)
        self._validate()
        sigma_spacing(self.config)  # at most one of use_karras / exponential / beta_sigmas
        self.betas = make_betas(self.config)  # (T,) float32
        self.alphas = np.float32(1.0) - self.betas  # (T,)
        self.alphas_cumprod = cumprod_f32(self.alphas)  # alpha_bar_t, (T,)
        self.timesteps = None
        self.num_inference_steps = None

    @classmethod
    def from_config(cls, config, **overrides):
        """Build from a dict, a scheduler_config.json path, or another scheduler's config."""
        if hasattr(config, "config") and isinstance(config.config, dict):
            config = config.config
        data = read_config(config)
        data.update(overrides)
        return cls(**data)

    def _validate(self):
        name, cfg = type(self).__name__, self.config
        check_numbers(name, cfg, ints=("num_train_timesteps",), floats=("beta_start", "beta_end"))
        offset = cfg.steps_offset
        if not (isinstance(offset, int) and 0 <= offset < cfg.num_train_timesteps):
            raise ConfigError(
                f"{name}: steps_offset={offset!r}: expected an int in "
                f"[0, num_train_timesteps={cfg.num_train_timesteps})"
            )
        choices = getattr(self, "PREDICTION_TYPES", ("epsilon", "v_prediction", "sample"))
        if self.config.prediction_type not in choices:
            raise ConfigError(
                f"prediction_type={self.config.prediction_type!r}: {type(self).__name__} "
                f"supports {list(choices)}"
            )

    def _require_timesteps(self):
        if self.timesteps is None:
            raise InputError(
                f"{type(self).__name__}.step: call set_timesteps(num_inference_steps) first"
            )

    def scale_model_input(self, sample, timestep=None):
        return sample

    def _abar_at(self, timesteps, like):
        xp = array_module(like)
        idx = np.asarray(timesteps if not hasattr(timesteps, "get") else timesteps.get())
        idx = idx.astype(np.int64).reshape(-1)  # (B,)
        abar = xp.asarray(self.alphas_cumprod[idx].astype(like.dtype))  # (B,)
        sqrt_a = bcast(abar**0.5, like.ndim)  # (B, 1, 1, 1)
        sqrt_1ma = bcast((1 - abar) ** 0.5, like.ndim)  # (B, 1, 1, 1)
        return sqrt_a, sqrt_1ma

    def add_noise(self, original_samples, noise, timesteps):
        """Forward process q(x_t | x_0), DDPM eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1-abar_t) eps.

        Like diffusers, the float32 table is cast to the samples' dtype first."""
        sqrt_a, sqrt_1ma = self._abar_at(timesteps, original_samples)
        return sqrt_a * original_samples + sqrt_1ma * noise

    def get_velocity(self, sample, noise, timesteps):
        """v-prediction target (Salimans & Ho 2022, sec. 4):
        v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        sqrt_a, sqrt_1ma = self._abar_at(timesteps, sample)
        return sqrt_a * noise - sqrt_1ma * sample

    def __len__(self):
        return int(self.config.num_train_timesteps)

    def __repr__(self):
        return f"{type(self).__name__}({dict(self.config)})"


class StepIndexed:
    """diffusers' step-index protocol: ``step_index`` (position of the next ``step`` in
    ``timesteps``, None before the first), ``begin_index`` / ``set_begin_index`` (img2img starts
    mid-schedule), else the first step's position is looked up from its timestep."""

    _step_index = None
    _begin_index = None

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """img2img: start from ``timesteps[begin_index]`` (diffusers' pipeline protocol)."""
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep) -> int:
        """Position of ``timestep`` in ``timesteps``; the second one when it appears twice
        (so img2img starting mid-schedule does not skip a sigma), as diffusers."""
        t = np.float64(as_index_f(timestep))
        hits = np.nonzero(self.timesteps.astype(np.float64) == t)[0]
        if len(hits) == 0:
            raise InputError(f"timestep={timestep}: not in this scheduler's timesteps")
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _init_step_index(self, timestep):
        self._require_timesteps()
        if self._step_index is None:
            if self._begin_index is None:
                self._step_index = self.index_for_timestep(timestep)
            else:
                self._step_index = self._begin_index


class SigmaScheduler(StepIndexed, Scheduler):
    """Schedulers on the sigma (variance-exploding) parametrization x = x_0 + sigma * eps
    (Karras et al. 2022): the model sees x / sqrt(sigma^2 + 1); a step index tracks progress."""

    def __init__(self, **config):
        super().__init__(**config)
        self.sigmas = None
        self._step_index = None
        self._begin_index = None

    @property
    def init_noise_sigma(self):
        self._require_timesteps()
        s = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(s)
        return float(np.sqrt(s * s + np.float32(1.0)))

    def scale_model_input(self, sample, timestep=None):
        """c_in(sigma) = 1 / sqrt(sigma^2 + 1) (Karras et al. 2022, table 1, "VP" column)."""
        self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sample / np.sqrt(sigma * sigma + np.float32(1.0)).astype(sample.dtype)

    def add_noise(self, original_samples, noise, timesteps):
        """x_sigma = x_0 + sigma * eps, sigma looked up by timestep (or begin_index)."""
        xp = array_module(original_samples)
        ts = np.asarray(timesteps if not hasattr(timesteps, "get") else timesteps.get())
        ts = ts.reshape(-1)
        if self._begin_index is None:
            idx = [self.index_for_timestep(t) for t in ts]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * len(
                ts
            )
        sigma = xp.asarray(self.sigmas[idx].astype(original_samples.dtype))  # (B,)
        return original_samples + noise * bcast(sigma, original_samples.ndim)


def as_index_f(t) -> float:
    """A python float from a scalar / 0-d array timestep (numpy or cupy)."""
    return float(np.asarray(t if not hasattr(t, "get") else t.get()).reshape(()))
