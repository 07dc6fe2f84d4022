"""Peak memory of weights_tools conversions on a full-size SD1.5 single file (random weights).

    python benchmarks/bench_convert.py            # full size, fp16 (~2.1 GB file)
    python benchmarks/bench_convert.py --dtype fp32
    python benchmarks/bench_convert.py --quick    # SD1.5 topology at 1/4 width: seconds

Each command runs in a fresh subprocess; its peak resident set size (VmHWM, which includes
memory-mapped file pages while they are resident) is compared with the size of the largest
component (the UNet). Goal: peak RSS < 1.5x the largest component. The interpreter and numpy
alone take a baseline, reported separately.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from common import append_results, markdown_table  # noqa: E402

from weights_tools.make_tiny import full_size_configs, original_shapes, random_tensor  # noqa: E402
from weights_tools.stream import write_tensors  # noqa: E402

# Peak RSS of this process image: VmHWM (ru_maxrss would include the parent's RSS at fork, which
# Linux carries across exec).
CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import numpy, weights_tools as wt
def peak():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base = peak()
t = time.perf_counter()
{call}
print(json.dumps({{"seconds": time.perf_counter() - t, "baseline_kib": base, "peak_kib": peak()}}))
"""


def quick_configs():
    """SD1.5 topology (4 levels, 2 layers, 3 cross-attention levels) at a quarter of the width."""
    cfg = full_size_configs("sd1")
    cfg["unet"].update(block_out_channels=[80, 160, 320, 320], cross_attention_dim=192)
    cfg["vae"].update(block_out_channels=[32, 64, 128, 128])
    cfg["text_encoder"].update(hidden_size=192, intermediate_size=768, num_attention_heads=3)
    return cfg


def make_checkpoint(path, configs, tag):
    """An original-layout single file with random weights, written tensor by tensor."""
    dtype = {"F16": np.float16, "F32": np.float32}[tag]
    rng = np.random.default_rng(0)
    shapes = original_shapes(configs)
    items = [
        (k, tag, s, lambda k=k, s=s: random_tensor(k, s, rng, dtype))
        for k, s in sorted(shapes.items())
    ]
    write_tensors(path, items)
    unet = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("model.diffusion_model."))
    return unet * np.dtype(dtype).itemsize


def measure(call):
    code = CHILD.format(root=str(ROOT), call=call)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def record(results, unet_bytes, file_bytes, what):
    """Append the peak-memory table to RESULTS.md."""
    mib = 2**20
    rows = [
        [name, f"{r['seconds']:.1f}", f"{r['baseline_kib'] / 1024:.0f}"]
        + [f"{r['peak_kib'] / 1024:.0f}", f"{r['peak_kib'] * 1024 / unet_bytes:.2f}"]
        for name, r in results.items()
    ]
    head = ["command", "seconds", "baseline MiB", "peak RSS MiB", "peak / UNet"]
    note = (
        f"Single file {file_bytes / mib:.0f} MiB, UNet {unet_bytes / mib:.0f} MiB; each command "
        "in a fresh subprocess, peak = VmHWM (includes resident file pages). Goal < 1.5x UNet."
    )
    append_results(
        f"weights_tools conversions, peak memory ({what})", markdown_table(head, rows), note
    )


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="quarter-width model (seconds)")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--workdir", help="where to write the files (default: a temp folder)")
    ap.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = ap.parse_args()
    tag = {"fp16": "F16", "fp32": "F32"}[args.dtype]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        single = work / "sd15.safetensors"
        t = time.perf_counter()
        unet_bytes = make_checkpoint(
            single, quick_configs() if args.quick else full_size_configs("sd1"), tag
        )
        made = time.perf_counter() - t
        file_bytes = single.stat().st_size
        folder, back = str(work / "folder"), str(work / "back.safetensors")
        runs = {
            "to_diffusers": f"wt.to_diffusers({str(single)!r}, {folder!r})",
            "to_original": f"wt.to_original({folder!r}, {back!r})",
            "verify": f"assert wt.verify({str(single)!r}, {folder!r})['same']",
        }
        results = {name: measure(call) for name, call in runs.items()}
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    mib = 1024 * 1024
    cpu = platform.processor() or platform.machine()
    print(f"# bench_convert  {time.strftime('%Y-%m-%d')}  {platform.node()}  {cpu}")
    size = "quarter width" if args.quick else "full size"
    print(
        f"model: SD1.5 {size}, {args.dtype}; file {file_bytes / mib:.0f} MiB (written in "
        f"{made:.1f} s); largest component (UNet) {unet_bytes / mib:.0f} MiB"
    )
    head = f"{'command':<14} {'seconds':>8} {'baseline MiB':>13} {'peak RSS MiB':>13}"
    print(head + f" {'peak / UNet':>12} {'(peak - base) / UNet':>21}")
    for name, r in results.items():
        peak, base = r["peak_kib"] * 1024, r["baseline_kib"] * 1024
        print(
            f"{name:<14} {r['seconds']:8.1f} {base / mib:13.0f} {peak / mib:13.0f} "
            f"{peak / unet_bytes:12.2f} {(peak - base) / unet_bytes:21.2f}"
        )
    worst = max(r["peak_kib"] * 1024 for r in results.values()) / unet_bytes
    if args.record:
        record(results, unet_bytes, file_bytes, f"SD1.5 {size}, {args.dtype}")
    if args.quick:
        print("quick run: the interpreter baseline dominates; the goal is judged at full size")
        return 0
    print(
        f"goal peak < 1.5x largest component: {'met' if worst < 1.5 else 'NOT met'} ({worst:.2f}x)"
    )
    return 0 if worst < 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
