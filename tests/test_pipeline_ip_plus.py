"""IP-Adapter Plus in the pipelines (minisd/pipeline_ip.py) against diffusers' StableDiffusion
and StableDiffusionXL pipelines after ``load_ip_adapter`` over the same files, float32: a tiny
randomized CLIPVisionModelWithProjection (image_encoder/, 17 hidden-state tokens of width 16) and
a random Plus adapter in h94's layout (tests/test_ip_adapter_plus.py's plus_state_dict: a
Resampler with 5 queries and two 64-wide heads), next to the tiny SD1 pipeline and the tiny SDXL
base. diffusers encodes the image with ``output_hidden_states=True`` (hidden_states[-2]) and the
unconditional rows from an all-zeros input, as minisd must."""

import numpy as np
import pytest
from pipelines import build
from pipelines_xl import build as build_xl
from refharness import assert_rel, need, randomize_
from test_ip_adapter import adapter_state_dict
from test_ip_adapter_plus import plus_state_dict
from test_pipeline import PROMPTS, TOL, _image, _run_ref
from test_pipeline_ip import VISION

import minisd
from minisd.errors import WeightsError
from minisd.pipeline_xl import StableDiffusionXL
from minisd.weights import flatten, save_file

WEIGHTS = "ip-adapter-plus_sd15.safetensors"
WEIGHTS_XL = "ip-adapter-plus_sdxl_vit-h.safetensors"
BASE = "ip-adapter_sd15.safetensors"  # a base adapter for the same UNet, to switch kinds
SCALE = 0.7


def _encoder(folder, seed=9, **cfg):
    torch, transformers = need("torch", "transformers")
    torch.manual_seed(0)
    enc = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**{**VISION, **cfg})
    )
    randomize_(enc, seed=seed).eval().save_pretrained(str(folder))


def _load(ref, ours, folder, weights):
    ref.load_ip_adapter(str(folder), subfolder="", weight_name=weights)
    ref.set_ip_adapter_scale(SCALE)
    ours.load_ip_adapter(folder / weights, folder / "image_encoder", scale=SCALE)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(diffusers SD pipeline with the Plus adapter, folder, minisd with it, minisd UNet params
    before loading as {key: copy})."""
    folder = tmp_path_factory.mktemp("ip_plus") / "sd1"
    ref = build("sd1", folder)
    _encoder(folder / "image_encoder")
    save_file(plus_state_dict(ref.unet, seed=2, width=VISION["hidden_size"]), folder / WEIGHTS)
    save_file(adapter_state_dict(ref.unet, seed=3, embed_dim=VISION["projection_dim"]),
              folder / BASE)  # fmt: skip
    ours = minisd.StableDiffusion.from_pretrained(folder)
    before = {k: np.array(v, copy=True) for k, v in flatten(ours.unet.params).items()}
    _load(ref, ours, folder, WEIGHTS)
    return ref, folder, ours, before


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(diffusers SDXL pipeline with a Plus adapter (2048-wide tokens in SDXL; 24 here), folder,
    minisd with it)."""
    folder = tmp_path_factory.mktemp("xl_ip_plus") / "base"
    ref, _ = build_xl("base", folder)
    _encoder(folder / "image_encoder", seed=11)
    save_file(plus_state_dict(ref.unet, seed=4, width=VISION["hidden_size"], heads=1),
              folder / WEIGHTS_XL)  # fmt: skip
    ours = StableDiffusionXL.from_pretrained(folder)
    _load(ref, ours, folder, WEIGHTS_XL)
    return ref, folder, ours


def _args(**kw):
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    args = dict(prompt=PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=2,
                guidance_scale=6.0, latents=latents, output_type="latent")  # fmt: skip
    return {**args, **kw}


def _same(ref, ours, what, scheduler="ddim", **kw):
    expect = _run_ref(ref, scheduler, **kw)
    expect = expect if isinstance(expect, np.ndarray) else expect.numpy()
    got = ours(**kw, scheduler=scheduler, progress=False)
    err = assert_rel(got, expect, TOL, what)
    print(f"{what}: rel. error {err:.2e}")
    return got


@pytest.mark.parametrize("kw", [dict(), dict(guidance_scale=1.0)])  # CFG; no CFG: no uncond rows
def test_sd1_same_latents(sd1, kw):
    ref, _, ours, _ = sd1
    args = _args(**kw)
    got = _same(ref, ours, f"SD1 IP-Adapter Plus {kw}", ip_adapter_image=_image(50, 70, seed=4),
                **args)  # fmt: skip
    other = ours(**args, ip_adapter_image=_image(40, 40, seed=5), scheduler="ddim", progress=False)
    assert np.abs(other - got).max() > 1e-3 * np.abs(got).max()  # the image prompt matters


def test_sd1_two_images_per_prompt_seeded(sd1):
    """[[a, b]]: two images seen by every prompt (10 image tokens), 2 images per prompt, a
    stochastic sampler seeded as diffusers."""
    ref, _, ours, _ = sd1
    images = [[_image(64, 48, seed=1), _image(33, 65, seed=2)]]
    args = dict(prompt=PROMPTS, num_inference_steps=2, guidance_scale=5.0,
                num_images_per_prompt=2, output_type="latent", seed=3)  # fmt: skip
    _same(ref, ours, "SD1 IP-Adapter Plus, two images, seeded", "euler_a",
          ip_adapter_image=images, **args)  # fmt: skip


def test_sd1_unload_and_switch_kinds(sd1):
    """unload restores the UNet bit for bit; a base adapter replaces the Plus one (and back)."""
    ref, folder, ours, before = sd1
    args = _args()
    plain = minisd.StableDiffusion.from_pretrained(folder)(**args, progress=False)
    try:
        ours.unload_ip_adapter()
        assert ours.image_encoder is None and ours.unet.ip_adapter is None
        after = flatten(ours.unet.params)
        assert after.keys() == before.keys()
        for k, v in before.items():
            np.testing.assert_array_equal(after[k], v, err_msg=k)
            assert after[k].dtype == v.dtype, k
        np.testing.assert_array_equal(ours(**args, progress=False), plain)
        ref.unload_ip_adapter()
        _load(ref, ours, folder, BASE)
        assert not ours.unet.ip_adapter.plus
        _same(ref, ours, "SD1 base IP-Adapter after Plus", ip_adapter_image=_image(), **args)
    finally:
        ref.unload_ip_adapter()
        _load(ref, ours, folder, WEIGHTS)
    assert ours.unet.ip_adapter.plus


def test_sd1_encoder_mismatch(sd1, tmp_path):
    """A Plus adapter takes the encoder's hidden size (here 16), not its projection_dim."""
    _, folder, _, _ = sd1
    _encoder(tmp_path / "wide", hidden_size=24, intermediate_size=48)
    pipe = minisd.StableDiffusion.from_pretrained(folder)
    with pytest.raises(WeightsError, match=rf"{WEIGHTS}: key 'image_proj\.proj_in\.weight' "
                       r"takes 16-d hidden states; .* 24-d ones \(hidden_size\)"):  # fmt: skip
        pipe.load_ip_adapter(folder / WEIGHTS, tmp_path / "wide")
    assert pipe.unet.ip_adapter is None and pipe.image_encoder is None


def test_sd1_device_path_on_fake_cupy(sd1):
    """The Plus pipeline with every array on the (fake) device: NumPy's float64 result."""
    import fake_cupy

    _, folder, _, _ = sd1
    kw = dict(prompt=PROMPTS[0], num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
              ip_adapter_image=_image(seed=4), scheduler="ddim", seed=0, output_type="np",
              progress=False)  # fmt: skip

    def run(device):
        pipe = minisd.StableDiffusion.from_pretrained(folder, dtype="float64", device=device)
        pipe.load_ip_adapter(folder / WEIGHTS, folder / "image_encoder", scale=SCALE)
        return pipe, pipe(**kw)

    _, expect = run("cpu")
    with fake_cupy.installed() as fcp:
        pipe, got = run("cuda")
        assert type(pipe.unet.ip_adapter.image_proj["latents"]) is fcp.ndarray
    assert type(got) is np.ndarray
    assert_rel(got, expect, 1e-12, "IP-Adapter Plus pipeline on fake_cupy")


@pytest.mark.parametrize("kw", [dict(), dict(guidance_scale=1.0, scheduler="euler_a", seed=3)])
def test_sdxl_same_latents(sdxl, kw):
    ref, _, ours = sdxl
    kw = dict(kw)
    scheduler = kw.pop("scheduler", None)
    args = _args(height=64, width=64, **kw)
    if "seed" in kw:
        del args["latents"]
    _same(ref, ours, f"SDXL IP-Adapter Plus {kw}", scheduler, ip_adapter_image=_image(50, 70),
          **args)  # fmt: skip


def test_sdxl_unload_restores_the_unet(sdxl):
    _, folder, ours = sdxl
    args = _args(height=64, width=64)
    plain = StableDiffusionXL.from_pretrained(folder)(**args, progress=False)
    try:
        ours.unload_ip_adapter()
        np.testing.assert_array_equal(ours(**args, progress=False), plain)
    finally:
        ours.load_ip_adapter(folder / WEIGHTS_XL, folder / "image_encoder", scale=SCALE)
