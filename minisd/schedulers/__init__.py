"""Noise schedulers with diffusers' config names and semantics, on numpy / cupy arrays.

Loop protocol (every scheduler): one model call per entry of ``scheduler.timesteps``::

    s.set_timesteps(n)
    x = x * s.init_noise_sigma
    for t in s.timesteps:
        eps = model(s.scale_model_input(x, t), t)
        x = s.step(eps, t, x, eta=..., rng=...).prev_sample

Heun, DPM2, DPM++ SDE, PNDM's PRK warm-up and PLMS's first (pseudo improved Euler) step need
two model calls per solver step; they list the extra timesteps in ``timesteps`` and keep their
own state, so the loop above never changes. :func:`sample_loop` is that loop.
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
    "DPMSolverSDEScheduler": "dpm_sde",
    "LMSDiscreteScheduler": "lms",
    "DPMSolverMultistepScheduler": "dpm_solver",
    "DPMSolverSinglestepScheduler": "dpm_singlestep",
    "DEISMultistepScheduler": "deis",
    "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
    "EDMEulerScheduler": "edm",
    "EDMDPMSolverMultistepScheduler": "edm_dpm",
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
    # DPM++ SDE (k-diffusion's sample_dpmpp_sde): two calls per step, Brownian noise
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
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
    # EDM (Karras et al. 2022) samplers, for models trained with EDM's preconditioning
    # (Playground v2.5, CosXL); the sigma range and sigma_data come from their config
    "edm_euler": ("EDMEulerScheduler", {}),
    "edm_dpmpp_2m": (
        "EDMDPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "edm_dpmpp_2m_sde": (
        "EDMDPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    ),
}

__all__ = [
    "Config", "NAMES", "Scheduler", "SchedulerOutput", "config_family", "get_scheduler",
    "sample_loop", *_CLASSES,
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
    _check_family(name, cls_name, data)
    data.update(overrides)
    return __getattr__(cls_name).from_config(data)


def _is_edm(cls_name) -> bool:
    return isinstance(cls_name, str) and cls_name.startswith("EDM")


def config_family(data: dict):
    """The family of a scheduler config: "edm" for an EDM scheduler's (continuous sigmas,
    Karras et al.'s preconditioning), "ddpm" for a beta-table one (every other scheduler),
    None if unknown; from its ``_class_name``, else from its keys."""
    cls_name = data.get("_class_name")
    if _is_edm(cls_name):
        return "edm"
    beta_keys = ("beta_schedule", "beta_start", "beta_end", "trained_betas")
    if cls_name in _CLASSES or any(k in data for k in beta_keys):
        return "ddpm"
    return "edm" if "sigma_data" in data else None


def _check_family(name, cls_name, data):
    """A model trained on EDM's preconditioning needs an EDM sampler and a beta-table model
    another one: the wrong family runs without error in diffusers and gives noise (an EDM
    sampler hands the UNet c_noise = ln(sigma) / 4 for timesteps, about -1.6 to 1.1)."""
    family = config_family(data)
    want = "edm" if _is_edm(cls_name) else "ddpm"
    if family is None or family == want:
        return
    from ..errors import InputError

    own = data.get("_class_name") or "a beta-table scheduler"
    edm_names = sorted(k for k, (c, _) in NAMES.items() if _is_edm(c))
    if want == "edm":
        raise InputError(f"scheduler={name!r}: an EDM sampler (Karras et al. 2022), but this "
                         f"model's scheduler config is {own}'s, a model trained on a beta "
                         f"schedule; choose a scheduler other than {edm_names}")  # fmt: skip
    raise InputError(f"scheduler={name!r}: this model's scheduler config is {own}'s (EDM: "
                     "continuous sigmas, Karras et al.'s preconditioning), which the beta-"
                     f"schedule samplers cannot drive; choose one of {edm_names}")  # fmt: skip


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
