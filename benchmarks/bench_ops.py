"""minisd.ops against torch on the CPU: conv2d and attention at SD 512x512 UNet sizes.

    python benchmarks/bench_ops.py              # conv2d + attention, 5 alternating rounds
    python benchmarks/bench_ops.py --write      # also append a table to benchmarks/RESULTS.md
    python benchmarks/bench_ops.py --quick      # 2 rounds, smaller attention
    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_ops.py --threads 1 --cpu-time
                                                # work per call, robust to a busy machine

conv2d: N=2 (classifier-free guidance batch), 320->320 channels, 64x64, 3x3, padding 1 — the
UNet's first level, where ~30% of the convolution time goes. Attention: 2 x 8 heads, 4096 tokens,
40 dims per head (the same level's self-attention). Variants are run alternately in one process
and the median of the rounds is reported, with GFLOP/s and the ratio to torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import (  # noqa: E402
    append_results,
    attention_flop,
    conv2d_flop,
    gflops,
    machine,
    markdown_table,
    time_alternating,
)

from minisd import conv_fast, ops  # noqa: E402


def conv_variants(torch, n=2, c=320, hw=64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = (rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
    pads = (1, 1, 1, 1)
    fns = {
        "torch F.conv2d": lambda: torch.nn.functional.conv2d(tx, tw, tb, padding=1),
        "minisd conv2d": lambda: ops.conv2d(x, w, b, padding=1),
        "winograd F(4x4,3x3)": lambda: conv_fast.conv2d_winograd(x, w, b, pads=pads, m=4),
        "winograd F(2x2,3x3)": lambda: conv_fast.conv2d_winograd(x, w, b, pads=pads, m=2),
        "direct (shifted GEMM)": lambda: conv_fast.conv2d_direct(x, w, b, pads=pads),
        "conv2d_reference": lambda: ops.conv2d_reference(x, w, b, padding=1),
    }
    return fns, conv2d_flop(n, c, c, hw, hw, 3, 3), f"conv2d N={n} {c}->{c} {hw}x{hw} 3x3"


def attention_variants(torch, b=2, heads=8, tokens=4096, d=40):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((b, heads, tokens, d)).astype(np.float32) for _ in range(3))
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fns = {"torch SDPA": lambda: sdpa(tq, tk, tv)}
    for chunk in (None, 4096, 1024, 256):
        if chunk is None or chunk < tokens:
            name = f"minisd attention chunk={chunk}"
            fns[name] = lambda c=chunk: ops.attention(q, k, v, chunk_size=c)
    label = f"attention {b}x{heads} heads, {tokens} tokens, {d} dims"
    return fns, attention_flop(b, heads, tokens, tokens, d), label


def run(fns, flop, label, reps, cpu_time=False):
    res = time_alternating(fns, reps=reps, cpu_time=cpu_time)
    base = res[next(iter(fns))]["median"]
    rows = []
    print(f"\n{label}")
    for name, r in res.items():
        med = r["median"]
        rows.append(
            [name, f"{med * 1e3:.1f}", f"{r['min'] * 1e3:.1f}", f"{gflops(flop, med):.0f}",
             f"{med / base:.2f}"]
        )  # fmt: skip
        print(f"  {name:32s} {med * 1e3:8.1f} ms (min {r['min'] * 1e3:7.1f})  "
              f"{gflops(flop, med):5.0f} GFLOP/s  x{med / base:.2f} of torch")  # fmt: skip
    return [f"\n{label}\n"] + markdown_table(
        ["variant", "median ms", "min ms", "GFLOP/s", "time / torch"], rows
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="alternating rounds (median reported)")
    ap.add_argument("--quick", action="store_true", help="2 rounds, 1024-token attention")
    ap.add_argument("--write", action="store_true", help="append a table to RESULTS.md")
    ap.add_argument("--note", default="", help="note to add under the table")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--cpu-time", action="store_true", help="time CPU seconds (use 1 thread)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    reps = 2 if args.quick else args.reps
    print(machine())
    lines = run(*conv_variants(torch), reps, args.cpu_time)
    tokens = 1024 if args.quick else 4096
    lines += run(*attention_variants(torch, tokens=tokens), reps, args.cpu_time)
    if args.write:
        blas = os.environ.get("OPENBLAS_NUM_THREADS", "default")
        clock = "CPU time" if args.cpu_time else "wall-clock"
        note = (
            f"{reps} alternating rounds, {clock}, torch {torch.__version__} on {args.threads} "
            f"thread(s), OPENBLAS_NUM_THREADS={blas}. {args.note}"
        ).strip()
        append_results("ops: conv2d and attention vs torch (CPU, float32)", lines, note)


if __name__ == "__main__":
    main()
