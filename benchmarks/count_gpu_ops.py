"""Device operations (kernel launches) per forward of the GPU path, counted without a GPU.

    python benchmarks/count_gpu_ops.py [--model FOLDER] [--size 64] [--record]

Runs SD1.5-architecture components (random weights; a full-size folder is written to a
temporary directory unless --model names one) on ``tests/fake_cupy.py``, the CPU stand-in for
CuPy, and counts its device operations: ufunc and ``xp.<function>`` calls, copies, casts,
reductions as CuPy runs them, fused kernels, allocations. On a GPU each costs a launch, ~10 us
of host time, so these counts bound how fast a small-batch step can be before the GPU's own
speed matters. Counts, not timings: the timings are bench_gpu.py's, on a GPU.
Cases: CLIP ViT-L/14 (2 x 77 tokens), the UNet (CFG batch 2, size x size latents), the VAE
decoder (1 x 4 x size x size). float32 by default (NumPy's float16 matmul is too slow to be
practical here); float16 adds one cast per attention call.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import fake_cupy  # noqa: E402
import numpy as np  # noqa: E402
from common import append_results, markdown_table, write_full_size_model  # noqa: E402

import minisd  # noqa: E402


def cases(folder, fcp, size, dtype):
    """name -> (callable, input description); each callable runs one forward on the device."""
    rng = np.random.default_rng(0)
    dev = lambda a: fcp.asarray(a.astype(dtype))  # noqa: E731
    load = dict(dtype=dtype, device="cuda")
    clip = minisd.CLIPTextModel.from_pretrained(folder / "text_encoder", **load)
    ids = fcp.asarray(rng.integers(0, 49408, (2, 77)))
    unet = minisd.UNet2DConditionModel.from_pretrained(folder / "unet", **load)
    unet.attention_chunk_size = None  # what the pipeline's "auto" picks on a GPU when it fits
    x, ctx = dev(rng.standard_normal((2, 4, size, size))), dev(rng.standard_normal((2, 77, 768)))
    t = fcp.asarray(np.array([500, 500]))
    vae = minisd.AutoencoderKL.from_pretrained(folder / "vae", **load)
    z = dev(rng.standard_normal((1, 4, size, size)))
    return {
        "CLIP text encoder": (lambda: clip(ids), "2 x 77 tokens"),
        "UNet": (lambda: unet(x, t, ctx), f"2 x 4 x {size} x {size}"),
        "VAE decode": (lambda: vae.decode(z), f"1 x 4 x {size} x {size}"),
    }


def count(folder, size, dtype):
    rows = []
    with fake_cupy.installed() as fcp:
        for name, (run, shape) in cases(folder, fcp, size, dtype).items():
            fake_cupy.OPS.clear()
            start = time.perf_counter()
            run()
            ops = collections.Counter(fake_cupy.OPS)
            fused = sum(v for k, v in ops.items() if k.startswith("minisd_"))
            top = ", ".join(f"{k} {v}" for k, v in ops.most_common(4))
            total = sum(ops.values())
            rows.append([name, shape, str(total), str(total - ops["empty"]), str(fused), top])
            print(f"{name}: {total} operations ({time.perf_counter() - start:.0f} s on the CPU)")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="full-size diffusers folder (default: write one)")
    p.add_argument("--size", type=int, default=64, help="latent size (64: 512x512 images)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="minisd-count-") as tmp:
        folder = args.model or write_full_size_model(Path(tmp) / "sd15")
        rows = count(folder, args.size, args.dtype)
    header = ["component", "input", "device ops", "without allocations", "fused kernels", "most"]
    table = markdown_table(header, rows)
    print("\n".join(table))
    if args.record:
        note = (
            "Counted on tests/fake_cupy.py (no GPU): each operation is a kernel launch on a GPU "
            f"(allocations excepted). {args.dtype}, SD1.5 architecture, random weights."
        )
        append_results("GPU path: device operations per forward (counted, not timed)", table, note)


if __name__ == "__main__":
    main()
