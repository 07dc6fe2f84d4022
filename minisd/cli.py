"""The ``minisd`` command: demo, generate, trace, selfcheck (and parity, with the test extra)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import cli_addons
from .errors import InputError, MinisdError
from .schedulers import NAMES

SCHEDULER_HELP = ", ".join(NAMES)
REAL_MODEL_HINT = (
    'With real weights: minisd generate "a photo of an astronaut riding a horse" '
    "--model path/to/stable-diffusion-v1-5 (a diffusers folder or a single .safetensors file)"
)


def _size(text):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        msg = f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 512x512"
        raise argparse.ArgumentTypeError(msg) from None
    return w, h


def _add_sampling(p, steps, size):
    p.add_argument("--negative", default=None, help="negative prompt (what to steer away from)")
    p.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default {steps})")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale; <= 1 disables guidance (default 7.5; SDXL 5, "
        "SDXL inpainting 7.5 without a ControlNet). "
        "LCM-distilled models take it as an input instead (one UNet batch; try 1-2, 4 steps)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        help=f"sampler: {SCHEDULER_HELP} (default: the model's own, e.g. pndm)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the torch-compatible RNG: same seed, same image as diffusers (CPU)",
    )
    p.add_argument(
        "--size",
        type=_size,
        default=size,
        help="WIDTHxHEIGHT in pixels, multiples of 8 (default: the model's native size)",
    )
    p.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        help="0..1: pull CFG's spread back to the prompt's (Lin et al. 2024; for v-prediction "
        "zero-SNR models, e.g. 0.7; default 0)",
    )
    p.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--clip-skip", type=int, default=None, help="skip the last k CLIP layers")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta, TCD gamma (0 = deterministic)")
    p.add_argument(
        "--dtype", default=None, help="float32 (default on cpu), float16 (default on cuda), float64"
    )
    p.add_argument("--device", default="cpu", help="cpu (NumPy, default) or cuda (CuPy)")
    p.add_argument("--out", default=None, help="output PNG path (default: minisd-<seed>.png)")


def build_parser():
    p = argparse.ArgumentParser(
        prog="minisd",
        description="Stable Diffusion in plain array code (NumPy on the CPU, CuPy on the GPU).",
        epilog=REAL_MODEL_HINT,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser(
        "demo",
        help="run txt2img on a small random-weight demo model (no download)",
        description="Builds (once, cached) a tiny randomly initialized SD1-like "
        "model with weights_tools.make_tiny and runs the whole txt2img pipeline "
        "on it. The picture is noise-like: the weights are random; it shows the "
        "pipeline works end to end. " + REAL_MODEL_HINT,
    )
    d.add_argument(
        "prompt",
        nargs="?",
        default="a watercolor painting of a lighthouse",
        help="prompt (default: a watercolor painting of a lighthouse)",
    )
    _add_sampling(d, steps=10, size=None)  # demo: 128x128 unless --size
    d.add_argument(
        "--family",
        default="sd1",
        help="demo model family: sd1, sd2, inpaint, instruct-pix2pix, sd2-depth, sdxl, "
        "sdxl-refiner or sdxl-inpaint (inpainting, pix2pix and depth families get a made-up "
        "input image, and mask or depth map)",
    )
    d.add_argument(
        "--cache",
        default=None,
        help="folder for the demo model (default $MINISD_CACHE or ~/.cache/minisd)",
    )
    g = sub.add_parser(
        "generate",
        help="txt2img / img2img / inpainting with a real model",
        description="Generate images with a Stable Diffusion checkpoint.",
    )
    g.add_argument("prompt", help="the text prompt")
    g.add_argument(
        "--model",
        required=True,
        help="diffusers folder, single-file .safetensors, or a Hugging Face repo id "
        "(needs huggingface_hub; downloads safetensors/configs only)",
    )
    _add_sampling(g, steps=30, size=None)
    g.add_argument("--init-image", default=None, help="input image for img2img / inpainting")
    g.add_argument(
        "--strength",
        type=float,
        default=None,
        help="img2img/inpaint: how much of the schedule to run, in (0, 1] (default 0.8; SDXL: "
        "0.3, with a ControlNet 0.8, inpainting 0.9999)",
    )
    g.add_argument("--mask", default=None, help="inpainting mask image (white = repaint)")
    g.add_argument(
        "--noise-level",
        type=int,
        default=None,
        help="the x4 upscaler: noise added to --init-image, 0..350 (default 20)",
    )
    g.add_argument(
        "--mask-crop",
        type=int,
        default=None,
        metavar="PAD",
        help="inpaint only the mask's surroundings (PAD pixels of context) at the model's size "
        "and paste them back (diffusers' padding_mask_crop; A1111's 'only masked')",
    )
    g.add_argument(
        "--config",
        default=None,
        help="single-file: a diffusers folder whose configs override the inferred architecture",
    )
    g.add_argument(
        "--prediction-type",
        default=None,
        help="single-file SD2: epsilon or v_prediction (can't be seen from the weights)",
    )
    cli_addons.add_arguments(g)
    cli_addons.add_image_prompt_arguments(g)
    g.add_argument(
        "--weights",
        choices=("eager", "lazy", "stream"),
        default="eager",
        help="eager: cast all weights at load (fastest); lazy / stream: keep the files "
        "memory-mapped and cast each layer when used (stream also gives the pages back: "
        "a 512x512 SD1.5 txt2img from float16 files peaks near 1.2 GiB)",
    )
    t = sub.add_parser(
        "trace",
        help="dump a named intermediate tensor of one UNet call to .npy",
        description="Runs the text encoder and one UNet call on random latents "
        "and saves the output of the module named --module (a diffusers path, "
        "e.g. down_blocks.1.attentions.0) as .npy. --list prints all names.",
    )
    t.add_argument("--model", required=True, help="diffusers folder or .safetensors file")
    t.add_argument("--module", default=None, help="module path, e.g. mid_block.attentions.0")
    t.add_argument("--prompt", default="a photo of a cat", help="prompt for the text encoder")
    t.add_argument("--timestep", type=int, default=500, help="UNet timestep (default 500)")
    t.add_argument(
        "--size", type=_size, default=(64, 64), help="WIDTHxHEIGHT pixels (default 64x64)"
    )
    t.add_argument("--list", action="store_true", help="list every traced module name")
    t.add_argument("--out", default="trace.npy", help="output .npy file (default trace.npy)")
    par = sub.add_parser(
        "parity",
        help="per-layer comparison with diffusers (needs the test extra)",
        description="Runs one UNet, VAE and text-encoder pass in minisd and in "
        "diffusers/transformers on the same inputs and prints a per-layer table "
        "naming the first layer that diverges. Needs torch, diffusers and "
        "transformers (pip install 'minisd[test]').",
    )
    par.add_argument("--model", required=True, help="diffusers folder")
    par.add_argument("--dtype", default="float32", help="float64, float32 or float16")
    par.add_argument("--tol", type=float, default=None, help="divergence bound (default by dtype)")
    chk = sub.add_parser("selfcheck", help="print the version and check the core ops")
    chk.add_argument(
        "--device", default="cpu", help="cuda: also check the GPU path against NumPy float64"
    )
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        scheduler = getattr(args, "scheduler", None)
        if scheduler is not None and scheduler not in NAMES:  # before any model is built
            raise InputError(f"--scheduler {scheduler!r}: expected one of {SCHEDULER_HELP}")
        if args.command in (None, "selfcheck"):
            return _selfcheck(getattr(args, "device", "cpu"))
        if args.command == "demo":
            return _demo(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "trace":
            return _trace(args)
        if args.command == "parity":
            return _parity(args)
    except MinisdError as e:
        print(f"minisd: error: {e}", file=sys.stderr)
        return 2
    parser.print_help()
    return 0


def _selfcheck(device="cpu"):
    from . import __version__, selfcheck

    print(f"minisd {__version__}: core ops self-check")
    ok = selfcheck.run()
    print(selfcheck.gpu_line())
    if device != "cpu":
        print(f"GPU path on {device} (float32 vs NumPy float64):")
        ok &= selfcheck.run_device(device)
    return 0 if ok else 1


def cache_dir(arg=None):
    return Path(arg or os.environ.get("MINISD_CACHE") or Path.home() / ".cache" / "minisd")


def _demo(args):
    from weights_tools import make_tiny

    from .cli_demo import demo_inputs

    folder = cache_dir(args.cache) / f"demo-{args.family}"
    if not (folder / "model_index.json").is_file():
        print(f"building the random-weight demo model in {folder} (once) ...")
        make_tiny(folder, family=args.family, seed=0)
    print(
        "RANDOM-WEIGHT DEMO: the weights are random, so the image is not a picture of the "
        "prompt; it shows the whole pipeline (CLIP, UNet, scheduler, VAE) running."
    )
    args.size = args.size or (128, 128)
    args.out = args.out or "minisd-demo.png"
    image, mask, args.depth_map = demo_inputs(args.family, args.size)
    out = _run(args, str(folder), image=image, mask=mask)
    print(REAL_MODEL_HINT)
    return out


def _generate(args):
    return _run(args, _resolve_model(args.model), image=args.init_image, mask=args.mask)


def _resolve_model(model):
    if Path(model).exists() or "/" not in model or model.startswith((".", "/")):
        return model
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InputError(
            f"--model {model!r}: no such path (install huggingface_hub to use a "
            "Hugging Face repo id)"
        ) from None
    try:
        return snapshot_download(
            model,
            allow_patterns=["*.json", "*.txt", "*.safetensors"],
            ignore_patterns=["*.fp16.safetensors", "*non_ema*", "*.ckpt"],
        )
    except Exception as e:  # offline, unknown repo, gated repo, ...: hub errors vary by version
        raise InputError(
            f"--model {model!r}: no such local path, and fetching it from the Hugging Face Hub "
            f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def _open_image(path):
    from PIL import Image

    if path is None or isinstance(path, Image.Image):  # (the demo's made-up inputs)
        return path

    if not Path(path).is_file():
        raise InputError(f"{path}: no such image file")
    try:
        return Image.open(path).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for files it cannot decode
        raise InputError(f"{path}: cannot read it as an image ({e})") from None


def _output_path(args):
    """The image path to write, checked before any work: its folder exists and its extension
    is an image format PIL writes."""
    from PIL import Image

    out = Path(args.out or f"minisd-{args.seed}.png")
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder; give a file name such as {out / 'a.png'}")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: the folder {out.parent} does not exist")
    if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:
        raise InputError(f"--out {out}: {out.suffix!r} is no image format PIL writes (use .png)")
    return out


def _run(args, model, image, mask):
    from .pipeline import StableDiffusion
    from .pipeline_control import default_scale

    kw = {} if getattr(args, "config", None) is None else {"config": args.config}
    if getattr(args, "prediction_type", None):
        kw["prediction_type"] = args.prediction_type
    if getattr(args, "weights", None):
        kw["weights"] = args.weights
    out = _output_path(args)
    image, mask = _open_image(image), _open_image(mask)
    t0 = time.perf_counter()
    addons = cli_addons.read(args, _open_image)  # bad files fail before the model loads
    kw["controlnet"], kw["adapter"] = addons["controlnet"], addons["adapter"]
    pipe = StableDiffusion.from_pretrained(model, dtype=args.dtype, device=args.device, **kw)
    cli_addons.apply(pipe, addons)
    w, h = args.size if args.size else (None, None)
    t1 = time.perf_counter()
    if type(pipe).__name__ == "StableDiffusionUpscale":
        images = pipe(args.prompt, **_upscale_kwargs(args, image, mask, addons))
    else:
        images = pipe(
            args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
            height=h, width=w, seed=args.seed, scheduler=args.scheduler,
            num_images_per_prompt=args.n, image=image, clip_skip=args.clip_skip, eta=args.eta,
            guidance_rescale=args.guidance_rescale, **_family_kwargs(args, mask),
            **cli_addons.call_kwargs(args, addons, pipe),
        )  # fmt: skip
    t2 = time.perf_counter()
    args.scheduler = args.scheduler or pipe.scheduler_name  # (for the PNG's parameters)
    if args.guidance is None:  # (for the PNG's parameters)
        args.guidance = _default_guidance(pipe, mask, addons["control_image"])
    if addons["control_image"] is not None:  # (for the PNG's parameters: the pipeline's default)
        args.control_scale = default_scale(args.control_scale, image, mask, pipe)
    for k, img in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{k}{out.suffix}")
        _save_png(img, path, _parameters(args, model, img.size))
        print(f"wrote {path} ({img.size[0]}x{img.size[1]})")
    print(f"loaded in {t1 - t0:.1f} s, generated in {t2 - t1:.1f} s")
    return 0


def _upscale_kwargs(args, image, mask, addons):
    """The x4 upscaler's call (``--init-image`` is the low-resolution image), refusing the flags
    it has no use for (LoRAs, embeddings and FreeU change the models and do apply)."""
    given = {"--mask": mask, "--size": args.size, "--strength": getattr(args, "strength", None)}
    given["--guidance-rescale"] = args.guidance_rescale or None
    given["--image-guidance"] = getattr(args, "image_guidance", None)
    images = ("control_image", "adapter_image", "ip_adapter_image", "ip_adapter_embeds")
    for k in (*images, "depth_map"):
        given[f"--{k.replace('_', '-')}"] = addons.get(k)
    for flag, value in given.items():
        if value is not None:
            raise InputError(f"{flag}: not supported by the x4 upscaler (StableDiffusionUpscale)")
    kw = {} if args.guidance is None else {"guidance_scale": args.guidance}
    if getattr(args, "noise_level", None) is not None:
        kw["noise_level"] = args.noise_level
    return dict(
        kw, image=image, negative_prompt=args.negative, num_inference_steps=args.steps,
        seed=args.seed, scheduler=args.scheduler, num_images_per_prompt=args.n,
        clip_skip=args.clip_skip, eta=args.eta,
    )  # fmt: skip


def _default_guidance(pipe, mask, control_image):
    """The pipeline's own guidance scale (7.5; SDXL's 5.0, or 7.5 when inpainting without a
    ControlNet, as diffusers' SDXL pipelines)."""
    import inspect

    default = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default
    if default is None:  # StableDiffusionXL: by task
        from .pipeline_xl_steps import default_guidance

        return default_guidance(None, mask, control_image)
    return default


def _family_kwargs(args, mask):
    """Guidance, strength and mask where given (else the pipeline's defaults)."""
    kw = {} if args.guidance is None else {"guidance_scale": args.guidance}
    if getattr(args, "strength", None) is not None:
        kw["strength"] = args.strength
    if getattr(args, "mask_crop", None) is not None:
        kw["padding_mask_crop"] = args.mask_crop
    return {**kw, "mask_image": mask}


def _parameters(args, model, size):
    """A1111-style generation parameters, stored as the PNG's "parameters" text chunk."""
    lines = [args.prompt]
    if args.negative:
        lines.append(f"Negative prompt: {args.negative}")
    lines.append(
        f"Steps: {args.steps}, Sampler: {args.scheduler}, CFG scale: {args.guidance}, "
        f"Seed: {args.seed}, Size: {size[0]}x{size[1]}, Model: {Path(model).name}"
        + (f", Clip skip: {args.clip_skip}" if args.clip_skip else "")
        + cli_addons.parameters(args)
        + ", Generator: minisd"
    )
    return "\n".join(lines)


def _save_png(img, path, parameters):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    img.save(path, pnginfo=info)


def _trace(args):
    from .tracecmd import run_trace

    return run_trace(args)


def _parity(args):
    try:
        from minisd_parity import run_parity
    except ImportError as e:
        msg = f"minisd parity needs the test extra (pip install 'minisd[test]'): {e}"
        raise InputError(msg) from None
    return run_parity(args)


if __name__ == "__main__":
    sys.exit(main())
