"""ControlNet guidance in the pipeline (minisd/pipeline_control.py) against diffusers'
StableDiffusionControlNet, ...Img2Img and ...Inpaint pipelines over the same folders.

The ControlNet is diffusers' ``ControlNetModel.from_unet`` of the tiny SD1 pipeline's UNet with
every parameter randomized (its zero convolutions included, which would otherwise make every
residual zero and hide any error), saved next to the pipeline.
"""

import numpy as np
import pytest
from pipelines import build
from refharness import assert_rel, need, randomize_
from test_pipeline import PROMPTS, TOL, _image, _mask, _run_ref

import minisd
from minisd.errors import InputError


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """(diffusers pipeline components, ControlNet folder, minisd pipeline with the ControlNet)."""
    torch, diffusers = need("torch", "diffusers")
    folder = tmp_path_factory.mktemp("controlnet") / "sd1"
    ref = build("sd1", folder)
    cn = diffusers.ControlNetModel.from_unet(ref.unet)
    randomize_(cn, seed=7)
    with torch.no_grad():  # as pipelines.py does for the UNet: keep sampling well-conditioned
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            conv.weight.mul_(0.1)
    cn.eval().save_pretrained(str(folder / "controlnet"), safe_serialization=True)
    ours = minisd.StableDiffusion.from_pretrained(folder, controlnet=folder / "controlnet")
    return {**ref.components, "controlnet": cn.eval()}, folder, ours


def _ref(trio, kind="ControlNet"):
    diffusers = need("diffusers")
    cls = getattr(diffusers, f"StableDiffusion{kind}Pipeline")
    keys = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "controlnet")
    pipe = cls(**{k: trio[0][k] for k in keys}, safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _control(seed=4, h=64, w=64):
    return _image(h, w, seed=seed)


@pytest.mark.parametrize(
    "kw",
    [
        dict(controlnet_conditioning_scale=0.7),
        dict(guess_mode=True),  # the ControlNet sees the prompt half of the CFG batch only
        dict(control_guidance_start=0.25, control_guidance_end=0.75),  # steps 2, 3 of 4
        dict(guidance_scale=1.0),  # no CFG
    ],
)
def test_txt2img_same_latents(trio, kw):
    ref, ours = _ref(trio), trio[2]
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    args = dict(prompt=PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=4,
                guidance_scale=6.0, latents=latents, output_type="latent")  # fmt: skip
    args.update(kw)
    expect = _run_ref(ref, "ddim", image=_control(), **args).numpy()
    got = ours(**args, control_image=_control(), scheduler="ddim", progress=False)
    assert_rel(got, expect, TOL, f"ControlNet txt2img {kw}")
    plain = ours(**args, scheduler="ddim", progress=False)  # and the ControlNet changed it
    assert np.abs(plain - got).max() > 1e-3 * np.abs(got).max()


def test_seeded_batches_of_control_images(trio):
    """One control image per prompt, repeated for num_images_per_prompt; a stochastic sampler."""
    ref, ours = _ref(trio), trio[2]
    controls = [_control(seed=1), _control(seed=2)]
    args = dict(prompt=PROMPTS, num_inference_steps=3, guidance_scale=5.0,
                num_images_per_prompt=2, output_type="latent")  # fmt: skip
    expect = _run_ref(ref, "euler_a", image=controls, seed=3, **args).numpy()
    got = ours(**args, control_image=controls, seed=3, scheduler="euler_a", progress=False)
    assert_rel(got, expect, TOL, "ControlNet, two control images, seeded")


def test_size_comes_from_the_control_image(trio):
    ref, ours = _ref(trio), trio[2]
    args = dict(prompt=PROMPTS[0], num_inference_steps=2, output_type="latent")
    expect = _run_ref(ref, "ddim", image=_control(h=48, w=80), seed=1, **args).numpy()
    got = ours(**args, control_image=_control(h=48, w=80), seed=1, scheduler="ddim",
               progress=False)  # fmt: skip
    assert got.shape == expect.shape == (1, 4, 6, 10)
    assert_rel(got, expect, TOL, "ControlNet, size from the control image")


def test_img2img_same_seed(trio):
    ref, ours = _ref(trio, "ControlNetImg2Img"), trio[2]
    args = dict(prompt=PROMPTS[1], image=_image(), strength=0.6, num_inference_steps=5,
                guidance_scale=5.0, output_type="latent")  # fmt: skip
    expect = _run_ref(ref, "dpmpp_2m", control_image=_control(), seed=3, **args).numpy()
    got = ours(**args, control_image=_control(), seed=3, scheduler="dpmpp_2m", progress=False)
    assert_rel(got, expect, TOL, "ControlNet img2img")


def test_inpaint_same_seed(trio):
    """4-channel UNet: the mask blend; the ControlNet sees the 4 latent channels."""
    ref, ours = _ref(trio, "ControlNetInpaint"), trio[2]
    args = dict(prompt=PROMPTS[0], image=_image(seed=1), mask_image=_mask(), strength=0.75,
                num_inference_steps=4, guidance_scale=4.0, height=64, width=64,
                output_type="np")  # fmt: skip
    expect = _run_ref(ref, "ddim", control_image=_control(), seed=11, **args)
    got = ours(**args, control_image=_control(), seed=11, scheduler="ddim", progress=False)
    assert_rel(got, expect, TOL, "ControlNet inpaint")


def test_controlnet_runs_only_inside_its_window(trio):
    _, _, ours = trio
    calls, real = [], ours.controlnet

    class Counting:
        config = real.config
        dtype = real.dtype

        def __call__(self, *a, **k):
            calls.append(k["conditioning_scale"])
            return real(*a, **k)

    ours.controlnet = Counting()
    try:
        ours("a cat", num_inference_steps=5, control_image=_control(), scheduler="ddim",
             controlnet_conditioning_scale=0.5, control_guidance_start=0.2,
             control_guidance_end=0.6, output_type="latent", progress=False)  # fmt: skip
    finally:
        ours.controlnet = real
    assert calls == [0.5, 0.5]  # steps 1 and 2 of 0..4: i / 5 >= 0.2 and (i + 1) / 5 <= 0.6


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(controlnet_conditioning_scale=float("nan")), "controlnet_conditioning_scale=nan"),
        (dict(control_guidance_start=0.5, control_guidance_end=0.5), "start < end"),
        (dict(control_guidance_end=1.5), "control_guidance_end=1.5"),
        (dict(guess_mode="yes"), "guess_mode='yes'"),
        (dict(control_image=[_control(), _control(), _control()]), "3 images for 2 prompt"),
    ],
)
def test_bad_controlnet_arguments(trio, kw, message):
    _, _, ours = trio
    args = dict(prompt=["a", "b"], num_inference_steps=2, control_image=_control(),
                progress=False)  # fmt: skip
    with pytest.raises(InputError, match=message):
        ours(**{**args, **kw})


def test_control_image_needs_a_controlnet(trio):
    _, folder, _ = trio
    plain = minisd.StableDiffusion.from_pretrained(folder)
    with pytest.raises(InputError, match="control_image: this pipeline has no ControlNet"):
        plain("a cat", num_inference_steps=2, control_image=_control(), progress=False)


def test_lazy_weights_give_the_eager_result(trio):
    """weights="stream" reaches the ControlNet (cast per layer, pages released after the
    denoising phase) and changes memory, not results."""
    from minisd.weights import CastOnRead

    _, folder, ours = trio
    lazy = minisd.StableDiffusion.from_pretrained(
        folder, controlnet=folder / "controlnet", weights="stream"
    )
    assert isinstance(lazy.controlnet.params, CastOnRead)
    args = dict(prompt="a cat", num_inference_steps=2, control_image=_control(), seed=0,
                scheduler="ddim", output_type="latent", progress=False)  # fmt: skip
    np.testing.assert_array_equal(lazy(**args), ours(**args))


@pytest.fixture(scope="module")
def multi(trio):
    """A second randomized ControlNet beside the first: (diffusers pipeline, minisd pipeline)."""
    torch, diffusers = need("torch", "diffusers")
    components, folder, _ = trio
    cn2 = diffusers.ControlNetModel.from_unet(components["unet"])
    randomize_(cn2, seed=8)
    with torch.no_grad():
        for conv in [*cn2.controlnet_down_blocks, cn2.controlnet_mid_block]:
            conv.weight.mul_(0.1)
    cn2.eval().save_pretrained(str(folder / "controlnet2"), safe_serialization=True)
    nets = [folder / "controlnet", folder / "controlnet2"]
    ours = minisd.StableDiffusion.from_pretrained(folder, controlnet=nets)
    ref = _ref(({**components, "controlnet": [components["controlnet"], cn2.eval()]},))
    return ref, ours


@pytest.mark.parametrize(
    "kw",
    [
        dict(controlnet_conditioning_scale=[0.7, 0.4]),
        dict(control_guidance_start=[0.0, 0.5], control_guidance_end=[0.5, 1.0]),
        dict(guess_mode=True, controlnet_conditioning_scale=0.6),
    ],
)
def test_multi_controlnet_same_latents(multi, kw):
    """Several ControlNets (diffusers' MultiControlNetModel): residuals summed, each with its
    own image, scale and step window."""
    ref, ours = multi
    latents = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    images = [_control(seed=5), _control(seed=6)]
    args = dict(prompt=PROMPTS[0], num_inference_steps=4, guidance_scale=5.0, latents=latents,
                output_type="latent", **kw)  # fmt: skip
    expect = _run_ref(ref, "ddim", image=images, **args).numpy()
    got = ours(**args, control_image=images, scheduler="ddim", progress=False)
    assert_rel(got, expect, TOL, f"MultiControlNet {kw}")
    one = ours(**{**args, "controlnet_conditioning_scale": [0.7, 0.0]}, control_image=images,
               scheduler="ddim", progress=False)  # fmt: skip
    assert np.abs(one - got).max() > 1e-3 * np.abs(got).max()  # the second one counts


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(control_image=[_control()]), "1 images for 2 ControlNets"),
        (dict(control_image=_control()), "a list of 2 images"),
        (dict(controlnet_conditioning_scale=[1.0, 1.0, 1.0]), "3 values for 2 ControlNets"),
        (dict(control_guidance_end=[1.0, 0.0]), "0 <= start < end <= 1"),
    ],
)
def test_bad_multi_controlnet_arguments(multi, kw, message):
    _, ours = multi
    args = dict(prompt="a", num_inference_steps=2, control_image=[_control(), _control()],
                progress=False)  # fmt: skip
    with pytest.raises(InputError, match=message):
        ours(**{**args, **kw})
