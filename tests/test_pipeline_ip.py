"""IP-Adapter in the pipeline (minisd/pipeline_ip.py) against diffusers' StableDiffusionPipeline
after ``load_ip_adapter`` over the same files: a tiny randomized CLIPVisionModelWithProjection
(image_encoder/) and a random base IP-Adapter in h94's layout (ip-adapter.safetensors), written
next to the tiny SD1 pipeline. diffusers preprocesses with the CLIPImageProcessor its loader
creates at the encoder's image_size, as minisd does."""

import numpy as np
import pytest
from pipelines import build
from refharness import assert_rel, need, randomize_
from test_ip_adapter import adapter_state_dict
from test_pipeline import PROMPTS, TOL, _image, _run_ref

import minisd
from minisd.errors import InputError, WeightsError
from minisd.weights import save_file

VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=8, projection_dim=12, hidden_act="gelu")  # fmt: skip
WEIGHTS = "ip-adapter.safetensors"


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """(diffusers pipeline with the IP-Adapter loaded, folder, minisd pipeline with it)."""
    torch, transformers = need("torch", "transformers")
    folder = tmp_path_factory.mktemp("ip_pipe") / "sd1"
    ref = build("sd1", folder)
    torch.manual_seed(0)
    enc = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION))
    randomize_(enc, seed=9).eval().save_pretrained(str(folder / "image_encoder"))
    save_file(adapter_state_dict(ref.unet, seed=2, embed_dim=VISION["projection_dim"]),
              folder / WEIGHTS)  # fmt: skip
    ref.load_ip_adapter(str(folder), subfolder="", weight_name=WEIGHTS)
    ref.set_ip_adapter_scale(0.7)
    ours = minisd.StableDiffusion.from_pretrained(folder)
    ours.load_ip_adapter(folder / WEIGHTS, folder / "image_encoder", scale=0.7)
    return ref, folder, ours


def _args(**kw):
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    args = dict(prompt=PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=3,
                guidance_scale=6.0, latents=latents, output_type="latent")  # fmt: skip
    return {**args, **kw}


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(guidance_scale=1.0),  # no CFG: no zero-embedding rows
    ],
)
def test_txt2img_same_latents(trio, kw):
    ref, _, ours = trio
    image = _image(50, 70, seed=4)  # odd size: resized and cropped by CLIPImageProcessor
    args = _args(**kw)
    expect = _run_ref(ref, "ddim", ip_adapter_image=image, **args).numpy()
    got = ours(**args, ip_adapter_image=image, scheduler="ddim", progress=False)
    err = assert_rel(got, expect, TOL, f"IP-Adapter txt2img {kw}")
    print(f"IP-Adapter txt2img {kw}: rel. error {err:.2e}")
    other = ours(**args, ip_adapter_image=_image(40, 40, seed=5), scheduler="ddim", progress=False)
    assert np.abs(other - got).max() > 1e-3 * np.abs(got).max()  # the image prompt matters


def test_seeded_several_images_and_images_per_prompt(trio):
    """[[a, b]]: two images seen by every prompt (8 image tokens); 2 images per prompt; a
    stochastic sampler seeded as diffusers."""
    ref, _, ours = trio
    images = [[_image(64, 48, seed=1), _image(33, 65, seed=2)]]
    args = dict(prompt=PROMPTS, num_inference_steps=3, guidance_scale=5.0,
                num_images_per_prompt=2, output_type="latent")  # fmt: skip
    expect = _run_ref(ref, "euler_a", ip_adapter_image=images, seed=3, **args).numpy()
    got = ours(**args, ip_adapter_image=images, seed=3, scheduler="euler_a", progress=False)
    err = assert_rel(got, expect, TOL, "IP-Adapter, two images, seeded")
    print(f"IP-Adapter, two images, seeded: rel. error {err:.2e}")


def test_one_image_per_prompt(trio):
    """Beyond diffusers: a list of one image per prompt; each prompt's rows see its own image,
    as if run alone (batching changes round-off only)."""
    _, _, ours = trio
    a, b = _image(64, 64, seed=6), _image(48, 80, seed=7)
    args = _args(num_images_per_prompt=1)
    both = ours(**args, ip_adapter_image=[a, b], scheduler="ddim", progress=False)
    for i, im in enumerate((a, b)):
        one = dict(args, prompt=PROMPTS[i], negative_prompt=args["negative_prompt"][i],
                   latents=args["latents"][i : i + 1])  # fmt: skip
        alone = ours(**one, ip_adapter_image=im, scheduler="ddim", progress=False)
        assert_rel(both[i : i + 1], alone, 1e-5, f"prompt {i}")
    with pytest.raises(InputError, match="3 images for 2 prompt"):
        ours(**args, ip_adapter_image=[a, b, a], scheduler="ddim", progress=False)


def test_scale_zero_unload_and_errors(trio, tmp_path):
    _, folder, ours = trio
    args = _args()
    plain_pipe = minisd.StableDiffusion.from_pretrained(folder)
    plain = plain_pipe(**args, scheduler="ddim", progress=False)
    with pytest.raises(InputError, match="ip_adapter_image: no IP-Adapter is loaded"):
        plain_pipe(**args, ip_adapter_image=_image(), scheduler="ddim", progress=False)
    with pytest.raises(InputError, match="ip_adapter_image: an IP-Adapter is loaded"):
        ours(**args, scheduler="ddim", progress=False)
    try:
        ours.set_ip_adapter_scale(0.0)  # the image branch is skipped: the plain pipeline
        got = ours(**args, ip_adapter_image=_image(), scheduler="ddim", progress=False)
        np.testing.assert_array_equal(got, plain)
        with pytest.raises(InputError, match="per-block"):
            ours.set_ip_adapter_scale({"up": {"block_0": [0.0, 1.0, 0.0]}})
    finally:
        ours.set_ip_adapter_scale(0.7)
    ours.unload_ip_adapter()
    try:
        assert ours.image_encoder is None and ours.unet.ip_adapter is None
        np.testing.assert_array_equal(ours(**args, scheduler="ddim", progress=False), plain)
    finally:
        ours.load_ip_adapter(folder / WEIGHTS, folder / "image_encoder", scale=0.7)
    with pytest.raises(WeightsError, match="never loaded"):
        (tmp_path / "ip.bin").write_bytes(b"x")
        plain_pipe.load_ip_adapter(tmp_path / "ip.bin", folder / "image_encoder")
    assert plain_pipe.unet.ip_adapter is None and plain_pipe.image_encoder is None


def test_device_path_on_fake_cupy(trio):
    """The IP-Adapter pipeline with every array on the (fake) device: NumPy's float64 result."""
    import fake_cupy

    _, folder, _ = trio
    kw = dict(prompt=PROMPTS[0], num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
              ip_adapter_image=_image(seed=4), scheduler="ddim", seed=0, output_type="np",
              progress=False)  # fmt: skip

    def run(device):
        pipe = minisd.StableDiffusion.from_pretrained(folder, dtype="float64", device=device)
        pipe.load_ip_adapter(folder / WEIGHTS, folder / "image_encoder", scale=0.7)
        return pipe, pipe(**kw)

    _, expect = run("cpu")
    with fake_cupy.installed() as fcp:
        pipe, got = run("cuda")
        assert type(pipe.unet.ip_adapter.image_proj["proj"]["weight"]) is fcp.ndarray
    assert type(got) is np.ndarray
    assert_rel(got, expect, 1e-12, "IP-Adapter pipeline on fake_cupy")
