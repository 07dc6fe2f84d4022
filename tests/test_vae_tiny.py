"""minisd.AutoencoderTiny (TAESD) against diffusers' AutoencoderTiny: every named module, encode
and decode, float64 (<= 1e-10) and float32 (<= 1e-4), tiny variants and the default TAESD
architecture; diffusers' forward (8-bit latent round trip); the parameter table against
diffusers' state_dict; loading errors; backends; a Stable Diffusion pipeline with a TAESD VAE."""

import json

import numpy as np
import pytest
from pipelines import build
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
from minisd.vae_tiny import AutoencoderTiny, TinyVAEConfig, expected_shapes
from minisd.weights import RecordingDict, save_file

DTYPES = ["float64", "float32"]
# name: (config, image shape, latent shape). Odd and non-square sizes, batch 2-3, stages
# without blocks, upsampling by 3, every activation diffusers offers, 1-16 channels.
TINY = {
    "relu-4stages": (
        dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
             num_encoder_blocks=(1, 2, 1, 1), num_decoder_blocks=(1, 1, 2, 1)),
        (2, 3, 27, 33), (2, 4, 5, 7),
    ),
    "silu-x3-empty-stages": (
        dict(encoder_block_out_channels=(8,) * 3, decoder_block_out_channels=(12,) * 3,
             num_encoder_blocks=(1, 0, 2), num_decoder_blocks=(2, 0, 1), act_fn="silu",
             upsampling_scaling_factor=3, in_channels=1, out_channels=2, latent_channels=3),
        (3, 1, 16, 21), (3, 3, 4, 3),
    ),
    "gelu-16-latents": (
        dict(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(8, 8),
             num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), act_fn="gelu",
             latent_channels=16, latent_magnitude=2, latent_shift=0.25),
        (2, 3, 9, 12), (2, 16, 6, 5),
    ),
    "mish-swish": (
        dict(encoder_block_out_channels=(8,) * 2, decoder_block_out_channels=(8,) * 2,
             num_encoder_blocks=(2, 1), num_decoder_blocks=(1, 2), act_fn="Mish"),
        (2, 3, 8, 8), (2, 4, 4, 4),
    ),
}  # fmt: skip


def ref_model(cfg, dtype, seed=0):
    """diffusers' AutoencoderTiny from a config dict, every parameter randomized."""
    _, diffusers = need("torch", "diffusers")
    m = diffusers.AutoencoderTiny(**cfg).eval()
    m = m.double() if dtype == "float64" else m.float()
    return randomize_(m, seed)


def state_dict(m):
    return {k: to_np(v) for k, v in m.state_dict().items()}


def inputs(x_shape, z_shape, dtype, seed=1):
    """Images in [-1, 1]; latents of std 3, well into the tanh soft clamp's bend."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, x_shape).astype(dtype)
    return x, (3 * rng.standard_normal(z_shape)).astype(dtype)


def check_parity(vae, m, x, z, dtype):
    torch = need("torch")
    with torch.no_grad(), collect_outputs(m) as acts:
        lat = to_np(m.encode(to_torch(x)).latents)
        dec = to_np(m.decode(to_torch(z)).sample)
    with minisd.trace() as ours:
        got_lat = vae.encode(x)
        got_dec = vae.decode(z)
    assert len(acts) > 20
    compare_traces(ours, acts, TOL[dtype])  # every named module, nothing left out
    assert got_lat.dtype == got_dec.dtype == np.dtype(dtype)
    assert got_lat.shape == lat.shape and got_dec.shape == dec.shape
    return assert_rel(got_lat, lat, TOL[dtype], "encode"), assert_rel(got_dec, dec, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(TINY))
def test_tiny_parity_from_pretrained(name, dtype, ref_cache):
    cfg, x_shape, z_shape = TINY[name]
    m = ref_model(cfg, dtype)
    folder = save_pretrained(m, ref_cache / f"taesd-{name}-{dtype}")
    vae = AutoencoderTiny.from_pretrained(folder, dtype=dtype)
    assert vae.config.block_out_channels == m.config.block_out_channels
    check_parity(vae, m, *inputs(x_shape, z_shape, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_taesd_architecture(dtype, ref_cache):
    """diffusers' defaults are TAESD's (64 channels, 1-3-3-3 / 3-3-3-1 blocks, ReLU, f = 8):
    64x64 images, 8x8 latents, batch 2."""
    m = ref_model({}, dtype)
    vae = AutoencoderTiny.from_pretrained(save_pretrained(m, ref_cache / f"taesd-{dtype}"), dtype)
    cfg = vae.config
    assert (cfg.scaling_factor, cfg.shift_factor, cfg.vae_scale_factor) == (1.0, 0.0, 8)
    assert cfg.block_out_channels == (64,) * 4 and cfg.latent_channels == 4
    assert vae.needs_upcast is False and cfg.force_upcast is False
    check_parity(vae, m, *inputs((2, 3, 64, 64), (2, 4, 8, 8), dtype), dtype)


def test_forward_round_trips_8bit_latents():
    """__call__ as diffusers' forward: latents -> [0, 1] -> 255 levels (round half to even) ->
    back -> decode. float64 (diffusers divides the uint8 levels in torch's default dtype)."""
    torch = need("torch")
    cfg, x_shape, _ = TINY["gelu-16-latents"]
    m = ref_model(cfg, "float64")
    vae = AutoencoderTiny(dict(m.config), state_dict(m))
    x, z = inputs(x_shape, (2, 16, 3, 3), "float64")
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            expect = to_np(m(to_torch(x)).sample)
    finally:
        torch.set_default_dtype(saved)
    assert_rel(vae(x), expect, TOL["float64"], "forward")
    for fn in ("scale_latents", "unscale_latents"):  # 3 sigma latents pass both clamp ends
        assert_rel(getattr(vae, fn)(z), to_np(getattr(m, fn)(to_torch(z))), 1e-15, fn)
    assert vae.scale_latents(z).min() == 0 and vae.scale_latents(z).max() == 1


def test_quantize_latents_rounds_ties_to_even():
    """Latents that land exactly on n + 1/2 levels (magnitude 1/2, shift 0: level = 255 z)."""
    need("torch")
    cfg = dict(TINY["mish-swish"][0], latent_magnitude=0.5, latent_shift=0.0)
    m = ref_model(cfg, "float64")
    vae = AutoencoderTiny(dict(m.config), state_dict(m))
    z = (np.arange(255) + 0.5) / 255  # (255,)
    assert np.count_nonzero(z * 255 == np.arange(255) + 0.5) > 100  # exact ties
    levels = m.scale_latents(to_torch(z)).mul_(255).round_().byte()
    expect = to_np(m.unscale_latents(levels.double() / 255.0))
    assert np.array_equal(vae.quantize_latents(z), expect)


def _meta_model(cfg):
    torch, diffusers = need("torch", "diffusers")
    with torch.device("meta"):
        return diffusers.AutoencoderTiny(**cfg)


@pytest.mark.parametrize("cfg", [{}, dict(latent_channels=16)] + [c for c, *_ in TINY.values()])
def test_param_table_matches_diffusers(cfg):
    m = _meta_model(cfg)
    expect = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert expected_shapes(TinyVAEConfig.from_dict(dict(m.config))) == expect


def test_every_key_is_read():
    cfg, x_shape, z_shape = TINY["silu-x3-empty-stages"]
    m = ref_model(cfg, "float32")
    flat = state_dict(m)
    vae = AutoencoderTiny(dict(m.config), flat)
    vae.params = RecordingDict(vae.params)
    x, z = inputs(x_shape, z_shape, "float32")
    vae.decode(z)
    vae.encode(x)
    assert vae.params.reads == set(flat)


def test_slicing_upcast_lazy_and_export(ref_cache):
    cfg, x_shape, z_shape = TINY["relu-4stages"]
    m = ref_model(cfg, "float32")
    folder = save_pretrained(m, ref_cache / "pipe" / "vae")
    vae = AutoencoderTiny.from_pretrained(ref_cache / "pipe", dtype="float64")  # finds vae/
    x, z = inputs(x_shape, z_shape, "float64")
    lat, dec = vae.encode(x), vae.decode(z)
    vae.enable_slicing()
    assert_rel(vae.encode(x), lat, 1e-14, "sliced encode")
    assert_rel(vae.decode(z), dec, 1e-14, "sliced decode")
    half = AutoencoderTiny.from_pretrained(folder, dtype="float16", weights="lazy")
    assert half.needs_upcast is False and half.decode(z).dtype == np.float16
    up = half.upcast()
    assert up.dtype == np.float32 and set(up.params) == {"decoder"}
    rounded = {k: v.astype(np.float16).astype(np.float32) for k, v in state_dict(m).items()}
    expect = AutoencoderTiny(dict(m.config), rounded).decode(z.astype(np.float32))
    assert np.array_equal(up.decode(z), expect)
    assert minisd.AutoencoderTiny is AutoencoderTiny


def test_load_errors(tmp_path):
    cfg, *_ = TINY["relu-4stages"]
    m = ref_model(cfg, "float32")
    cfg, flat = dict(m.config), state_dict(m)
    with pytest.raises(WeightsError, match="v.st: missing key 'decoder.layers.0.bias'"):
        missing = {k: v for k, v in flat.items() if k != "decoder.layers.0.bias"}
        AutoencoderTiny(cfg, missing, source="v.st")
    bad = dict(flat, **{"encoder.layers.2.weight": np.zeros((8, 8, 1, 1), np.float32)})
    with pytest.raises(WeightsError, match=r"'encoder.layers.2.weight' has shape \(8, 8, 1, 1\)"):
        AutoencoderTiny(cfg, bad)
    with pytest.raises(WeightsError, match="unexpected key 'encoder.layers.2.bias'"):
        AutoencoderTiny(cfg, dict(flat, **{"encoder.layers.2.bias": np.zeros(8, np.float32)}))
    bad_configs = [
        ({"act_fn": "tanh"}, "act_fn='tanh'"),
        ({"upsample_fn": "bilinear"}, "upsample_fn='bilinear'"),
        ({"num_encoder_blocks": [1, 2]}, "num_encoder_blocks has 2 entries"),
        ({"num_decoder_blocks": [1, -1, 1, 1]}, "num_decoder_blocks=.*non-negative"),
        ({"encoder_block_out_channels": [8, 16, 16, 16]}, "encoder_block_out_channels=.*one"),
        ({"latent_channels": "4"}, "latent_channels='4'"),
        ({"decoder_block_out_channels": 8}, "decoder_block_out_channels=8"),
        ({"latent_magnitude": 0}, "latent_magnitude=0"),
        ({"scaling_factor": None}, "scaling_factor=None"),
        ({"_class_name": "AutoencoderKL"}, "_class_name='AutoencoderKL'"),
    ]
    for change, message in bad_configs:
        with pytest.raises(ConfigError, match=f"vae.safetensors: {message}"):
            AutoencoderTiny(dict(cfg, **change), flat, source="vae.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, act_fn="elu")))
    with pytest.raises(ConfigError, match=r"config.json: act_fn='elu'"):
        AutoencoderTiny.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="no weights file"):
        AutoencoderTiny.from_pretrained(tmp_path)
    save_file({k: v for k, v in flat.items() if k != "encoder.layers.9.bias"},
              tmp_path / "diffusion_pytorch_model.safetensors")  # fmt: skip
    with pytest.raises(WeightsError, match="safetensors: missing key 'encoder.layers.9.bias'"):
        AutoencoderTiny.from_pretrained(tmp_path)
    vae = AutoencoderTiny(cfg, flat)
    with pytest.raises(InputError, match=r"encode\(images\): expected shape \(N, 3, H, W\)"):
        vae.encode(np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"decode\(latents\)"):
        vae.decode(np.zeros((4, 8, 8), np.float32))
    assert vae.encode(np.zeros((1, 3, 1, 3), np.float32)).shape == (1, 4, 1, 1)


def test_backends_agree(xp):
    """The same code on NumPy and CuPy (the cupy case runs where a GPU exists); x3 upsampling
    takes the index path, x2 the broadcast one."""
    for name in ("silu-x3-empty-stages", "relu-4stages", "mish-swish"):
        cfg, x_shape, z_shape = TINY[name]
        m = ref_model(cfg, "float64")
        device = "cpu" if xp is np else "cuda"
        vae = AutoencoderTiny(dict(m.config), state_dict(m), device=device)
        cpu = AutoencoderTiny(dict(m.config), state_dict(m))
        x, z = inputs(x_shape, z_shape, "float64")
        assert_rel(vae.encode(xp.asarray(x)), cpu.encode(x), TOL["float64"], "encode")
        assert_rel(vae.decode(xp.asarray(z)), cpu.decode(z), TOL["float64"], "decode")
        assert_rel(vae(xp.asarray(x)), cpu(x), TOL["float64"], "round trip")


# --------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def tiny_pipes(tmp_path_factory):
    """(diffusers SD1 pipeline with a randomized AutoencoderTiny as vae, the minisd pipeline
    built from the same folder with our AutoencoderTiny, the folder of the diffusers one)."""
    diffusers = need("diffusers")
    root = tmp_path_factory.mktemp("taesd_pipe")
    base = build("sd1", root / "sd1")
    taesd = ref_model(dict(TINY["relu-4stages"][0], latent_channels=4), "float32", seed=5)
    ref = diffusers.StableDiffusionPipeline(**{**base.components, "vae": taesd})
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(str(root / "taesd"), safe_serialization=True)
    sd = minisd.StableDiffusion.from_pretrained(root / "sd1")
    vae = AutoencoderTiny.from_pretrained(root / "taesd" / "vae")
    parts = dict(tokenizer=sd.tokenizer, text_encoder=sd.text_encoder, unet=sd.unet)
    ours = minisd.StableDiffusion(**parts, vae=vae, scheduler_config=sd.scheduler_config)
    return ref, ours, root / "taesd"


def _ref_call(ref, **kw):
    torch, diffusers = need("torch", "diffusers")
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    if "seed" in kw:
        kw["generator"] = torch.Generator().manual_seed(kw.pop("seed"))
    with torch.no_grad():
        return ref(**kw).images


def test_pipeline_with_taesd_txt2img(tiny_pipes):
    """Fixed latents, DDIM, decoded by TAESD and post-processed to [0, 1] images."""
    ref, ours, _ = tiny_pipes
    assert ours.vae_scale_factor == ref.vae_scale_factor == 8
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    kw = dict(prompt=["a lighthouse", "a cat"], num_inference_steps=4, guidance_scale=6.0,
              height=64, width=64, output_type="np")  # fmt: skip
    expect = _ref_call(ref, latents=need("torch").from_numpy(latents), **kw)
    got = ours(**kw, latents=latents, scheduler="ddim", progress=False)
    assert got.shape == expect.shape == (2, 64, 64, 3)
    assert_rel(got, expect, 1e-4, "TAESD txt2img images")


def test_pipeline_with_taesd_img2img_same_seed(tiny_pipes):
    """diffusers' retrieve_latents takes an AutoencoderTiny's latents as they are and draws no
    noise for them; so does StableDiffusion.encode_image (the seed's draws stay in step)."""
    diffusers = need("diffusers")
    from PIL import Image

    ref, ours, _ = tiny_pipes
    i2i = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    i2i.set_progress_bar_config(disable=True)
    pixels = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    kw = dict(prompt="a cat", image=Image.fromarray(pixels), strength=0.6,
              num_inference_steps=5, guidance_scale=5.0, output_type="np")  # fmt: skip
    expect = _ref_call(i2i, seed=3, **kw)
    got = ours(**kw, seed=3, scheduler="ddim", progress=False)
    assert_rel(got, expect, 1e-4, "TAESD img2img")


def test_pipeline_folder_with_taesd_loads(tiny_pipes):
    _, ours, folder = tiny_pipes
    loaded = minisd.StableDiffusion.from_pretrained(folder)
    assert isinstance(loaded.vae, AutoencoderTiny)
