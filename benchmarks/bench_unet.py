"""Full-size SD1.5 UNet, minisd vs diffusers: float32, batch 2, 64x64 and 32x32 latents.

    python benchmarks/bench_unet.py            # 3 timed repetitions per side and size
    python benchmarks/bench_unet.py --quick    # 1 repetition, no warm-up (checks that it runs)
    python benchmarks/bench_unet.py --record   # also append the table to RESULTS.md

Both sides load the same random weights (one diffusers folder written at the start). For each
latent size, each side runs in its own worker subprocess (the minisd worker never imports
torch), so its peak RSS is its own; the parent alternates the workers' timed forwards (minisd,
diffusers, minisd, ...) and reports median seconds, the minisd/diffusers time ratio, effective
GFLOP/s (FLOPs counted by torch's FlopCounterMode on the meta device: convolutions, linear
layers and attention matmuls, 2 per multiply-add) and peak RSS. The outputs of the two sides
are compared too (relative error, a sanity check).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import append_results, gflops, machine, markdown_table, meta_flops  # noqa: E402

SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
BATCH, CTX_LEN, TIMESTEP = 2, 77, 500
SIDES = ("minisd", "diffusers")


def inputs(size):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, 4, size, size), dtype=np.float32)
    ctx = rng.standard_normal((BATCH, CTX_LEN, SD15["cross_attention_dim"]), dtype=np.float32)
    return x, ctx


def peak_rss_mib():
    """This process's peak resident set (VmHWM; ru_maxrss may include the parent at fork)."""
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 1024


# --------------------------------------------------------------------------- workers


def _load(side, folder):
    if side == "minisd":
        sys.path.insert(0, str(ROOT))
        from minisd import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(folder, dtype="float32")
        return lambda x, ctx: unet(x, TIMESTEP, ctx)
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32).eval()

    def run(x, ctx):
        with torch.inference_mode():
            return unet(torch.from_numpy(x), TIMESTEP, torch.from_numpy(ctx)).sample.numpy()

    return run


def worker(side, folder, size, out):
    """Load the UNet, then serve commands from stdin: "run" (one timed forward), "save" (write
    the last output to ``out``), "quit" (report peak RSS). Answers are JSON lines."""
    run = _load(side, folder)
    x, ctx = inputs(size)
    print(json.dumps({"ready": True, "rss_mib": peak_rss_mib()}), flush=True)
    y = None
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            t0 = time.perf_counter()
            y = run(x, ctx)
            print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
        elif cmd == "save":
            np.save(out, y)
            print(json.dumps({"saved": str(out)}), flush=True)
        elif cmd == "quit":
            print(json.dumps({"peak_rss_mib": peak_rss_mib()}), flush=True)
            return


class Worker:
    def __init__(self, side, folder, size, out):
        args = [sys.executable, __file__, "--worker", side, "--folder", str(folder)]
        args += ["--size", str(size), "--out", str(out)]
        self.side = side
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.loaded_rss = self.ask(None)["rss_mib"]

    def ask(self, cmd):
        if cmd is not None:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.side} worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self):
        rss = self.ask("quit")["peak_rss_mib"]
        self.proc.wait()
        return rss


# --------------------------------------------------------------------------- parent


def make_weights(folder):
    """Random SD1.5 UNet weights (diffusers' default init, seeded) as a diffusers folder."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(**SD15).save_pretrained(folder, safe_serialization=True)


def count_flops(size):
    """FLOPs of one batched forward, counted by torch on the meta device (no memory)."""
    import torch
    from diffusers import UNet2DConditionModel

    def run():
        unet = UNet2DConditionModel(**SD15)
        x = torch.empty(BATCH, 4, size, size)
        ctx = torch.empty(BATCH, CTX_LEN, SD15["cross_attention_dim"])
        unet(x, torch.full((BATCH,), TIMESTEP), ctx)

    return meta_flops(run)


def bench_size(folder, size, reps, warmup, tmp):
    workers = [Worker(side, folder, size, tmp / f"{side}_{size}.npy") for side in SIDES]
    times = {w.side: [] for w in workers}
    for _ in range(warmup):
        for w in workers:
            w.ask("run")
    for _ in range(reps):  # alternate: minisd, diffusers, minisd, ...
        for w in workers:
            times[w.side].append(w.ask("run")["seconds"])
    for w in workers:
        w.ask("save")
    rss = {w.side: w.close() for w in workers}
    a, b = (np.load(tmp / f"{s}_{size}.npy").astype(np.float64) for s in SIDES)
    err = float(np.abs(a - b).max() / np.abs(b).max())
    return {s: float(np.median(times[s])) for s in SIDES}, rss, err


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition, no warm-up")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.folder, args.size, args.out)
    reps, warmup = (1, 0) if args.quick else (args.reps, 1)
    print(machine(), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_unet_"))
    rows = []
    try:
        make_weights(tmp / "unet")
        for size in args.sizes:
            flop = count_flops(size)
            secs, rss, err = bench_size(tmp / "unet", size, reps, warmup, tmp)
            ratio = secs["minisd"] / secs["diffusers"]
            row = [f"{BATCH}x4x{size}x{size}", f"{flop / 1e9:.0f}"]
            for s in SIDES:
                row += [f"{secs[s]:.2f}", f"{gflops(flop, secs[s]):.0f}", f"{rss[s]:.0f}"]
            rows.append(row + [f"{ratio:.2f}", f"{err:.1e}"])
            print(
                f"{size}x{size}: "
                + ", ".join(f"{s} {secs[s]:.2f} s" for s in SIDES)
                + f", ratio minisd/diffusers {ratio:.2f}, rel. diff {err:.1e}",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    header = [
        "latents",
        "GFLOP",
        "minisd s",
        "minisd GFLOP/s",
        "minisd peak RSS MiB",
        "diffusers s",
        "diffusers GFLOP/s",
        "diffusers peak RSS MiB",
        "minisd/diffusers",
        "rel. diff",
    ]
    table = markdown_table(header, rows)
    print("\n".join(table))
    if args.record:
        note = f"median of {reps} alternating repetitions after {warmup} warm-up; float32."
        append_results("UNet SD1.5 forward, batch 2", table, note)


if __name__ == "__main__":
    main()
