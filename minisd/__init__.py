"""minisd: Stable Diffusion in plain NumPy / CuPy array code.

Public names (see DESIGN.md): StableDiffusion, UNet2DConditionModel, UNet2DModel, AutoencoderKL,
CLIPTextModel, CLIPTokenizer, trace, MinisdError; and StableDiffusionXL (SDXL), its
CLIPTextModelWithProjection, StableDiffusionUpscale (the x4 upscaler), the add-on models.
Components are imported on first use so that ``import minisd`` stays fast.
"""

from importlib import import_module

from . import trace  # a callable module: `with minisd.trace() as acts:`
from .errors import ConfigError, InputError, MinisdError, WeightsError

__version__ = "0.1.0"

_LAZY = {
    "StableDiffusion": "pipeline",
    "StableDiffusionXL": "pipeline_xl",
    "StableDiffusionUpscale": "pipeline_upscale",
    "UNet2DConditionModel": "unet",
    "UNet2DModel": "unet2d",
    "AutoencoderKL": "vae",
    "AutoencoderTiny": "vae_tiny",
    "CLIPTextModel": "clip",
    "CLIPTextModelWithProjection": "clip_projection",
    "CLIPTokenizer": "tokenizer",
    "ControlNetModel": "controlnet",
    "T2IAdapter": "t2i_adapter",
    "MultiAdapter": "t2i_adapter",
    "CLIPVisionModelWithProjection": "clip_vision",
}

__all__ = [
    "ConfigError",
    "InputError",
    "MinisdError",
    "WeightsError",
    "trace",
    "__version__",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'minisd' has no attribute {name!r}")
