"""FreeU (minisd/freeu.py) against diffusers' ``enable_freeu`` (utils/torch_utils.py apply_freeu /
fourier_filter, applied by UpBlock2D / CrossAttnUpBlock2D).

Reference precision island: diffusers' Fourier filter runs in float32 / complex64 in every model
dtype (float64 is cast down) and torch's CPU FFT (MKL) rounds differently from NumPy's pocketfft,
so the filter is held to FFT_TOL (measured <= 2.7e-7 relative, 1x1 to 64x64). In float64 UNet
runs the reference is then fed minisd's own filtered skips (as tests/test_unet.py feeds it
minisd's time_proj), and every layer and the output are held to 1e-10; without that feeding the
float64 output is held to FFT_TOL * 10 (measured ~1.5e-7). float32 runs use the reference's own
filter: every layer <= 1e-4.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pipelines import build
from refharness import TOL, assert_rel, diffusers_models, need, rand, rel_err, to_np, torch_dtype
from test_unet import TINY, compare_whole

import minisd
from minisd import freeu
from minisd.backend import to_numpy
from minisd.errors import InputError
from minisd.unet import UNet2DConditionModel

FFT_TOL = 1e-6  # float32 FFT rounding, torch (MKL) vs NumPy (pocketfft) / CuPy (cuFFT)
FACTORS = {  # (s1, s2, b1, b2)
    "sd15": (0.9, 0.2, 1.5, 1.6),  # FreeU's recommended values for SD1.5 ...
    "sd21": (0.9, 0.2, 1.4, 1.6),  # ... and SD2.1
    "skewed": (1.7, 0.3, 0.6, 2.2),  # every factor far from the others and from 1
}
MODELS = {**TINY, "nomid": {**TINY["sd1"], "mid_block_type": None}}
# case: (tiny model, factors, (h, w), timestep); batch 2. Stage sizes (up_blocks.0 / .1):
CASES = {
    "sd1_13x19": ("sd1", "sd15", (13, 19), 500),  # 4x5 / 7x10
    "sd2_12x20": ("sd2", "sd21", (12, 20), np.array([3, 900])),  # 3x5 / 6x10
    "sd1_9x16_skewed": ("sd1", "skewed", (9, 16), 999),  # 3x4 / 5x8
    "nomid_8x8": ("nomid", "skewed", (8, 8), 250),  # 2x2 / 4x4; the skip IS the backbone
}


@pytest.fixture(scope="module")
def tiny(ref_cache):
    return diffusers_models(ref_cache, "UNet2DConditionModel", MODELS, "freeu_unet", seed=1)


def _pair(tiny, name, dtype, factors):
    """(minisd UNet, diffusers copy), both in ``dtype`` with FreeU enabled."""
    ref, folder = tiny(name)
    ours = UNet2DConditionModel.from_pretrained(folder, dtype=dtype)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    ours.enable_freeu(*FACTORS[factors])
    ref.enable_freeu(*FACTORS[factors])
    return ours, ref


def _inputs(ours, case, dtype):
    torch = need("torch")
    _, _, (h, w), t = CASES[case]
    x = rand(2, 4, h, w).astype(dtype)
    ctx = rand(2, 7, ours.config.cross_attention_dim[0], seed=1).astype(dtype)
    tt = torch.from_numpy(t) if isinstance(t, np.ndarray) else t
    return [x, t, ctx], [torch.from_numpy(x), tt, torch.from_numpy(ctx)]


def _ref_filter(x, scale, *, dtype):
    torch = need("torch")
    from diffusers.utils.torch_utils import fourier_filter

    return to_np(fourier_filter(torch.from_numpy(x.astype(dtype)), threshold=1, scale=scale))


# --------------------------------------------------------------------------- the math


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 2, 2, 3), (2, 4, 4, 4), (2, 8, 13, 19),
                                   (1, 16, 64, 64), (2, 5, 17, 8)])  # fmt: skip
def test_fourier_filter_matches_diffusers(shape, dtype):
    x = rand(*shape, seed=3).astype(dtype)
    for scale in (0.9, 0.2, 1.7):
        ref = _ref_filter(x, scale, dtype=dtype)
        ours = freeu.fourier_filter(x, scale)
        assert ours.dtype == ref.dtype == np.dtype(dtype) and ours.shape == shape
        tol = 2.0**-10 if dtype == "float16" else FFT_TOL  # float16: one rounding of the result
        assert_rel(ours, ref, tol, f"fourier_filter {shape} {dtype} scale={scale}")


def test_fourier_filter_is_a_float32_island():
    """float64 in, float32 FFT inside (as diffusers): the result is the float32 input's, off
    the exact float64 filter by float32 FFT rounding."""
    x = rand(2, 8, 13, 19, seed=4)
    ours = freeu.fourier_filter(x, 0.9)
    assert np.array_equal(ours, freeu.fourier_filter(x.astype(np.float32), 0.9).astype(np.float64))
    f = np.fft.fftshift(np.fft.fft2(x.astype(np.float32).astype(np.float64)), axes=(-2, -1))
    f[..., 5:7, 8:10] *= float(np.float32(0.9))  # the centre box of a 13x19 spectrum
    exact = np.fft.ifft2(np.fft.ifftshift(f, axes=(-2, -1))).real
    assert 0 < rel_err(ours, exact) <= FFT_TOL
    assert 0 < rel_err(_ref_filter(x, 0.9, dtype="float64"), exact) <= FFT_TOL


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_apply_freeu_matches_diffusers_per_stage(dtype):
    """Stage i of FreeU(s1, s2, b1, b2) against diffusers' apply_freeu(resolution_idx=i): the
    backbone bit for bit, the skip within the FFT island; stages 2, 3 untouched."""
    torch = need("torch")
    from diffusers.utils.torch_utils import apply_freeu

    s1, s2, b1, b2 = FACTORS["skewed"]
    f = freeu.FreeU.checked(s1, s2, b1, b2)
    h, skip = rand(2, 7, 5, 6, seed=5).astype(dtype), rand(2, 3, 5, 6, seed=6).astype(dtype)
    for i in range(4):
        th, ts = torch.from_numpy(h.copy()), torch.from_numpy(skip.copy())
        rh, rs = (to_np(t) for t in apply_freeu(i, th, ts, s1=s1, s2=s2, b1=b1, b2=b2))
        kw = f.stage(i)
        if i >= 2:
            assert kw is None and np.array_equal(rh, h) and np.array_equal(rs, skip)
            continue
        oh, os_ = freeu.apply_freeu(h, skip, **kw)
        assert np.array_equal(oh, rh), f"stage {i}: backbone"
        assert oh.dtype == os_.dtype == np.dtype(dtype)
        tol = 2.0**-10 if dtype == "float16" else FFT_TOL
        assert_rel(os_, rs, tol, f"stage {i}: skip")
    assert np.array_equal(h, rand(2, 7, 5, 6, seed=5).astype(dtype))  # inputs not modified


# --------------------------------------------------------------------------- whole UNet


@pytest.mark.parametrize("case", list(CASES))
def test_every_layer_matches_diffusers_float32(tiny, case):
    name, factors, _, _ = CASES[case]
    ours, ref = _pair(tiny, name, "float32", factors)
    our_args, ref_args = _inputs(ours, case, "float32")
    errs = compare_whole(ours, ref, our_args, ref_args, "float32")
    assert len(errs) > 40


@pytest.mark.parametrize("case", list(CASES))
def test_every_layer_matches_diffusers_float64(tiny, case, monkeypatch):
    """The reference's float32 filter (the island) is replaced by minisd's results, after they
    are checked against it: then every layer matches to 1e-10. Unfed, the output to 1e-5."""
    torch = need("torch")
    from diffusers.utils import torch_utils

    name, factors, _, _ = CASES[case]
    ours, ref = _pair(tiny, name, "float64", factors)
    our_args, ref_args = _inputs(ours, case, "float64")
    filtered, filter_errs = [], []
    our_filter, ref_filter = freeu.fourier_filter, torch_utils.fourier_filter

    def record(x, scale, threshold=freeu.THRESHOLD):
        filtered.append(our_filter(x, scale, threshold))
        return filtered[-1]

    def feed(x, threshold, scale):
        mine = filtered[len(filter_errs)]
        filter_errs.append(rel_err(mine, to_np(ref_filter(x, threshold, scale))))
        return torch.from_numpy(mine)

    monkeypatch.setattr(freeu, "fourier_filter", record)
    monkeypatch.setattr(torch_utils, "fourier_filter", feed)
    errs = compare_whole(ours, ref, our_args, ref_args, "float64")
    assert len(errs) > 40
    n_layers = sum(ours.config.layers_per_block[-2:]) + 2  # resnets of up_blocks.0 and .1
    assert len(filtered) == len(filter_errs) == n_layers
    assert max(filter_errs) <= FFT_TOL, f"fourier_filter: {max(filter_errs):.2e}"
    monkeypatch.undo()
    with torch.no_grad():
        expect = to_np(ref(*ref_args).sample)
    assert_rel(ours(*our_args), expect, 10 * FFT_TOL, "unfed float64 output")


def test_disable_freeu_restores_the_default_bit_for_bit(tiny):
    _, folder = tiny("sd1")
    unet = UNet2DConditionModel.from_pretrained(folder, dtype="float64")
    args = rand(2, 4, 9, 12), np.array([10, 700]), rand(2, 5, 32, seed=1)
    with minisd.trace() as plain_acts:
        plain = unet(*args)
    unet.enable_freeu(*FACTORS["sd15"])
    with minisd.trace() as freeu_acts:
        changed = unet(*args)
    assert set(freeu_acts) == set(plain_acts)  # no new or missing trace names
    assert rel_err(changed, plain) > 0.1
    moved = {n for n in plain_acts if not np.array_equal(freeu_acts[n], plain_acts[n])}
    assert all(n.startswith(("up_blocks", "conv_norm_out", "conv_out")) for n in moved)
    assert {"up_blocks.0.resnets.0.norm1", "up_blocks.1.resnets.0", "conv_out"} <= moved
    unet.disable_freeu()
    assert unet.freeu is None and np.array_equal(unet(*args), plain)
    unet.disable_freeu()  # twice is fine, as in diffusers
    assert np.array_equal(
        UNet2DConditionModel.from_pretrained(folder, dtype="float64")(*args), plain
    )


def test_array_backend_matches_diffusers(tiny, xp):
    """FreeU on each array backend (NumPy; fake_cupy; CuPy where a GPU exists), float32."""
    torch = need("torch")
    ref, folder = tiny("sd2")
    ref = copy.deepcopy(ref)
    unet = UNet2DConditionModel.from_pretrained(
        folder, dtype="float32", device="cpu" if xp is np else "cuda"
    )
    ref.enable_freeu(*FACTORS["sd21"])
    unet.enable_freeu(*FACTORS["sd21"])
    x, ctx = rand(2, 4, 6, 10).astype(np.float32), rand(2, 5, 48, seed=1).astype(np.float32)
    out = unet(xp.asarray(x), xp.asarray(np.array([7, 700])), xp.asarray(ctx))
    assert isinstance(out, xp.ndarray)
    with torch.no_grad():
        r = ref(torch.from_numpy(x), torch.tensor([7, 700]), torch.from_numpy(ctx)).sample
    assert_rel(to_numpy(out), to_np(r), TOL["float32"], "output")
    skip = rand(2, 3, 7, 5, seed=2).astype(np.float32)
    dev = freeu.fourier_filter(xp.asarray(skip), 0.2)
    assert isinstance(dev, xp.ndarray) and dev.dtype == np.float32
    assert_rel(to_numpy(dev), _ref_filter(skip, 0.2, dtype="float32"), FFT_TOL, "filter")


# --------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("freeu_pipes") / "sd1"
    ref = build("sd1", folder)
    return ref, minisd.StableDiffusion.from_pretrained(folder)


def _ref_latents(ref, latents, **kw):
    """diffusers' pipeline with DDIM (as minisd's scheduler="ddim" builds it) -> latents."""
    torch, diffusers = need("torch", "diffusers")
    saved = ref.scheduler
    ref.scheduler = diffusers.DDIMScheduler.from_config(saved.config)
    try:
        with torch.no_grad():
            return ref(**kw, latents=torch.from_numpy(latents)).images.numpy()
    finally:
        ref.scheduler = saved


def test_pipeline_matches_diffusers(pipes):
    """StableDiffusion.enable_freeu against StableDiffusionPipeline.enable_freeu: the same fixed
    latents through DDIM with CFG give the same latents (float32, 1e-4); 80x96 images make
    odd stage sizes (3x3, 5x6)."""
    ref, ours = pipes
    latents = np.random.default_rng(0).standard_normal((2, 4, 10, 12)).astype(np.float32)
    kw = dict(prompt=["a lighthouse at dusk", "a cat"], negative_prompt=["blurry", ""],
              num_inference_steps=4, guidance_scale=6.0, height=80, width=96,
              output_type="latent")  # fmt: skip
    plain = ours(**kw, latents=latents, scheduler="ddim", progress=False)
    ref.enable_freeu(*FACTORS["sd15"])
    ours.enable_freeu(*FACTORS["sd15"])
    try:
        expect = _ref_latents(ref, latents, **kw)
        got = ours(**kw, latents=latents, scheduler="ddim", progress=False)
    finally:
        ref.disable_freeu()
        ours.disable_freeu()
    assert_rel(got, expect, 1e-4, "FreeU latents")
    assert rel_err(got, plain) > 1e-2  # FreeU did change the result
    assert np.array_equal(ours(**kw, latents=latents, scheduler="ddim", progress=False), plain)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "arg, value",
    [("s1", float("nan")), ("s2", float("inf")), ("b1", "1.5"), ("b2", None), ("s1", True),
     ("b2", 0), ("s2", 0.0), ("b1", np.array([1.5]))],
)  # fmt: skip
def test_bad_factors_name_the_argument(tiny, pipes, arg, value):
    _, folder = tiny("sd1")
    unet = UNet2DConditionModel.from_pretrained(folder)
    kw = dict(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    kw[arg] = value
    for model in (unet, pipes[1]):
        with pytest.raises(InputError, match=f"enable_freeu: {arg}="):
            model.enable_freeu(**kw)
    assert unet.freeu is None and pipes[1].unet.freeu is None  # nothing half-enabled


def test_numpy_scalars_and_negative_factors_are_accepted(tiny):
    _, folder = tiny("sd1")
    unet = UNet2DConditionModel.from_pretrained(folder)
    unet.enable_freeu(np.float32(0.9), np.float64(0.2), 2, -1.5)
    assert unet.freeu == freeu.FreeU(float(np.float32(0.9)), 0.2, 2.0, -1.5)
    assert unet.freeu.stage(0) == {"b": 2.0, "s": float(np.float32(0.9))}
    assert unet.freeu.stage(2) is None
