"""StableDiffusionXL against diffusers' StableDiffusionXLPipeline / StableDiffusionXLImg2Img-
Pipeline on tiny folders written by diffusers (tests/pipelines_xl.py), float32: the same latents
or the same seed -> the same latents and images (rel. error <= 1e-4)."""

import numpy as np
import pytest
from pipelines_xl import build
from refharness import assert_rel, need
from test_pipeline import _run_ref

import minisd
from minisd.errors import ConfigError, InputError, WeightsError
from minisd.pipeline_xl import StableDiffusionXL

TOL = 1e-4
PROMPTS = ["a watercolor painting of a lighthouse", "a cat, (masterpiece:1.2)"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(diffusers txt2img, diffusers img2img, minisd) over one SDXL base folder."""
    folder = tmp_path_factory.mktemp("xl") / "base"
    ref, i2i = build("base", folder)
    return ref, i2i, minisd.StableDiffusion.from_pretrained(folder), folder


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl") / "refiner"
    ref, i2i = build("refiner", folder)
    return i2i, StableDiffusionXL.from_pretrained(folder), folder


def run_ref(ref, scheduler=None, **kw):
    """diffusers' result as NumPy (tests/test_pipeline.py's runner; None: its own scheduler)."""
    out = _run_ref(ref, scheduler, **kw)
    return out if isinstance(out, (np.ndarray, list)) else out.numpy()


def _latents(seed=0, n=2):
    return np.random.default_rng(seed).standard_normal((n, 4, 8, 8)).astype(np.float32)


def _image(seed=2):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_folder_loads_as_sdxl(base):
    _, _, ours, _ = base
    assert type(ours) is StableDiffusionXL and ours.force_zeros_for_empty_prompt
    assert not ours.requires_aesthetics_score and ours.scheduler_name == "euler"
    assert ours.tokenizer_2.pad_token == "!"


@pytest.mark.parametrize("scheduler", [None, "ddim", "dpmpp_2m", "unipc", "heun"])
def test_same_latents_same_result(base, scheduler):
    ref, _, ours, _ = base
    kw = dict(prompt=PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=4,
              guidance_scale=6.0, height=64, width=64, latents=_latents(),
              output_type="latent")  # fmt: skip
    expect = run_ref(ref, scheduler, **kw)
    got = ours(**kw, scheduler=scheduler, progress=False)
    assert_rel(got, expect, TOL, f"{scheduler} latents")


@pytest.mark.parametrize(
    "extra",
    [
        {},  # no negative prompt: zeroed unconditional rows (force_zeros_for_empty_prompt)
        {
            "prompt_2": ["an oil painting", "a sketch"],
            "negative_prompt": "ugly",
            "negative_prompt_2": ["dark", "noisy"],
        },
        # one prompt: with several, diffusers' txt2img repeats [negative, positive] time ids
        # as a pair per image (rows neg, pos, neg, pos), so its negative rows alternate; minisd
        # gives every negative row the negative ids (identical results when they are equal)
        {
            "prompt": PROMPTS[1],
            "original_size": (512, 768),
            "crops_coords_top_left": (16, 32),
            "target_size": (1024, 1024),
            "negative_original_size": (256, 256),
            "negative_crops_coords_top_left": (8, 0),
            "negative_target_size": (640, 512),
        },
        {"guidance_scale": 1.0},  # no guidance: one UNet row per image
        {"clip_skip": 1, "guidance_rescale": 0.7},
    ],
)
def test_prompts_and_micro_conditioning_as_diffusers(base, extra):
    ref, _, ours, _ = base
    kw = dict(prompt=PROMPTS, num_inference_steps=3, guidance_scale=7.0, height=64, width=64,
              output_type="latent")  # fmt: skip
    kw.update(extra)
    kw["latents"] = _latents(1, n=1 if isinstance(kw["prompt"], str) else 2)
    expect = run_ref(ref, **kw)
    assert_rel(ours(**kw, progress=False), expect, TOL, f"{sorted(extra)}")


def test_micro_conditioning_reaches_the_image(base):
    _, _, ours, _ = base
    kw = dict(prompt=PROMPTS[0], num_inference_steps=2, height=64, width=64,
              latents=_latents(n=1), output_type="latent", progress=False)  # fmt: skip
    a = ours(**kw)
    b = ours(**kw, original_size=(256, 256))
    assert np.abs(a - b).max() > 1e-4


def test_same_seed_images(base):
    """Seeded euler_a, two images per prompt, decoded (float32 VAE, diffusers' postprocess)."""
    ref, _, ours, _ = base
    kw = dict(prompt=PROMPTS, num_inference_steps=3, height=64, width=64,
              num_images_per_prompt=2, output_type="np", seed=7)  # fmt: skip
    expect = run_ref(ref, "euler_a", **kw)
    got = ours(**kw, scheduler="euler_a", progress=False)
    assert got.shape == expect.shape == (4, 64, 64, 3)
    assert_rel(got, expect, TOL, "images")


def test_img2img_same_seed(base):
    _, i2i, ours, _ = base
    kw = dict(prompt=PROMPTS, negative_prompt="blurry", image=_image(), strength=0.6,
              num_inference_steps=5, output_type="np", seed=3)  # fmt: skip
    expect = run_ref(i2i, **kw)
    got = ours(**kw, progress=False)
    assert_rel(got, expect, TOL, "img2img images")


def test_refiner_img2img_same_seed(refiner):
    """Refiner: second encoder only (it reads `prompt`), aesthetic scores, latents_mean/std."""
    i2i, ours, _ = refiner
    assert ours.text_encoder is None and ours.requires_aesthetics_score
    kw = dict(prompt=PROMPTS[1], prompt_2="ignored by the refiner", image=_image(4),
              strength=0.5, num_inference_steps=4, aesthetic_score=7.5,
              negative_aesthetic_score=1.5, negative_original_size=(128, 96),
              output_type="np", seed=5)  # fmt: skip
    expect = run_ref(i2i, **kw)
    got = ours(**kw, progress=False)
    assert_rel(got, expect, TOL, "refiner images")


def test_bad_inputs_are_named(base):
    _, _, ours, _ = base
    kw = dict(prompt=PROMPTS, num_inference_steps=1, height=64, width=64, progress=False)
    with pytest.raises(InputError, match="original_size="):
        ours(**kw, original_size=(64,))
    with pytest.raises(InputError, match="crops_coords_top_left="):
        ours(**kw, crops_coords_top_left="0,0")
    with pytest.raises(InputError, match="prompt_2: 3 prompt"):
        ours(**kw, prompt_2=["a", "b", "c"])
    with pytest.raises(InputError, match="aesthetic_score"):
        ours(**kw, aesthetic_score=float("nan"))
    with pytest.raises(InputError, match="height=60"):
        ours(**{**kw, "height": 60})
    with pytest.raises(WeightsError, match="w: no such IP-Adapter file"):
        ours.load_ip_adapter("w", "e")


def test_time_id_width_mismatch_names_the_flag(refiner):
    """A refiner folder whose model_index lost requires_aesthetics_score: six ids don't fit."""
    _, ours, _ = refiner
    ours.requires_aesthetics_score = False
    try:
        with pytest.raises(ConfigError, match="requires_aesthetics_score"):
            ours("x", image=_image(), num_inference_steps=2, progress=False)
    finally:
        ours.requires_aesthetics_score = True


def test_sdxl_refuses_an_sd_unet(base, tmp_path):
    from pipelines import build as build_sd

    build_sd("sd1", tmp_path / "sd1")
    sd = minisd.StableDiffusion.from_pretrained(tmp_path / "sd1")
    _, _, ours, _ = base
    with pytest.raises(ConfigError, match="addition_embed_type='text_time'"):
        StableDiffusionXL(
            tokenizer=ours.tokenizer, text_encoder=ours.text_encoder,
            tokenizer_2=ours.tokenizer_2, text_encoder_2=ours.text_encoder_2, unet=sd.unet,
            vae=ours.vae, scheduler_config=ours.scheduler_config,
        )  # fmt: skip


def test_every_negative_row_gets_the_negative_time_ids(base):
    from types import SimpleNamespace

    _, _, ours, _ = base
    a = SimpleNamespace(
        prompt=PROMPTS, prompt_2=None, negative_prompt_2=None, image=None, original_size=None,
        crops_coords_top_left=(0, 0), target_size=None, negative_original_size=(256, 256),
        negative_crops_coords_top_left=(8, 0), negative_target_size=(640, 512),
        aesthetic_score=6.0, negative_aesthetic_score=2.5,
    )  # fmt: skip
    extra = ours._text_extra(a, 64, 64)
    ctx, added = ours.text_conditioning(PROMPTS, None, 2, True, None, extra)
    ids = added["time_ids"]
    assert ctx.shape == (8, 77, 24) and added["text_embeds"].shape == (8, 12)
    np.testing.assert_array_equal(ids[:4], [[256, 256, 8, 0, 640, 512]] * 4)
    np.testing.assert_array_equal(ids[4:], [[64, 64, 0, 0, 64, 64]] * 4)
    assert not added["text_embeds"][:4].any() and not ctx[:4].any()  # zeroed negatives


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_device_path_on_fake_cupy(base, refiner, kind):
    """SDXL with every array on the (fake) device: NumPy's float64 result (txt2img for the base,
    img2img with latents statistics for the refiner), no host array mixed in."""
    import fake_cupy

    folder = base[3] if kind == "base" else refiner[2]
    kw = dict(prompt=PROMPTS, negative_prompt="blurry", num_inference_steps=2, height=64,
              width=64, seed=0, output_type="np", progress=False)  # fmt: skip
    if kind == "refiner":
        kw.update(image=_image(), strength=0.7, scheduler="dpmpp_2m")

    def run(device):
        pipe = StableDiffusionXL.from_pretrained(folder, dtype="float64", device=device)
        return pipe, pipe(**kw)

    _, expect = run("cpu")
    with fake_cupy.installed() as fcp:
        pipe, got = run("cuda")
        assert type(pipe.text_encoder_2.text_projection["weight"]) is fcp.ndarray
    assert type(got) is np.ndarray
    assert_rel(got, expect, 1e-12, f"SDXL {kind} on fake_cupy")


def test_cli_generates_the_api_image(base, tmp_path):
    """`minisd generate` on an SDXL folder: the API's image (8-bit), SDXL's defaults (guidance
    5.0, the checkpoint's euler) in the PNG's parameters (--mask: test_pipeline_xl_inpaint)."""
    from PIL import Image

    from minisd.cli import main

    _, _, ours, folder = base
    out = tmp_path / "xl.png"
    args = ["generate", "a cat", "--model", str(folder), "--steps", "2", "--size", "64x64"]
    assert main([*args, "--seed", "3", "--out", str(out)]) == 0
    img = Image.open(out)
    expect = ours("a cat", num_inference_steps=2, height=64, width=64, seed=3, progress=False)
    diff = np.abs(np.asarray(img, np.int16) - np.asarray(expect[0], np.int16))
    assert diff.max() <= 1
    assert "CFG scale: 5.0" in img.info["parameters"] and "Sampler: euler" in img.info["parameters"]


def test_array_backends_same_latents(base, xp):
    """The SDXL pipeline on each array backend (CuPy where a GPU exists), float32, against
    diffusers' latents."""
    ref, _, _, folder = base
    kw = dict(prompt=PROMPTS, negative_prompt="blurry", num_inference_steps=3, height=64,
              width=64, latents=_latents(2), output_type="latent")  # fmt: skip
    expect = run_ref(ref, "dpmpp_2m", **kw)
    device = "cpu" if xp is np else "cuda"
    ours = minisd.StableDiffusionXL.from_pretrained(folder, dtype="float32", device=device)
    assert isinstance(ours.unet.params["conv_in"]["weight"], xp.ndarray)
    got = ours(**kw, scheduler="dpmpp_2m", progress=False)
    assert type(got) is np.ndarray
    assert_rel(got, expect, TOL, f"{xp.__name__} latents")


@pytest.mark.parametrize("scheduler", [None, "heun", "dpmpp_2m"])
def test_ensemble_of_experts_as_diffusers(base, refiner, scheduler):
    """Base with denoising_end -> latents -> refiner with denoising_start (no noise added; a
    second-order sampler starts on a full step), both against diffusers, same seed."""
    torch = need("torch")
    ref, _, ours, _ = base
    ref_i2i, ours_refiner, _ = refiner
    kw = dict(prompt=PROMPTS[0], num_inference_steps=6, height=64, width=64, seed=11)
    expect = run_ref(ref, scheduler, **kw, denoising_end=0.7, output_type="latent")
    lat = ours(**kw, scheduler=scheduler, denoising_end=0.7, output_type="latent", progress=False)
    assert_rel(lat, expect, TOL, "base latents at denoising_end")
    kw.pop("height"), kw.pop("width")
    expect = run_ref(ref_i2i, scheduler, **kw, image=torch.from_numpy(expect),
                     denoising_start=0.7, output_type="np")  # fmt: skip
    got = ours_refiner(**kw, image=lat, denoising_start=0.7, scheduler=scheduler,
                       output_type="np", progress=False)  # fmt: skip
    assert got.shape == expect.shape == (1, 64, 64, 3)
    assert_rel(got, expect, TOL, "refined images")


def test_expert_arguments_are_checked(base):
    _, _, ours, _ = base
    kw = dict(prompt="x", num_inference_steps=2, height=64, width=64, progress=False)
    with pytest.raises(InputError, match="denoising_end=1.5"):
        ours(**kw, denoising_end=1.5)
    with pytest.raises(InputError, match="denoising_start: needs `image`"):
        ours(**kw, denoising_start=0.5)
    with pytest.raises(InputError, match="denoising_start=0.8 must be < denoising_end=0.5"):
        ours(**kw, image=_image(), denoising_start=0.8, denoising_end=0.5)


def test_attention_chunk_policy_skips_levels_without_attention(base):
    """SDXL's first level has no attention: at 256x256 px the largest score tile is level 1's
    (256 tokens, 2 heads, CFG batch 2, float32: 8 KiB per query row, 2 MiB in all), so half of
    2 MiB free holds 128 query rows (level 0 would have asked for 32 KiB rows)."""
    import fake_cupy

    _, _, _, folder = base
    with fake_cupy.installed(free=2 << 20):
        pipe = StableDiffusionXL.from_pretrained(folder, dtype="float32", device="cuda")
        pipe("a cat", num_inference_steps=1, height=256, width=256, output_type="latent",
             progress=False)  # fmt: skip
        assert pipe.unet.attention_chunk_size == 128
