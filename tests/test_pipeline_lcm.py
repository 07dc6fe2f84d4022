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
from test_pipeline import PROMPTS, TOL, _CountingUNet, _run_ref

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
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
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
        def __call__(self, x, t, ctx, **kw):
            calls.append((x.shape[0], kw["timestep_cond"]))
            return self.unet(x, t, ctx, **kw)

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
