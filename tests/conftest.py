"""Shared fixtures. Reference helpers live in refharness.py (importable from every test)."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

from minisd.backend import cuda_available  # noqa: E402

# MINISD_REQUIRE_REFERENCE=1 (set by .ci/run): missing torch/diffusers/transformers fail tests.
REQUIRE_REFERENCE = os.environ.get("MINISD_REQUIRE_REFERENCE") == "1"

BACKENDS = ["numpy"] + (["cupy"] if cuda_available() else [])


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """The array module under test: numpy always; cupy only where a GPU exists."""
    if request.param == "numpy":
        return np
    if not cuda_available():
        pytest.skip("CuPy backend: no GPU on this machine")
    import cupy

    return cupy


@pytest.fixture(scope="session")
def ref_cache(tmp_path_factory):
    """A session-wide folder for reference models saved as safetensors."""
    return tmp_path_factory.mktemp("refmodels")
