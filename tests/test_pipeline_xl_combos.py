"""SDXL add-ons combined in ways the other SDXL tests leave out, float32, against diffusers where
it has the combination (rel. error <= 1e-4), on tests/pipelines_xl.py's tiny folders:

- the refiner (second text encoder only, aesthetic scores, latents_mean / latents_std) with a
  ControlNet made from its own UNet, img2img: diffusers' StableDiffusionXLControlNetImg2Img-
  Pipeline runs it over the refiner's modules (text_encoder None, requires_aesthetics_score)
  when original_size is given (its default fails there; see the test);
- weights="lazy" / "stream" with an SDXL ControlNet: the eager result, bit for bit;
- a T2I-Adapter with img2img: diffusers has no SDXL adapter img2img pipeline, so the reference
  is its StableDiffusionXLImg2ImgPipeline with its T2IAdapter's features given to its UNet as
  StableDiffusionXLAdapterPipeline gives them (down_intrablock_additional_residuals);
- the CLI's --ip-adapter / --image-encoder / --ip-adapter-image on an SDXL folder: the API's
  image;
- explicit negative micro-conditioning with several images: img2img as diffusers; txt2img,
  where diffusers' rows are misaligned for batches, documented.
"""

import numpy as np
import pytest
from pipelines_xl import build, build_controlnet
from refharness import assert_rel, need, randomize_
from test_ip_adapter import adapter_state_dict
from test_pipeline_xl import PROMPTS, TOL, run_ref
from test_pipeline_xl_adapter import ADAPTERS
from test_pipeline_xl_ip import BIG_G, WEIGHTS

from minisd.errors import InputError
from minisd.pipeline_xl import StableDiffusionXL
from minisd.weights import CastOnRead, save_file


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One tiny SDXL base folder with, next to it, an SDXL ControlNet (controlnet/), an SDXL
    T2I-Adapter (xl_rgb/), an IP-Adapter file with its image encoder (image_encoder/) and a
    condition image (cond.png). {"ref", "i2i": diffusers pipelines, "cn", "adapter": diffusers
    modules, "folder", "ours": minisd without add-ons, "ours_cn": with the ControlNet}."""
    torch, diffusers, transformers = need("torch", "diffusers", "transformers")
    folder = tmp_path_factory.mktemp("xl_combos") / "base"
    ref, i2i = build("base", folder)
    cn = build_controlnet(ref.unet, folder / "controlnet", seed=7)
    torch.manual_seed(0)
    adapter = randomize_(diffusers.T2IAdapter(**ADAPTERS["xl_rgb"]), seed=40).eval()
    adapter.save_pretrained(str(folder / "xl_rgb"), safe_serialization=True)
    torch.manual_seed(0)
    enc = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**BIG_G))
    randomize_(enc, seed=9).eval().save_pretrained(str(folder / "image_encoder"))
    save_file(adapter_state_dict(ref.unet, seed=2, embed_dim=BIG_G["projection_dim"]),
              folder / WEIGHTS)  # fmt: skip
    _image(13).save(folder / "cond.png")
    ours = StableDiffusionXL.from_pretrained(folder)
    ours_cn = StableDiffusionXL.from_pretrained(folder, controlnet=folder / "controlnet")
    return dict(ref=ref, i2i=i2i, cn=cn, adapter=adapter, folder=folder, ours=ours,
                ours_cn=ours_cn)  # fmt: skip


def _image(seed, h=64, w=64):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def _latents(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 4, 8, 8)).astype(np.float32)


def _differs(a, b):
    return np.abs(a - b).max() > 1e-3 * np.abs(a).max()


# ------------------------------------------------------------------ 1. refiner + ControlNet


@pytest.fixture(scope="module")
def refiner_cn(tmp_path_factory):
    """(diffusers' StableDiffusionXLControlNetImg2ImgPipeline over the refiner's modules and a
    ControlNet from its UNet, minisd's refiner with that ControlNet)."""
    diffusers = need("diffusers")
    folder = tmp_path_factory.mktemp("xl_combos") / "refiner"
    _, i2i = build("refiner", folder)
    cn = build_controlnet(i2i.unet, folder / "controlnet", seed=5)
    c = i2i.components
    keys = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")
    ref = diffusers.StableDiffusionXLControlNetImg2ImgPipeline(
        **{k: c[k] for k in keys}, scheduler=c["scheduler"], controlnet=cn,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False,
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    ours = StableDiffusionXL.from_pretrained(folder, controlnet=folder / "controlnet")
    return ref, ours


REFINED = dict(negative_prompt="blurry", strength=0.6, aesthetic_score=7.5,
               negative_aesthetic_score=1.5, negative_original_size=(128, 96),
               controlnet_conditioning_scale=0.6)  # fmt: skip


@pytest.mark.parametrize(
    "scheduler, kw",
    [
        (None, {}),  # diffusers' defaults: strength 0.8, conditioning scale 0.8, guidance 5.0
        ("dpmpp_2m", REFINED),
        ("ddim", dict(guess_mode=True, control_guidance_end=0.5)),
    ],
)
def test_refiner_with_controlnet_img2img(refiner_cn, scheduler, kw):
    """The refiner's five time ids reach the ControlNet too (its add_embedding takes them).
    original_size is given: diffusers' default, the control image's torch.Size, fails there
    (torch.Size + crop + (aesthetic_score,): "takes an iterable of 'int'"); minisd's default
    is the same (64, 64)."""
    ref, ours = refiner_cn
    assert ours.text_encoder is None and ours.requires_aesthetics_score
    args = dict(prompt=PROMPTS, image=_image(1), num_inference_steps=4, output_type="np")
    args.update(original_size=(64, 64), **kw)  # see the docstring
    expect = run_ref(ref, scheduler, control_image=_image(2), seed=3, **args)
    got = ours(**args, control_image=_image(2), seed=3, scheduler=scheduler, progress=False)
    assert got.shape == expect.shape == (2, 64, 64, 3)
    err = assert_rel(got, expect, TOL, f"refiner + ControlNet img2img {scheduler} {kw}")
    print(f"\nrefiner + ControlNet {scheduler} {sorted(kw)}: {err:.2e}")
    off = {**args, "controlnet_conditioning_scale": 0.0}  # the same run, zero residuals
    assert _differs(got, ours(**off, control_image=_image(2), seed=3, scheduler=scheduler,
                              progress=False))  # fmt: skip


# ------------------------------------------------------------------ 2. lazy / stream weights


@pytest.mark.parametrize("mode", ["lazy", "stream"])
def test_lazy_weights_with_a_controlnet_give_the_eager_result(base, mode):
    """weights="lazy" / "stream" reach the SDXL ControlNet (cast per layer; "stream" gives the
    file pages back) and change memory, not results: txt2img with CFG and img2img, decoded."""
    folder = base["folder"]
    lazy = StableDiffusionXL.from_pretrained(folder, controlnet=folder / "controlnet",
                                             weights=mode)  # fmt: skip
    for params in (lazy.controlnet.params, lazy.unet.params):
        assert isinstance(params, CastOnRead) and params.stream == (mode == "stream")
    args = dict(prompt=PROMPTS, negative_prompt="blurry", num_inference_steps=2, seed=0,
                control_image=_image(4), scheduler="ddim", output_type="np",
                progress=False)  # fmt: skip
    np.testing.assert_array_equal(lazy(**args), base["ours_cn"](**args))
    args.update(image=_image(5), strength=0.7)
    np.testing.assert_array_equal(lazy(**args), base["ours_cn"](**args))


# ------------------------------------------------------------------ 3. T2I-Adapter + img2img


def _adapter_img2img_ref(base, adapter_image, scale, factor, n_run, **kw):
    """diffusers' SDXL img2img with its T2IAdapter's features (image preprocessed by the
    adapter pipeline's _preprocess_adapter_image, times the scale) added in its UNet for the
    first int(n_run * factor) UNet calls, every row (both CFG halves), as
    StableDiffusionXLAdapterPipeline adds them."""
    torch, _ = need("torch", "diffusers")
    from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_xl_adapter import (
        _preprocess_adapter_image,
    )

    i2i, unet = base["i2i"], base["i2i"].unet
    with torch.no_grad():
        x = _preprocess_adapter_image(adapter_image, 64, 64)
        feats = [f * scale for f in base["adapter"](x)]
    calls = []
    forward = unet.forward

    def with_features(sample, *args, **kwargs):
        if len(calls) < int(n_run * factor):
            n = sample.shape[0]
            kwargs["down_intrablock_additional_residuals"] = [f.repeat(n, 1, 1, 1) for f in feats]
        calls.append(1)
        return forward(sample, *args, **kwargs)

    unet.forward = with_features
    try:
        out = run_ref(i2i, None, **kw)
    finally:
        del unet.forward
    assert len(calls) == n_run
    return out


@pytest.mark.parametrize("scale, factor", [(0.8, 1.0), (1.2, 0.5)])
def test_adapter_with_img2img(base, scale, factor):
    """``image=`` + ``adapter_image=`` runs: img2img whose UNet gets the adapter's features.
    ``adapter_conditioning_factor`` is a fraction of the steps that run (3 of 4 at strength
    0.75), as diffusers' ControlNet img2img windows are; factor 0.5: the first step only."""
    ours = StableDiffusionXL.from_pretrained(base["folder"], adapter=base["folder"] / "xl_rgb")
    kw = dict(prompt=PROMPTS, negative_prompt="blurry", image=_image(6), strength=0.75,
              num_inference_steps=4, seed=8, output_type="np")  # fmt: skip
    cond = _image(7)
    expect = _adapter_img2img_ref(base, cond, scale, factor, 3, **kw)
    got = ours(**kw, adapter_image=cond, adapter_conditioning_scale=scale,
               adapter_conditioning_factor=factor, progress=False)  # fmt: skip
    err = assert_rel(got, expect, TOL, f"adapter + img2img, scale {scale}, factor {factor}")
    print(f"\nadapter + img2img {scale} {factor}: {err:.2e}")
    assert _differs(got, ours(**kw, progress=False))
    with pytest.raises(InputError, match="height=72, width=72: a T2I-Adapter needs multiples"):
        ours(**{**kw, "image": _image(6, 72, 72)}, adapter_image=cond, progress=False)


# ------------------------------------------------------------------ 4. CLI + SDXL IP-Adapter


def test_cli_ip_adapter_on_sdxl_is_the_api_image(base, tmp_path):
    from PIL import Image

    from minisd.cli import main

    folder = base["folder"]
    kw = dict(num_inference_steps=2, height=64, width=64, seed=0, scheduler="ddim",
              output_type="np", progress=False)  # fmt: skip
    pipe = StableDiffusionXL.from_pretrained(folder)
    pipe.load_ip_adapter(folder / WEIGHTS, folder / "image_encoder", scale=0.6)
    cond = Image.open(folder / "cond.png").convert("RGB")
    expect = pipe("a cat", ip_adapter_image=cond, **kw)[0]
    assert np.abs(expect - base["ours"]("a cat", **kw)[0]).max() > 0.01  # the image prompt counts
    out = tmp_path / "ip.png"
    args = ["generate", "a cat", "--model", str(folder), "--steps", "2", "--size", "64x64"]
    args += ["--seed", "0", "--scheduler", "ddim", "--ip-adapter", str(folder / WEIGHTS)]
    args += ["--image-encoder", str(folder / "image_encoder")]
    args += ["--ip-adapter-image", str(folder / "cond.png"), "--ip-adapter-scale", "0.6"]
    assert main([*args, "--out", str(out)]) == 0
    img = Image.open(out)
    got = np.asarray(img.convert("RGB"), np.float64) / 255
    assert got.shape == expect.shape
    assert np.abs(got - expect).max() <= 1 / 255 + 1e-6
    params = img.info["parameters"]
    assert f"IP-Adapter: {folder / WEIGHTS}:0.6" in params and "CFG scale: 5.0" in params


# ------------------------------------------------------------------ 5. negative micro-cond.

NEG = dict(original_size=(512, 768), target_size=(1024, 1024), crops_coords_top_left=(16, 32),
           negative_original_size=(256, 256), negative_target_size=(640, 512),
           negative_crops_coords_top_left=(8, 0))  # fmt: skip


def test_img2img_negative_sizes_with_several_images(base):
    """Two prompts x num_images_per_prompt=2 (8 UNet rows): diffusers' img2img repeats the
    negative ids over the negative rows, as minisd does (its negative rows take the positive
    crop: diffusers' _get_add_time_ids ignores negative_crops_coords_top_left there)."""
    kw = dict(prompt=PROMPTS, negative_prompt=["blurry", ""], image=_image(9), strength=0.6,
              num_inference_steps=4, num_images_per_prompt=2, output_type="np", seed=4,
              **NEG)  # fmt: skip
    expect = run_ref(base["i2i"], "euler_a", **kw)
    got = base["ours"](**kw, scheduler="euler_a", progress=False)
    assert got.shape == expect.shape == (4, 64, 64, 3)
    err = assert_rel(got, expect, TOL, "img2img, negative sizes, 4 images")
    print(f"\nimg2img negative sizes: {err:.2e}")
    same = base["ours"](**{**kw, "negative_original_size": None, "negative_target_size": None},
                        scheduler="euler_a", progress=False)  # fmt: skip
    assert _differs(got, same)  # the negative sizes reach the negative rows


def test_txt2img_negative_sizes_diffusers_misaligns_batches(base):
    """diffusers' StableDiffusionXLPipeline stacks the embeddings as [neg x B; pos x B] but
    the time ids as cat([neg, pos]).repeat(B, 1) = [neg, pos, neg, pos, ...]: for B > 1 and
    negative sizes unlike the positive ones, some negative rows get positive ids and some
    positive rows negative ids, so an image depends on which batch it is generated in.
    minisd gives every negative (positive) embedding row the negative (positive) ids, as
    diffusers' own SDXL img2img, inpainting and ControlNet img2img pipelines do (its txt2img
    ControlNet and T2I-Adapter pipelines copy the txt2img layout). Aligned rows are right: the
    unconditional prediction is the one conditioned on the negative prompt *and* the negative
    sizes, and an image must not depend on the batch it is made in. Hence: batch 1, where both
    layouts agree, matches diffusers; with batch 2, each of minisd's results is diffusers'
    batch-1 result for its prompt, and diffusers' batch-2 results are not."""
    ref, ours = base["ref"], base["ours"]
    lat = _latents(2, seed=5)
    kw = dict(negative_prompt="blurry", num_inference_steps=3, guidance_scale=7.0, height=64,
              width=64, output_type="latent", **NEG)  # fmt: skip
    alone = []
    for k, prompt in enumerate(PROMPTS):
        expect = run_ref(ref, "ddim", prompt=prompt, latents=lat[k : k + 1], **kw)
        got = ours(prompt=prompt, latents=lat[k : k + 1], scheduler="ddim", progress=False, **kw)
        err = assert_rel(got, expect, TOL, f"txt2img batch 1, prompt {k}")
        print(f"\ntxt2img negative sizes, batch 1, prompt {k}: {err:.2e}")
        alone.append(expect)
    alone = np.concatenate(alone)
    expect = run_ref(ref, "ddim", prompt=PROMPTS, latents=lat, **kw)
    got = ours(prompt=PROMPTS, latents=lat, scheduler="ddim", progress=False, **kw)
    err = assert_rel(got, alone, TOL, "minisd's batch 2 against diffusers' batch-1 images")
    print(f"minisd batch 2 vs diffusers batch 1: {err:.2e}")
    for k in range(2):  # diffusers' batch: both images move off their batch-1 results
        assert _differs(alone[k], expect[k]) and _differs(got[k], expect[k])
    print(f"diffusers batch 2 vs batch 1: {np.abs(expect - alone).max() / np.abs(alone).max():.2e}")
