"""IP-Adapter on SDXL (minisd/pipeline_ip.py through StableDiffusionXL) against diffusers'
StableDiffusionXLPipeline after ``load_ip_adapter`` over the same files, float32: a tiny SDXL
base written by diffusers (tests/pipelines_xl.py: transformer_layers_per_block (1, 1, 2), so the
processor numbering crosses blocks of one and of two transformer layers), two tiny randomized
CLIPVisionModelWithProjection encoders shaped unlike each other (a "bigG-like" one for
ip-adapter_sdxl, a "ViT-H-like" one for ip-adapter_sdxl_vit-h: hidden size, depth, heads,
patch, image and projection sizes differ) and random base IP-Adapters in h94's layout, numbered
over diffusers' own attn_processors (tests/test_ip_adapter.py's adapter_state_dict)."""

import numpy as np
import pytest
from pipelines_xl import build
from refharness import assert_rel, need, randomize_
from test_ip_adapter import adapter_state_dict
from test_pipeline import _image
from test_pipeline_xl import PROMPTS, TOL, run_ref
from test_unet import TINY as UNET_TINY

from minisd.errors import InputError, WeightsError
from minisd.pipeline_xl import StableDiffusionXL
from minisd.weights import flatten, save_file

BIG_G = dict(hidden_size=20, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
             image_size=28, patch_size=14, projection_dim=16, hidden_act="gelu")  # fmt: skip
VIT_H = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             image_size=32, patch_size=8, projection_dim=12, hidden_act="gelu")  # fmt: skip
WEIGHTS = "ip-adapter_sdxl.safetensors"  # with image_encoder/ (bigG-like)
WEIGHTS_H = "ip-adapter_sdxl_vit-h.safetensors"  # with image_encoder_h/ (ViT-H-like)
SCALE = 0.7


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """(diffusers SDXL pipeline with ip-adapter_sdxl loaded, folder, minisd with it, the
    minisd UNet's params before loading as {key: copy})."""
    torch, transformers = need("torch", "transformers")
    folder = tmp_path_factory.mktemp("xl_ip") / "base"
    ref, _ = build("base", folder)
    for i, (sub, cfg, name) in enumerate(
        [("image_encoder", BIG_G, WEIGHTS), ("image_encoder_h", VIT_H, WEIGHTS_H)]
    ):
        torch.manual_seed(0)
        enc = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**cfg))
        randomize_(enc, seed=9 + i).eval().save_pretrained(str(folder / sub))
        flat = adapter_state_dict(ref.unet, seed=2 + i, embed_dim=cfg["projection_dim"])
        save_file(flat, folder / name)
    ref.load_ip_adapter(str(folder), subfolder="", weight_name=WEIGHTS)
    ref.set_ip_adapter_scale(SCALE)
    ours = StableDiffusionXL.from_pretrained(folder)
    before = {k: np.array(v, copy=True) for k, v in flatten(ours.unet.params).items()}
    ours.load_ip_adapter(folder / WEIGHTS, folder / "image_encoder", scale=SCALE)
    return ref, folder, ours, before


def _args(**kw):
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    args = dict(prompt=PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=3,
                guidance_scale=6.0, height=64, width=64, latents=latents,
                output_type="latent")  # fmt: skip
    return {**args, **kw}


def _both(ref, ours, scheduler=None, **kw):
    """(minisd's, diffusers') latents for the same arguments."""
    expect = run_ref(ref, scheduler, **kw)
    return ours(**kw, scheduler=scheduler, progress=False), expect


@pytest.mark.parametrize(
    "scale, kw",
    [
        (SCALE, {}),
        (1.3, dict(guidance_scale=1.0)),  # no CFG: no zero-embedding rows
        (0.0, {}),  # both skip the image branch
        (0.4, dict(negative_prompt=None, scheduler="dpmpp_2m")),  # zeroed negative text rows
    ],
)
def test_same_latents_scales(trio, scale, kw):
    ref, _, ours, _ = trio
    image = _image(50, 70, seed=4)  # odd size: resized and cropped by CLIPImageProcessor
    kw = dict(kw)
    scheduler = kw.pop("scheduler", None)
    args = _args(**kw)
    try:
        ref.set_ip_adapter_scale(scale)
        ours.set_ip_adapter_scale(scale)
        got, expect = _both(ref, ours, scheduler, ip_adapter_image=image, **args)
        err = assert_rel(got, expect, TOL, f"SDXL IP-Adapter, scale {scale}, {kw}")
        print(f"SDXL IP-Adapter, scale {scale} {kw}: rel. error {err:.2e}")
        other = ours(**args, ip_adapter_image=_image(40, 40, seed=5), scheduler=scheduler,
                     progress=False)  # fmt: skip
        changed = np.abs(other - got).max() > 1e-3 * np.abs(got).max()
        assert changed == (scale != 0)  # the image prompt matters exactly when scale != 0
    finally:
        ref.set_ip_adapter_scale(SCALE)
        ours.set_ip_adapter_scale(SCALE)


def test_two_prompts_two_images_seeded(trio):
    """[[a, b]]: two images seen by both prompts (8 image tokens per row), 2 images per prompt,
    CFG (8 UNet rows), a stochastic sampler seeded as diffusers; and one image per prompt."""
    ref, _, ours, _ = trio
    images = [[_image(64, 48, seed=1), _image(33, 65, seed=2)]]
    args = dict(prompt=PROMPTS, num_inference_steps=3, guidance_scale=5.0, height=64,
                width=64, num_images_per_prompt=2, output_type="latent", seed=3)  # fmt: skip
    got, expect = _both(ref, ours, "euler_a", ip_adapter_image=images, **args)
    err = assert_rel(got, expect, TOL, "SDXL IP-Adapter, two prompts x two images, seeded")
    print(f"SDXL IP-Adapter, two prompts x two images, seeded: rel. error {err:.2e}")
    a, b = images[0]
    both = ours(**_args(), ip_adapter_image=[a, b], progress=False)  # one image per prompt
    for i, im in enumerate((a, b)):
        one = _args(prompt=PROMPTS[i], negative_prompt=["blurry", ""][i],
                    latents=_args()["latents"][i : i + 1])  # fmt: skip
        assert_rel(both[i : i + 1], ours(**one, ip_adapter_image=im, progress=False), 1e-5, "")


def test_vit_h_encoder(trio):
    """ip-adapter_sdxl_vit-h with its ViT-H-like encoder (another image size, embedding size
    and depth), loaded over the bigG one; then back."""
    ref, folder, ours, _ = trio
    image = _image(64, 64, seed=8)
    try:
        ref.unload_ip_adapter()
        ref.load_ip_adapter(str(folder), subfolder="", weight_name=WEIGHTS_H,
                            image_encoder_folder="image_encoder_h")  # fmt: skip
        ref.set_ip_adapter_scale(0.9)
        ours.load_ip_adapter(folder / WEIGHTS_H, folder / "image_encoder_h", scale=0.9)
        assert ours.image_encoder.config.projection_dim == VIT_H["projection_dim"]
        got, expect = _both(ref, ours, "ddim", ip_adapter_image=image, **_args())
        err = assert_rel(got, expect, TOL, "SDXL IP-Adapter, ViT-H-like encoder")
        print(f"SDXL IP-Adapter, ViT-H-like encoder: rel. error {err:.2e}")
    finally:
        ref.unload_ip_adapter()
        ref.load_ip_adapter(str(folder), subfolder="", weight_name=WEIGHTS)
        ref.set_ip_adapter_scale(SCALE)
        ours.load_ip_adapter(folder / WEIGHTS, folder / "image_encoder", scale=SCALE)


def test_unload_restores_the_unet_bit_for_bit(trio):
    ref, folder, ours, before = trio
    args = _args()
    plain = StableDiffusionXL.from_pretrained(folder)(**args, progress=False)
    ours.unload_ip_adapter()
    try:
        assert ours.image_encoder is None and ours.unet.ip_adapter is None
        after = flatten(ours.unet.params)
        assert after.keys() == before.keys()
        for k, v in before.items():
            np.testing.assert_array_equal(after[k], v, err_msg=k)
            assert after[k].dtype == v.dtype, k
        np.testing.assert_array_equal(ours(**args, progress=False), plain)
        expect = run_ref(_without_ip(ref), None, **args)  # diffusers without the adapter too
        assert_rel(plain, expect, TOL, "SDXL without IP-Adapter")
    finally:
        ours.load_ip_adapter(folder / WEIGHTS, folder / "image_encoder", scale=SCALE)


def _without_ip(ref):
    """A diffusers SDXL pipeline over ref's modules with a fresh, adapter-free UNet."""
    diffusers = need("diffusers")
    folder = ref.config._name_or_path
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    pipe = diffusers.StableDiffusionXLPipeline(
        **{**ref.components, "unet": unet.eval(), "image_encoder": None}
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_errors(trio, tmp_path):
    torch, diffusers = need("torch", "diffusers")
    _, folder, ours, _ = trio
    plain = StableDiffusionXL.from_pretrained(folder)
    args = _args(num_inference_steps=1)
    with pytest.raises(InputError, match="ip_adapter_image: no IP-Adapter is loaded"):
        plain(**args, ip_adapter_image=_image(), progress=False)
    with pytest.raises(InputError, match="ip_adapter_image: an IP-Adapter is loaded"):
        ours(**args, progress=False)
    torch.manual_seed(0)  # an SD1.x adapter: 32-wide image tokens (SD1.5: 768) for a 24-wide UNet
    sd1 = diffusers.UNet2DConditionModel(**UNET_TINY["sd1"])
    path = tmp_path / "ip-adapter_sd15.safetensors"
    save_file(adapter_state_dict(sd1, embed_dim=BIG_G["projection_dim"]), path)
    with pytest.raises(WeightsError, match=r"ip-adapter_sd15\.safetensors.*32 wide.*takes 24"):
        plain.load_ip_adapter(path, folder / "image_encoder")
    with pytest.raises(WeightsError, match=r"ip-adapter_sdxl\.safetensors.*16-d.*gives 12-d"):
        plain.load_ip_adapter(folder / WEIGHTS, folder / "image_encoder_h")  # wrong encoder
    plus = {  # IP-Adapter Plus: read, and checked key by key
        "image_proj.latents": np.zeros((1, 16, 24), np.float32),
        **{
            f"ip_adapter.1.{w}.weight": np.zeros((8, 24), np.float32)
            for w in ("to_k_ip", "to_v_ip")
        },
    }
    save_file(plus, tmp_path / "ip-adapter-plus_sdxl_vit-h.safetensors")
    with pytest.raises(WeightsError, match=r"plus_sdxl_vit-h.*missing key 'image_proj\.proj_in"):
        plain.load_ip_adapter(tmp_path / "ip-adapter-plus_sdxl_vit-h.safetensors", "enc")
    faceid = {"image_proj.perceiver_resampler.latents": np.zeros((1, 4, 24), np.float32)}
    save_file(faceid, tmp_path / "ip-adapter-faceid-plusv2_sdxl.safetensors")
    with pytest.raises(WeightsError, match=r"faceid-plusv2_sdxl.*FaceID Plus"):
        plain.load_ip_adapter(tmp_path / "ip-adapter-faceid-plusv2_sdxl.safetensors", "enc")
    assert plain.unet.ip_adapter is None and plain.image_encoder is None


def test_device_path_on_fake_cupy(trio):
    """The SDXL IP-Adapter pipeline with every array on the (fake) device: NumPy's float64
    result."""
    import fake_cupy

    _, folder, _, _ = trio
    kw = dict(prompt=PROMPTS[0], num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
              ip_adapter_image=_image(seed=4), seed=0, output_type="np",
              progress=False)  # fmt: skip

    def run(device):
        pipe = StableDiffusionXL.from_pretrained(folder, dtype="float64", device=device)
        pipe.load_ip_adapter(folder / WEIGHTS, folder / "image_encoder", scale=SCALE)
        return pipe, pipe(**kw)

    _, expect = run("cpu")
    with fake_cupy.installed() as fcp:
        pipe, got = run("cuda")
        assert type(pipe.unet.ip_adapter.image_proj["proj"]["weight"]) is fcp.ndarray
    assert type(got) is np.ndarray
    assert_rel(got, expect, 1e-12, "SDXL IP-Adapter pipeline on fake_cupy")


@pytest.mark.parametrize(
    "cfg",
    [  # h94/IP-Adapter's sdxl_models/image_encoder (bigG) and models/image_encoder (ViT-H)
        dict(
            hidden_size=1664,
            intermediate_size=8192,
            num_hidden_layers=48,
            num_attention_heads=16,
            projection_dim=1280,
        ),  # fmt: skip
        dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            projection_dim=1024,
        ),  # fmt: skip
    ],
)
def test_full_size_encoder_configs(cfg):
    """The full-size encoders' config.json read and their keys and shapes as transformers'
    (a meta-device model: no memory)."""
    torch, transformers = need("torch", "transformers")
    from minisd.clip_vision import CLIPVisionConfig, expected_shapes

    cfg = dict(cfg, image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)
    with torch.device("meta"):
        ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**cfg))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if "position_ids" not in k}
    assert expected_shapes(CLIPVisionConfig.from_dict(cfg)) == want
