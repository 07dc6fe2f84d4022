"""End-to-end txt2img: minisd vs diffusers, total seconds and peak RSS (issues 7 and 10).

The SD1.5 architecture (weights_tools.make_tiny.full_size_configs("sd1")) with random float16
weights on disk (~2 GB, written once into a cache folder and reused); 20 DDIM steps at 512x512,
guidance 7.5 (a CFG batch of 2). Each side runs in its own fresh subprocess, which reports its
wall-clock seconds (load, generation) and its peak RSS (VmHWM, with the RssFile / RssAnon split
at the end). minisd runs with ``weights="stream"`` (the float16 file stays on disk and each
weight is cast to float32 when a layer reads it; see minisd/weights.py) and, for comparison,
with the default ``weights="eager"`` (everything cast to float32 at load). diffusers loads the
same folder with ``torch_dtype=torch.float32``.

    python benchmarks/bench_pipeline.py            # 20 steps, 512x512, all sides
    python benchmarks/bench_pipeline.py --quick    # 2 steps, 256x256: a few minutes here
    python benchmarks/bench_pipeline.py --sides minisd-stream --no-write
    python benchmarks/bench_pipeline.py --family sdxl --steps 4   # SDXL base (~7 GB folder)

``--family sdxl``: the SDXL 1.0 base architecture the same way (two text encoders, float32 VAE
decode on both sides), 512x512 by default: its 1024x1024 costs ~4x per step on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import append_results, markdown_table, write_full_size_model  # noqa: E402

CACHE = {
    "sd1": Path(os.environ.get("MINISD_BENCH_CACHE", "/tmp/minisd-bench-sd15-fp16")),
    "sdxl": Path(os.environ.get("MINISD_BENCH_CACHE_XL", "/tmp/minisd-bench-sdxl-fp16")),
}
TITLES = {"sd1": "SD1.5", "sdxl": "SDXL base"}
PROMPT = "a photograph of an astronaut riding a horse"
SIDES = ("minisd-stream", "minisd-lazy", "minisd-eager", "diffusers")


def write_model(folder, family="sd1", seed=0):
    """A diffusers pipeline folder of ``family`` with random float16 weights (skipped if
    complete)."""
    folder = Path(folder)
    if (folder / "complete").is_file():
        return folder
    write_full_size_model(folder, family=family, seed=seed)
    (folder / "complete").write_text("ok\n")
    return folder


# --------------------------------------------------------------------------- workers


def _status_kib():
    """{VmRSS, VmHWM, RssAnon, RssFile: KiB} of this process."""
    text = Path("/proc/self/status").read_text()
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    return {k: int(re.search(rf"{k}:\s+(\d+)", text)[1]) for k in keys}


class RssSampler:
    """Polls /proc/self/status in a thread: the RssAnon / RssFile split at the highest VmRSS
    seen (VmHWM itself is exact; the split is sampled every ``period`` seconds)."""

    def __init__(self, period=0.02):
        import threading

        self.peak = _status_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period):
        while not self._stop.wait(period):
            s = _status_kib()
            if s["VmRSS"] > self.peak["VmRSS"]:
                self.peak = s

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.peak


def run_minisd(folder, mode, steps, size):
    import minisd

    t0 = time.perf_counter()
    pipe = minisd.StableDiffusion.from_pretrained(folder, dtype="float32", weights=mode)
    t1 = time.perf_counter()
    kw = dict(num_inference_steps=steps, height=size, width=size, guidance_scale=7.5)
    pipe(PROMPT, scheduler="ddim", seed=0, output_type="np", progress=False, **kw)
    return t1 - t0, time.perf_counter() - t1


def run_diffusers(folder, steps, size):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    t0 = time.perf_counter()
    if (Path(folder) / "text_encoder_2").is_dir():
        pipe = StableDiffusionXLPipeline.from_pretrained(
            folder, torch_dtype=torch.float32, add_watermarker=False
        )
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
        )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    t1 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    kw = dict(num_inference_steps=steps, height=size, width=size, guidance_scale=7.5)
    pipe(PROMPT, generator=gen, output_type="np", **kw)
    return t1 - t0, time.perf_counter() - t1


def worker(side, folder, steps, size):
    """Run one side in this (fresh) process; print one JSON line."""
    sampler = RssSampler()
    if side == "diffusers":
        load, gen = run_diffusers(folder, steps, size)
    else:
        load, gen = run_minisd(folder, side.split("-")[1], steps, size)
    peak = sampler.stop()
    final = _status_kib()
    out = {"side": side, "load_s": load, "gen_s": gen, "vmhwm_kib": final["VmHWM"]}
    out.update({f"peak_{k.lower()}_kib": peak[k] for k in ("RssAnon", "RssFile")})
    print("__RESULT__", json.dumps(out), flush=True)


def run_side(side, folder, steps, size, threads):
    cmd = [sys.executable, __file__, "--worker", side, "--folder", str(folder)]
    cmd += ["--steps", str(steps), "--size", str(size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.split("__RESULT__", 1)[1])


def gib(kib):
    return f"{kib / 2**20:.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=sorted(CACHE), default="sd1", help="default sd1")
    p.add_argument("--quick", action="store_true", help="2 steps at 256x256")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--folder", help="model folder (default: a cache folder per family)")
    p.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    steps = args.steps or (2 if args.quick else 20)
    size = args.size or (256 if args.quick else 512)
    if args.worker:
        return worker(args.worker, args.folder, steps, size)
    folder = write_model(args.folder or CACHE[args.family], args.family)
    rows = []
    for side in [s for s in args.sides.split(",") if s]:
        r = run_side(side, folder, steps, size, args.threads)
        print(json.dumps(r), flush=True)
        rows.append(
            [
                side,
                f"{r['load_s']:.1f}",
                f"{r['gen_s']:.1f}",
                gib(r["vmhwm_kib"]),
                gib(r["peak_rssanon_kib"]),
                gib(r["peak_rssfile_kib"]),
            ]
        )
    header = ["side", "load s", "txt2img s", "peak RSS GiB (VmHWM)", "RssAnon", "RssFile"]
    table = markdown_table(header, rows)
    print("\n".join(table))
    if not args.no_write:
        name = TITLES[args.family]
        title = f"pipeline: txt2img {name} fp16 files, {steps} DDIM steps {size}x{size}, CFG 7.5"
        notes = (
            f"Random full-size {name} weights stored as float16, computed in float32 on both "
            "sides; each side in a fresh subprocess. minisd-stream/-lazy: float16 memory maps "
            "cast per layer (minisd/weights.py); minisd-eager: cast to float32 at load. "
            "RssAnon / RssFile: the split at the highest sampled VmRSS (20 ms polling)."
        )
        append_results(title, table, notes)


if __name__ == "__main__":
    main()
