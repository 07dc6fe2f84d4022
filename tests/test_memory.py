"""Bounded memory with float16 weights (issue 10): weights="eager" | "lazy" | "stream".

Lazy / streamed float16 weights cast to float32 when a layer reads them must give bit-identical
outputs to eagerly cast ones (float16 -> float32 is exact); the memory effect is measured in
subprocesses (VmHWM) with wide margins, never with timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minisd
import weights_tools
from minisd.errors import InputError
from minisd.weights import CastOnRead, load_file, prepare_weights, release_pages, save_file

MODES = ("eager", "lazy", "stream")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory):
    """A tiny random SD1 pipeline folder stored in float16."""
    d = tmp_path_factory.mktemp("mem")
    weights_tools.make_tiny(d / "f32", "sd1", seed=3)
    weights_tools.cast(d / "f32", d / "f16", "float16")
    return d / "f16"


def test_cast_on_read_semantics(tmp_path):
    rng = np.random.default_rng(0)
    flat = {
        "a.weight": rng.standard_normal((64, 300)).astype(np.float16),
        "a.bias": rng.standard_normal(64).astype(np.float16),
        "emb.position_ids": np.arange(77, dtype=np.int64)[None],
    }
    save_file(flat, tmp_path / "w.safetensors")
    for mode in ("lazy", "stream"):
        p = prepare_weights(load_file(tmp_path / "w.safetensors"), dtype="float32", weights=mode)
        assert isinstance(p, CastOnRead) and isinstance(p["a"], CastOnRead)
        raw = p.raw()
        assert raw["a.weight"].dtype == np.float16 and isinstance(raw["a.weight"], np.memmap)
        assert raw["a.bias"].dtype == np.float32  # vectors are cast once, at load
        w = p["a"]["weight"]
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, flat["a.weight"].astype(np.float32))
        assert p["emb"]["position_ids"].dtype == np.int64  # integer buffers as stored
        assert p.get("missing") is None
        assert p.release() == 2  # a.weight and position_ids are file-backed; a.bias is not
        np.testing.assert_array_equal(p["a"]["weight"], w)  # re-read from the file after release
    eager = prepare_weights(load_file(tmp_path / "w.safetensors"), dtype="float64")
    assert type(eager) is dict and eager["a"]["weight"].dtype == np.float64


def test_release_pages_never_touches_anonymous_memory():
    a = np.arange(100_000, dtype=np.float32)
    assert release_pages(a) is False
    assert release_pages(a[10:]) is False
    np.testing.assert_array_equal(a, np.arange(100_000, dtype=np.float32))


def test_bad_mode_names_the_argument(fp16_folder):
    with pytest.raises(InputError, match="weights="):
        minisd.UNet2DConditionModel.from_pretrained(fp16_folder / "unet", weights="mmap")
    with pytest.raises(InputError, match="weights="):
        minisd.StableDiffusion.from_pretrained(fp16_folder, weights="fp16")


def test_components_bit_identical(fp16_folder):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)  # (B, 4, h, w)
    ids = rng.integers(0, 49408, (2, 77))  # (B, 77)
    img = rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)  # (1, 3, H, W)
    outs = {}
    for mode in MODES:
        te = minisd.CLIPTextModel.from_pretrained(fp16_folder / "text_encoder", weights=mode)
        hidden, states = te(ids, output_hidden_states=True)
        ctx = hidden[:, :, :]  # (B, 77, D)
        unet = minisd.UNet2DConditionModel.from_pretrained(fp16_folder / "unet", weights=mode)
        eps = unet(x, 500, ctx)  # (B, 4, h, w)
        vae = minisd.AutoencoderKL.from_pretrained(fp16_folder / "vae", weights=mode)
        dec = vae.decode(x)  # (B, 3, 8h, 8w)
        mean = vae.encode(img).mean  # (1, 4, H/8, W/8)
        assert unet.dtype == te.dtype == vae.dtype == np.float32
        outs[mode] = [hidden, states[-2], eps, dec, mean]
    for mode in ("lazy", "stream"):
        for a, b in zip(outs["eager"], outs[mode]):
            assert a.dtype == b.dtype == np.float32
            np.testing.assert_array_equal(a, b)


def test_pipeline_bit_identical_and_releases(fp16_folder):
    images = {}
    for mode in MODES:
        pipe = minisd.StableDiffusion.from_pretrained(fp16_folder, dtype="float32", weights=mode)
        kw = dict(num_inference_steps=2, height=64, width=64, scheduler="ddim", seed=5)
        images[mode] = pipe("a red cube", output_type="np", progress=False, **kw)
        if mode != "eager":
            assert isinstance(pipe.unet.params, CastOnRead)
            assert pipe.unet.params.release() > 0  # the file-backed float16 tensors
    for mode in ("lazy", "stream"):
        np.testing.assert_array_equal(images["eager"], images[mode])


PROBE = """
import json, re, sys
import numpy as np
from minisd.weights import load_file, prepare_weights

def kib(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read())[1])

path, mode = sys.argv[1], sys.argv[2]
base = kib("VmRSS")
flat = load_file(path, dtype="float32" if mode == "eager" else None)
p = prepare_weights(flat, dtype="float32", weights=mode)
total = 0.0
for name in sorted(flat):
    w = p[name.split(".")[0]][name.split(".")[1]]
    total += float(w.sum())
    del w
print(json.dumps({"peak_mib": (kib("VmHWM") - base) / 1024, "total": total}))
"""


def test_peak_rss_by_mode(tmp_path):
    """8 float16 matrices of 16 MiB (128 MiB on disk), each read once as float32 (32 MiB):
    eager holds 256 MiB of float32 copies, lazy the 128 MiB of touched file pages plus one
    transient copy, stream one tensor's pages plus one copy."""
    rng = np.random.default_rng(0)
    m = rng.standard_normal((2048, 4096)).astype(np.float16)
    save_file({f"layer{i}.weight": m for i in range(8)}, tmp_path / "big.safetensors")
    del m
    res = {}
    for mode in MODES:
        cmd = [sys.executable, "-c", PROBE, str(tmp_path / "big.safetensors"), mode]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        res[mode] = json.loads(out.stdout)
    assert res["eager"]["total"] == res["lazy"]["total"] == res["stream"]["total"]
    assert res["eager"]["peak_mib"] > 240, res
    assert 120 < res["lazy"]["peak_mib"] < 200, res
    assert res["stream"]["peak_mib"] < 90, res
