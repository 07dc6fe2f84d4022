"""LCM-distilled UNets (``time_cond_proj_dim``) in the pipeline, and the LCM / TCD samplers,
against diffusers' StableDiffusion pipelines on the same folders.

An LCM-distilled UNet (Luo et al. 2023) takes the guidance scale as an embedding of
w = guidance_scale - 1 (``timestep_cond``) instead of classifier-free guidance: one UNet batch
per step whatever the scale. LCM and TCD also run on ordinary UNets with CFG (LCM-LoRA style).
"""

import numpy as np
import pytest
from pipelines import build
from refharness import assert_rel, need
from test_pipeline import PROMPTS, TOL, _CountingUNet, _image, _mask, _run_ref

import minisd
from minisd.errors import InputError
from minisd.pipeline_steps import guidance_scale_embedding
from minisd_parity.compare import time_proj_bound


@pytest.fixture(scope="module")
def lcm_pair(tmp_path_factory):
    """(diffusers pipeline, minisd pipeline) over one LCM-distilled tiny folder."""
    folder = tmp_path_factory.mktemp("pipes") / "lcm"
    ref = build("lcm", folder)
    return ref, minisd.StableDiffusion.from_pretrained(folder)


@pytest.fixture(scope="module")
def sd1_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipes") / "sd1"
    ref = build("sd1", folder)
    return ref, minisd.StableDiffusion.from_pretrained(folder)


@pytest.mark.parametrize("dim", [4, 24, 25, 256, 512])
@pytest.mark.parametrize("scale", [0.0, 1.0, 1.5, 8.0, 15.0])
def test_guidance_embedding_matches_diffusers(dim, scale):
    """A float32 island, as the UNet's time_proj: torch's float32 exp (frequencies) and sin/cos
    are not correctly rounded, ours are; the argument 1000 w freq then differs by up to
    1000 |w| ulp(freq) (measured <= 3.1e-5 at w = 14, dim 24; 0 at w = 0, the LCM default)."""
    torch, diffusers = need("torch", "diffusers")
    w = torch.tensor(scale - 1).repeat(3)
    ref = diffusers.StableDiffusionPipeline.get_guidance_scale_embedding(None, w, dim).numpy()
    ours = guidance_scale_embedding(np.full(3, scale - 1, np.float32), dim)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (3, dim)
    assert np.abs(ours - ref).max() <= time_proj_bound(1000 * abs(scale - 1))
    if dim % 2:
        assert (ours[:, -1] == 0).all()


def test_guidance_embedding_width_is_checked():
    with pytest.raises(InputError, match="time_cond_proj_dim=3"):
        guidance_scale_embedding(np.zeros(1), 3)


@pytest.mark.parametrize("scale", [1.0, 8.0])
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])  # deterministic ones
def test_lcm_unet_same_latents(lcm_pair, scheduler, scale):
    ref, ours = lcm_pair
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    kw = dict(prompt=PROMPTS, num_inference_steps=4, guidance_scale=scale, height=64, width=64,
              latents=latents, output_type="latent")  # fmt: skip
    expect = _run_ref(ref, scheduler, **kw).numpy()
    got = ours(**{**kw, "scheduler": scheduler, "progress": False})
    assert_rel(got, expect, TOL, f"LCM UNet, {scheduler}, guidance {scale}")


def test_lcm_unet_takes_the_scale_as_an_embedding(lcm_pair):
    """No CFG batch: one UNet row per image at guidance 8, and the scale changes the result
    (through timestep_cond); a negative prompt has no effect, as in diffusers."""
    _, ours = lcm_pair
    calls, saved = [], ours.unet

    class Recording(_CountingUNet):
        def __call__(self, x, t, ctx, *args, **kw):
            calls.append((x.shape[0], kw["timestep_cond"]))
            return self.unet(x, t, ctx, *args, **kw)

    kw = dict(num_inference_steps=2, height=64, width=64, output_type="latent", progress=False,
              scheduler="ddim")  # fmt: skip
    try:
        ours.unet = Recording(ours.unet)
        a = ours("a cat", guidance_scale=8.0, seed=1, **kw)
        b = ours("a cat", guidance_scale=8.0, negative_prompt="blurry", seed=1, **kw)
        c = ours("a cat", guidance_scale=2.0, seed=1, **kw)
    finally:
        ours.unet = saved
    assert [n for n, _ in calls] == [1] * 6
    assert calls[0][1].shape == (1, 8) and not np.allclose(calls[0][1], calls[4][1])
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3 * np.abs(a).max()


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_unet_and_sampler_same_seed(lcm_pair, steps):
    """The LCM sampler re-noises with fresh noise between steps (drawn as diffusers draws)."""
    ref, ours = lcm_pair
    kw = dict(prompt=PROMPTS[0], num_inference_steps=steps, guidance_scale=1.5, height=64,
              width=64, num_images_per_prompt=2, output_type="latent")  # fmt: skip
    expect = _run_ref(ref, "lcm", seed=5, **kw).numpy()
    got = ours(**kw, seed=5, scheduler="lcm", progress=False)
    assert_rel(got, expect, TOL, f"lcm seeded, {steps} steps")


def test_the_default_scheduler_of_an_lcm_checkpoint_is_lcm(lcm_pair, caplog):
    _, ours = lcm_pair
    assert type(ours.make_scheduler()).__name__ == "LCMScheduler" and not caplog.records


def test_lcm_img2img_same_seed(lcm_pair):
    diffusers = need("diffusers")
    ref, ours = lcm_pair
    i2i = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    i2i.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPTS[1], image=_image(), strength=0.5, num_inference_steps=6,
              guidance_scale=2.0, output_type="latent")  # fmt: skip
    expect = _run_ref(i2i, "lcm", seed=3, **kw).numpy()
    got = ours(**kw, seed=3, scheduler="lcm", progress=False)
    assert_rel(got, expect, TOL, "LCM img2img")


def test_lcm_inpaint_same_seed(lcm_pair):
    """4-channel inpainting: the mask blend re-noises the image latents to each next timestep."""
    diffusers = need("diffusers")
    ref, ours = lcm_pair
    inpaint = diffusers.StableDiffusionInpaintPipeline(**ref.components)
    inpaint.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPTS[0], image=_image(seed=1), mask_image=_mask(), strength=0.75,
              num_inference_steps=4, guidance_scale=4.0, height=64, width=64,
              output_type="np")  # fmt: skip
    expect = _run_ref(inpaint, "lcm", seed=11, **kw)
    got = ours(**kw, seed=11, scheduler="lcm", progress=False)
    assert_rel(got, expect, TOL, "LCM inpaint")


@pytest.mark.parametrize("scheduler, eta", [("lcm", 0.0), ("tcd", 0.0), ("tcd", 0.3)])
def test_consistency_samplers_on_an_ordinary_unet_with_cfg(sd1_pair, scheduler, eta):
    """LCM-LoRA / TCD-LoRA style: an ordinary UNet (classifier-free guidance) with the LCM or
    TCD sampler. TCD's gamma is the pipeline's ``eta``: 0 (deterministic) by default, as in
    diffusers' pipelines; its authors suggest 0.3."""
    ref, ours = sd1_pair
    kw = dict(prompt=PROMPTS[0], negative_prompt="blurry", num_inference_steps=4,
              guidance_scale=1.5, height=64, width=64, output_type="latent", eta=eta)  # fmt: skip
    expect = _run_ref(ref, scheduler, seed=2, **kw).numpy()
    got = ours(**kw, seed=2, scheduler=scheduler, progress=False)
    assert_rel(got, expect, TOL, f"{scheduler} with CFG, eta {eta}")


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_tcd_on_an_lcm_unet_same_seed(lcm_pair, eta):
    ref, ours = lcm_pair
    kw = dict(prompt=PROMPTS, num_inference_steps=4, guidance_scale=2.0, height=64, width=64,
              output_type="latent", eta=eta)  # fmt: skip
    expect = _run_ref(ref, "tcd", seed=9, **kw).numpy()
    got = ours(**kw, seed=9, scheduler="tcd", progress=False)
    assert_rel(got, expect, TOL, f"tcd, eta {eta}")
