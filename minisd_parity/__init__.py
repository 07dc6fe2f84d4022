"""Parity tooling: run minisd and the Hugging Face reference side by side, layer by layer.

This package is a *development* tool: it imports torch, diffusers and transformers (the test
extra), which ``minisd`` itself never does. ``tests/refharness.py`` and ``minisd parity`` share it.
"""

from .compare import collect_outputs, first_tensor, layer_table, rel_err, text_model_names
from .report import run_parity

__all__ = [
    "collect_outputs",
    "first_tensor",
    "layer_table",
    "rel_err",
    "run_parity",
    "text_model_names",
]
