"""``minisd generate``'s add-ons: ControlNet, T2I-Adapter, IP-Adapter, LoRAs, textual inversion
embeddings, FreeU, and InstructPix2Pix's image guidance.

Every file is read and checked before the model loads (a bad one costs no model load), then
applied to the loaded pipeline; the PNG's parameters name each one.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError, MinisdError


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
        help="ControlNet residual scale (default 1; img2img 0.8, inpainting 0.5 (SDXL: 1), as "
        "diffusers)",
    )
    g.add_argument(
        "--guess-mode", action="store_true", help="ControlNet on the prompt half of CFG only"
    )
    g.add_argument(
        "--control-mode",
        action="append",
        type=int,
        default=None,
        help="union ControlNets (SDXL): the control type of each --control-image, repeated in "
        "the same order (one union ControlNet may take several images; see its card)",
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
        help="a textual inversion .safetensors (diffusers or A1111; SDXL: clip_l + clip_g); its "
        "token (default: the file's own, or its name for A1111 and SDXL files) can then be used "
        "in prompts; repeatable",
    )


def add_image_prompt_arguments(g):
    """T2I-Adapter, IP-Adapter and InstructPix2Pix options."""
    g.add_argument(
        "--adapter",
        action="append",
        default=None,
        help="a T2I-Adapter (diffusers folder); repeat (with one --adapter-image each) for several",
    )
    g.add_argument("--adapter-image", action="append", default=None, help="its condition image")
    g.add_argument("--adapter-scale", type=float, default=1.0, help="T2I-Adapter feature scale")
    g.add_argument(
        "--adapter-factor",
        type=float,
        default=1.0,
        help="the fraction of the steps that get the T2I-Adapter's features (default 1)",
    )
    g.add_argument("--ip-adapter", default=None, help="an IP-Adapter .safetensors (h94 layout)")
    g.add_argument("--image-encoder", default=None, help="the IP-Adapter's CLIP vision folder")
    g.add_argument("--ip-adapter-image", default=None, help="the image prompt (IP-Adapter)")
    g.add_argument(
        "--ip-adapter-embeds",
        default=None,
        help="precomputed IP-Adapter embeddings (.npy) instead of --ip-adapter-image, e.g. "
        "IP-Adapter FaceID's face embedding (insightface): (2, n, 512) [negative; positive], "
        "or (1, n, 512) with --guidance 1",
    )
    g.add_argument("--ip-adapter-scale", type=float, default=1.0, help="IP-Adapter weight")
    g.add_argument(
        "--image-guidance",
        type=float,
        default=None,
        help="InstructPix2Pix models: image guidance scale (default 1.5); --init-image is the "
        "image to edit and the prompt the instruction",
    )
    g.add_argument(
        "--depth-map",
        default=None,
        help="depth2img models (stable-diffusion-2-depth): a depth map of --init-image, a "
        "grayscale image (8/16-bit PNG, larger = nearer) or a .npy array; minisd has no depth "
        "estimator",
    )


def _paired(args, model_arg, image_arg, open_image):
    """--controlnet / --adapter and their images: one image each -> (one or a list, same)."""
    models = getattr(args, model_arg, None) or []
    images = getattr(args, image_arg, None) or []
    if len(models) != len(images):
        flag = "--" + model_arg.replace("_", "-")
        raise InputError(
            f"{flag} and --{image_arg.replace('_', '-')}: one image per model (got "
            f"{len(models)} model(s) and {len(images)} image(s))"
        )
    images = [open_image(i) for i in images]
    one = len(models) == 1
    return (models[0] if one else models or None), (images[0] if one else images or None)


def _control(args, open_image):
    """--controlnet, --control-image (and --control-mode): one image per ControlNet, or for
    one union ControlNet one image per mode."""
    modes = getattr(args, "control_mode", None)
    models = getattr(args, "controlnet", None) or []
    if modes is None or len(models) != 1:
        cn, images = _paired(args, "controlnet", "control_image", open_image)
        if modes is not None and len(modes) != len(models):
            raise InputError(
                f"--control-mode: one per --controlnet (got {len(modes)} for {len(models)})"
            )
        return cn, images
    images = getattr(args, "control_image", None) or []
    if len(images) != len(modes):
        raise InputError(
            f"--control-image and --control-mode: one image per mode (got {len(images)} "
            f"image(s) and {len(modes)} mode(s))"
        )
    return models[0], [open_image(i) for i in images]


def read(args, open_image):
    """Everything the add-on arguments name, read and checked: a dict for :func:`apply`."""
    from .lora import parse_lora_arg, read_lora
    from .textual_inversion_xl import embedding_tokens

    cn, control_image = _control(args, open_image)
    adapter, adapter_image = _paired(args, "adapter", "adapter_image", open_image)
    for folder in getattr(args, "adapter", None) or ():
        _check_adapter(folder)
    ip = [getattr(args, k, None) for k in ("ip_adapter", "image_encoder", "ip_adapter_image")]
    embeds = getattr(args, "ip_adapter_embeds", None)
    if embeds is not None and (not ip[0] or ip[2]):
        raise InputError("--ip-adapter-embeds: give it with --ip-adapter, instead of "
                         "--ip-adapter-image")  # fmt: skip
    if embeds is None and any(ip) and not all(ip):
        raise InputError("--ip-adapter, --image-encoder, --ip-adapter-image: give all three")
    loaded = all(ip) or embeds is not None
    if loaded:
        ip[0] = _read_ip_adapter(*ip[:2])  # the IPAdapter, for load_ip_adapter
    loras = [parse_lora_arg(v) for v in getattr(args, "lora", None) or ()]
    embeddings = [parse_embedding_arg(v) for v in getattr(args, "embedding", None) or ()]
    return {
        "freeu": parse_freeu_arg(getattr(args, "freeu", None)),
        "controlnet": cn,
        "control_image": control_image,
        "adapter": adapter,
        "adapter_image": adapter_image,
        "ip_adapter": (*ip[:2], getattr(args, "ip_adapter_scale", 1.0)) if loaded else None,
        "ip_adapter_image": open_image(ip[2]) if all(ip) else None,
        "ip_adapter_embeds": None if embeds is None else _read_embeds(embeds),
        "loras": [(read_lora(path), scale) for path, scale in loras],
        "embeddings": [(p, t) for p, t in embeddings if embedding_tokens(p, t)],  # checked
        "depth_map": read_depth_map(getattr(args, "depth_map", None)),
    }


def _check_adapter(folder):
    """--adapter FOLDER: its config.json is a T2IAdapter's and its weights file is there (the
    adapter itself loads with the model, in its dtype)."""
    from .t2i_adapter import T2IAdapterConfig
    from .weights import find_weights, read_config

    try:
        find_weights(folder)
        cfg = Path(folder) / "config.json"
        T2IAdapterConfig.from_dict(read_config(cfg), str(cfg))
    except MinisdError as e:
        raise InputError(f"--adapter: {e}") from None


def _read_ip_adapter(weights, encoder):
    """--ip-adapter read and checked, and --image-encoder's config against it."""
    from .clip_vision import CLIPVisionConfig
    from .ip_adapter_files import read_ip_adapter
    from .weights import read_config

    try:
        adapter = read_ip_adapter(weights)
    except MinisdError as e:
        raise InputError(f"--ip-adapter: {e}") from None
    if encoder is None:  # --ip-adapter-embeds without an image encoder
        return adapter
    cfg = Path(encoder) / "config.json"
    if not cfg.is_file():
        what = "no config.json in it" if Path(encoder).is_dir() else "no such folder"
        raise InputError(
            f"--image-encoder {encoder}: {what} (the IP-Adapter's CLIP vision model: "
            "config.json and model.safetensors)"
        )
    try:
        config = CLIPVisionConfig.from_dict(read_config(cfg), str(cfg))
    except MinisdError as e:
        raise InputError(f"--image-encoder: {e}") from None
    dim = getattr(config, adapter.encoder_field)  # Plus: hidden_size, else projection_dim
    if dim != adapter.embed_dim:
        what = "hidden states" if adapter.hidden_states else "image embeddings"
        raise InputError(
            f"--image-encoder {encoder}: gives {dim}-d {what} ({adapter.encoder_field}); the "
            f"IP-Adapter {weights} takes {adapter.embed_dim}-d ones"
        )
    return adapter


def _read_embeds(path):
    """--ip-adapter-embeds: a NumPy .npy array (no pickles)."""
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"--ip-adapter-embeds {path}: not a readable .npy array ({e})") from None


def apply(pipe, addons):
    """Merge the LoRAs and add the embeddings to the loaded pipeline."""
    for lora, scale in addons["loras"]:
        pipe.load_lora(lora, scale)
    for path, token in addons["embeddings"]:
        pipe.load_textual_inversion(path, token)
    if addons["freeu"] is not None:
        pipe.enable_freeu(*addons["freeu"])
    if addons["ip_adapter"] is not None:
        pipe.load_ip_adapter(*addons["ip_adapter"])  # weights, image encoder, scale


def call_kwargs(args, addons, pipe=None):
    """The add-on arguments of the pipeline call (``pipe``: refuse what its call lacks)."""
    kw = {}
    if addons["control_image"] is not None:
        kw.update(
            control_image=addons["control_image"],
            controlnet_conditioning_scale=args.control_scale,
            guess_mode=args.guess_mode,
        )
        if getattr(args, "control_mode", None) is not None:
            kw["control_mode"] = list(args.control_mode)
    if addons["adapter_image"] is not None:
        kw.update(
            adapter_image=addons["adapter_image"],
            adapter_conditioning_scale=args.adapter_scale,
            adapter_conditioning_factor=args.adapter_factor,
        )
    if addons["ip_adapter_image"] is not None:
        kw["ip_adapter_image"] = addons["ip_adapter_image"]
    if addons.get("ip_adapter_embeds") is not None:
        kw["ip_adapter_image_embeds"] = addons["ip_adapter_embeds"]
    if getattr(args, "image_guidance", None) is not None:
        kw["image_guidance_scale"] = args.image_guidance
    if addons["depth_map"] is not None:
        kw["depth_map"] = addons["depth_map"]
    _check_accepted(pipe, kw)
    return kw


def _check_accepted(pipe, kw):
    """InputError naming the flag whose argument the pipeline's call does not take (SDXL has
    no InstructPix2Pix, for one), instead of Python's TypeError."""
    import inspect

    if pipe is None:
        return
    params = inspect.signature(type(pipe).__call__).parameters
    flags = {"image_guidance_scale": "--image-guidance", "adapter_image": "--adapter-image"}
    flags.update(ip_adapter_image="--ip-adapter-image", control_image="--control-image")
    flags.update(depth_map="--depth-map", control_mode="--control-mode")
    flags["ip_adapter_image_embeds"] = "--ip-adapter-embeds"
    for name in kw:
        if name not in params:
            flag = flags.get(name, name)
            raise InputError(f"{flag}: not supported with {type(pipe).__name__} in minisd")


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
    if getattr(args, "control_mode", None):
        text += f", Control mode: {' '.join(map(str, args.control_mode))}"
    for adapter in getattr(args, "adapter", None) or ():
        text += f", T2I-Adapter: {adapter}:{args.adapter_scale}:{args.adapter_factor}"
    if getattr(args, "ip_adapter", None):
        text += f", IP-Adapter: {args.ip_adapter}:{args.ip_adapter_scale}"
    if getattr(args, "image_guidance", None) is not None:
        text += f", Image CFG scale: {args.image_guidance}"
    if isinstance(getattr(args, "depth_map", None), str):
        text += f", Depth map: {args.depth_map}"
    return text


def read_depth_map(path):
    """--depth-map: a .npy array or a single-channel image file (an RGB one is read as its
    luminance); an array (the demo's made-up map) passes through; None stays None."""
    if path is None or not isinstance(path, (str, Path)):
        return path
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--depth-map {path}: no such file")
    if path.suffix.lower() == ".npy":
        import numpy as np

        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"--depth-map {path}: cannot read it as a .npy array ({e})") from None
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"--depth-map {path}: cannot read it as an image ({e})") from None
    return image if len(image.getbands()) == 1 else image.convert("L")


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
