"""SD txt2img on one GPU: minisd on CuPy (float16) vs diffusers on torch (float16, SDPA).

    python benchmarks/bench_gpu.py                  # SD1.5, 512x512, 50 steps, CFG 7.5, PNDM
    python benchmarks/bench_gpu.py --record         # also append the table to RESULTS.md
    python benchmarks/bench_gpu.py --steps 20 --size 768 --batch 2
    python benchmarks/bench_gpu.py --family sdxl    # SDXL base, 1024x1024, CFG 5, Euler
    python benchmarks/bench_gpu.py --dry-run        # CPU only: parse, build, run a tiny model

The architecture (weights_tools.make_tiny.full_size_configs(family): SD1.5, or SDXL 1.0 base)
with random float16 weights is written once as a diffusers folder; each side then runs in its
own subprocess (the minisd worker never imports torch, so neither side's allocator holds memory
during the other's run): one warm-up generation (CuPy compiles its kernels on first use), then
``--reps`` timed generations. Reported per side:
- loop it/s: UNet calls per second inside the denoising loop (device synchronized at the first
  and last step callbacks; text encoding and VAE decode excluded), and the minisd/diffusers ratio;
- total s: a whole generation (tokenize, encode, loop, decode, copy to host);
- peak allocated: the high-water mark of bytes in use (an allocator hook on CuPy's memory pool,
  during one more generation after the timed ones; torch.cuda.max_memory_allocated) and peak
  held (CuPy's pool total_bytes, which never shrinks unless freed;
  torch.cuda.max_memory_reserved).
Both sides draw the initial latents with the same seed on the CPU (minisd.rng reproduces
torch.Generator), so the images are compared too (a sanity check; float16 with random weights).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import append_results, markdown_table, write_full_size_model  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
SIDES = ("minisd", "diffusers")
#: per family: the defaults of size, guidance and (minisd's name for) the folder's scheduler
FAMILIES = {
    "sd1": {"size": 512, "guidance": 7.5, "scheduler": "pndm", "title": "SD1.5"},
    "sdxl": {"size": 1024, "guidance": 5.0, "scheduler": "euler", "title": "SDXL base"},
}
NEEDS_GPU = (
    "bench_gpu: needs a GPU (CuPy with a visible CUDA device, and torch with CUDA for the "
    "diffusers side); --dry-run checks the script on the CPU at a tiny size"
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="sd1", help="default sd1")
    p.add_argument("--steps", type=int, default=50, help="inference steps (default 50)")
    p.add_argument("--size", type=int, help="image height = width (default 512; SDXL 1024)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--guidance", type=float, help="CFG scale (default 7.5; SDXL 5)")
    p.add_argument("--scheduler", help="minisd name, default the folder's (pndm; SDXL euler)")
    p.add_argument("--reps", type=int, default=2, help="timed generations per side (default 2)")
    p.add_argument("--sides", default="minisd,diffusers", help="comma-separated subset")
    p.add_argument("--folder", default=None, help="reuse a model folder (default: write one)")
    p.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, no GPU needed")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = FAMILIES[args.family]
    for name in ("size", "guidance", "scheduler"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.size % 8 or args.size <= 0 or args.steps < 2 or args.reps < 1 or args.batch < 1:
        p.error("--size must be a positive multiple of 8, --steps >= 2, --reps/--batch >= 1")
    args.sides = [s for s in args.sides.split(",") if s]
    if any(s not in SIDES for s in args.sides):
        p.error(f"--sides: expected a subset of {SIDES}")
    return args


# --------------------------------------------------------------------------- model folder


def write_model(folder, family="sd1", tiny=False, seed=0):
    """A diffusers pipeline folder with random weights: full-size (float16 tensors) or tiny."""
    import weights_tools

    folder = Path(folder)
    if tiny:
        weights_tools.make_tiny(folder, family=family, seed=seed)
        return folder
    return write_full_size_model(folder, family=family, seed=seed)


# --------------------------------------------------------------------------- workers


def _peak_tracker_cupy():
    """Route CuPy's allocations through the default pool, recording the used-bytes high-water."""
    import cupy

    pool = cupy.get_default_memory_pool()
    peak = {"used": 0}

    def malloc(size):
        mem = pool.malloc(size)
        peak["used"] = max(peak["used"], pool.used_bytes())
        return mem

    cupy.cuda.set_allocator(malloc)
    return pool, peak


def run_minisd(args, folder):
    """Load, warm up, time ``args.reps`` generations, then one more, untimed, for the peak
    memory (the allocator hook costs a Python call per allocation, which would slow the
    host-bound loop it measures); returns a result dict."""
    import minisd
    from minisd import backend

    gpu = args.device != "cpu"
    xp = backend.get_xp(args.device)
    sync = xp.cuda.Device().synchronize if gpu else (lambda: None)
    pipe = minisd.StableDiffusion.from_pretrained(folder, device=args.device)
    kw = dict(height=args.size, width=args.size, guidance_scale=args.guidance, seed=0)
    kw.update(scheduler=args.scheduler, num_images_per_prompt=args.batch, progress=False)
    pipe(PROMPT, num_inference_steps=2, output_type="np", **kw)  # warm-up: kernel compilation
    sync()
    loops, totals, image = [], [], None
    for _ in range(args.reps):
        stamps = []

        def callback(i, t, lat, stamps=stamps):
            sync()
            stamps.append(time.perf_counter())

        t0 = time.perf_counter()
        image = pipe(
            PROMPT, num_inference_steps=args.steps, output_type="np", callback=callback, **kw
        )
        totals.append(time.perf_counter() - t0)
        loops.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    used, held = 0, 0
    if gpu:
        pool, peak = _peak_tracker_cupy()
        peak["used"] = pool.used_bytes()  # the weights and whatever the pipeline keeps
        pipe(PROMPT, num_inference_steps=args.steps, output_type="np", **kw)
        sync()
        used, held = peak["used"], pool.total_bytes()
    info = backend.device_info(args.device)
    return _result("minisd", loops, totals, image, used, held, info["name"])


def run_diffusers(args, folder):
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    gpu = args.device != "cpu"
    dtype = torch.float16 if gpu else torch.float32
    pipe = _diffusers_pipeline(args.family, folder, dtype).to(args.device)
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # F.scaled_dot_product_attention
    pipe.set_progress_bar_config(disable=True)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    kw = dict(height=args.size, width=args.size, guidance_scale=args.guidance)
    kw.update(num_images_per_prompt=args.batch, output_type="np")
    gen = torch.Generator("cpu")
    pipe(PROMPT, num_inference_steps=2, generator=gen.manual_seed(0), **kw)  # warm-up
    sync()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    loops, totals, image = [], [], None
    for _ in range(args.reps):
        stamps = []

        def on_step_end(p, i, t, tensors, stamps=stamps):
            sync()
            stamps.append(time.perf_counter())
            return tensors

        t0 = time.perf_counter()
        out = pipe(
            PROMPT,
            num_inference_steps=args.steps,
            generator=gen.manual_seed(0),
            callback_on_step_end=on_step_end,
            **kw,
        )
        totals.append(time.perf_counter() - t0)
        loops.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        image = out.images
    used = torch.cuda.max_memory_allocated() if gpu else 0
    held = torch.cuda.max_memory_reserved() if gpu else 0
    name = torch.cuda.get_device_name() if gpu else "cpu"
    return _result("diffusers", loops, totals, image, used, held, name)


def _diffusers_pipeline(family, folder, dtype):
    """diffusers' pipeline of ``family``: no safety checker, no watermark (minisd has neither)."""
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline.from_pretrained(
            folder, torch_dtype=dtype, add_watermarker=False
        )
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    )


def _result(side, loops, totals, image, used, held, device):
    np.save(_image_path(side), np.asarray(image, dtype=np.float32))
    return {
        "side": side,
        "loop_its": float(np.median(loops)),
        "total_s": float(np.median(totals)),
        "peak_used": int(used),
        "peak_held": int(held),
        "device": device,
    }


def _image_path(side):
    return Path(tempfile.gettempdir()) / f"minisd-bench-gpu-{side}.npy"


# --------------------------------------------------------------------------- parent


def run_worker(side, args, folder):
    """Run one side in a fresh subprocess; returns its result dict."""
    cmd = [sys.executable, __file__, "--worker", side, "--folder", str(folder)]
    cmd += ["--family", args.family]
    cmd += ["--steps", str(args.steps), "--size", str(args.size), "--batch", str(args.batch)]
    cmd += ["--guidance", str(args.guidance), "--scheduler", args.scheduler]
    cmd += ["--reps", str(args.reps), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{side} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(results, args):
    mib = 2**20
    by = {r["side"]: r for r in results}
    base = by.get("diffusers", {}).get("loop_its")
    rows = []
    for r in results:
        ratio = f"{r['loop_its'] / base:.2f}" if base else "-"
        rows.append([
            r["side"], f"{r['loop_its']:.2f}", ratio, f"{r['total_s']:.2f}",
            f"{r['peak_used'] / mib:.0f}", f"{r['peak_held'] / mib:.0f}",
        ])  # fmt: skip
    header = ["side", "loop it/s", "vs diffusers", "total s", "peak alloc MiB", "peak held MiB"]
    lines = markdown_table(header, rows)
    if len(by) == 2:
        a, b = (np.load(_image_path(s)).astype(np.float64) for s in SIDES)
        err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)
        lines.append(f"\nImages minisd vs diffusers: max rel. difference {err:.2e}")
    device = results[0]["device"]
    dtype = "float32 (CPU dry run)" if args.device == "cpu" else "float16"
    title = (
        f"bench_gpu: {FAMILIES[args.family]['title']} txt2img {args.size}x{args.size}, "
        f"{args.steps} steps, CFG {args.guidance}, batch {args.batch}, {dtype}, on {device}"
    )
    print(f"\n{title}\n" + "\n".join(lines))
    return title, lines


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        run = run_minisd if args.worker == "minisd" else run_diffusers
        print(json.dumps(run(args, args.folder)))
        return 0
    if args.dry_run:
        return dry_run(args)
    from minisd.backend import cuda_available

    if not cuda_available():
        raise SystemExit(NEEDS_GPU)
    with tempfile.TemporaryDirectory(prefix="minisd-bench-gpu-") as tmp:
        folder = args.folder or write_model(Path(tmp) / args.family, family=args.family)
        results = [run_worker(side, args, folder) for side in args.sides]
    title, lines = report(results, args)
    if args.record:
        notes = (
            f"Random {FAMILIES[args.family]['title']}-architecture weights (float16), "
            f"{args.scheduler} scheduler. loop it/s: UNet calls per second in "
            "the denoising loop (synchronized at the first and last step). Peak alloc: CuPy "
            "pool used-bytes high-water (an allocator hook, in one more untimed generation) / "
            "torch.cuda.max_memory_allocated; held: CuPy pool total_bytes / "
            "torch.cuda.max_memory_reserved."
        )
        append_results(title, lines, notes)
    return 0


def dry_run(args):
    """Everything but the GPU: parse, write a tiny folder, run each side's worker on the CPU."""
    args.device, args.size, args.steps, args.reps = "cpu", 64, 3, 1
    with tempfile.TemporaryDirectory(prefix="minisd-bench-gpu-dry-") as tmp:
        folder = write_model(Path(tmp) / "tiny", family=args.family, tiny=True)
        sides = [s for s in args.sides if s == "minisd" or _has_diffusers()]
        results = [run_worker(side, args, folder) for side in sides]
    report(results, args)
    print("dry run OK (CPU, tiny model): the full benchmark needs a GPU")
    return 0


def _has_diffusers():
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
