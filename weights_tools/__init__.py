"""weights_tools: inspect, convert, cast, verify and make Stable Diffusion checkpoints
(SD1.x, SD2.x; SDXL base and refiner for inspect / convert / verify / cast).

Plain functions (also ``python -m weights_tools <command>``)::

    inspect(path)                                   # family, layout, dtypes, parameter counts
    to_diffusers(single_file, out_folder, config=None, prediction_type=None)
    to_original(folder, out_file, dtype=None)
    cast(path, out, dtype)                          # fp32 / fp16 / bf16
    verify(a, b)                                    # same tensors under either layout?
    make_tiny(out_folder, family="sd1", seed=0)     # small random model, numpy only

In memory (for minisd.StableDiffusion.from_pretrained(single_file)):
``weights_tools.convert.load_single_file``, ``weights_tools.convert.original_to_diffusers``,
``weights_tools.configs.infer_configs``; for original single-file ControlNets (lllyasviel's
``control_model.*`` layout) ``weights_tools.controlnet.load_single_file_controlnet``. No torch;
nothing is ever unpickled.
"""

from .cast import cast
from .configs import infer_configs
from .convert import load_single_file, original_to_diffusers, to_diffusers, to_original
from .inspect_ import format_report, inspect
from .make_tiny import make_tiny
from .verify import format_verify, verify

__all__ = [
    "cast",
    "format_report",
    "format_verify",
    "infer_configs",
    "inspect",
    "load_single_file",
    "make_tiny",
    "original_to_diffusers",
    "to_diffusers",
    "to_original",
    "verify",
]
