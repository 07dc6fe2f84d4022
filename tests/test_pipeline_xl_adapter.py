"""SDXL T2I-Adapter guidance (StableDiffusionXL.from_pretrained(..., adapter=), ``adapter_image``,
``adapter_conditioning_scale``, ``adapter_conditioning_factor``) against diffusers'
StableDiffusionXLAdapterPipeline over the same tiny SDXL base folder (tests/pipelines_xl.py),
float32: the same latents or the same seed -> the same latents and images (rel. error <= 1e-4).

The adapters are diffusers T2IAdapters with adapter_type "full_adapter_xl" sized for the tiny
SDXL UNet (channels 8, 16, 16; features at 1/16, 1/16, 1/32 and, the fourth, the mid block's
1/32), every parameter randomized: an RGB one and a grayscale one (a MultiAdapter of the two
for several adapters); and an SD1.x-style adapter that fits no SDXL UNet, for the load check.
"""

import numpy as np
import pytest
from pipelines_xl import build
from refharness import assert_rel, need, randomize_
from test_pipeline import _run_ref

import minisd
from minisd.errors import ConfigError
from minisd.pipeline_xl import StableDiffusionXL
from minisd.t2i_adapter import T2IAdapter

TOL = 1e-4
PROMPTS = ["a watercolor painting of a lighthouse", "a cat, (masterpiece:1.2)"]
XL = dict(channels=(8, 16, 16, 16), num_res_blocks=2, downscale_factor=16,
          adapter_type="full_adapter_xl")  # fmt: skip
ADAPTERS = {
    "xl_rgb": dict(in_channels=3, **XL),
    "xl_gray": dict(in_channels=1, **{**XL, "num_res_blocks": 1}),
    "sd_full": dict(in_channels=3, channels=(8, 16, 16), num_res_blocks=1),  # an SD1.x layout
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(diffusers txt2img pipeline's components, folder, {name: diffusers adapter})."""
    torch, diffusers = need("torch", "diffusers")
    folder = tmp_path_factory.mktemp("xl_adapter") / "base"
    ref, _ = build("base", folder)
    adapters = {}
    for seed, (name, cfg) in enumerate(ADAPTERS.items()):
        torch.manual_seed(0)
        a = randomize_(diffusers.T2IAdapter(**cfg), seed=40 + seed).eval()
        a.save_pretrained(str(folder.parent / name), safe_serialization=True)
        adapters[name] = a
    return ref.components, folder, adapters


def _ref(setup, *names):
    """diffusers' StableDiffusionXLAdapterPipeline (a MultiAdapter for several names)."""
    diffusers = need("diffusers")
    components, _, adapters = setup
    keys = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet",
            "scheduler")  # fmt: skip
    several = [adapters[n] for n in names]  # the SDXL pipeline takes no plain list
    adapter = diffusers.MultiAdapter(several) if len(names) > 1 else several[0]
    pipe = diffusers.StableDiffusionXLAdapterPipeline(
        **{k: components[k] for k in keys}, adapter=adapter, force_zeros_for_empty_prompt=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(setup, *names):
    _, folder, _ = setup
    spec = [folder.parent / n for n in names] if len(names) > 1 else folder.parent / names[0]
    return StableDiffusionXL.from_pretrained(folder, adapter=spec)


@pytest.fixture(scope="module")
def ours(setup):
    return _ours(setup, "xl_rgb")


def run_ref(ref, scheduler=None, **kw):
    out = _run_ref(ref, scheduler, **kw)
    return out if isinstance(out, (np.ndarray, list)) else out.numpy()


def _image(h=64, w=64, seed=4, mode="RGB"):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _latents(n=2, h=8, w=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 4, h, w)).astype(np.float32)


def test_loads_the_adapter(ours):
    assert type(ours) is StableDiffusionXL and isinstance(ours.adapter, T2IAdapter)
    assert ours.adapter.config.adapter_type == "full_adapter_xl"
    assert ours.adapter.downscale_factor == 16


@pytest.mark.parametrize(
    "scheduler, kw",
    [
        (None, dict(adapter_conditioning_scale=0.7)),  # the folder's Euler
        (None, dict(adapter_conditioning_scale=0.8, adapter_conditioning_factor=0.5)),
        ("ddim", dict(adapter_conditioning_factor=0.3, guidance_rescale=0.5)),
        ("dpmpp_2m", dict(guidance_scale=1.0)),  # no CFG: one UNet row per image
    ],
)
def test_txt2img_same_latents(setup, ours, scheduler, kw):
    """Two prompts with one adapter image each (diffusers' batching), the scale, the factor
    (features for the first int(steps * factor) steps), CFG or not."""
    ref = _ref(setup, "xl_rgb")
    args = dict(prompt=PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=4,
                guidance_scale=6.0, latents=_latents(), height=64, width=64,
                output_type="latent")  # fmt: skip
    args.update(kw)
    images = [_image(seed=4), _image(seed=5)]
    expect = run_ref(ref, scheduler, image=images, **args)
    got = ours(**args, adapter_image=images, scheduler=scheduler, progress=False)
    err = assert_rel(got, expect, TOL, f"SDXL T2I-Adapter {scheduler} {kw}")
    print(f"\n{scheduler} {sorted(kw)}: {err:.2e}")
    plain = ours(**args, scheduler=scheduler, progress=False)  # the adapter sits this one out
    assert np.abs(plain - got).max() > 1e-3 * np.abs(got).max()


def test_same_seed_images_with_num_images_per_prompt(setup, ours):
    """One prompt, one image, num_images_per_prompt=2, a seed, decoded images (output_type
    "np"); the size given explicitly and not square."""
    ref = _ref(setup, "xl_rgb")
    kw = dict(prompt=PROMPTS[1], num_inference_steps=3, guidance_scale=5.0, height=64,
              width=96, num_images_per_prompt=2, adapter_conditioning_scale=1.3,
              output_type="np", seed=7)  # fmt: skip
    image = _image(80, 112, seed=6)  # Lanczos-resized to 64 x 96 by both
    expect = run_ref(ref, image=image, **kw)
    got = ours(**kw, adapter_image=image, progress=False)
    assert got.shape == expect.shape == (2, 64, 96, 3)
    err = assert_rel(got, expect, TOL, "images, num_images_per_prompt=2")
    print(f"\nseeded images: {err:.2e}")


def test_size_defaults_to_the_adapter_image(setup, ours):
    """No height / width: the adapter image's size (here multiples of 16, the adapter's
    downscale_factor), as diffusers' _default_height_width."""
    ref = _ref(setup, "xl_rgb")
    kw = dict(prompt=PROMPTS[0], num_inference_steps=2, latents=_latents(1, 6, 10),
              output_type="latent")  # fmt: skip
    image = _image(48, 80, seed=8)
    expect = run_ref(ref, image=image, **kw)
    got = ours(**kw, adapter_image=image, progress=False)
    assert got.shape == expect.shape == (1, 4, 6, 10)
    assert_rel(got, expect, TOL, "default size")


def test_size_defaults_round_down_to_the_adapter_downscale_factor(setup, ours):
    """A 72 x 88 adapter image: diffusers' output is 64 x 80 (multiples of 16)."""
    ref = _ref(setup, "xl_rgb")
    kw = dict(prompt=PROMPTS[0], num_inference_steps=2, output_type="latent", seed=3)
    image = _image(72, 88, seed=8)
    expect = run_ref(ref, image=image, **kw)
    got = ours(**kw, adapter_image=image, progress=False)
    assert got.shape == expect.shape == (1, 4, 8, 10)
    assert_rel(got, expect, TOL, "rounded default size")


def test_several_adapters_as_diffusers_multi_adapter(setup):
    """A list of an RGB and a grayscale SDXL adapter: diffusers' MultiAdapter with
    adapter_weights = the scales; one image per adapter (RGB converted to "L" for the gray
    one by minisd; diffusers is given it in "L")."""
    ref = _ref(setup, "xl_rgb", "xl_gray")
    ours = _ours(setup, "xl_rgb", "xl_gray")
    kw = dict(prompt=PROMPTS[0], negative_prompt="dark", num_inference_steps=3,
              guidance_scale=4.0, latents=_latents(1), height=64, width=64,
              adapter_conditioning_scale=[0.9, 0.6], output_type="latent")  # fmt: skip
    rgb, gray = _image(seed=11), _image(seed=12, mode="L")
    expect = run_ref(ref, image=[rgb, gray], **kw)
    got = ours(**kw, adapter_image=[rgb, gray], progress=False)
    err = assert_rel(got, expect, TOL, "MultiAdapter")
    print(f"\nMultiAdapter: {err:.2e}")


def test_sd_adapter_on_sdxl_is_refused_at_load(setup):
    _, folder, _ = setup
    with pytest.raises(ConfigError, match=r"^adapter \(.*sd_full.*\): an SD1.x / SD2.x") as e:
        StableDiffusionXL.from_pretrained(folder, adapter=folder.parent / "sd_full")
    assert "an SDXL UNet" in str(e.value)
    with pytest.raises(ConfigError, match=r"adapter\[1\] \(.*sd_full"):
        minisd.StableDiffusion.from_pretrained(
            folder, adapter=[folder.parent / "xl_rgb", folder.parent / "sd_full"]
        )


def test_sdxl_adapter_on_sd_is_refused_at_load_and_run(setup, tiny_sd1_files):
    _, folder, _ = setup
    sd_folder, _ = tiny_sd1_files
    with pytest.raises(ConfigError, match=r"adapter \(.*xl_rgb.*\): an SDXL T2I-Adapter"):
        minisd.StableDiffusion.from_pretrained(sd_folder, adapter=folder.parent / "xl_rgb")
    pipe = minisd.StableDiffusion.from_pretrained(sd_folder)
    pipe.adapter = T2IAdapter.from_pretrained(folder.parent / "xl_rgb")  # set by hand
    with pytest.raises(ConfigError, match="an SDXL T2I-Adapter"):
        pipe("a cat", num_inference_steps=1, adapter_image=_image(), progress=False)


def test_array_backend(setup, xp):
    """The SDXL adapter on each array backend (NumPy; CuPy where a GPU exists), float32."""
    from refharness import to_np
    from test_t2i_adapter import tensor

    from minisd.backend import to_numpy

    _, folder, adapters = setup
    device = "cpu" if xp is np else "cuda"
    ours = T2IAdapter.from_pretrained(folder.parent / "xl_rgb", dtype="float32", device=device)
    img = np.random.default_rng(1).uniform(size=(2, 3, 80, 48)).astype(np.float32)
    feats = ours(xp.asarray(img))
    assert all(isinstance(f, xp.ndarray) for f in feats)
    with need("torch").no_grad():
        expect = adapters["xl_rgb"](tensor(img))
    for k, (a, r) in enumerate(zip(feats, expect)):
        assert_rel(to_numpy(a), to_np(r), TOL, f"feature {k}")
