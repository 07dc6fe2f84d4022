"""StableDiffusionUpscale against diffusers' StableDiffusionUpscalePipeline on a tiny x4 upscaler
folder written by diffusers itself (every parameter randomized).

The same seed draws the same numbers (minisd.rng.TorchGenerator vs torch.Generator): the noise
added to the low-resolution image first, then the initial latents, then the stochastic steps'.
16x20 inputs -> 64x80 outputs (the tiny VAE has 3 levels, a factor 4, as the real one).

Float64: the reference precision island of tests/test_unet.py (diffusers' float32 time_proj,
whose sin/cos are not correctly rounded, ~1e-8 at the latents after two steps) is closed by
giving the reference minisd's time_proj; every other operation is then held to 1e-10.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from refharness import assert_rel, need, randomize_
from test_pipeline import _CountingUNet

from minisd.errors import ConfigError, InputError
from minisd.pipeline_upscale import StableDiffusionUpscale, is_upscale_folder

TOL = {"float32": 1e-4, "float64": 1e-10}
PROMPTS = ["a watercolor painting of a lighthouse", "a cat, (masterpiece:1.2)"]


def _components(folder):
    """diffusers/transformers modules of a tiny x4 upscaler: the real layout (DownBlock2D first,
    only_cross_attention on the first levels, a noise-level class embedding, 7 input channels,
    SD2's gelu text encoder and "!" padding, DDIM v-prediction, a DDPM low_res_scheduler)."""
    torch, diffusers, transformers = need("torch", "diffusers", "transformers")
    from minisd.tokenizer import write_vocab_files

    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16, 16), layers_per_block=1, in_channels=7, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24, attention_head_dim=2, norm_num_groups=4,
        use_linear_projection=True, num_class_embeds=400,
        only_cross_attention=[True, True, False], sample_size=16,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=4,
        latent_channels=4, scaling_factor=0.08333,
    )  # fmt: skip
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=24, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407,
    ))  # fmt: skip
    for i, module in enumerate((unet, vae, text)):
        randomize_(module, seed=20 + i)
    with torch.no_grad():  # tame a random UNet's round-off growth (see tests/pipelines.py)
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    tok_dir = write_vocab_files(folder.parent / f"{folder.name}_tokenizer", pad_token="!")
    kw = dict(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    return dict(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(tok_dir)),
        scheduler=diffusers.DDIMScheduler(**kw, prediction_type="v_prediction",
                                          set_alpha_to_one=False, steps_offset=1),
        low_res_scheduler=diffusers.DDPMScheduler(**kw), max_noise_level=350,
    )  # fmt: skip


@pytest.fixture(scope="module")
def x4_folder(tmp_path_factory):
    """(folder, diffusers' pipeline loaded back from it, as a user would)."""
    diffusers = need("diffusers")
    folder = tmp_path_factory.mktemp("pipes") / "x4"
    cls = diffusers.StableDiffusionUpscalePipeline
    cls(**_components(folder)).save_pretrained(str(folder), safe_serialization=True)
    ref = cls.from_pretrained(str(folder), local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return folder, ref


@pytest.fixture(scope="module")
def x4_pair(x4_folder):
    return x4_folder[1], StableDiffusionUpscale.from_pretrained(x4_folder[0])


def _image(h=16, w=20, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _run_ref(ref, scheduler=None, **kw):
    """diffusers' pipeline with minisd's scheduler ``scheduler`` (None: the folder's own)."""
    torch = need("torch")
    from minisd.schedulers import NAMES

    saved = ref.scheduler
    if scheduler is not None:
        cls_name, overrides = NAMES[scheduler]
        ref.scheduler = getattr(need("diffusers"), cls_name).from_config(saved.config, **overrides)
    if "seed" in kw:
        kw["generator"] = torch.Generator().manual_seed(kw.pop("seed"))
    if kw.get("latents") is not None:
        kw["latents"] = torch.from_numpy(kw["latents"])
    try:
        with torch.no_grad():
            out = ref(**kw).images
    finally:
        ref.scheduler = saved
    return out.numpy() if hasattr(out, "numpy") else out


@pytest.mark.parametrize(
    "scheduler,eta,noise_level",
    [(None, 0.0, 20), ("ddim", 0.6, 350), ("ddpm", 0.0, 0), ("euler_a", 0.0, 100),
     ("dpmpp_2m", 0.0, 20), ("pndm", 0.0, 20)],
)  # fmt: skip
def test_same_seed_same_latents(x4_pair, scheduler, eta, noise_level):
    """Seeded runs: image noise, initial latents and each stochastic step's noise in order."""
    ref, ours = x4_pair
    kw = dict(prompt=PROMPTS[0], image=_image(), num_inference_steps=3, guidance_scale=7.0,
              noise_level=noise_level, eta=eta, output_type="latent")  # fmt: skip
    expect = _run_ref(ref, scheduler, seed=5, **kw)
    got = ours(**kw, seed=5, scheduler=scheduler, progress=False)
    assert got.shape == expect.shape == (1, 4, 16, 20)
    assert_rel(got, expect, TOL["float32"], f"x4 {scheduler} latents")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_decoded_images_match(x4_folder, x4_pair, dtype):
    """Decoded to (N, 64, 80, 3) in [0, 1] through the 0.08333-scaled VAE; float64 with the
    diffusers pipeline cast to float64 (its image output is float32, as minisd's)."""
    torch = need("torch")
    ref, ours = x4_pair
    if dtype == "float64":
        ref = type(ref).from_pretrained(str(x4_folder[0]), local_files_only=True)
        ref = ref.to(torch.float64)  # a fresh copy: the module's float32 pipeline stays as is
        ref.set_progress_bar_config(disable=True)
        _exact_time_proj(ref.unet)
        ours = StableDiffusionUpscale.from_pretrained(x4_folder[0], dtype="float64")
    kw = dict(prompt=PROMPTS, image=[_image(seed=1), _image(seed=2)], num_inference_steps=2,
              negative_prompt=["blurry", "dark"], noise_level=40, seed=3)  # fmt: skip
    for output_type in ("latent", "np"):
        expect = _run_ref(ref, **kw, output_type=output_type)
        got = ours(**kw, output_type=output_type, progress=False)
        assert got.dtype == expect.dtype
        tol = TOL[dtype] if output_type == "latent" else {"float32": 1e-4, "float64": 1e-6}[dtype]
        assert_rel(got, expect, tol, f"x4 {output_type} {dtype}")
    assert got.shape == (2, 64, 80, 3)


def _exact_time_proj(unet):
    """The float32 island of the module docstring: the reference's time_proj computes minisd's
    correctly rounded float32 sinusoids."""
    torch = need("torch")
    from minisd import ops

    tp = unet.time_proj

    def forward(t):
        emb = ops.timestep_embedding(
            t.numpy(), tp.num_channels, flip_sin_to_cos=tp.flip_sin_to_cos,
            downscale_freq_shift=tp.downscale_freq_shift,
        )  # fmt: skip
        return torch.from_numpy(np.asarray(emb))

    tp.forward = forward


def test_given_latents_and_several_images_per_prompt(x4_pair):
    """Two prompts, two images each: diffusers' row pairing (the image batch repeated whole)."""
    ref, ours = x4_pair
    latents = np.random.default_rng(0).standard_normal((4, 4, 16, 20)).astype(np.float32)
    kw = dict(prompt=PROMPTS, image=[_image(seed=3), _image(seed=4)], num_inference_steps=2,
              guidance_scale=5.0, num_images_per_prompt=2, negative_prompt=["blurry", ""],
              latents=latents, seed=8, output_type="latent")  # fmt: skip
    expect = _run_ref(ref, **kw)
    got = ours(**kw, progress=False)
    assert_rel(got, expect, TOL["float32"], "x4 given latents, 2 images per prompt")


def test_without_guidance_one_row_with_the_noise_level(x4_pair):
    """guidance_scale <= 1: one UNet row per image, the 7 channels [latents, noisy image], and
    the noise level as every row's class label."""
    ref, ours = x4_pair
    seen, saved = [], ours.unet

    class Recording(_CountingUNet):
        def __call__(self, x, t, ctx, *args, **kw):
            seen.append((x.shape, kw["class_labels"].tolist()))
            return self.unet(x, t, ctx, *args, **kw)

    kw = dict(prompt=PROMPTS[1], image=_image(8, 12), num_inference_steps=2, guidance_scale=1.0,
              noise_level=77, seed=1, output_type="latent")  # fmt: skip
    try:
        ours.unet = Recording(ours.unet)
        got = ours(**kw, progress=False)
    finally:
        ours.unet = saved
    assert seen == [((1, 7, 8, 12), [77])] * 2
    assert_rel(got, _run_ref(ref, **kw), TOL["float32"], "x4 without guidance")


def test_noise_level_changes_the_result_and_callback_runs(x4_pair):
    _, ours = x4_pair
    calls = []
    kw = dict(image=_image(), num_inference_steps=3, seed=2, output_type="latent", progress=False)
    a = ours("a cat", noise_level=10, callback=lambda i, t, x: calls.append((i, int(t))), **kw)
    b = ours("a cat", noise_level=200, **kw)
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()
    assert [i for i, _ in calls] == [0, 1, 2]


def test_pil_output_is_four_times_the_input(x4_pair):
    _, ours = x4_pair
    (img,) = ours("a cat", image=_image(18, 21), num_inference_steps=1, progress=False)
    assert img.size == (80, 64)  # 21x18 rounds down to 20x16 (multiples of 4), then 4x


def test_loads_its_own_parts(x4_folder, x4_pair):
    _, ours = x4_pair
    assert is_upscale_folder(x4_folder[0])
    assert ours.max_noise_level == 350 and ours.vae_scale_factor == 4
    assert type(ours.low_res_scheduler).__name__ == "DDPMScheduler"
    assert type(ours.scheduler).__name__ == "DDIMScheduler"
    assert ours.unet.config.only_cross_attention == (True, True, False)


def test_device_path_on_fake_cupy(x4_folder):
    """Every array on the (fake) device: NumPy's float64 result."""
    import fake_cupy

    kw = dict(prompt="a cat", image=_image(), num_inference_steps=2, scheduler="euler_a",
              seed=0, output_type="np", progress=False)  # fmt: skip
    expect = StableDiffusionUpscale.from_pretrained(x4_folder[0], dtype="float64")(**kw)
    with fake_cupy.installed():
        pipe = StableDiffusionUpscale.from_pretrained(x4_folder[0], dtype="float64", device="cuda")
        got = pipe(**kw)
    assert type(got) is np.ndarray
    assert_rel(got, expect, 1e-12, "x4 pipeline on fake_cupy")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(image=None), "image: the x4 upscaler needs the low-resolution image"),
        (dict(noise_level=351), r"noise_level=351: must be an integer in \[0, 350\]"),
        (dict(noise_level=-1), "noise_level=-1"),
        (dict(noise_level=20.5), "noise_level=20.5"),
        (dict(noise_level=True), "noise_level=True"),
        (dict(prompt=PROMPTS), r"image: 1 image\(s\) for 2 prompt\(s\)"),
        (dict(image="tiny"), "image: 3x3 pixels"),
        (dict(latents=np.zeros((1, 4, 8, 8))), r"latents: shape \(1, 4, 8, 8\)"),
        (dict(output_type="jpg"), "output_type='jpg'"),
        (dict(num_inference_steps=0), "num_inference_steps=0"),
        (dict(scheduler="nope"), "scheduler='nope'"),
    ],
)
def test_bad_arguments_are_refused(x4_pair, kw, match):
    _, ours = x4_pair
    kw = {"prompt": "a cat", "image": _image(), "num_inference_steps": 1, **kw}
    if isinstance(kw["image"], str):
        kw["image"] = _image(3, 3)
    with pytest.raises(InputError, match=match):
        ours(**kw, progress=False)


def test_other_folders_are_refused(x4_folder, tiny_sd1_files, tmp_path):
    with pytest.raises(ConfigError, match="not an x4 upscaler folder"):
        StableDiffusionUpscale.from_pretrained(tiny_sd1_files[0])
    with pytest.raises(ConfigError, match="diffusers folders only"):
        StableDiffusionUpscale.from_pretrained(tiny_sd1_files[1])
    dst = tmp_path / "x4"
    shutil.copytree(x4_folder[0], dst)
    index = json.loads((dst / "model_index.json").read_text())
    (dst / "model_index.json").write_text(json.dumps({**index, "max_noise_level": 400}))
    with pytest.raises(ConfigError, match="num_class_embeds=400"):
        StableDiffusionUpscale.from_pretrained(dst)


def test_stable_diffusion_loads_the_upscaler(x4_folder, tmp_path):
    """StableDiffusion.from_pretrained returns the upscaler's class for its folder (as it
    returns StableDiffusionXL for SDXL) and refuses the arguments the upscaler does not take."""
    import minisd

    assert type(minisd.StableDiffusion.from_pretrained(x4_folder[0])) is StableDiffusionUpscale
    with pytest.raises(InputError, match="x4 upscaler folder"):
        minisd.StableDiffusion.from_pretrained(x4_folder[0], controlnet=tmp_path)


def test_cli_upscales_with_generate(x4_pair, x4_folder, tmp_path):
    """`minisd generate --model <x4 folder> --init-image low.png --noise-level N`: the PNG is
    the API's image, 4x the input; flags the upscaler has no use for are refused by name."""
    from PIL import Image

    from minisd.cli import main

    _, ours = x4_pair
    _image(seed=5).save(tmp_path / "low.png")
    low = Image.open(tmp_path / "low.png").convert("RGB")
    want = ours("a cat", image=low, num_inference_steps=2, noise_level=30, seed=4, progress=False)
    args = ["generate", "a cat", "--model", str(x4_folder[0]), "--init-image",
            str(tmp_path / "low.png"), "--steps", "2", "--seed", "4"]  # fmt: skip
    out = tmp_path / "up.png"
    assert main([*args, "--noise-level", "30", "--out", str(out)]) == 0
    got = Image.open(out)
    assert got.size == (80, 64) == want[0].size
    assert np.abs(np.asarray(got, np.int16) - np.asarray(want[0], np.int16)).max() <= 1
    assert main([*args, "--mask", str(tmp_path / "low.png"), "--out", str(out)]) == 2
    assert main([*args, "--size", "64x64", "--out", str(out)]) == 2


def test_inspect_names_the_upscaler(x4_folder):
    import weights_tools as wt

    assert wt.inspect(x4_folder[0])["family"] == "sd2-x4-upscaler"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_parity_command_on_the_upscaler(x4_folder, capsys, dtype):
    """`minisd parity` gives the x4 UNet its class label (the default noise level) on both
    sides: the class embedding is compared, every layer within the bound."""
    from minisd.cli import main

    need("torch", "diffusers", "transformers")
    assert main(["parity", "--model", str(x4_folder[0]), "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    row = next(s for s in out.splitlines() if s.strip().startswith("class_embedding "))
    assert "not traced" not in row and "<-- over" not in row, row
    assert "summary: all components within the bound" in out


def test_trace_command_on_the_upscaler(x4_folder, tmp_path):
    from minisd.cli import main

    npy = tmp_path / "class.npy"
    args = ["trace", "--model", str(x4_folder[0]), "--module", "class_embedding", "--out"]
    assert main([*args, str(npy), "--size", "16x16"]) == 0
    pipe = StableDiffusionUpscale.from_pretrained(x4_folder[0])
    table = pipe.unet.params["class_embedding"]["weight"]  # (num_class_embeds, T)
    np.testing.assert_array_equal(np.load(npy), table[[20]])  # the default noise level's row
