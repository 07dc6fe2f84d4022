"""The CuPy / GPU path (docs/gpu.md): backend parity, the float16 policy, the memory policy.

Three kinds of tests:
- parity on each array backend (the ``xp`` fixture: NumPy always, CuPy where a GPU exists):
  tiny CLIP, VAE, UNet and short pipeline runs on the device against minisd's NumPy float64
  result (itself held to 1e-10 against diffusers / transformers by the other test files), plus
  a per-layer CPU-vs-device drift table (``drift_report``);
- the same code on ``fake_cupy`` (a CPU stand-in as strict as CuPy about host/device mixing),
  so the device code path runs in CI without a GPU: results must be bit-identical to NumPy;
- the float16 precision policy and the GPU memory policy, checked on the CPU.
"""

from __future__ import annotations

import fake_cupy
import numpy as np
import pytest
from refharness import TOL, assert_rel, rel_err

import minisd
from minisd import backend, ops
from minisd.backend import to_numpy
from minisd_parity.compare import layer_table

# Float16 bounds (relative to the float64 result, random tiny weights; measured values are
# printed): one forward of a component ~1e-3 (float16 storage, eps 2^-11 = 4.9e-4), a 5-step
# pipeline up to ~2e-2 (errors grow through the sampler).
FP16_TOL = {"component": 5e-3, "pipeline": 3e-2}
# A device run of a whole pipeline differs from NumPy's by GEMM summation order, grown through
# the steps and the decoder. Not yet measured on a GPU (docs/gpu.md).
PIPE_TOL = {"float64": 1e-8, "float32": 2e-3}


@pytest.fixture(scope="session")
def tiny(ref_cache):
    """tiny(family) -> folder of a random tiny SD pipeline (weights_tools.make_tiny, seed 0)."""
    import weights_tools

    made = {}

    def get(family="sd1"):
        if family not in made:
            made[family] = ref_cache / f"gpu-tiny-{family}"
            weights_tools.make_tiny(made[family], family=family, seed=0)
        return made[family]

    return get


@pytest.fixture(scope="session")
def cpu_pipe(tiny):
    """cpu_pipe(family, dtype) -> a NumPy pipeline, loaded once."""
    cache = {}

    def get(family="sd1", dtype="float64"):
        if (family, dtype) not in cache:
            cache[family, dtype] = minisd.StableDiffusion.from_pretrained(tiny(family), dtype=dtype)
        return cache[family, dtype]

    return get


@pytest.fixture(scope="session")
def cpu64(cpu_pipe):
    """The NumPy float64 reference pipelines."""
    return lambda family="sd1": cpu_pipe(family, "float64")


def device_of(xp):
    return "cpu" if xp is np else "cuda"


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# --------------------------------------------------------------------------- drift report


def drift_report(ref_acts, dev_acts, tol, title="device vs cpu", limit=60):
    """Per-layer drift of traced device activations against a CPU reference trace: prints a
    table (layer, shape, max-abs, relative, cosine) and returns (rows, first layer over tol)."""
    ours = {k: to_numpy(v) for k, v in dev_acts.items()}
    rows, first = layer_table(ours, {k: to_numpy(v) for k, v in ref_acts.items()}, tol)
    worst = sorted(rows, key=lambda r: -np.nan_to_num(r[3], nan=np.inf))[:limit]
    print(f"\n== {title}: {len(rows)} layers, bound {tol:.0e}; worst {len(worst)} first")
    for name, shape, diff, rel, cos, ok in worst:
        mark = "  (not traced)" if ok is None else "" if ok else "  <-- over"
        print(f"{name:<60} {str(tuple(shape)):<18} {diff:10.2e} {rel:10.2e} {cos:.9f}{mark}")
    return rows, first


def traced_unet(unet, xp, x, t, ctx):
    with minisd.trace() as acts:
        unet(xp.asarray(x), t, xp.asarray(ctx))
    return acts


# --------------------------------------------------------------------------- backend parity


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_clip_parity(tiny, cpu64, xp, dtype):
    te = minisd.CLIPTextModel.from_pretrained(
        tiny("sd2") / "text_encoder", dtype=dtype, device=device_of(xp)
    )
    ref = cpu64("sd2").text_encoder
    ids = cpu64("sd2").tokenizer(["a photo of a cat", "two dogs"])  # (2, 77)
    out = te(xp.asarray(ids))
    assert type(out) is xp.ndarray and out.dtype == np.dtype(dtype)
    assert_rel(out, ref(ids), TOL[dtype], "last_hidden_state")
    assert_rel(te.encode(ids, clip_skip=1), ref.encode(ids, clip_skip=1), TOL[dtype], "skip")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_vae_parity(tiny, cpu64, xp, dtype):
    vae = minisd.AutoencoderKL.from_pretrained(
        tiny("sd1") / "vae", dtype=dtype, device=device_of(xp)
    )
    ref = cpu64("sd1").vae
    img, z = np.tanh(rand(1, 3, 48, 40)), rand(2, 4, 6, 5, seed=1)
    dist = vae.encode(xp.asarray(img.astype(dtype)))
    assert type(dist.mean) is xp.ndarray
    assert_rel(dist.mean, ref.encode(img).mean, TOL[dtype], "encode mean")
    assert_rel(dist.std, ref.encode(img).std, TOL[dtype], "encode std")
    assert_rel(vae.decode(xp.asarray(z.astype(dtype))), ref.decode(z), TOL[dtype], "decode")


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_parity_and_drift(tiny, cpu64, xp, family):
    """float32 on the backend vs NumPy float64, layer by layer (sd2: linear projections,
    upcast_attention); small attention chunks exercise the chunked path."""
    unet = minisd.UNet2DConditionModel.from_pretrained(
        tiny(family) / "unet", dtype="float32", device=device_of(xp)
    )
    unet.attention_chunk_size = 24
    x, ctx = rand(2, 4, 10, 12), rand(2, 77, 32, seed=1)
    t = xp.asarray(np.array([10, 900]))
    ref_acts = traced_unet(cpu64(family).unet, np, x, np.array([10, 900]), ctx)
    dev_acts = traced_unet(unet, xp, x.astype(np.float32), t, ctx.astype(np.float32))
    assert set(dev_acts) == set(ref_acts) and len(ref_acts) > 100
    assert all(type(v) is xp.ndarray for v in dev_acts.values())
    rows, first = drift_report(ref_acts, dev_acts, TOL["float32"], f"{family} unet float32")
    assert first is None, f"first layer over {TOL['float32']:.0e}: {first}"


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint", "pix2pix"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_pipeline_parity(tiny, cpu_pipe, xp, mode, dtype):
    """Seeds draw on the CPU and are uploaded, so the device run sees the same noise. The
    reference is NumPy in the same dtype: a float32 seed draws other numbers than a float64 one
    (as in torch), and the stochastic samplers here draw every step."""
    family = {"inpaint": "inpaint", "pix2pix": "instruct-pix2pix"}.get(mode, "sd1")
    pipe = minisd.StableDiffusion.from_pretrained(tiny(family), dtype=dtype, device=device_of(xp))
    kw = _pipe_kwargs(mode, scheduler="euler_a" if mode == "txt2img" else "ddim")
    out = pipe("a cat", **kw)
    ref = cpu_pipe(family, dtype)("a cat", **kw)
    assert out.shape == (1, 64, 64, 3)
    assert_rel(out, ref, PIPE_TOL[dtype], f"{mode} image")


def _pipe_kwargs(mode, scheduler="ddim", steps=3):
    kw = dict(num_inference_steps=steps, height=64, width=64, scheduler=scheduler, seed=3)
    kw.update(output_type="np", progress=False, eta=0.5)
    if mode != "txt2img":
        kw["image"] = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
        kw["strength"] = 0.75
    if mode == "pix2pix":  # InstructPix2Pix: three UNet rows per image
        kw["image_guidance_scale"] = 1.5
    if mode == "inpaint":
        kw["mask_image"] = (np.random.default_rng(1).random((64, 64)) > 0.5).astype(np.float32)
    return kw


# --------------------------------------------------------------------------- fake device


def test_fake_cupy_is_strict():
    """The stand-in rejects what CuPy rejects (so passing tests below mean something)."""
    with fake_cupy.installed() as fcp:
        d = fcp.asarray(np.ones(3))
        assert backend.array_module(d) is fcp and backend.get_xp("cuda") is fcp
        with pytest.raises(fake_cupy.HostDeviceMix):
            d + np.ones(3)
        with pytest.raises(fake_cupy.HostDeviceMix):
            fcp.concatenate([d, np.ones(3)])
        with pytest.raises(fake_cupy.HostDeviceMix):
            d[np.array([0, 1])]
        with pytest.raises(TypeError):
            np.concatenate([d, d])
        with pytest.raises(AttributeError):
            fcp.not_a_cupy_function  # noqa: B018
        assert type(d * np.float32(2)) is fake_cupy.DeviceArray  # numpy scalars are fine
        assert type(backend.to_numpy(d)) is np.ndarray


@pytest.mark.parametrize(
    "family,mode,scheduler",
    [
        ("sd1", "txt2img", "pndm"),
        ("sd1", "txt2img", "euler_a"),
        ("sd2", "txt2img", "dpmpp_2m_karras"),
        ("sd2", "txt2img", "heun"),
        ("sd1", "img2img", "plms"),
        ("sd1", "img2img", "unipc"),
        ("inpaint", "inpaint", "ddpm"),
        ("sd1", "inpaint", "lms"),
        ("instruct-pix2pix", "pix2pix", "euler_a"),
    ],
)
def test_device_path_on_fake_cupy(tiny, cpu64, family, mode, scheduler):
    """The whole pipeline with every array on the (fake) device: NumPy's result to round-off (the
    same code; BLAS may round differently on differently aligned copies), no host array ever
    mixed in, and a fixed number of device->host syncs whatever the number of steps."""
    ref = cpu64(family)("a cat", **_pipe_kwargs(mode, scheduler))
    syncs = []
    with fake_cupy.installed() as fcp:
        pipe = minisd.StableDiffusion.from_pretrained(tiny(family), dtype="float64", device="cuda")
        assert type(pipe.unet.params["conv_in"]["weight"]) is fcp.ndarray
        for steps in (2, 3):
            fake_cupy.SYNCS["count"] = 0
            out = pipe("a cat", **_pipe_kwargs(mode, scheduler, steps))
            syncs.append(fake_cupy.SYNCS["count"])
    assert type(out) is np.ndarray
    assert_rel(out, ref, 1e-12, f"{mode} {scheduler}")
    assert syncs[0] == syncs[1], f"device->host syncs grow with the steps: {syncs}"


def test_drift_report_on_fake_cupy(tiny, cpu64, capsys):
    with fake_cupy.installed() as fcp:
        unet = minisd.UNet2DConditionModel.from_pretrained(
            tiny("sd2") / "unet", dtype="float64", device="cuda"
        )
        x, ctx = rand(1, 4, 8, 8), rand(1, 77, 32, seed=1)
        dev = traced_unet(unet, fcp, x, 500, ctx)
        assert fake_cupy.SYNCS["count"] == 0  # a UNet forward never waits for the device
    ref = traced_unet(cpu64("sd2").unet, np, x, 500, ctx)
    rows, first = drift_report(ref, dev, TOL["float64"])
    assert first is None and len(rows) == len(ref) and max(r[3] for r in rows) < 1e-12
    printed = capsys.readouterr().out
    assert f"== device vs cpu: {len(ref)} layers" in printed and printed.count("\n") == 62


# --------------------------------------------------------------------------- float16 policy


def test_fp16_statistics_accumulate_in_float32():
    """Inputs whose float16 sums / scores overflow (max 65504): the results stay finite and
    match float64, which they could not if group/layer norm or attention accumulated in fp16."""
    x = (300 + rand(1, 8, 16, 16)).astype(np.float16)  # group sums ~ 2.4e5 > 65504
    w, b = np.ones(8, np.float16), np.zeros(8, np.float16)
    got = ops.group_norm(x, w, b, groups=2, eps=1e-5)
    want = ops.group_norm(x.astype(np.float64), w * 1.0, b * 1.0, groups=2, eps=1e-5)
    assert got.dtype == np.float16 and rel_err(got, want) < 2e-3
    y = (300 + rand(4, 1024)).astype(np.float16)
    got = ops.layer_norm(y, np.ones(1024, np.float16), np.zeros(1024, np.float16), eps=1e-5)
    assert rel_err(got, ops.layer_norm(y.astype(np.float64), 1.0, 0.0, eps=1e-5)) < 2e-3
    q, k, v = (np.full((1, 1, 4, 64), 40.0) + rand(1, 1, 4, 64, seed=i) for i in range(3))
    got = ops.attention(*(a.astype(np.float16) for a in (q, k, v)), scale=1.0)  # q.k ~ 1e5
    assert np.isfinite(got).all() and rel_err(got, ops.attention(q, k, v, scale=1.0)) < 2e-3


@pytest.mark.parametrize("family,upcast", [("sd1", False), ("sd2", True)])
def test_fp16_upcast_attention_respected(tiny, monkeypatch, family, upcast):
    seen = []
    real = ops.attention
    monkeypatch.setattr(
        ops, "attention", lambda *a, **kw: seen.append(kw["upcast"]) or real(*a, **kw)
    )
    unet = minisd.UNet2DConditionModel.from_pretrained(tiny(family) / "unet", dtype="float16")
    out = unet(rand(1, 4, 8, 8), 300, rand(1, 77, 32))
    assert out.dtype == np.float16 and seen and set(seen) == {upcast}


def test_fp16_components_vs_float64(tiny, cpu64):
    pipe = minisd.StableDiffusion.from_pretrained(tiny("sd2"), dtype="float16")
    ref = cpu64("sd2")
    ids = ref.tokenizer(["a photo of a cat"])
    x, ctx, z = rand(2, 4, 8, 8), rand(2, 77, 32, seed=1), rand(1, 4, 8, 8, seed=2)
    errs = {
        "clip": rel_err(pipe.text_encoder(ids), ref.text_encoder(ids)),
        "unet": rel_err(pipe.unet(x, 500, ctx), ref.unet(x, 500, ctx)),
        "vae encode": rel_err(
            pipe.vae.encode(np.tanh(x[:1, :3])).mean, ref.vae.encode(np.tanh(x[:1, :3])).mean
        ),
        "vae decode fp16": rel_err(pipe.vae.decode(z), ref.vae.decode(z)),
    }
    print({k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) <= FP16_TOL["component"], errs


@pytest.mark.parametrize("scheduler", ["pndm", "dpmpp_2m"])
def test_fp16_pipeline_vs_float64(tiny, cpu64, scheduler):
    """Same initial latents (float16 and float64 seeds draw different numbers, as in torch)."""
    pipe = minisd.StableDiffusion.from_pretrained(tiny("sd2"), dtype="float16")
    kw = dict(num_inference_steps=5, height=64, width=64, scheduler=scheduler, progress=False)
    kw.update(latents=rand(1, 4, 8, 8, seed=5), output_type="np")
    err = rel_err(pipe("a cat", **kw), cpu64("sd2")("a cat", **kw))
    print(f"fp16 {scheduler}: {err:.2e}")
    assert err <= FP16_TOL["pipeline"]


def test_vae_force_upcast(tiny, cpu64):
    """float16 weights decoded in float32 lose only the weights' own rounding: compared with a
    float64 decode of the same (float16-rounded) weights and latents."""
    pipe = minisd.StableDiffusion.from_pretrained(tiny("sd1"), dtype="float16")
    assert pipe.vae.config.force_upcast and pipe.vae.needs_upcast
    lat = (rand(1, 4, 8, 8) * pipe.vae.config.scaling_factor).astype(np.float16)
    exact = minisd.AutoencoderKL(pipe.vae.config, pipe.vae.params, dtype="float64")
    want = exact.decode(lat.astype(np.float64) / pipe.vae.config.scaling_factor)
    up = pipe.decode_latents(lat)  # "auto": float32
    pipe.upcast_vae = False
    half = pipe.decode_latents(lat)
    assert up.dtype == np.float32 and half.dtype == np.float16
    errs = rel_err(up, want), rel_err(half, want)
    print(f"VAE decode vs float64: upcast {errs[0]:.1e}, float16 {errs[1]:.1e}")
    assert errs[0] <= TOL["float32"] < errs[1]
    assert pipe.vae.dtype == np.float16  # the upcast copy is transient
    off = minisd.AutoencoderKL(
        dict(vars(pipe.vae.config), force_upcast=False), pipe.vae.params, dtype="float16"
    )
    assert not off.needs_upcast and not cpu64("sd1").vae.needs_upcast


def test_default_dtype_by_device(tiny):
    assert backend.default_dtype("cpu") == np.float32
    assert backend.default_dtype("cuda") == np.float16
    assert backend.resolve_device_dtype("float64", "cuda") == np.float64
    assert minisd.StableDiffusion.from_pretrained(tiny("sd1")).dtype == np.float32
    with fake_cupy.installed():
        pipe = minisd.StableDiffusion.from_pretrained(tiny("sd1"), device="cuda")
        assert pipe.dtype == np.float16 and pipe.unet.dtype == np.float16
        assert pipe.vae.dtype == np.float16 and pipe.text_encoder.dtype == np.float16
        for cls, sub in [
            (minisd.UNet2DConditionModel, "unet"),
            (minisd.AutoencoderKL, "vae"),
            (minisd.CLIPTextModel, "text_encoder"),
        ]:  # components on their own: the same default
            assert cls.from_pretrained(tiny("sd1") / sub, device="cuda").dtype == np.float16
            assert cls.from_pretrained(tiny("sd1") / sub).dtype == np.float32


# --------------------------------------------------------------------------- memory policy


def test_free_memory_and_info():
    assert backend.free_memory("cpu") == 0 and backend.memory_info("cpu") is None
    assert backend.device_info("cpu")["device"] == "cpu"
    with fake_cupy.installed(free=3 << 30, total=16 << 30) as fcp:
        assert backend.device_info("cuda") == {
            "device": "cuda:0",
            "name": "fake",
            "total_bytes": 16 << 30,
            "compute_capability": "0.0",
        }
        assert backend.free_memory("cuda") == 0
        assert fcp._pool.freed == 1 and fcp._pinned.freed == 1
        assert backend.memory_info("cuda") == (3 << 30, 16 << 30)


@pytest.mark.parametrize("setting", ["call", "attribute", "off"])
def test_free_memory_between_phases(tiny, setting):
    with fake_cupy.installed() as fcp:
        pipe = minisd.StableDiffusion.from_pretrained(tiny("sd1"), dtype="float32", device="cuda")
        kw = _pipe_kwargs("txt2img", steps=1)
        if setting == "call":
            pipe("a cat", free_memory_between_phases=True, **kw)
        else:
            pipe.free_memory_between_phases = setting == "attribute"
            pipe("a cat", **kw)
        want = 0 if setting == "off" else 3  # after text encoding, denoising and decoding
        assert fcp._pool.freed == want and fcp._pinned.freed == want


def test_attention_chunk_for():
    assert backend.attention_chunk_for(4096, 1000, 1e10) is None  # fits: no chunking
    assert backend.attention_chunk_for(4096, 1 << 20, 1 << 30) == 512  # 512 MiB budget
    assert backend.attention_chunk_for(4096, 1 << 30, 1 << 30) == 64  # never below 64


def test_attention_chunk_policy(tiny):
    """SD1 tiny at 128x128 px: 256 tokens, 4 heads, CFG batch 2, float32: a query row of the
    level-0 scores costs 2*4*256*(4+4) B = 16 KiB, the tile 4 MiB; half of 4 MiB free holds 128
    rows."""
    kw = dict(_pipe_kwargs("txt2img", steps=1), height=128, width=128)
    with fake_cupy.installed(free=4 << 20):
        pipe = minisd.StableDiffusion.from_pretrained(tiny("sd1"), dtype="float32", device="cuda")
        pipe("a cat", guidance_scale=7.5, **kw)
        assert pipe.unet.attention_chunk_size == 128
    with fake_cupy.installed(free=1 << 30):
        pipe("a cat", **kw)
        assert pipe.unet.attention_chunk_size is None  # the whole tile fits
        pipe.attention_chunk_size = 16  # explicit values are applied as given
        pipe("a cat", **kw)
        assert pipe.unet.attention_chunk_size == 16
    cpu = minisd.StableDiffusion.from_pretrained(tiny("sd1"))
    cpu("a cat", **kw)
    assert cpu.unet.attention_chunk_size == 1024  # "auto" leaves the CPU setting alone


# --------------------------------------------------------------------------- real GPU only


def test_device_info_on_gpu(xp):
    if xp is np:
        pytest.skip("GPU-only check")
    info = backend.device_info("cuda")
    assert info["name"] and info["total_bytes"] > 0
    free, total = backend.memory_info("cuda")
    assert 0 < free <= total
