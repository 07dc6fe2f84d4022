"""StableDiffusion against diffusers' pipelines on tiny folders written by diffusers.

Same `latents` -> same latents and images (fp32, rel. error <= 1e-4) for pndm, ddim, euler,
dpmpp_2m, unipc; same seed (minisd.rng.TorchGenerator vs torch.Generator().manual_seed) -> same
results for txt2img (incl. euler_a, ddpm), img2img and inpainting.
"""

import numpy as np
import pytest
from pipelines import build
from refharness import assert_rel, need

import minisd
from minisd.errors import InputError
from minisd.schedulers import NAMES

TOL = 1e-4
PROMPTS = ["a watercolor painting of a lighthouse", "a cat, (masterpiece:1.2)"]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request, tmp_path_factory):
    """(diffusers pipeline, minisd pipeline) over the same folder."""
    folder = tmp_path_factory.mktemp("pipes") / request.param
    ref = build(request.param, folder)
    return ref, minisd.StableDiffusion.from_pretrained(folder)


def _ref_scheduler(ref, name):
    """diffusers' scheduler for minisd's ``name`` (None: the pipeline's own)."""
    if name is None:
        return ref.scheduler
    diffusers = need("diffusers")
    cls_name, overrides = NAMES[name]
    return getattr(diffusers, cls_name).from_config(ref.scheduler.config, **overrides)


def _run_ref(ref, name, **kw):
    torch = need("torch")
    saved = ref.scheduler
    ref.scheduler = _ref_scheduler(ref, name)
    if "seed" in kw:
        kw["generator"] = torch.Generator().manual_seed(kw.pop("seed"))
    if "latents" in kw:
        kw["latents"] = torch.from_numpy(kw["latents"])
    try:
        with torch.no_grad():
            return ref(**kw).images
    finally:
        ref.scheduler = saved


@pytest.mark.parametrize(
    "scheduler", ["pndm", "ddim", "euler", "dpmpp_2m", "unipc", "dpm2", "dpmpp_2s", "deis"]
)
def test_same_latents_same_result(pair, scheduler):
    ref, ours = pair
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    kw = dict(prompt=PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=4,
              guidance_scale=6.0, height=64, width=64, latents=latents,
              output_type="latent")  # fmt: skip
    expect = _run_ref(ref, scheduler, **kw).numpy()
    got = ours(**{**kw, "scheduler": scheduler, "progress": False})
    assert_rel(got, expect, TOL, f"{scheduler} latents")
    if scheduler == "ddim":  # decoded images through the VAE and diffusers' postprocessing
        kw["output_type"] = "np"
        expect = _run_ref(ref, scheduler, **kw)
        got = ours(**{**kw, "scheduler": scheduler, "progress": False})
        assert got.shape == expect.shape == (2, 64, 64, 3)
        assert_rel(got, expect, TOL, "np images")


@pytest.mark.parametrize("rescale", [0.0, 0.7, 1.0])
def test_guidance_rescale_as_diffusers(pair, rescale):
    """Lin et al.'s guidance rescale (rescale_noise_cfg), fixed latents; 0 is plain CFG."""
    ref, ours = pair
    latents = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    kw = dict(prompt=PROMPTS, num_inference_steps=3, guidance_scale=9.0, height=64, width=64,
              latents=latents, output_type="latent", guidance_rescale=rescale)  # fmt: skip
    expect = _run_ref(ref, "ddim", **kw).numpy()
    got = ours(**kw, scheduler="ddim", progress=False)
    assert_rel(got, expect, TOL, f"guidance_rescale={rescale}")
    if rescale:
        plain = ours(**{**kw, "guidance_rescale": 0.0}, scheduler="ddim", progress=False)
        assert np.abs(plain - got).max() > 1e-3 * np.abs(got).max()


def test_rescale_guidance_is_rescale_noise_cfg_in_float64():
    torch = need("torch")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from minisd.pipeline_steps import rescale_guidance

    rng = np.random.default_rng(0)
    guided, text = rng.standard_normal((2, 3, 4, 4, 5)) * [[[[[3.0]]]], [[[[1.0]]]]]
    expect = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(text), 0.6).numpy()
    assert_rel(rescale_guidance(guided, text, 0.6), expect, 1e-14, "rescale_guidance")


@pytest.mark.parametrize(
    "scheduler,eta",
    [("euler_a", 0.0), ("ddpm", 0.0), ("ddim", 0.7), ("dpmpp_2m_sde", 0.0),
     ("dpmpp_2m_sde_karras", 0.0), ("dpm2_a", 0.0), ("dpm2_a_karras", 0.0)],
)  # fmt: skip
def test_same_seed_same_result_txt2img(pair, scheduler, eta):
    ref, ours = pair
    kw = dict(prompt=PROMPTS[0], num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
              num_images_per_prompt=2, output_type="latent")  # fmt: skip
    extra = {"eta": eta} if scheduler == "ddim" else {}
    expect = _run_ref(ref, scheduler, seed=7, **kw, **extra).numpy()
    got = ours(**kw, **extra, seed=7, scheduler=scheduler, progress=False)
    assert_rel(got, expect, TOL, f"{scheduler} seeded")


def _image(h=64, w=64, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _mask(h=64, w=64):
    from PIL import Image

    m = np.zeros((h, w), np.uint8)
    m[h // 4 : 3 * h // 4, w // 3 :] = 255
    return Image.fromarray(m)


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpm2_a", "dpmpp_2s", "deis"])
def test_img2img_same_seed(pair, scheduler):
    diffusers = need("diffusers")
    ref, ours = pair
    i2i = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    i2i.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPTS[1], image=_image(), strength=0.6, num_inference_steps=5,
              guidance_scale=5.0, output_type="latent")  # fmt: skip
    expect = _run_ref(i2i, scheduler, seed=3, **kw).numpy()
    got = ours(**kw, seed=3, scheduler=scheduler, progress=False)
    assert_rel(got, expect, TOL, f"img2img {scheduler}")


@pytest.mark.parametrize(
    "kind,strength,scheduler",
    [
        ("inpaint", 1.0, "ddim"),
        ("inpaint", 0.7, "ddim"),
        ("sd1", 0.8, "ddim"),
        # 4-channel blending re-noises the image latents to the current step's sigma
        ("sd1", 0.7, "dpmpp_2m"),
        ("sd1", 1.0, "unipc"),
        ("sd1", 0.7, "dpm2_a"),  # two model calls per step, noise on the second
        ("sd1", 0.7, "dpmpp_3s"),
        ("sd1", 0.7, "deis"),
        ("sd1", 0.7, "dpmpp_2m_sde"),
    ],
)
def test_inpaint_same_seed(kind, strength, scheduler, tmp_path_factory):
    """9-channel inpainting UNets, and mask blending for ordinary (4-channel) UNets.

    Random-weight UNets make sampling chaotic: near t=999 DDIM divides by sqrt(alpha_bar) ~ 0.07,
    so round-off grew ~60x per step at guidance 7 (float32: 1e-7 after one step, 1.2e-4 after
    four; float64 likewise 3e-9 -> 2e-7, so not a bug). pipelines.py scales the random UNet's
    conv_out by 0.1 (measured margins then 1e-6 against the 1e-4 bound)."""
    diffusers = need("diffusers")
    folder = tmp_path_factory.mktemp("inpaint") / kind
    base = build(kind, folder)
    ref = diffusers.StableDiffusionInpaintPipeline(**base.components)
    ref.set_progress_bar_config(disable=True)
    ours = minisd.StableDiffusion.from_pretrained(folder)
    kw = dict(prompt=PROMPTS[0], image=_image(seed=1), mask_image=_mask(), strength=strength,
              num_inference_steps=4, guidance_scale=4.0, height=64, width=64)  # fmt: skip
    expect = _run_ref(ref, scheduler, seed=11, output_type="np", **kw)
    got = ours(**kw, seed=11, scheduler=scheduler, output_type="np", progress=False)
    assert_rel(got, expect, TOL, f"inpaint {kind} {scheduler}")


def test_plms_and_heun_and_lms_run(pair):
    """Samplers without a separate parity target here still give finite images of the right
    shape (their trajectories are checked against diffusers / the paper in the scheduler tests)."""
    _, ours = pair
    for name in ("plms", "heun", "lms", "dpmpp_2m_karras"):
        out = ours("a cat", num_inference_steps=3, height=64, width=32, scheduler=name,
                   output_type="np", progress=False)  # fmt: skip
        assert out.shape == (1, 64, 32, 3) and np.isfinite(out).all()
        assert 0 <= out.min() and out.max() <= 1


class _CountingUNet:
    """The pipeline's UNet, recording the timestep of every call."""

    def __init__(self, unet):
        self.unet, self.seen = unet, []

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def __call__(self, x, t, *args, **kw):
        self.seen.append(int(t))
        return self.unet(x, t, *args, **kw)


def test_img2img_plms_starts_mid_schedule(pair):
    """PLMS re-lists its calls when img2img skips steps: strength 0.5 of 6 steps = 3 base steps,
    i.e. 4 model calls (the first step takes two: at t, then at the next timestep, which the
    second step calls again), and one callback per solver step, numbered by model call as
    diffusers numbers steps after warm-up calls (PNDM's)."""
    _, ours = pair
    counting, saved = _CountingUNet(ours.unet), ours.unet
    steps = []
    try:
        ours.unet = counting
        out = ours("a cat", image=_image(), strength=0.5, num_inference_steps=6,
                   scheduler="plms", callback=lambda i, t, x: steps.append(i),
                   output_type="latent", progress=False)  # fmt: skip
    finally:
        ours.unet = saved
    seen = counting.seen
    assert len(seen) == 4 and seen[1] == seen[2] and np.isfinite(out).all()
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("scheduler", ["heun", "ddim", "pndm", "dpm2", "dpmpp_3s"])
def test_callback_as_diffusers(pair, scheduler):
    """diffusers' callback(step, t, latents): once per solver step (Heun makes two model calls
    per step), with the same step numbers, timesteps and latents."""
    ref, ours = pair
    kw = dict(prompt="a cat", num_inference_steps=3, height=64, width=64, output_type="latent")
    seen_ref, seen = [], []
    _run_ref(ref, scheduler, seed=1, callback_steps=1, **kw,
             callback=lambda i, t, x: seen_ref.append((i, float(t), x.numpy().copy())))  # fmt: skip
    ours(**kw, seed=1, scheduler=scheduler, progress=False,
         callback=lambda i, t, x: seen.append((i, float(t), np.asarray(x).copy())))  # fmt: skip
    assert [(i, t) for i, t, _ in seen] == [(i, t) for i, t, _ in seen_ref]
    assert len(seen) == 3
    for (i, _, got), (_, _, expect) in zip(seen, seen_ref):
        assert_rel(got, expect, TOL, f"{scheduler} callback latents at step {i}")


def test_default_scheduler_is_the_checkpoint_s_own(pair):
    """scheduler=None: the checkpoint's scheduler class with its config as it is (here a
    third-order DPM-Solver, which the name "dpmpp_2m" would turn into second order)."""
    diffusers = need("diffusers")
    ref, ours = pair
    own = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config, solver_order=3)
    config = dict(own.config, _class_name="DPMSolverMultistepScheduler")
    parts = ("tokenizer", "text_encoder", "unet", "vae")
    pipe = minisd.StableDiffusion(**{k: getattr(ours, k) for k in parts}, scheduler_config=config)
    assert pipe.scheduler.config.solver_order == 3
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kw = dict(prompt="a cat", num_inference_steps=5, height=64, width=64, latents=latents,
              output_type="latent")  # fmt: skip
    saved, ref.scheduler = ref.scheduler, own
    try:
        torch = need("torch")
        with torch.no_grad():
            expect = ref(**{**kw, "latents": torch.from_numpy(latents)}).images.numpy()
    finally:
        ref.scheduler = saved
    assert_rel(pipe(**kw, scheduler=None, progress=False), expect, TOL, "own scheduler")
    second = pipe(**kw, scheduler="dpmpp_2m", progress=False)
    assert np.abs(second - expect).max() > 1e-3 * np.abs(expect).max()  # the name's preset


def test_every_scheduler_class_has_a_default_name(caplog):
    """A checkpoint naming any scheduler class minisd implements gets it as its default; an
    unknown class (diffusers' FlowMatchEulerDiscreteScheduler, for SD3) warns and uses pndm."""
    from minisd import schedulers
    from minisd.pipeline import _default_scheduler_name

    for cls_name in schedulers._CLASSES:
        name = _default_scheduler_name(cls_name)
        assert NAMES[name][0] == cls_name, cls_name
    assert not caplog.records
    assert _default_scheduler_name(None) == "pndm" and not caplog.records
    assert _default_scheduler_name("FlowMatchEulerDiscreteScheduler") == "pndm"
    assert "FlowMatchEulerDiscreteScheduler is not implemented" in caplog.text


def test_callback_and_pil(pair):
    ref, ours = pair
    seen = []
    images = ours(["a", "b"], num_inference_steps=3, height=32, width=32, scheduler="ddim",
                  callback=lambda i, t, x: seen.append((i, x.shape)), progress=False)  # fmt: skip
    assert [i for i, _ in seen] == [0, 1, 2]
    assert all(s == (2, 4, 4, 4) for _, s in seen)
    assert len(images) == 2 and images[0].size == (32, 32)


def _embeds(ref, prompts, clip_skip):
    """diffusers' encode_prompt with clip_skip, written out: hidden_states[-(k + 1)] through the
    final layer norm (diffusers' own path reaches for `text_encoder.text_model`, which
    transformers 5 no longer has)."""
    torch = need("torch")
    tok, te = ref.tokenizer, ref.text_encoder
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        if clip_skip is None:
            return out[0]
        norm = next(m for n, m in te.named_modules() if n.endswith("final_layer_norm"))
        return norm(out.hidden_states[-(clip_skip + 1)])


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_as_diffusers(pair, clip_skip):
    """clip_skip applies to the prompt, not to the negative prompt, as diffusers."""
    torch = need("torch")
    ref, ours = pair
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kw = dict(num_inference_steps=3, height=64, width=64, output_type="latent")
    with torch.no_grad():
        expect = ref(prompt_embeds=_embeds(ref, ["a red cat"], clip_skip),
                     negative_prompt_embeds=_embeds(ref, ["blurry"], None),
                     latents=torch.from_numpy(latents), **kw).images.numpy()  # fmt: skip
    got = ours("a red cat", negative_prompt="blurry", clip_skip=clip_skip, latents=latents,
               scheduler=None, progress=False, **kw)  # fmt: skip
    assert_rel(got, expect, TOL, f"clip_skip={clip_skip}")


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(height=60), "height=60"),
        (dict(width=0), "width=0"),
        (dict(num_inference_steps=0), "num_inference_steps=0"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(guidance_scale="7.5"), "guidance_scale"),
        (dict(prompt=[]), "empty prompt list"),
        (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "negative_prompt"),
        (dict(scheduler="k_dpm_3"), "scheduler='k_dpm_3'"),
        (dict(output_type="tensor"), "output_type"),
        (dict(mask_image="m"), "mask_image"),
        (dict(image="img", strength=0.0), "strength"),
        (dict(image="img", strength=1.5), "strength"),
        (dict(image="img", strength="0.5"), "strength"),
        (dict(image=5), "image: expected a PIL image"),
        (dict(image=[]), "image: empty list"),
        (dict(image="img", mask_image=3), "mask_image: expected a PIL image"),
        (dict(num_images_per_prompt="2"), "num_images_per_prompt"),
        (dict(num_images_per_prompt=1.5), "num_images_per_prompt"),
        (dict(eta=float("nan")), "eta=nan"),
        (dict(eta=-1.0), "eta=-1.0"),
        (dict(eta=1.5, scheduler="tcd"), "TCD's gamma"),
        (dict(clip_skip=1.5), "clip_skip=1.5"),
        (dict(guidance_rescale=1.5), "guidance_rescale=1.5"),
        (dict(guidance_rescale=float("nan")), "guidance_rescale=nan"),
        (dict(callback=5), "callback=5"),
        (dict(prompt="lone \ud800"), "not valid Unicode"),
    ],
)
def test_bad_arguments_raise_before_any_work(pair, kw, message):
    _, ours = pair
    args = dict(prompt="a cat", num_inference_steps=2, height=64, width=64, progress=False)
    args.update(kw)
    if args.get("image") == "img":
        args["image"] = _image()
    with pytest.raises(InputError, match=message):
        ours(**args)


def test_model_path_must_be_a_path():
    with pytest.raises(InputError, match="path=None"):
        minisd.StableDiffusion.from_pretrained(None)


def test_mask_size_mismatch(pair):
    _, ours = pair
    with pytest.raises(InputError, match="mask_image"):
        ours("a", image=_image(64, 64), mask_image=_mask(32, 64), num_inference_steps=2,
             progress=False)  # fmt: skip


def test_single_file_gives_the_folder_results(pair, tmp_path):
    """weights_tools.to_original -> StableDiffusion.from_pretrained(single file): same output."""
    import weights_tools

    ref, ours = pair
    folder = tmp_path / "again"
    ref.save_pretrained(str(folder), safe_serialization=True)
    single = tmp_path / "model.safetensors"
    weights_tools.to_original(folder, single)
    pred = ref.scheduler.config.prediction_type
    other = minisd.StableDiffusion.from_pretrained(single, prediction_type=pred)
    kw = dict(num_inference_steps=3, height=64, width=64, seed=1, output_type="latent",
              progress=False, scheduler="ddim")  # fmt: skip
    np.testing.assert_array_equal(other("a red sofa", **kw), ours("a red sofa", **kw))
