"""Shared benchmark helpers: timing, peak memory, GFLOP/s, machine description, RESULTS.md.

    from common import time_alternating, machine, append_results, peak_rss_of

Timings on a shared machine are noisy: compare variants within one run, alternating them
(``time_alternating``), and report medians and ratios rather than absolute numbers.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def time_alternating(fns, reps=5, warmup=1, inner=1, cpu_time=False):
    """Median and minimum seconds of each callable in ``fns`` ({name: fn}).

    Round robin: each round runs every variant ``warmup`` untimed times (so thread pools of the
    previous variant's library have gone idle and caches hold its data), then ``inner`` timed
    calls. ``cpu_time``: process CPU seconds instead of wall-clock; with every library on one
    thread this measures the work done, nearly independent of other load on the machine.
    Returns {name: {"median": s, "min": s, "times": [...]}}."""
    clock = time.process_time if cpu_time else time.perf_counter
    times = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            for _ in range(inner):
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
    return {k: {"median": _median(v), "min": min(v), "times": v} for k, v in times.items()}


def _median(v):
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def gflops(flop, seconds):
    """Throughput in GFLOP/s."""
    return flop / seconds / 1e9


def meta_flops(run):
    """FLOPs of ``run()`` as torch's FlopCounterMode counts them (convolutions, matmuls and
    attention products, 2 per multiply-add), on the meta device: ``run`` builds its torch model
    and inputs there, so nothing is allocated or computed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def conv2d_flop(n, cin, cout, ho, wo, kh, kw):
    """Multiply-adds of a direct convolution, counted as 2 FLOP each."""
    return 2 * n * cout * ho * wo * cin * kh * kw


def attention_flop(b, h, lq, lk, d):
    """q k^T and probs v: 2 GEMMs of 2*Lq*Lk*D FLOP per head (softmax not counted)."""
    return 4 * b * h * lq * lk * d


def peak_rss_of(code, env=None):
    """Run ``code`` in a fresh Python subprocess; return (peak RSS in bytes, stdout).

    Peak is the child's VmHWM read at exit (ru_maxrss of a child can include the parent's RSS at
    fork)."""
    probe = (
        "\nimport re as _re\n"
        "print('__VMHWM__', _re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code + probe],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    ).stdout
    kb = int(re.search(r"__VMHWM__ (\d+)", out)[1])
    return kb * 1024, out.split("__VMHWM__")[0]


def write_full_size_model(folder, family="sd1", seed=0):
    """A full-size diffusers pipeline folder of ``family`` (weights_tools.make_tiny's
    full_size_configs names: "sd1", "sdxl", ...) with random float16 weights, written tensor by
    tensor (one component in memory at a time). Returns the folder as a Path."""
    import numpy as np

    from weights_tools.folders import COMPONENTS, write_configs
    from weights_tools.keymaps import TEXT_MODEL_PREFIX
    from weights_tools.make_tiny import PARTS, random_tensor
    from weights_tools.schema import component_shapes
    from weights_tools.stream import write_tensors

    folder = Path(folder)
    configs = _full_size_folder_configs(family)
    for index, part in enumerate((*PARTS, "text_encoder_2")):
        if configs.get(part) is None:
            continue
        rng = np.random.default_rng([seed, index])
        prefix = TEXT_MODEL_PREFIX if part == "text_encoder_2" else ""  # as make_tiny writes it
        shapes = component_shapes(part, configs[part], prefix)
        items = [
            (k, "F16", s, random_tensor(k, s, rng, dtype=np.float16))
            for k, s in sorted(shapes.items())
        ]
        sub, name = COMPONENTS[part]
        write_tensors(folder / sub / name, items, metadata={"format": "pt"})
        del items
    write_configs(folder, configs)
    return folder


def _full_size_folder_configs(family):
    """full_size_configs(family) plus what a pipeline folder needs: model_index and the
    tokenizers' pad tokens (SD1.x pads with EOS; SDXL's second tokenizer with "!")."""
    from weights_tools import configs as C
    from weights_tools.make_tiny import full_size_configs
    from weights_tools.presets import sdxl_model_index

    configs = full_size_configs(family)
    sched = configs["scheduler"]["_class_name"]
    if "text_encoder_2" in configs:
        refiner = configs["text_encoder"] is None
        configs["model_index"] = sdxl_model_index(refiner, sched)
        configs["tokenizer"] = None if refiner else {"pad_token": "<|endoftext|>"}
        configs["tokenizer_2"] = {"pad_token": "!"}
    else:
        configs["model_index"] = C.model_index(sched)
        configs["tokenizer"] = {"pad_token": "<|endoftext|>"}
    return configs


def machine():
    """One line: CPU model, cores, memory, BLAS threads, Python and NumPy versions, load."""
    import numpy as np

    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", info)[1].strip()
        flags = re.search(r"flags\s*:\s*(.*)", info)[1].split()
        simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
        cpu = f"{cpu} ({simd})"
    except (OSError, TypeError):
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, TypeError):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}; Python {platform.python_version()}, "
        f"NumPy {np.__version__}; load average {load:.1f}"
    )


def append_results(title, table_lines, notes=None, path=RESULTS):
    """Append a dated section (title, machine line, markdown table, notes) to RESULTS.md."""
    path = Path(path)
    if not path.exists():
        path.write_text("# minisd benchmark results\n")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"\n## {title} ({stamp})\n", f"Machine: {machine()}\n", *table_lines]
    if notes:
        parts.append(f"\n{notes}\n")
    with path.open("a") as f:
        f.write("\n".join(parts) + "\n")


def markdown_table(header, rows):
    """Lines of a markdown table from a header list and row lists (values already strings)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines
