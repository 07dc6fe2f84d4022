"""Full-size SD VAE, minisd vs diffusers: decode 1x4x64x64 and encode 1x3x512x512.

    python benchmarks/bench_vae.py            # 3 repetitions per case
    python benchmarks/bench_vae.py --quick    # 1 repetition (checks that everything runs)

Random weights (timing does not depend on the values). Each (side, task) runs in its own
subprocess, so the peak RSS is that case's alone; the minisd worker never imports torch.
Reported: median seconds, diffusers/minisd time ratio, peak RSS and peak RSS above the loaded
model (activations).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import append_results, gflops, markdown_table, meta_flops  # noqa: E402

SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    norm_num_groups=32,
    latent_channels=4,
    sample_size=512,
)
TASKS = {"decode": (1, 4, 64, 64), "encode": (1, 3, 512, 512)}


def rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _minisd_case(task):
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from minisd.vae import AutoencoderKL, VAEConfig, expected_shapes

    cfg = VAEConfig.from_dict(SD_VAE)
    rng = np.random.default_rng(0)
    params = {}
    for name, shape in expected_shapes(cfg).items():  # kernels N(0, 1/fan_in), norms ~1
        fan_in = int(np.prod(shape[1:]))
        w = (
            rng.standard_normal(shape) / np.sqrt(fan_in)
            if len(shape) > 1
            else 0.1 * rng.standard_normal(shape)
        )
        params[name] = (w + (len(shape) == 1 and name.endswith("weight"))).astype(np.float32)
    vae = AutoencoderKL(cfg, params)
    x = rng.standard_normal(TASKS[task]).astype(np.float32)
    run = vae.decode if task == "decode" else (lambda a: vae.encode(a).mean)
    return run, x


def _diffusers_case(task):
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE).eval()
    x = torch.randn(TASKS[task])

    def run(a):
        with torch.no_grad():
            return vae.decode(a).sample if task == "decode" else vae.encode(a).latent_dist.mean

    return run, x


def count_flops(task):
    """FLOPs of one decode / encode of the full-size VAE, counted by torch on the meta device."""
    import torch
    from diffusers import AutoencoderKL

    def run():
        vae = AutoencoderKL(**SD_VAE)
        x = torch.empty(TASKS[task])
        vae.decode(x) if task == "decode" else vae.encode(x)

    return meta_flops(run)


def worker(side, task, reps):
    run, x = (_minisd_case if side == "minisd" else _diffusers_case)(task)
    loaded = rss_mib()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    peak = rss_mib()
    print(json.dumps(dict(side=side, task=task, times=times, rss_loaded=loaded, rss_peak=peak)))


def run_case(side, task, reps):
    cmd = [sys.executable, __file__, "--worker", side, "--task", task, "--reps", str(reps)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{side} {task} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repetition per case")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    ap.add_argument("--worker", choices=["minisd", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--task", choices=list(TASKS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    reps = 1 if args.quick else args.reps
    if args.worker:
        return worker(args.worker, args.task, reps)
    print(f"# bench_vae: full-size SD VAE, float32, CPU, {reps} rep(s), {time.strftime('%F')}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    head = f"{'case':<28}{'minisd s':>10}{'diffusers s':>13}{'ratio':>8}"
    print(head + f"{'minisd RSS':>13}{'(act.)':>9}{'diffusers RSS':>15}{'(act.)':>9}")
    results, rows = [], []
    for task in args.tasks:
        r = {side: run_case(side, task, reps) for side in ("minisd", "diffusers")}
        med = {side: statistics.median(r[side]["times"]) for side in r}
        flop = count_flops(task)
        m, d = r["minisd"], r["diffusers"]
        name = f"{task} {'x'.join(map(str, TASKS[task]))}"
        print(
            f"{name:<28}{med['minisd']:>10.2f}{med['diffusers']:>13.2f}"
            f"{med['minisd'] / med['diffusers']:>8.2f}"
            f"{m['rss_peak']:>10.0f} MiB{m['rss_peak'] - m['rss_loaded']:>9.0f}"
            f"{d['rss_peak']:>12.0f} MiB{d['rss_peak'] - d['rss_loaded']:>9.0f}"
        )
        results.append(dict(task=task, shape=TASKS[task], median_s=med, runs=r))
        rows.append(
            [name, f"{flop / 1e9:.0f}", f"{med['minisd']:.2f}", f"{med['diffusers']:.2f}"]
            + [f"{med['minisd'] / med['diffusers']:.2f}"]
            + [f"{gflops(flop, med[s]):.0f}" for s in ("minisd", "diffusers")]
            + [f"{m['rss_peak']:.0f}", f"{d['rss_peak']:.0f}"]
        )
    print("# ratio = minisd time / diffusers time; (act.) = peak RSS above the loaded model")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.record:
        head = ["case", "GFLOP", "minisd s", "diffusers s", "minisd / diffusers"]
        head += ["minisd GFLOP/s", "diffusers GFLOP/s", "minisd RSS MiB", "diffusers RSS MiB"]
        table = markdown_table(head, rows)
        title = "VAE: full-size SD VAE vs diffusers (CPU, float32)"
        note = f"Median of {reps} rep(s) per side, each side in its own subprocess."
        append_results(title, table, note)


if __name__ == "__main__":
    main()
