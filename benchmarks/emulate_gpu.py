"""The GPU code path on the CPU: device operations per forward, and float16 drift per layer.

    python benchmarks/emulate_gpu.py [--model FOLDER] [--size 64] [--what counts|drift|all]
                                     [--record]

Runs SD1.5-architecture components (random weights; a full-size folder is written to a
temporary directory unless --model names one) on ``tests/fake_cupy.py``, the CPU stand-in for
CuPy whose fused kernels are their C bodies compiled for the CPU (``tests/fake_kernels.py``).

counts  device operations per forward: ufunc and ``xp.<function>`` calls, copies, casts,
        reductions as CuPy runs them, fused kernels, allocations. On a GPU each is a launch
        (~10 us of host time), so these bound how fast a small-batch step can be before the
        GPU's own speed matters. CLIP ViT-L/14 (2 x 77 tokens), the UNet (CFG batch 2,
        size x size latents, attention unchunked as the pipeline's "auto" picks on a GPU), the
        VAE decoder (1 x 4 x size x size); float32 (float16 adds one cast per attention call).
drift   the UNet in float16 (the GPU default) through the GPU code path against NumPy float64,
        layer by layer: what float16 storage costs with float32 accumulation in every GEMM
        (the fake's float16 GEMMs sum in float32 and round once, as cuBLAS does), norm,
        softmax and activation kernel. Not covered: cuBLAS's summation order and CUDA's libm.
Counts and errors, not timings: the timings are bench_gpu.py's, on a GPU.
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


def cases(folder, fcp, size, dtype="float32"):
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


def counts(folder, size):
    rows = []
    with fake_cupy.installed() as fcp:
        for name, (run, shape) in cases(folder, fcp, size).items():
            fake_cupy.OPS.clear()
            start = time.perf_counter()
            run()
            ops = collections.Counter(fake_cupy.OPS)
            fused = sum(v for k, v in ops.items() if k.startswith("minisd_"))
            top = ", ".join(f"{k} {v}" for k, v in ops.most_common(4))
            total = sum(ops.values())
            rows.append([name, shape, str(total), str(total - ops["empty"]), str(fused), top])
            print(f"{name}: {total} operations ({time.perf_counter() - start:.0f} s on the CPU)")
    header = ["component", "input", "device ops", "without allocations", "fused kernels", "most"]
    note = (
        "Counted on tests/fake_cupy.py (no GPU): each operation is a kernel launch on a GPU "
        "(allocations excepted). float32, SD1.5 architecture, random weights."
    )
    return "GPU path: device operations per forward (counted, not timed)", header, rows, note


def drift(folder, size, worst=8):
    """UNet float16 on the emulated device vs NumPy float64, per layer."""
    from test_gpu import traced_unet

    from minisd_parity.compare import layer_table

    rng = np.random.default_rng(0)
    x, ctx, t = rng.standard_normal((2, 4, size, size)), rng.standard_normal((2, 77, 768)), 500
    ref_unet = minisd.UNet2DConditionModel.from_pretrained(folder / "unet", dtype="float64")
    ref = traced_unet(ref_unet, np, x, t, ctx)
    del ref_unet
    with fake_cupy.installed() as fcp:
        unet = minisd.UNet2DConditionModel.from_pretrained(folder / "unet", device="cuda")
        unet.attention_chunk_size = None
        assert unet.params["conv_in"]["weight"].dtype == np.float16
        dev = traced_unet(unet, fcp, x.astype(np.float16), t, ctx.astype(np.float16))
    table, _ = layer_table({k: np.asarray(v) for k, v in dev.items()}, ref, 5e-3)
    table.sort(key=lambda r: -np.nan_to_num(r[3], nan=np.inf))
    out = next(r for r in table if r[0] == "conv_out")
    rows = [[r[0], str(tuple(r[1])), f"{r[3]:.2e}", f"{r[4]:.9f}"] for r in [out] + table[:worst]]
    note = (
        f"UNet output (conv_out) and the {worst} worst of {len(table)} layers, relative "
        "max-abs error. float16 weights and activations through the GPU code path (fused "
        "kernels as their C bodies compiled for the CPU, float16 as _Float16) on "
        "tests/fake_cupy.py vs NumPy float64 on the same float16 weights. One float16 rounding "
        "is 4.9e-4 relative."
    )
    title = f"GPU path: float16 UNet vs float64 per layer, 2 x 4 x {size} x {size} (emulated)"
    return title, ["layer", "shape", "relative error", "cosine"], rows, note


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="full-size diffusers folder (default: write one)")
    p.add_argument("--size", type=int, default=64, help="latent size (64: 512x512 images)")
    p.add_argument("--what", choices=["counts", "drift", "all"], default="all")
    p.add_argument("--record", action="store_true", help="append the tables to RESULTS.md")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="minisd-emulate-") as tmp:
        folder = args.model or write_full_size_model(Path(tmp) / "sd15")
        jobs = {"counts": [counts], "drift": [drift], "all": [counts, drift]}[args.what]
        for job in jobs:
            title, header, rows, note = job(folder, args.size)
            table = markdown_table(header, rows)
            print("\n".join(table))
            if args.record:
                append_results(title, table, note)


if __name__ == "__main__":
    main()
