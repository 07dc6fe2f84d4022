"""CLIP text encoder: minisd vs transformers on the full-size ViT-L/14 (SD1.x), 2 x 77 tokens.

    python benchmarks/bench_clip.py            # ViT-L/14, float32, 7 alternating rounds
    python benchmarks/bench_clip.py --quick    # 3 rounds
    python benchmarks/bench_clip.py --results  # also append the table to RESULTS.md

Both models hold the same random weights (minisd's built from transformers' state dict, no
files); the input is a CFG-sized batch of two tokenized prompts. Reported: median and minimum
seconds per encode, and the ratio minisd / transformers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from common import (  # noqa: E402
    append_results,
    gflops,
    machine,
    markdown_table,
    meta_flops,
    time_alternating,
)

from minisd import CLIPTextModel, CLIPTokenizer  # noqa: E402

VIT_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, hidden_act="quick_gelu", eos_token_id=2, projection_dim=768,
)  # fmt: skip
PROMPTS = ["a photograph of an astronaut riding a horse", ""]


def build(dtype):
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    torch.manual_seed(0)
    with no_init_weights():
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**VIT_L)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02 if p.ndim > 1 else 0.1)
    ref = ref.to(getattr(torch, dtype))
    ours = CLIPTextModel.from_state_dict(
        {k: v.numpy() for k, v in ref.state_dict().items()}, VIT_L, source="benchmark"
    )
    return ref, ours


def count_flops():
    """FLOPs of one 2x77 encode, counted by torch on the meta device."""
    import torch
    import transformers

    def run():
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**VIT_L))
        model(torch.zeros((len(PROMPTS), 77), dtype=torch.long))

    return meta_flops(run)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--results", action="store_true", help="append to benchmarks/RESULTS.md")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    ref, ours = build(args.dtype)
    ids = CLIPTokenizer.from_pretrained(None)(PROMPTS)  # (2, 77)
    ids_t = torch.from_numpy(ids)
    err = np.abs(ours(ids) - ref(ids_t).last_hidden_state.detach().numpy()).max()

    def run_ref():
        with torch.no_grad():
            ref(ids_t)

    res = time_alternating({"minisd": lambda: ours(ids), "transformers": run_ref},
                           reps=3 if args.quick else 7)  # fmt: skip
    ratio = res["minisd"]["median"] / res["transformers"]["median"]
    flop = count_flops()
    rows = [
        [name, f"{r['median']:.3f}", f"{r['min']:.3f}", f"{gflops(flop, r['median']):.0f}"]
        for name, r in res.items()
    ] + [["ratio minisd / transformers", f"{ratio:.2f}", "", ""]]
    head = [f"CLIP ViT-L/14 2x77 {args.dtype} ({flop / 1e9:.1f} GFLOP)", "median s", "min s"]
    table = markdown_table([*head, "GFLOP/s"], rows)
    print(machine())
    print("\n".join(table))
    print(f"max |minisd - transformers| = {err:.2e}")
    if args.results:
        append_results("CLIP text encoder, ViT-L/14, 2x77", table)


if __name__ == "__main__":
    main()
