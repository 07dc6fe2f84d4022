"""What the examples share: the model to load (the random-weight demo model by default)."""

from __future__ import annotations

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
