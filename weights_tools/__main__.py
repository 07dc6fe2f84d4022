"""``python -m weights_tools <command>``: see ``--help``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from minisd.errors import MinisdError

from .make_tiny import FAMILIES

DESCRIPTION = """\
Stable Diffusion checkpoint tools (numpy only; pickle files are never loaded).

commands:
  inspect PATH                  family (sd1, sd2, sd2-v, inpaint, sdxl, ...), layout, dtypes,
                                parameter counts per component, EMA / unused / unknown keys
  to-diffusers FILE OUT         original single file -> diffusers pipeline folder (SD1.x,
                                SD2.x, SDXL base / refiner)
  to-original FOLDER OUT        diffusers pipeline folder -> original single file
  cast PATH OUT --dtype D       fp32 / fp16 / bf16 (a file or a pipeline folder)
  verify A B                    same tensors? (any layouts: files or folders)
  make-tiny OUT                 small random pipeline folder (sd1, sd2, inpaint, sdxl, ...)
"""


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m weights_tools",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    c = sub.add_parser("inspect", help="describe a checkpoint file or folder")
    c.add_argument("path", help=".safetensors file or diffusers folder")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c = sub.add_parser("to-diffusers", help="original single file -> diffusers folder")
    c.add_argument("file", help="original-layout .safetensors checkpoint")
    c.add_argument("out", help="output folder (created)")
    c.add_argument("--config", help="diffusers folder whose configs/tokenizer/scheduler to use")
    c.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction", "sample"],
        help="needed for SD2.x: v-prediction (768-v) and epsilon (512-base) models have the same "
        "tensors; without it v_prediction is assumed, as diffusers does",
    )
    c.add_argument("--extract-ema", action="store_true", help="take the UNet's EMA weights")
    c.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast floats on the way")
    c = sub.add_parser("to-original", help="diffusers folder -> original single file")
    c.add_argument("folder")
    c.add_argument("out", help="output .safetensors file")
    c.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast floats on the way")
    c = sub.add_parser("cast", help="change the float dtype of a file or folder")
    c.add_argument("path")
    c.add_argument("out")
    c.add_argument("--dtype", required=True, choices=["fp32", "fp16", "bf16"])
    c = sub.add_parser("verify", help="compare the tensors of two checkpoints")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c = sub.add_parser("make-tiny", help="write a small random pipeline folder")
    c.add_argument("out")
    c.add_argument("--family", default="sd1", choices=list(FAMILIES))
    c.add_argument("--seed", type=int, default=0)
    return p


def run(args):
    import weights_tools as wt

    if args.command == "inspect":
        r = wt.inspect(args.path)
        print(json.dumps(r, indent=2, default=str) if args.json else wt.format_report(r))
        return 0
    if args.command == "to-diffusers":
        cfg = wt.to_diffusers(
            args.file,
            args.out,
            config=args.config,
            prediction_type=args.prediction_type,
            extract_ema=args.extract_ema,
            dtype=args.dtype,
        )
        print(f"wrote {args.out} ({cfg['family']}, configs from {cfg['source']})")
        return 0
    if args.command == "to-original":
        wt.to_original(args.folder, args.out, dtype=args.dtype)
        print(f"wrote {args.out}")
        return 0
    if args.command == "cast":
        r = wt.cast(args.path, args.out, args.dtype)
        print(f"wrote {args.out}: {r['cast']} of {r['tensors']} tensors cast to {args.dtype}")
        return 0
    if args.command == "verify":
        r = wt.verify(args.a, args.b)
        print(json.dumps(r, indent=2, default=str) if args.json else wt.format_verify(r))
        return 0 if r["same"] else 1
    wt.make_tiny(args.out, family=args.family, seed=args.seed)
    print(f"wrote {args.out} ({args.family}, seed {args.seed})")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
        try:
            return run(args)
        except MinisdError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
