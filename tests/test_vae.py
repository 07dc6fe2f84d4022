"""minisd.AutoencoderKL against diffusers' AutoencoderKL: every named module, encode (mean,
logvar) and decode, float64 (<= 1e-10) and float32 (<= 1e-4); loading (every key used, legacy
attention names, errors); DiagonalGaussian; tiled encode / decode."""

import json
import tracemalloc

import numpy as np
import pytest
from refharness import (
    TOL,
    assert_rel,
    collect_outputs,
    compare_traces,
    need,
    randomize_,
    save_pretrained,
    to_np,
    to_torch,
)

import minisd
from minisd.errors import ConfigError, InputError, WeightsError
from minisd.vae import AutoencoderKL, DiagonalGaussian
from minisd.weights import RecordingDict, save_file

DTYPES = ["float64", "float32"]
# name: (config, image shape, latent shape). Group counts 2/4/8, 2-4 blocks, batch 1-3,
# non-square and non-multiple-of-f images, a model without mid attention / quant convs.
TINY = {
    "2blocks-g4": (
        dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4),
        (2, 3, 24, 40),
        (2, 4, 5, 7),
    ),
    "3blocks-g2": (
        dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=2),
        (1, 3, 19, 26),
        (1, 4, 6, 3),
    ),
    "4blocks-g8": (
        dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
        (3, 3, 32, 48),
        (3, 4, 4, 6),
    ),
    "no-attn-no-quant": (
        dict(
            block_out_channels=(8, 16),
            norm_num_groups=8,
            latent_channels=3,
            mid_block_add_attention=False,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        (2, 3, 16, 24),
        (2, 3, 8, 12),
    ),
}
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    latent_channels=4,
    sample_size=512,
)
# Modules a forward hook sees but that have no output of their own: the SiLU module a ResNet
# block calls twice (the hook keeps the last call), and dropouts (identities at inference).
NOT_TRACED = (".nonlinearity", ".dropout", ".to_out.1")


def ref_model(cfg, dtype, seed=0):
    """diffusers' AutoencoderKL from a config dict, every parameter randomized."""
    torch, diffusers = need("torch", "diffusers")
    n = len(cfg["block_out_channels"])
    kinds = dict(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n
    )
    m = diffusers.AutoencoderKL(**kinds, **cfg).eval()
    m = m.double() if dtype == "float64" else m.float()
    return randomize_(m, seed)


def state_dict(m):
    return {k: to_np(v) for k, v in m.state_dict().items()}


def inputs(x_shape, z_shape, dtype, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, x_shape).astype(dtype)
    return x, rng.standard_normal(z_shape).astype(dtype)


def ref_run(m, x, z):
    """Reference encode and decode with a forward hook on every named module."""
    torch = need("torch")
    with torch.no_grad(), collect_outputs(m) as acts:
        dist = m.encode(to_torch(x)).latent_dist
        dec = m.decode(to_torch(z)).sample
    return acts, to_np(dist.mean), to_np(dist.logvar), to_np(dec)


def check_parity(vae, m, x, z, dtype):
    acts, mean, logvar, dec = ref_run(m, x, z)
    with minisd.trace() as ours:
        dist = vae.encode(x)
        out = vae.decode(z)
    names = [n for n in acts if not n.endswith(NOT_TRACED)]
    assert len(names) > 20
    compare_traces(ours, acts, TOL[dtype], names)
    assert dist.mean.dtype == np.dtype(dtype) and out.dtype == np.dtype(dtype)
    assert_rel(dist.mean, mean, TOL[dtype], "encode mean")
    assert_rel(dist.logvar, logvar, TOL[dtype], "encode logvar")
    assert_rel(out, dec, TOL[dtype], "decode")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(TINY))
def test_tiny_parity_from_pretrained(name, dtype, ref_cache):
    cfg, x_shape, z_shape = TINY[name]
    m = ref_model(cfg, dtype)
    folder = save_pretrained(m, ref_cache / f"vae-{name}-{dtype}")
    vae = AutoencoderKL.from_pretrained(folder, dtype=dtype)
    assert vae.config.block_out_channels == cfg["block_out_channels"]
    check_parity(vae, m, *inputs(x_shape, z_shape, dtype), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_size_sd_vae(dtype):
    """The SD 1.x/2.x VAE architecture (84M parameters) at 64x64 pixels, built in memory."""
    m = ref_model(SD_VAE, dtype)
    vae = AutoencoderKL(dict(m.config), state_dict(m))
    assert vae.config.vae_scale_factor == 8
    check_parity(vae, m, *inputs((1, 3, 64, 64), (1, 4, 8, 8), dtype), dtype)


def test_every_key_is_read():
    m = ref_model(TINY["3blocks-g2"][0], "float32")
    flat = state_dict(m)
    vae = AutoencoderKL(dict(m.config), flat)
    vae.params = RecordingDict(vae.params)
    x, z = inputs((1, 3, 16, 16), (1, 4, 4, 4), "float32")
    vae.decode(vae.encode(x).sample(rng=0))
    assert vae.params.reads == set(flat)


@pytest.mark.parametrize("kernel", ["linear", "conv1x1"])
def test_legacy_attention_names(kernel, tmp_path):
    """Older files: query/key/value/proj_attn, possibly as 1x1 conv kernels."""
    torch, diffusers = need("torch", "diffusers")
    m = ref_model(TINY["2blocks-g4"][0], "float32")
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    flat = {}
    for k, v in state_dict(m).items():
        for new, old in legacy.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                if kernel == "conv1x1" and v.ndim == 2:
                    v = v[:, :, None, None]  # (out, in, 1, 1)
        flat[k] = v
    assert any(".query.weight" in k for k in flat)
    m.save_config(tmp_path)
    save_file(flat, tmp_path / "diffusion_pytorch_model.safetensors")
    vae = AutoencoderKL.from_pretrained(tmp_path)
    modern = AutoencoderKL(dict(m.config), state_dict(m))
    x, z = inputs((1, 3, 16, 24), (1, 4, 3, 5), "float32")
    assert np.array_equal(vae.encode(x).mean, modern.encode(x).mean)
    assert np.array_equal(vae.decode(z), modern.decode(z))
    if kernel == "linear":  # diffusers renames these names on load, too
        ref = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            assert_rel(vae.decode(z), to_np(ref.decode(to_torch(z)).sample), TOL["float32"])


def test_load_errors(tmp_path):
    m = ref_model(TINY["2blocks-g4"][0], "float32")
    cfg, flat = dict(m.config), state_dict(m)
    with pytest.raises(WeightsError, match="decoder.conv_out.bias"):
        AutoencoderKL(cfg, {k: v for k, v in flat.items() if k != "decoder.conv_out.bias"})
    bad = dict(flat, **{"encoder.conv_in.weight": np.zeros((8, 3, 1, 1), np.float32)})
    with pytest.raises(WeightsError, match="encoder.conv_in.weight"):
        AutoencoderKL(cfg, bad)
    with pytest.raises(WeightsError, match="unexpected key 'extra.weight'"):
        AutoencoderKL(cfg, dict(flat, **{"extra.weight": np.zeros(1, np.float32)}))
    with pytest.raises(ConfigError, match="down_block_types"):
        AutoencoderKL(dict(cfg, down_block_types=["AttnDownEncoderBlock2D"] * 2), flat)
    with pytest.raises(ConfigError, match="norm_num_groups"):
        AutoencoderKL(dict(cfg, norm_num_groups=3), flat)
    for field, value in (("norm_num_groups", 0), ("scaling_factor", "0.18"), ("sample_size", -1)):
        with pytest.raises(ConfigError, match=f"vae.safetensors: {field}={value!r}"):
            AutoencoderKL(dict(cfg, **{field: value}), flat, source="vae.safetensors")
    with pytest.raises(WeightsError, match="no weights file"):
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        AutoencoderKL.from_pretrained(tmp_path)
    vae = AutoencoderKL(cfg, flat)
    with pytest.raises(InputError, match="encode"):
        vae.encode(np.zeros((1, 4, 8, 8), np.float32))
    f = vae.config.vae_scale_factor  # smaller images run out of pixels in the downsamplers
    assert vae.encode(np.zeros((1, 3, f, f + 1), np.float32)).mean.shape[2:] == (1, 1)
    with pytest.raises(InputError, match=f"{f - 1}x{f} pixels; needs >= {f}"):
        vae.encode(np.zeros((1, 3, f - 1, f), np.float32))
    with pytest.raises(InputError, match="decode"):
        vae.decode(np.zeros((1, 3, 8, 8), np.float32))


def test_config_and_pipeline_folder(ref_cache):
    m = ref_model(TINY["2blocks-g4"][0], "float32")
    save_pretrained(m, ref_cache / "pipe" / "vae")
    vae = AutoencoderKL.from_pretrained(ref_cache / "pipe", dtype="float64")  # finds vae/
    assert vae.config.scaling_factor == 0.18215 and vae.config.force_upcast is True
    assert vae.config.vae_scale_factor == 2 and vae.dtype == np.float64
    x, _ = inputs((3, 3, 8, 8), (1, 4, 1, 1), "float64")
    batched = vae.decode(vae.encode(x).mean)
    vae.enable_slicing()
    assert_rel(vae(x), batched, 1e-14, "slicing")


def test_diagonal_gaussian():
    torch = need("torch")
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.default_rng(0)
    moments = 25 * rng.standard_normal((2, 8, 3, 5))  # logvar beyond both clamps
    ours, ref = DiagonalGaussian(moments), DiagonalGaussianDistribution(to_torch(moments))
    assert ours.logvar.min() == -30.0 and ours.logvar.max() == 20.0
    for attr in ("mean", "logvar", "std", "var"):
        assert_rel(getattr(ours, attr), to_np(getattr(ref, attr)), 1e-15, attr)
    other = DiagonalGaussian(rng.standard_normal((2, 8, 3, 5)))
    ref_other = DiagonalGaussianDistribution(to_torch(other.parameters))
    assert_rel(ours.kl(), to_np(ref.kl()), 1e-14, "kl")
    assert_rel(ours.kl(other), to_np(ref.kl(ref_other)), 1e-14, "kl(other)")
    s = other.mean + 0.5
    assert_rel(ours.nll(s), to_np(ref.nll(to_torch(s))), 1e-14, "nll")
    noise = rng.standard_normal(ours.mean.shape)
    assert np.array_equal(ours.sample(noise=noise), ours.mean + ours.std * noise)
    ref_sample = to_np(ref.mean + ref.std * torch.from_numpy(noise))
    assert_rel(ours.sample(noise=noise), ref_sample, 1e-15, "sample")
    assert np.array_equal(ours.sample(rng=3), ours.sample(rng=np.random.default_rng(3)))
    assert not np.array_equal(ours.sample(rng=3), ours.sample(rng=4))

    class Ones:
        def randn(self, shape):
            return np.ones(shape)

    assert np.array_equal(ours.sample(Ones()), ours.mean + ours.std)
    assert np.array_equal(ours.mode(), ours.mean)
    assert np.array_equal(DiagonalGaussian(moments, deterministic=True).sample(0), ours.mean)
    with pytest.raises(InputError, match="noise"):
        ours.sample(noise=noise[:, :2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_matches_diffusers(dtype):
    """Tiles of 32 px / 8 latents, overlap 0.25, over images not a multiple of the tile."""
    torch = need("torch")
    m = ref_model(dict(TINY["3blocks-g2"][0], layers_per_block=1, sample_size=32), dtype)
    vae = AutoencoderKL(dict(m.config), state_dict(m))
    x, z = inputs((2, 3, 80, 72), (2, 4, 21, 13), dtype)
    plain = vae.decode(z)
    m.enable_tiling()
    vae.enable_tiling()
    with torch.no_grad():
        ref_dist = m.encode(to_torch(x)).latent_dist
        ref_dec = to_np(m.decode(to_torch(z)).sample)
    dist = vae.encode(x)
    assert_rel(dist.mean, to_np(ref_dist.mean), TOL[dtype], "tiled encode mean")
    assert_rel(dist.logvar, to_np(ref_dist.logvar), TOL[dtype], "tiled encode logvar")
    dec = vae.decode(z)
    assert_rel(dec, ref_dec, TOL[dtype], "tiled decode")
    assert np.array_equal(vae.tiled_decode(z), dec)
    assert np.array_equal(vae.tiled_encode(x).mean, dist.mean)
    assert rel_diff(dec, plain) > 1e-3  # tiling really happened
    small = z[:, :, :8, :8]  # not larger than a tile: the untiled path
    small_tiling_on = vae.decode(small)
    vae.disable_tiling()
    assert np.array_equal(small_tiling_on, vae.decode(small))


def test_trace_names_under_tiling():
    """A tiled encode / decode records the names an untiled one does (each tile in turn: the
    last tile's outputs stay, as forward hooks would keep them); no name loses its
    "encoder." / "decoder." prefix (bare "conv_out" overwrote the UNet's in a pipeline trace)."""
    m = ref_model(dict(TINY["3blocks-g2"][0], layers_per_block=1, sample_size=32), "float32")
    vae = AutoencoderKL(dict(m.config), state_dict(m))
    x, z = inputs((1, 3, 80, 72), (1, 4, 21, 13), "float32")
    names = {}
    for tiling in (False, True):
        vae.use_tiling = tiling
        with minisd.trace() as acts:
            vae.decode(z)
            vae.encode(x)
        names[tiling] = set(acts)
    assert names[True] == names[False]
    assert {"decoder", "post_quant_conv", "encoder", "quant_conv"} <= names[True]
    assert max(acts["decoder"].shape[2:]) <= 32  # one tile's output (the last, a border one)


def rel_diff(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
def test_tiled_1024_decode_close_to_untiled_and_smaller(capsys):
    """128x128 latents -> 1024^2 pixels with a tiny 4-block model (f = 8, SD's 512 px tiles):
    3x3 tiles, blend bands of 128 px at 384 and 768. Each tile has its own GroupNorm
    statistics and mid-block attention, so with random weights single pixels differ by a few
    percent everywhere; the mean difference away from the seams stays below 1e-2."""
    m = ref_model(
        dict(block_out_channels=(8, 8, 16, 16), norm_num_groups=4, sample_size=512), "float32"
    )
    vae = AutoencoderKL(dict(m.config), state_dict(m))
    z = np.random.default_rng(0).standard_normal((1, 4, 128, 128)).astype(np.float32)
    tracemalloc.start()
    try:
        full = vae.decode(z)
        peak_full = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        vae.enable_tiling()
        tiled = vae.decode(z)
        peak_tiled = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tiled.shape == full.shape == (1, 3, 1024, 1024)
    band = np.zeros(1024, bool)
    band[384:512] = band[768:896] = True
    inner = ~band[:, None] & ~band[None, :]  # (1024, 1024)
    diff = np.abs(tiled - full)[0].max(axis=0) / np.abs(full).max()  # (1024, 1024)
    with capsys.disabled():
        print(
            f"\n1024^2 tiled vs untiled: interior mean {diff[inner].mean():.2e} max "
            f"{diff[inner].max():.2e}; seams mean {diff[~inner].mean():.2e}; peak memory "
            f"untiled {peak_full / 2**20:.0f} MiB, tiled {peak_tiled / 2**20:.0f} MiB"
        )
    assert diff[inner].mean() < 1e-2
    assert diff[~inner].mean() < 2e-2
    assert peak_tiled < 0.7 * peak_full


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_with_torch_compatible_rng(dtype):
    """The posterior sample drawn as diffusers draws it (torch.randn in the moments' dtype)."""
    torch = need("torch")
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from minisd.rng import TorchGenerator

    moments = np.random.default_rng(9).standard_normal((2, 8, 5, 6)).astype(dtype)
    ref = DiagonalGaussianDistribution(to_torch(moments))
    expected = to_np(ref.sample(generator=torch.Generator().manual_seed(42)))
    got = DiagonalGaussian(moments).sample(TorchGenerator(42))
    assert got.dtype == np.dtype(dtype)
    assert_rel(got, expected, 1e-15 if dtype == "float64" else 1e-7, "posterior sample")


def test_backends_agree(xp):
    """The same code on NumPy and CuPy (the cupy case runs where a GPU exists)."""
    m = ref_model(dict(TINY["2blocks-g4"][0], sample_size=16), "float64")
    device = "cpu" if xp is np else "cuda"
    vae = AutoencoderKL(dict(m.config), state_dict(m), device=device)
    cpu = AutoencoderKL(dict(m.config), state_dict(m))
    x, z = inputs((2, 3, 24, 40), (2, 4, 13, 11), "float64")
    noise = np.random.default_rng(2).standard_normal((2, 4, 12, 20))
    dist = vae.encode(xp.asarray(x))
    assert_rel(dist.mean, cpu.encode(x).mean, TOL["float64"], "encode")
    assert_rel(dist.sample(noise=noise), cpu.encode(x).sample(noise=noise), 1e-10)
    vae.enable_tiling()
    cpu.enable_tiling()
    assert_rel(vae.decode(xp.asarray(z)), cpu.decode(z), TOL["float64"], "tiled decode")
