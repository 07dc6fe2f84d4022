"""What the examples share: the model to load (the random-weight demo model by default)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a source checkout without installing


def model_or_demo(model, tmp):
    """``model`` if given, else the demo model (as ``minisd demo``: random weights, SD1
    architecture at a small size) written into the temporary folder ``tmp``."""
    if model is not None:
        return model
    from weights_tools import make_tiny

    folder = Path(tmp) / "demo"
    make_tiny(folder, family="sd1", seed=0)
    return folder


def parser(doc, *, steps, out):
    """The options the model-running examples share: --model, --prompt, --size, --steps, --out."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--model", help="diffusers folder or .safetensors (default: the demo model)")
    p.add_argument("--prompt", default="a lighthouse at dusk")
    p.add_argument("--size", type=int, default=128, help="image height and width (pixels)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--out", default=out)
    return p
