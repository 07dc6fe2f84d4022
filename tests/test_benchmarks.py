"""The GPU benchmark script stays runnable where no GPU is: its --dry-run writes a tiny model (SD1
or SDXL) and runs both workers (minisd, diffusers) on the CPU, through the same code as on a
GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from refharness import need

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_bench_gpu_dry_run(family):
    need("torch", "diffusers")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_gpu.py"),
            "--dry-run",
            "--family",
            family,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "| minisd |" in out and "| diffusers |" in out and "dry run OK" in out
    assert ("SDXL base" in out) == (family == "sdxl")
    err = float(out.split("max rel. difference ")[1].split()[0])
    assert err < 1e-4  # the same seed gives the same float32 image on both sides


def test_bench_gpu_refuses_without_a_gpu():
    from minisd.backend import cuda_available

    if cuda_available():
        pytest.skip("a GPU is present: the benchmark would run, not refuse")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "needs a GPU" in done.stderr
