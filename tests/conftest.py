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


@pytest.fixture(params=["numpy", "fake_cupy", "cupy"])
def xp(request):
    """The array module under test: numpy; fake_cupy (tests/fake_cupy.py: the device code path
    on the CPU, as strict as CuPy about host/device mixing, with the CUDA kernels' bodies
    compiled for the CPU); cupy only where a GPU exists."""
    if request.param == "numpy":
        yield np
    elif request.param == "fake_cupy":
        import fake_cupy

        with fake_cupy.installed() as fcp:
            yield fcp
    elif not cuda_available():
        pytest.skip("CuPy backend: no GPU on this machine")
    else:
        import cupy

        yield cupy


@pytest.fixture(scope="session")
def ref_cache(tmp_path_factory):
    """A session-wide folder for reference models saved as safetensors."""
    return tmp_path_factory.mktemp("refmodels")


@pytest.fixture(scope="module")
def tiny_sd1_files(tmp_path_factory):
    """A weights_tools.make_tiny SD1 folder and its original-layout single file, built once per
    test module (some tests write next to them)."""
    import weights_tools as wt

    root = tmp_path_factory.mktemp("tiny_sd1")
    wt.make_tiny(root / "sd1", family="sd1", seed=0)
    wt.to_original(root / "sd1", root / "sd1.safetensors")
    return root / "sd1", root / "sd1.safetensors"
