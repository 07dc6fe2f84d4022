"""The fused CUDA kernels of minisd/gpu_kernels.py, without a GPU.

Their bodies run on the CPU through ``fake_cupy`` (``fake_kernels`` compiles each body with the
host C++ compiler, float16 as ``_Float16``): every op that uses one is compared with NumPy
float64, whole models with kernels against the float64 reference, and the fallback to the
array formulas is exercised. With nvcc installed, the source CuPy generates for each kernel
(cupy_codegen.py) is compiled as CUDA.
"""

from __future__ import annotations

import shutil
import subprocess

import cupy_codegen
import fake_cupy
import fake_kernels
import numpy as np
import pytest
from refharness import TOL, assert_rel, need_tool, rel_err, unavailable
from test_gpu import (  # noqa: F401 (fixtures)
    FP16_TOL,
    _pipe_kwargs,
    cpu64,
    cpu_pipe,
    drift_report,
    rand,
    tiny,
    traced_unet,
)

import minisd
from minisd import gpu_kernels, ops

# A result computed in float32 and rounded once to float32 / float16: half an ulp of the largest
# output, 2^-24 / 2^-11 relative (float16 measured 1.1e-4 to 2.8e-4); float32 has margin for
# libm's expf/erff (a few ulp) and the norms' float32 statistics on data of mean 40 (4.9e-7).
KERNEL_TOL = {"float32": 1e-6, "float16": 4.9e-4}
DTYPES = ["float16", "float32"]


@pytest.fixture
def _cxx():
    """The host C++ compiler that builds the kernels' bodies (fake_kernels.CXX): part of the
    reference toolchain of these checks, so missing it fails under MINISD_REQUIRE_REFERENCE=1."""
    need_tool("g++", "c++", what="the C++ compiler that builds the fake kernels' bodies")


needs_cxx = pytest.mark.usefixtures("_cxx")


def _ops_cases(rng):
    x = rng.standard_normal((2, 8, 6, 5)) * 3
    g = rng.standard_normal((2, 7, 16)) * 3
    w8, b8 = rng.standard_normal((2, 8))
    w16, b16 = rng.standard_normal((2, 16))
    return {
        "silu": (lambda o, x: o.silu(x), (x,)),
        "quick_gelu": (lambda o, x: o.quick_gelu(x), (x,)),
        "gelu": (lambda o, x: o.gelu(x), (x,)),
        "geglu": (lambda o, a, g: o.geglu(a, g), (g[..., ::-1], g)),
        "group_norm": (lambda o, x, w, b: o.group_norm(x, w, b, groups=4, eps=1e-5), (x, w8, b8)),
        "group_norm+silu": (
            lambda o, x, w, b: o.group_norm(x, w, b, groups=2, eps=1e-6, act="silu"),
            (x + 40, w8, b8),  # a large mean: the float32 statistics are two-pass
        ),
        "layer_norm": (lambda o, x, w, b: o.layer_norm(x, w, b, eps=1e-5), (g + 40, w16, b16)),
    }


# The kernels each op launches (the norms: CuPy's mean, then these two).
LAUNCHES = {"silu": {"silu"}, "quick_gelu": {"silu"}, "gelu": {"gelu"}, "geglu": {"geglu"}}
NORMS = {"sqdev", "norm_affine"}
LAUNCHES.update(dict.fromkeys(["group_norm", "group_norm+silu", "layer_norm"], NORMS))


@needs_cxx
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("op", list(_ops_cases(np.random.default_rng(0))))
def test_kernel_ops_vs_float64(op, dtype):
    """Each op on a float32/float16 device array runs one fused kernel (its name counted) and
    lands within one rounding of the float64 formula."""
    fn, args = _ops_cases(np.random.default_rng(0))[op]
    args = [a.astype(dtype) for a in args]  # float64 sees the same (rounded) inputs
    want = fn(ops, *(a.astype(np.float64) for a in args))
    with fake_cupy.installed() as fcp:
        dev = [fcp.asarray(a) for a in args]
        fake_cupy.OPS.clear()
        got = fn(ops, *dev)
        launched = [k for k in fake_cupy.OPS if k.startswith("minisd_")]
    assert type(got) is fake_cupy.DeviceArray and got.dtype == np.dtype(dtype)
    assert set(launched) == {f"minisd_{k}" for k in LAUNCHES[op]}, dict(fake_cupy.OPS)
    assert sum(fake_cupy.OPS.values()) == len(launched) + ("norm" in op), dict(fake_cupy.OPS)
    assert_rel(got, want, KERNEL_TOL[dtype], f"{op} {dtype} kernel")


@needs_cxx
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("chunk,mask", [(None, False), (5, False), (None, True), (4, True)])
def test_attention_softmax_kernel_vs_float64(dtype, chunk, mask):
    """Attention on the device: scores in float32, the softmax as max + two kernels, the
    probabilities in the model dtype; in one chunk (written straight into the output) or
    several, with an additive (causal) mask."""
    q, k, v = (rand(2, 3, 11, 8, seed=i) * 2 for i in range(3))
    m = np.triu(np.full((11, 11), -np.inf), 1) if mask else None
    want = ops.attention(q, k, v, mask=m)
    with fake_cupy.installed() as fcp:
        dq, dk, dv = (fcp.asarray(a.astype(dtype)) for a in (q, k, v))
        dm = None if m is None else fcp.asarray(m.astype(np.float32))
        fake_cupy.OPS.clear()
        got = ops.attention(dq, dk, dv, chunk_size=chunk, mask=dm)
        chunks = 1 if chunk is None else -(-11 // chunk)
        assert fake_cupy.OPS["minisd_expsum"] == fake_cupy.OPS["minisd_softmax_apply"] == chunks
        assert "exp" not in fake_cupy.OPS, dict(fake_cupy.OPS)
    assert type(got) is fake_cupy.DeviceArray and got.dtype == np.dtype(dtype)
    tol = {"float32": 2e-6, "float16": 2e-3}[dtype]  # float16: probabilities and v rounded
    assert_rel(got, want, tol, f"attention {dtype} chunk {chunk} mask {mask}")


@needs_cxx
def test_float64_and_disabled_take_the_array_formulas(monkeypatch):
    x = rand(3, 4, 5)
    with fake_cupy.installed() as fcp:
        ops.gelu(fcp.asarray(x))  # float64: the exact erf formula
        assert not [k for k in fake_cupy.OPS if k.startswith("minisd_")]
        monkeypatch.setattr(gpu_kernels, "ENABLED", False)
        y = ops.silu(fcp.asarray(x.astype(np.float32)))
        assert not [k for k in fake_cupy.OPS if k.startswith("minisd_")]
    assert_rel(y, ops.silu(x), TOL["float32"], "array silu")


def test_broken_kernel_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setitem(gpu_kernels.SOURCES, "gelu", ("T x", "T y", "y = not C;"))
    monkeypatch.setattr(gpu_kernels, "_kernels", {})
    monkeypatch.setattr(gpu_kernels, "_failed", set())
    x = rand(4, 6).astype(np.float32)
    with fake_cupy.installed() as fcp:
        with pytest.warns(RuntimeWarning, match="GPU kernel 'gelu' failed"):
            y1 = ops.gelu(fcp.asarray(x))
        y2 = ops.gelu(fcp.asarray(x))  # no second build attempt, no second warning
    assert len(gpu_kernels._failed) == 1
    for y in (y1, y2):
        assert_rel(y, ops.gelu(x.astype(np.float64)), TOL["float32"], "fallback gelu")


def test_out_of_memory_in_a_kernel_is_not_a_fallback(monkeypatch):
    """A kernel that runs out of device memory raises (the array code would need more), and is
    not marked failed."""

    class OutOfMemoryError(MemoryError):  # cupy.cuda.memory.OutOfMemoryError's name
        pass

    def oom(*args, **kw):
        raise OutOfMemoryError("out of memory allocating 1 GiB")

    monkeypatch.setattr(gpu_kernels, "_failed", set())
    with fake_cupy.installed() as fcp:
        monkeypatch.setattr(gpu_kernels, "_kernels", {(fcp, "silu"): oom})
        with pytest.raises(OutOfMemoryError):
            ops.silu(fcp.asarray(np.ones(4, np.float32)))
    assert not gpu_kernels._failed


@needs_cxx
def test_fake_kernel_is_as_strict_as_cupy():
    k = fake_kernels.ElementwiseKernel("T x, float32 m", "T y", "y = x + (T)m;", "k")
    np.testing.assert_array_equal(k(np.ones(3, np.float16), np.float32(2)), np.full(3, 3.0))
    with pytest.raises(TypeError, match="float64 array for a float32 parameter"):
        k(np.ones(3, np.float16), np.ones(3))
    with pytest.raises(TypeError, match="float32 array for a T parameter"):
        fake_kernels.ElementwiseKernel("T a, T b", "T y", "y = a;", "k2")(
            np.ones(2, np.float16), np.ones(2, np.float32)
        )


@needs_cxx
def test_fake_float16_matmul_accumulates_in_float32():
    """fake_cupy's float16 GEMMs: float32 sums rounded once, as cuBLAS and NumPy's own (slow)
    float16 matmul compute them; a float16 running sum would lose the small terms."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 5, 300)).astype(np.float16)
    b = rng.standard_normal((300, 4)).astype(np.float16)
    with fake_cupy.installed() as fcp:
        da, db = fcp.asarray(a), fcp.asarray(b)
        out = fcp.empty((3, 5, 4), dtype=np.float16)
        results = [da @ db, fcp.matmul(da, db), fcp.matmul(da, db, out=out)]
    assert np.shares_memory(np.asarray(results[2]), np.asarray(out))  # written in place
    exact = a.astype(np.float64) @ b.astype(np.float64)
    for r in results:
        assert r.dtype == np.float16
        np.testing.assert_allclose(np.asarray(r, np.float64), exact, rtol=2e-3, atol=2e-3)
        slow = np.matmul(a, b)  # NumPy's float16 matmul: the same sums in another order
        assert np.all(np.abs(np.asarray(r) - slow) <= np.spacing(np.abs(slow)))  # <= 1 ulp
    ones = np.full((1, 4096), 0.01, np.float16)
    assert float(fake_cupy._matmul(ones, np.ones((4096, 1), np.float16))[0, 0]) == 40.96875


def test_unet_with_kernels_vs_float64(tiny, cpu64):  # noqa: F811 (fixtures of test_gpu)
    """A float32 UNet on the (fake) device, kernels in every norm and activation: each layer
    within the float32 bound of the NumPy float64 reference."""
    x, ctx = rand(2, 4, 8, 10), rand(2, 77, 32, seed=1)
    ref = traced_unet(cpu64("sd2").unet, np, x, 500, ctx)
    with fake_cupy.installed() as fcp:
        unet = minisd.UNet2DConditionModel.from_pretrained(
            tiny("sd2") / "unet", dtype="float32", device="cuda"
        )
        dev = traced_unet(unet, fcp, x.astype(np.float32), 500, ctx.astype(np.float32))
        assert fake_cupy.OPS["minisd_norm_affine"] > 10 and fake_cupy.OPS["minisd_geglu"] > 0
    rows, first = drift_report(ref, dev, TOL["float32"], "unet float32 with GPU kernels")
    assert first is None, first


@needs_cxx
def test_fp16_components_with_kernels_vs_float64(tiny, cpu64):  # noqa: F811
    """float16 CLIP, UNet and VAE on the (fake) device with every kernel, against float64: the
    documented component bound, as NumPy's float16 path (test_gpu.test_fp16_components...)."""
    ref = cpu64("sd2")
    ids = ref.tokenizer(["a photo of a cat"])
    x, ctx, z = rand(2, 4, 8, 8), rand(2, 77, 32, seed=1), rand(1, 4, 8, 8, seed=2)
    with fake_cupy.installed() as fcp:
        pipe = minisd.StableDiffusion.from_pretrained(tiny("sd2"), device="cuda")
        h = lambda a: fcp.asarray(a.astype(np.float16))  # noqa: E731
        got = {
            "clip": pipe.text_encoder(fcp.asarray(ids)),
            "unet": pipe.unet(h(x), 500, h(ctx)),
            "vae decode": pipe.vae.decode(h(z)),
        }
    want = {"clip": ref.text_encoder(ids), "unet": ref.unet(x, 500, ctx)}
    want["vae decode"] = ref.vae.decode(z)
    errs = {k: rel_err(got[k], want[k]) for k in got}
    print({k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) <= FP16_TOL["component"], errs


@needs_cxx
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_fp16_pipeline_with_kernels_vs_float64(tiny, cpu64, family):  # noqa: F811
    """float16 weights and activations end to end on the (fake) device (the GPU default), a
    kernel in every norm and activation: within the float16 pipeline bound of float64, for the
    same initial latents (float16 and float64 seeds draw different numbers, as in torch)."""
    kw = dict(num_inference_steps=5, height=64, width=64, scheduler="pndm", progress=False)
    kw.update(output_type="np")
    latents = rand(1, 4, 8, 8, seed=5)
    ref = cpu64(family)("a cat", latents=latents, **kw)
    with fake_cupy.installed() as fcp:
        pipe = minisd.StableDiffusion.from_pretrained(tiny(family), device="cuda")
        assert pipe.unet.params["conv_in"]["weight"].dtype == np.float16
        out = pipe("a cat", latents=fcp.asarray(latents.astype(np.float16)), **kw)
        used = {k for k in fake_cupy.OPS if k.startswith("minisd_")}
    unused = {"sd1": {"minisd_gelu"}, "sd2": set()}[family]  # SD1's CLIP: quick_gelu (silu)
    every = {f"minisd_{k}" for k in [*gpu_kernels.SOURCES, *gpu_kernels.REDUCTIONS]}
    assert used == every - unused, used
    err = assert_rel(out, ref, FP16_TOL["pipeline"], f"{family} float16 pipeline, kernels")
    print(f"{family} float16 pipeline with kernels: {err:.2e}")


@needs_cxx
def test_fp16_sdxl_with_kernels_vs_float64(tiny, cpu64):  # noqa: F811
    """SDXL base in float16 on the (fake) device, the GPU default: two text encoders, the
    micro-conditioning embedding, float32 VAE decode (force_upcast), every kernel; within the
    float16 pipeline bound of float64 for the same initial latents."""
    kw = dict(num_inference_steps=5, height=64, width=64, scheduler="euler", progress=False)
    kw.update(output_type="np", negative_prompt="blurry")
    latents = rand(1, 4, 8, 8, seed=6)
    ref = cpu64("sdxl")("a cat", latents=latents, **kw)
    with fake_cupy.installed() as fcp:
        pipe = minisd.StableDiffusion.from_pretrained(tiny("sdxl"), device="cuda")
        assert type(pipe).__name__ == "StableDiffusionXL"
        assert pipe.text_encoder_2.text_projection["weight"].dtype == np.float16
        out = pipe("a cat", latents=fcp.asarray(latents.astype(np.float16)), **kw)
        assert fake_cupy.OPS["minisd_norm_affine"] > 0 and fake_cupy.OPS["minisd_gelu"] > 0
    err = assert_rel(out, ref, FP16_TOL["pipeline"], "sdxl float16 pipeline, kernels")
    print(f"sdxl float16 pipeline with kernels: {err:.2e}")


@needs_cxx
@pytest.mark.parametrize("family,mode", [("sd1", "img2img"), ("inpaint", "inpaint")])
def test_float32_img2img_inpaint_with_kernels(tiny, cpu_pipe, family, mode):  # noqa: F811
    """img2img and inpainting (the VAE encoder, masks, a 9-channel UNet) in float32 on the
    (fake) device with every kernel, against NumPy float32, at the float32 bound 1e-4
    (measured 6e-6 and 8e-6: expf/erff kernels vs the CPU's exp2/A&S erf, im2col vs Winograd)."""
    kw = _pipe_kwargs(mode, "ddim", steps=3)
    ref = cpu_pipe(family, "float32")("a cat", **kw)
    with fake_cupy.installed():
        pipe = minisd.StableDiffusion.from_pretrained(tiny(family), dtype="float32", device="cuda")
        out = pipe("a cat", **kw)
        assert fake_cupy.OPS["minisd_norm_affine"] > 0 and fake_cupy.OPS["minisd_softmax_apply"]
    err = assert_rel(out, ref, TOL["float32"], f"{mode} float32 with kernels")
    print(f"{mode} float32 with kernels vs NumPy: {err:.2e}")


@needs_cxx
def test_device_operations_do_not_grow_with_image_size(tiny):  # noqa: F811
    """Kernel launches per forward are a property of the architecture, not of the image size
    (the CPU's cache-sized chunking made them grow with the pixels: ~3000 per VAE convolution
    at 512x512); and fused kernels do the norms' and activations' elementwise work."""
    counts = {}
    with fake_cupy.installed() as fcp:
        unet = minisd.UNet2DConditionModel.from_pretrained(
            tiny("sd1") / "unet", dtype="float32", device="cuda"
        )
        unet.attention_chunk_size = None
        vae = minisd.AutoencoderKL.from_pretrained(
            tiny("sd1") / "vae", dtype="float32", device="cuda"
        )
        ctx = fcp.asarray(rand(2, 77, 32).astype(np.float32))
        for size in (16, 48):  # (8: the 1x1 lowest level needs fewer copies)
            fake_cupy.OPS.clear()
            unet(fcp.asarray(rand(2, 4, size, size).astype(np.float32)), 500, ctx)
            vae.decode(fcp.asarray(rand(1, 4, size, size).astype(np.float32)))
            counts[size] = dict(fake_cupy.OPS)
    assert counts[16] == counts[48], (counts[16], counts[48])
    ops_ = counts[48]  # exp, divide: once each, in the sinusoidal timestep embedding
    assert ops_.get("exp") == ops_.get("divide") == 1 and not {"sqrt", "where"} & set(ops_), ops_
    assert ops_["minisd_norm_affine"] == ops_["mean"] > 20 and ops_["minisd_silu"] > 10


@needs_cxx
def test_selfcheck_on_the_device(capsys, monkeypatch):
    """`minisd selfcheck --device cuda` on the (fake) device: every case within 1e-5 of
    float64 and every kernel built; a kernel that falls back fails the check by name."""
    from minisd import cli, selfcheck

    monkeypatch.setattr(gpu_kernels, "_kernels", {})
    monkeypatch.setattr(gpu_kernels, "_failed", set())
    with fake_cupy.installed():
        assert cli.main(["selfcheck", "--device", "cuda"]) == 0
        out = capsys.readouterr().out
        assert "GPU: fake (CuPy ?)" in out and "every one built" in out
        assert out.count(" ok") == 4 + len(selfcheck._device_cases(np.random.default_rng(0)))
        monkeypatch.setitem(gpu_kernels.SOURCES, "silu", ("T x, float32 alpha", "T y", "y = ?;"))
        monkeypatch.setattr(gpu_kernels, "_kernels", {})
        with pytest.warns(RuntimeWarning, match="'silu' failed"):
            assert not selfcheck.run_device("cuda")
    assert "FAIL: fell back for silu" in capsys.readouterr().out


@pytest.mark.skipif(
    shutil.which("nvcc") is None,
    reason="no CUDA compiler (nvcc): optional (.ci/run does not install it)",
)
@pytest.mark.parametrize("name", [*gpu_kernels.SOURCES, *gpu_kernels.REDUCTIONS])
def test_cupy_kernel_sources_compile(name, tmp_path):
    """The exact source CuPy would build for each kernel (its own code generators, run without
    a GPU; T = float16 and float32), compiled by nvcc for sm_90 against CuPy's headers: what
    the first call on a GPU compiles, checked here."""
    try:
        if name in gpu_kernels.REDUCTIONS:
            spec, make = gpu_kernels.REDUCTIONS[name], cupy_codegen.reduction_source
        else:
            spec, make = gpu_kernels.SOURCES[name], cupy_codegen.elementwise_source
        sources = {t: make(name, spec, t) for t in DTYPES}
        include = cupy_codegen.include_dir()
    except cupy_codegen.CodegenUnavailable as err:  # CuPy is a test dependency (.[test])
        unavailable(str(err))
    for tname, src in sources.items():
        path = tmp_path / f"{name}{tname}.cu"
        path.write_text(src)
        cmd = ["nvcc", "-ptx", "-arch=sm_90", "-I", include, str(path), "-o", f"{path}.ptx"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr + src
        assert f"minisd_{name}" in src or name in src
