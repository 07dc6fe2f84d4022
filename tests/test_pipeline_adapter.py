"""T2I-Adapter guidance in the pipeline (minisd/pipeline_adapter.py) against diffusers'
StableDiffusionAdapterPipeline over the same folders.

The adapters are diffusers T2IAdapters sized for the tiny SD1 pipeline's UNet (channels 8, 16,
16), every parameter randomized, saved next to the pipeline: a full RGB adapter and a light
grayscale one (a MultiAdapter of the two for several adapters).

diffusers' SD adapter pipeline has no ``adapter_conditioning_factor`` (its SDXL pipeline has:
features while ``i < int(steps * factor)``); for factor < 1 the reference is that pipeline with
its UNet's forward wrapped to drop the features from step int(steps * factor) on, which is what
the SDXL pipeline's loop does. Without height / width the output takes the adapter image's
size, rounded down to a multiple of 8 (diffusers: of the adapter's downscale_factor, 8 for SD).
"""

import numpy as np
import pytest
from pipelines import build
from refharness import assert_rel, need, randomize_
from test_pipeline import PROMPTS, TOL, _image, _run_ref

import minisd
from minisd.errors import InputError

ADAPTERS = {
    "full": dict(in_channels=3, channels=(8, 16, 16), num_res_blocks=2),
    "light_gray": dict(
        in_channels=1, channels=(8, 16), num_res_blocks=2, adapter_type="light_adapter"
    ),
}


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """(diffusers pipeline components, folder, {name: diffusers adapter})."""
    torch, diffusers = need("torch", "diffusers")
    folder = tmp_path_factory.mktemp("t2i_adapter") / "sd1"
    ref = build("sd1", folder)
    adapters = {}
    for seed, (name, cfg) in enumerate(ADAPTERS.items()):
        torch.manual_seed(0)
        a = randomize_(diffusers.T2IAdapter(**cfg), seed=20 + seed).eval()
        a.save_pretrained(str(folder / name), safe_serialization=True)
        adapters[name] = a
    return ref.components, folder, adapters


def _ref(trio, *names, factor=1.0, steps=None):
    """diffusers' adapter pipeline (a MultiAdapter for several names); ``factor`` < 1: its
    UNet drops the adapter features from step int(steps * factor) on (module docstring)."""
    diffusers = need("diffusers")
    components, _, adapters = trio
    keys = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    adapter = [adapters[n] for n in names] if len(names) > 1 else adapters[names[0]]
    pipe = diffusers.StableDiffusionAdapterPipeline(
        **{k: components[k] for k in keys}, adapter=adapter, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    if factor < 1:
        pipe.unet = _FactorUNet(pipe.unet, int(steps * factor))
    return pipe


class _FactorUNet:
    """The reference UNet, called with the adapter features only for its first ``active``
    calls (one call per step for DDIM and Euler ancestral)."""

    def __init__(self, unet, active):
        self.unet, self.active, self.calls = unet, active, 0

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def __call__(self, *a, **k):
        if self.calls >= self.active:
            k["down_intrablock_additional_residuals"] = None
        self.calls += 1
        return self.unet(*a, **k)


def _ours(trio, *names):
    _, folder, _ = trio
    spec = [folder / n for n in names] if len(names) > 1 else folder / names[0]
    return minisd.StableDiffusion.from_pretrained(folder, adapter=spec)


@pytest.fixture(scope="module")
def ours(trio):
    return _ours(trio, "full")


def _gray(h=64, w=64, seed=9):
    return _image(h, w, seed=seed).convert("L")


@pytest.mark.parametrize(
    "kw",
    [
        dict(adapter_conditioning_scale=0.7),
        dict(adapter_conditioning_scale=0.8, adapter_conditioning_factor=0.5),  # steps 0, 1 of 4
        dict(guidance_scale=1.0),  # no CFG
    ],
)
def test_txt2img_same_latents(trio, ours, kw):
    factor = kw.get("adapter_conditioning_factor", 1.0)
    ref = _ref(trio, "full", factor=factor, steps=4)
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    args = dict(prompt=PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=4,
                guidance_scale=6.0, latents=latents, height=64, width=64,
                output_type="latent")  # fmt: skip
    args.update({k: v for k, v in kw.items() if k != "adapter_conditioning_factor"})
    adapter_images = [_image(seed=4), _image(seed=5)]
    expect = _run_ref(ref, "ddim", image=adapter_images, **args).numpy()
    if factor < 1:
        assert ref.unet.calls == 4
        args["adapter_conditioning_factor"] = factor
    got = ours(**args, adapter_image=adapter_images, scheduler="ddim", progress=False)
    assert_rel(got, expect, TOL, f"T2I-Adapter txt2img {kw}")
    plain = ours(**args, scheduler="ddim", progress=False)  # a loaded adapter without an image
    assert np.abs(plain - got).max() > 1e-3 * np.abs(got).max()  # sits out; with one it counts


def test_seeded_images_per_prompt(trio, ours):
    """num_images_per_prompt=2 (features repeated), a stochastic sampler, factor 0.75."""
    ref = _ref(trio, "full", factor=0.75, steps=3)
    args = dict(prompt=PROMPTS[1], num_inference_steps=3, guidance_scale=5.0,
                num_images_per_prompt=2, height=64, width=64, output_type="latent",
                adapter_conditioning_scale=0.6)  # fmt: skip
    expect = _run_ref(ref, "euler_a", image=_image(48, 80, seed=3), seed=3, **args).numpy()
    got = ours(**args, adapter_image=_image(48, 80, seed=3), adapter_conditioning_factor=0.75,
               seed=3, scheduler="euler_a", progress=False)  # fmt: skip
    assert got.shape == (2, 4, 8, 8)
    assert_rel(got, expect, TOL, "T2I-Adapter, 2 images per prompt, seeded")


def test_several_adapters_same_latents(trio):
    """A full RGB adapter and a light grayscale one: diffusers' MultiAdapter, the scales as its
    adapter_weights."""
    ref, ours = _ref(trio, "full", "light_gray"), _ours(trio, "full", "light_gray")
    latents = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    images = [_image(seed=6), _gray()]
    args = dict(prompt=PROMPTS[0], num_inference_steps=3, guidance_scale=5.0, latents=latents,
                height=64, width=64, output_type="latent")  # fmt: skip
    expect = _run_ref(ref, "ddim", image=images, adapter_conditioning_scale=[0.7, 0.4], **args)
    got = ours(**args, adapter_image=images, adapter_conditioning_scale=[0.7, 0.4],
               scheduler="ddim", progress=False)  # fmt: skip
    assert_rel(got, expect.numpy(), TOL, "MultiAdapter")
    one = ours(**args, adapter_image=images, adapter_conditioning_scale=[0.7, 0.0],
               scheduler="ddim", progress=False)  # fmt: skip
    assert np.abs(one - got).max() > 1e-3 * np.abs(got).max()  # the second one counts


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(adapter_conditioning_scale=float("nan")), "adapter_conditioning_scale"),
        (dict(adapter_conditioning_factor=1.5), "adapter_conditioning_factor=1.5"),
        (dict(adapter_image=[_image(), _image(), _image()]), "3 images for 2 prompt"),
    ],
)
def test_bad_adapter_arguments(ours, kw, message):
    args = dict(prompt=["a", "b"], num_inference_steps=2, adapter_image=_image(),
                progress=False)  # fmt: skip
    with pytest.raises(InputError, match=message):
        ours(**{**args, **kw})


def test_adapter_image_needs_an_adapter(trio):
    _, folder, _ = trio
    plain = minisd.StableDiffusion.from_pretrained(folder)
    with pytest.raises(InputError, match="adapter_image: this pipeline has no T2I-Adapter"):
        plain("a cat", num_inference_steps=2, adapter_image=_image(), progress=False)


def test_default_size_is_the_adapter_image_s(trio, ours):
    """A 76 x 90 adapter image and no height / width: a 72 x 88 image, as diffusers."""
    ref = _ref(trio, "full")
    args = dict(prompt=PROMPTS[0], num_inference_steps=2, guidance_scale=4.0, output_type="np")
    expect = _run_ref(ref, "ddim", image=_image(76, 90, seed=8), seed=1, **args)
    got = ours(**args, adapter_image=_image(76, 90, seed=8), seed=1, scheduler="ddim",
               progress=False)  # fmt: skip
    assert got.shape == expect.shape == (1, 72, 88, 3)
    assert_rel(got, expect, TOL, "T2I-Adapter, size from the adapter image")


def test_device_path_on_fake_cupy(trio):
    """The adapter pipeline with every array on the (fake) device: NumPy's float64 result."""
    import fake_cupy

    _, folder, _ = trio
    kw = dict(prompt=PROMPTS[0], num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
              adapter_image=_image(seed=4), adapter_conditioning_scale=0.7,
              adapter_conditioning_factor=0.5, scheduler="ddim", seed=0, output_type="np",
              progress=False)  # fmt: skip
    load = dict(adapter=folder / "full", dtype="float64")
    expect = minisd.StableDiffusion.from_pretrained(folder, **load)(**kw)
    with fake_cupy.installed() as fcp:
        pipe = minisd.StableDiffusion.from_pretrained(folder, **load, device="cuda")
        assert type(pipe.adapter.params["adapter"]["conv_in"]["weight"]) is fcp.ndarray
        got = pipe(**kw)
    assert type(got) is np.ndarray
    assert_rel(got, expect, 1e-12, "T2I-Adapter pipeline on fake_cupy")
