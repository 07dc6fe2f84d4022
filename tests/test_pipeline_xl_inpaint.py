"""StableDiffusionXL inpainting against diffusers' StableDiffusionXLInpaintPipeline on tiny
folders written by diffusers (tests/pipelines_xl.py), float32: the same seed or the same latents
-> the same images / latents (rel. error <= 1e-4). A 9-channel inpainting UNet; mask blending
with the base's 4-channel UNet and the refiner's (aesthetic scores, and a VAE with latents_mean /
latents_std, which diffusers' inpainting leaves out when it encodes but uses when it decodes);
the ensemble of experts with a mask; the CLI's --mask; single files; make_tiny's sdxl-inpaint."""

import warnings

import numpy as np
import pytest
from pipelines_xl import build_inpaint
from refharness import assert_rel, need
from test_pipeline_xl import run_ref

import minisd
import weights_tools as wt
from minisd.errors import InputError
from minisd.pipeline_xl import StableDiffusionXL

TOL = 1e-4
PROMPTS = ["a watercolor painting of a lighthouse", "a cat, (masterpiece:1.2)"]


def _pair(kind, tmp_path_factory):
    """(diffusers StableDiffusionXLInpaintPipeline, minisd pipeline, folder) of ``kind``."""
    folder = tmp_path_factory.mktemp("xl_inpaint") / kind
    ref = build_inpaint(kind, folder)
    return ref, minisd.StableDiffusion.from_pretrained(folder), folder


@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    return _pair("inpaint", tmp_path_factory)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _pair("base", tmp_path_factory)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    return _pair("refiner", tmp_path_factory)


def _image(seed=1, h=64, w=64):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _mask(h=64, w=64):
    from PIL import Image

    m = np.zeros((h, w), np.uint8)
    m[h // 4 : 3 * h // 4, w // 3 :] = 255
    return Image.fromarray(m)


def _compare(pair, scheduler, what, **kw):
    ref, ours, _ = pair
    expect = run_ref(ref, scheduler, **kw)
    got = ours(**kw, scheduler=scheduler, progress=False)
    assert got.shape == expect.shape
    err = assert_rel(got, expect, TOL, what)
    print(f"{what}: relative error {err:.2e}")


def test_folders_load_as_sdxl(nine, refiner):
    _, ours, folder = nine
    assert type(ours) is StableDiffusionXL and ours.unet.config.in_channels == 9
    assert "InpaintPipeline" in (folder / "model_index.json").read_text()
    assert not ours.requires_aesthetics_score and refiner[1].requires_aesthetics_score


@pytest.mark.parametrize(
    "scheduler,strength",
    [(None, None), ("ddim", 1.0), ("dpmpp_2m", 0.6), ("euler_a", 0.75)],
)  # None: the checkpoint's Euler, diffusers' default strength 0.9999
def test_nine_channel_unet_same_seed(nine, scheduler, strength):
    """[latents, mask, masked-image latents] into the UNet; two prompts, one negative."""
    kw = dict(prompt=PROMPTS, negative_prompt="blurry", image=_image(), mask_image=_mask(),
              num_inference_steps=4, guidance_scale=6.0, output_type="np", seed=11)  # fmt: skip
    if strength is not None:
        kw["strength"] = strength
    _compare(nine, scheduler, f"9-channel {scheduler} {strength}", **kw)


def test_nine_channel_unet_same_latents(nine):
    """Given latents are the initial noise (scaled by init_noise_sigma); the seed still draws
    the masked image's VAE sample."""
    lat = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    kw = dict(prompt=PROMPTS[0], num_images_per_prompt=2, image=_image(2), mask_image=_mask(),
              strength=1.0, num_inference_steps=3, latents=lat, output_type="latent",
              seed=9)  # fmt: skip
    _compare(nine, "unipc", "9-channel latents", **kw)


@pytest.mark.parametrize(
    "scheduler,strength,nipp",
    [(None, None, 1), ("unipc", 1.0, 1), ("dpm2_a", 0.7, 2), ("heun", 0.8, 1)],
)  # dpm2_a: two model calls per step and noise on the second; heun: two calls per step
def test_blending_with_a_four_channel_unet_same_seed(base, scheduler, strength, nipp):
    """The base's own UNet: the image latents, re-noised to the next timestep, replace the
    latents outside the mask after every step."""
    kw = dict(prompt=PROMPTS, image=_image(3), mask_image=_mask(), num_inference_steps=4,
              num_images_per_prompt=nipp, output_type="np", seed=5)  # fmt: skip
    if strength is not None:
        kw["strength"] = strength
    _compare(base, scheduler, f"blending {scheduler} {strength}", **kw)


def test_refiner_inpainting_same_seed(refiner):
    """Aesthetic-score time ids; the image latents scaled without latents_mean / latents_std
    (diffusers' SDXL inpainting), the decoder's with them."""
    kw = dict(prompt=PROMPTS[1], image=_image(4), mask_image=_mask(), strength=0.6,
              num_inference_steps=4, aesthetic_score=7.5, negative_aesthetic_score=1.5,
              negative_original_size=(128, 96), output_type="np", seed=5)  # fmt: skip
    _compare(refiner, None, "refiner inpainting", **kw)
    _, ours, _ = refiner
    got = ours(**kw, progress=False)
    other = ours(**{**kw, "aesthetic_score": 3.0}, progress=False)
    assert np.abs(got - other).max() > 1e-4  # the score reaches the image


@pytest.mark.parametrize("scheduler", [None, "heun"])
def test_ensemble_of_experts_with_a_mask(nine, refiner, scheduler):
    """The 9-channel base stops at denoising_end and hands its latents to the refiner, which
    blends them in outside the mask from denoising_start (diffusers' documented recipe)."""
    torch = need("torch")
    kw = dict(prompt=PROMPTS[0], mask_image=_mask(), num_inference_steps=6, seed=2)
    expect = run_ref(nine[0], scheduler, **kw, image=_image(5), denoising_end=0.7,
                     output_type="latent")  # fmt: skip
    lat = nine[1](**kw, image=_image(5), denoising_end=0.7, scheduler=scheduler,
                  output_type="latent", progress=False)  # fmt: skip
    print(f"{scheduler}: base {assert_rel(lat, expect, TOL, 'base latents at denoising_end'):.2e}")
    expect = run_ref(refiner[0], scheduler, **kw, image=torch.from_numpy(expect),
                     denoising_start=0.7, output_type="np")  # fmt: skip
    got = refiner[1](**kw, image=lat, denoising_start=0.7, scheduler=scheduler,
                     output_type="np", progress=False)  # fmt: skip
    assert got.shape == expect.shape == (1, 64, 64, 3)
    print(f"{scheduler}: refiner {assert_rel(got, expect, TOL, 'refined images'):.2e}")


def test_denoising_start_from_an_image(nine):
    """denoising_start with pixels: the image latents as they are, no noise added. Clean
    latents at a noisy timestep make the random UNet chaotic: scaling minisd's own image
    latents by 1 + 1e-7 moves its result by 1.4e-5 at guidance 4 (by 2e-7 from strength=0.6,
    the same timesteps), and the distance to diffusers was 2.2e-5; at guidance 2: 2.0e-6."""
    kw = dict(prompt=PROMPTS[1], image=_image(6), mask_image=_mask(), num_inference_steps=5,
              denoising_start=0.4, guidance_scale=2.0, output_type="latent", seed=8)  # fmt: skip
    _compare(nine, "dpmpp_2m", "9-channel denoising_start", **kw)


def test_defaults_follow_the_task(base):
    """strength / guidance_scale None: 0.9999 / 7.5 with a mask (diffusers' SDXL inpainting),
    0.3 / 5.0 without (its img2img)."""
    _, ours, _ = base
    kw = dict(prompt="x", image=_image(), num_inference_steps=4, output_type="latent",
              seed=1, progress=False)  # fmt: skip
    img2img = ours(**kw)
    np.testing.assert_array_equal(img2img, ours(**kw, strength=0.3, guidance_scale=5.0))
    kw["mask_image"] = _mask()
    inpaint = ours(**kw)
    np.testing.assert_array_equal(inpaint, ours(**kw, strength=0.9999, guidance_scale=7.5))
    assert np.abs(inpaint - ours(**kw, strength=1.0)).max() > 1e-4
    assert np.abs(inpaint - ours(**kw, guidance_scale=5.0)).max() > 1e-4


@pytest.mark.parametrize("kind", ["nine", "base"])
def test_array_backends_same_images(nine, base, kind, xp):
    """Inpainting on each array backend (fake_cupy: the device code path, as strict as CuPy
    about host/device mixing; CuPy where a GPU exists), float32, against diffusers."""
    ref, _, folder = nine if kind == "nine" else base
    kw = dict(prompt=PROMPTS, image=_image(8), mask_image=_mask(), strength=0.7,
              num_inference_steps=3, output_type="np", seed=6)  # fmt: skip
    expect = run_ref(ref, "dpmpp_2m", **kw)
    device = "cpu" if xp is np else "cuda"
    ours = StableDiffusionXL.from_pretrained(folder, dtype="float32", device=device)
    assert isinstance(ours.unet.params["conv_in"]["weight"], xp.ndarray)
    got = ours(**kw, scheduler="dpmpp_2m", progress=False)
    assert type(got) is np.ndarray
    assert_rel(got, expect, TOL, f"{kind} on {xp.__name__}")


def test_bad_inputs_are_named(nine, base):
    _, ours9, _ = nine
    _, ours4, _ = base
    kw = dict(prompt="x", num_inference_steps=2, progress=False)
    lat = np.zeros((1, 4, 8, 8), np.float32)
    cases = [
        (ours9, dict(), "mask_image: this UNet is an inpainting UNet"),
        (ours9, dict(image=_image()), "mask_image: this UNet is an inpainting UNet"),
        (ours9, dict(image=lat, mask_image=_mask()), "image: latents cannot be masked"),
        (ours4, dict(mask_image=_mask()), "mask_image: inpainting needs `image`"),
        (ours4, dict(image=_image(), mask_image=_mask(32, 64)), r"mask_image: size \(32, 64\)"),
        (ours4, dict(image=lat, mask_image=_mask(32, 32)), r"differs from image size \(64, 64\)"),
        (ours4, dict(image=_image(), mask_image=_mask(), strength=0.0), "strength=0.0"),
        (ours4, dict(image=_image(), mask_image="m"), "mask_image: expected a PIL image"),
        (ours9, dict(image=_image(), mask_image=_mask(), latents=lat[:, :3]), "latents: shape"),
        (ours4, dict(image=_image(), mask_image=_mask(), denoising_start=1.5), "denoising_start"),
    ]
    for pipe, extra, message in cases:
        with pytest.raises(InputError, match=message):
            pipe(**kw, **extra)


def test_cli_mask_gives_the_api_image(nine, tmp_path):
    """`minisd generate --init-image --mask` on the 9-channel folder: the API's image (8-bit),
    SDXL inpainting's default guidance (7.5) in the PNG's parameters."""
    from PIL import Image

    from minisd.cli import main

    _, ours, folder = nine
    _image(7).save(tmp_path / "init.png")
    _mask().save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    files = ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")]
    args = ["generate", "a red sofa", "--model", str(folder), "--steps", "3", "--seed", "4"]
    assert main([*args, *files, "--out", str(out)]) == 0
    img = Image.open(out)
    init, mask = (Image.open(tmp_path / f).convert("RGB") for f in ("init.png", "mask.png"))
    expect = ours("a red sofa", image=init, mask_image=mask, num_inference_steps=3, seed=4,
                  progress=False)[0]  # fmt: skip
    assert img.size == expect.size == (64, 64)
    diff = np.abs(np.asarray(img, np.int16) - np.asarray(expect, np.int16))
    assert diff.max() <= 1
    params = img.info["parameters"]
    assert "Sampler: euler" in params and "CFG scale: 7.5" in params  # inpainting's default


def test_single_file_converts_and_loads(nine, tmp_path):
    """to_original -> diffusers' from_single_file gives back every tensor; minisd loads the
    file (converted in memory) with the folder's results; without the stored configs the
    architecture is inferred from the shapes (9 input channels: an inpainting pipeline)."""
    torch, diffusers = need("torch", "diffusers")
    from minisd.weights import load_file
    from weights_tools.stream import tag_of, write_tensors

    _, ours, folder = nine
    single = tmp_path / "inpaint.safetensors"
    wt.to_original(folder, single)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionXLInpaintPipeline.from_single_file(
            str(single), config=str(folder), local_files_only=True
        )
    expect = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    state = ref.unet.state_dict()
    assert set(state) == set(expect) and state["conv_in.weight"].shape[1] == 9
    assert all(np.array_equal(state[k].numpy(), expect[k]) for k in expect)
    kw = dict(prompt="a red sofa", image=_image(), mask_image=_mask(), num_inference_steps=2,
              output_type="latent", seed=1, progress=False)  # fmt: skip
    loaded = minisd.StableDiffusion.from_pretrained(single)
    assert type(loaded) is StableDiffusionXL
    np.testing.assert_array_equal(loaded(**kw), ours(**kw))
    bare = tmp_path / "bare.safetensors"
    flat = load_file(single)
    write_tensors(bare, [(k, tag_of(v), v.shape, v) for k, v in sorted(flat.items())])
    cfg = wt.to_diffusers(bare, tmp_path / "out")
    assert cfg["source"] == "inferred" and cfg["family"] == "sdxl-inpaint"
    assert cfg["unet"]["in_channels"] == 9 and not cfg["model_index"]["requires_aesthetics_score"]
    assert cfg["model_index"]["_class_name"] == "StableDiffusionXLInpaintPipeline"
    assert wt.inspect(bare)["family"] == "sdxl-inpaint"


def test_make_tiny_sdxl_inpaint_as_diffusers(tmp_path):
    """make_tiny's sdxl-inpaint folder loads in diffusers' StableDiffusionXLInpaintPipeline and
    in minisd, with the same images for the same seed."""
    torch, diffusers = need("torch", "diffusers")
    cfg = wt.make_tiny(tmp_path / "tiny", family="sdxl-inpaint", seed=0)
    assert cfg["unet"]["in_channels"] == 9 and cfg["family"] == "sdxl-inpaint"
    ref = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(
        str(tmp_path / "tiny"), local_files_only=True, add_watermarker=False
    )
    ref.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPTS, image=_image(), mask_image=_mask(), num_inference_steps=2,
              output_type="np", seed=3)  # fmt: skip
    ours = minisd.StableDiffusion.from_pretrained(tmp_path / "tiny")
    err = assert_rel(ours(**kw, progress=False), run_ref(ref, **kw), TOL, "make_tiny")
    print(f"make_tiny sdxl-inpaint: relative error {err:.2e}")
