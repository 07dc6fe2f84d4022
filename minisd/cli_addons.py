"""``minisd generate``'s add-ons: ControlNet, LoRAs and textual inversion embeddings.

Every file is read and checked before the model loads (a bad one costs no model load), then
applied to the loaded pipeline; the PNG's parameters name each one.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError


def add_arguments(g):
    g.add_argument(
        "--controlnet",
        action="append",
        default=None,
        help="a ControlNet: a diffusers folder or an original single .safetensors file; "
        "repeat (with one --control-image each) to sum several",
    )
    g.add_argument(
        "--control-image", action="append", default=None, help="the ControlNet's condition image"
    )
    g.add_argument(
        "--control-scale",
        type=float,
        default=None,
        help="ControlNet residual scale (default 1; img2img 0.8, inpainting 0.5, as diffusers)",
    )
    g.add_argument(
        "--guess-mode", action="store_true", help="ControlNet on the prompt half of CFG only"
    )
    g.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="PATH[:SCALE]",
        help="merge a LoRA .safetensors (kohya / A1111 or diffusers format) at SCALE "
        "(default 1); repeat for several",
    )
    g.add_argument(
        "--freeu",
        default=None,
        metavar="S1,S2,B1,B2",
        help="FreeU factors, e.g. 0.9,0.2,1.5,1.6 (SD1.5) or 0.9,0.2,1.4,1.6 (SD2.1)",
    )
    g.add_argument(
        "--embedding",
        action="append",
        default=None,
        metavar="PATH[:TOKEN]",
        help="a textual inversion .safetensors (diffusers or A1111); its token (default: the "
        "file's own, or its name for A1111 files) can then be used in prompts; repeatable",
    )


def read(args, open_image):
    """Everything the add-on arguments name, read and checked: a dict for :func:`apply`."""
    from .lora import parse_lora_arg, read_lora
    from .textual_inversion import read_embeddings

    cn, image = getattr(args, "controlnet", None) or [], getattr(args, "control_image", None) or []
    if len(cn) != len(image):
        raise InputError(
            f"--controlnet and --control-image: one image per ControlNet (got {len(cn)} "
            f"ControlNet(s) and {len(image)} image(s))"
        )
    images = [open_image(i) for i in image]
    loras = [parse_lora_arg(v) for v in getattr(args, "lora", None) or ()]
    embeddings = [parse_embedding_arg(v) for v in getattr(args, "embedding", None) or ()]
    return {
        "freeu": parse_freeu_arg(getattr(args, "freeu", None)),
        "controlnet": None if not cn else cn[0] if len(cn) == 1 else cn,
        "control_image": None if not images else images[0] if len(images) == 1 else images,
        "loras": [(read_lora(path), scale) for path, scale in loras],
        "embeddings": [(p, t) for p, t in embeddings if read_embeddings(p, t)],  # checked
    }


def apply(pipe, addons):
    """Merge the LoRAs and add the embeddings to the loaded pipeline."""
    from .textual_inversion import load_textual_inversion

    for lora, scale in addons["loras"]:
        pipe.load_lora(lora, scale)
    for path, token in addons["embeddings"]:
        load_textual_inversion(pipe, path, token)
    if addons["freeu"] is not None:
        pipe.enable_freeu(*addons["freeu"])


def call_kwargs(args, addons):
    """The ControlNet arguments of the pipeline call."""
    if addons["control_image"] is None:
        return {}
    return dict(
        control_image=addons["control_image"],
        controlnet_conditioning_scale=args.control_scale,
        guess_mode=args.guess_mode,
    )


def parameters(args):
    """The add-ons' part of the PNG's A1111-style parameters line."""
    from .pipeline_control import default_scale

    text = "".join(f", LoRA: {v}" for v in getattr(args, "lora", None) or ())
    text += "".join(f", Embedding: {v}" for v in getattr(args, "embedding", None) or ())
    if getattr(args, "freeu", None):
        text += f", FreeU: {args.freeu}"
    for cn in getattr(args, "controlnet", None) or ():
        scale = default_scale(args.control_scale, args.init_image, args.mask)
        text += f", ControlNet: {cn}:{scale}"
    return text


def parse_embedding_arg(text) -> tuple[str, str | None]:
    """``PATH[:TOKEN]`` -> (path, token or None); a ':' that belongs to an existing path is
    kept in it."""
    text = str(text)
    path, sep, token = text.rpartition(":")
    if not sep or not path or Path(text).exists() or "/" in token:
        return text, None
    return path, token


def parse_freeu_arg(text):
    """``S1,S2,B1,B2`` -> four floats (checked by enable_freeu) or None."""
    if text is None:
        return None
    from .freeu import FreeU

    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise InputError(f"--freeu {text}: expected four numbers S1,S2,B1,B2, e.g. 0.9,0.2,1.5,1.6")
    FreeU.checked(*values)  # a bad factor fails before the model loads
    return values
