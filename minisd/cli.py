"""The ``minisd`` command."""

from __future__ import annotations

import argparse
import sys


def build_parser():
    p = argparse.ArgumentParser(prog="minisd", description="Stable Diffusion in plain array code.")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("selfcheck", help="print the version and check the core ops")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in (None, "selfcheck"):
        from . import __version__, selfcheck

        print(f"minisd {__version__}: core ops self-check")
        return 0 if selfcheck.run() else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
