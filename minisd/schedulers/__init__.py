"""Noise schedulers with diffusers' config names and semantics, on numpy / cupy arrays.

Loop protocol (every scheduler): one model call per entry of ``scheduler.timesteps``::

    s.set_timesteps(n)
    x = x * s.init_noise_sigma
    for t in s.timesteps:
        eps = model(s.scale_model_input(x, t), t)
        x = s.step(eps, t, x, eta=..., rng=...).prev_sample

Heun, PNDM's PRK warm-up and PLMS's first (pseudo improved Euler) step need two model calls per
solver step; they list the extra timesteps in ``timesteps`` and keep their own state, so the
loop above never changes. :func:`sample_loop` is that loop.
"""

from importlib import import_module

from .base import Config, Scheduler, SchedulerOutput

_CLASSES = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "PLMSScheduler": "plms",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler",
    "HeunDiscreteScheduler": "heun",
    "KDPM2DiscreteScheduler": "kdpm2",
    "KDPM2AncestralDiscreteScheduler": "kdpm2",
    "LMSDiscreteScheduler": "lms",
    "DPMSolverMultistepScheduler": "dpm_solver",
    "DPMSolverSinglestepScheduler": "dpm_singlestep",
    "DEISMultistepScheduler": "deis",
    "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
}

# Scheduler names of the pipeline / CLI -> (class, config overrides)
NAMES = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as SD configures it (SD2: DDIM cfg)
    "plms": ("PLMSScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    ),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2s": (
        "DPMSolverSinglestepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "dpmpp_3s": (
        "DPMSolverSinglestepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 3},
    ),
    "deis": ("DEISMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}

__all__ = [
    "Config", "NAMES", "Scheduler", "SchedulerOutput", "get_scheduler", "sample_loop", *_CLASSES,
]  # fmt: skip


def __getattr__(name):
    if name in _CLASSES:
        return getattr(import_module(f".{_CLASSES[name]}", __name__), name)
    raise AttributeError(f"module 'minisd.schedulers' has no attribute {name!r}")


def get_scheduler(name: str, config=None):
    """The scheduler ``name`` built from a checkpoint's scheduler config (dict or path), as
    diffusers' ``Cls.from_config(pipe.scheduler.config)`` does; ``config=None``: defaults.
    The overrides of ``NAMES`` win ("pndm" is PNDM as SD configures it: skip_prk_steps)."""
    from ..errors import InputError
    from .base import read_config

    key = str(name).lower().replace("-", "_").replace("+", "p")
    if key not in NAMES:
        raise InputError(f"scheduler={name!r}: expected one of {sorted(NAMES)}")
    cls_name, overrides = NAMES[key]
    data = {} if config is None else read_config(config)
    data.update(overrides)
    return __getattr__(cls_name).from_config(data)


def sample_loop(scheduler, model_fn, x, *, num_inference_steps=None, eta=0.0, rng=None,
                callback=None):  # fmt: skip
    """Run the whole denoising loop: ``model_fn(x_in, t) -> model output`` once per timestep.

    x: the initial noise, NOT yet multiplied by ``init_noise_sigma`` (done here, as diffusers'
    pipelines do in prepare_latents). If ``num_inference_steps`` is None the scheduler must
    already have its timesteps (e.g. img2img trimmed them). ``callback(i, t, x)`` runs after
    every step. Returns the final sample.
    """
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    scheduler._require_timesteps()
    x = x * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        out = model_fn(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, eta=eta, rng=rng).prev_sample
        if callback is not None:
            callback(i, t, x)
    return x
