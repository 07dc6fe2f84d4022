"""IP-Adapter FaceID in the pipelines (minisd/pipeline_ip.py, ip_adapter_lora.py) against
diffusers' StableDiffusion and StableDiffusionXL pipelines after ``load_ip_adapter(...,
image_encoder_folder=None)`` over the same h94-layout file (tests/test_ip_adapter_faceid.py's
faceid_state_dict: the MLP projection, the layers and a LoRA for every attention layer, which
diffusers loads as the PEFT adapter ``faceid_0``), float32, on ``ip_adapter_image_embeds``:
the face embeddings insightface would give, here random, [negative; positive] with CFG as
diffusers' documentation builds them (zeros as the negative; (2, n, 1, D) arrays)."""

import numpy as np
import pytest
from pipelines import build
from pipelines_xl import build as build_xl
from refharness import need
from test_ip_adapter_faceid import EMBED, faceid_state_dict
from test_pipeline import PROMPTS, _image
from test_pipeline_ip_plus import _args, _same

import minisd
from minisd.errors import InputError
from minisd.ip_adapter import processor_paths
from minisd.pipeline_xl import StableDiffusionXL
from minisd.weights import flatten, save_file

WEIGHTS = "ip-adapter-faceid_sd15.safetensors"
WEIGHTS_XL = "ip-adapter-faceid_sdxl.safetensors"
SCALE = 0.7


def _load(ref, ours, folder, weights):
    need("peft")  # diffusers applies the FaceID LoRA with PEFT only
    ref.load_ip_adapter(str(folder), subfolder="", weight_name=weights, image_encoder_folder=None)
    ref.set_ip_adapter_scale(SCALE)
    ours.load_ip_adapter(folder / weights, None, scale=SCALE)


def _faces(n=1, cfg=True, seed=0):
    """Face embeddings as diffusers' FaceID example builds them: (1, n, 1, D) unit vectors,
    with CFG a zeros row first -> (2, n, 1, D); torch, as diffusers takes them."""
    torch = need("torch")
    e = np.random.default_rng(seed).standard_normal((1, n, 1, EMBED)).astype(np.float32)
    e /= np.linalg.norm(e, axis=-1, keepdims=True)  # insightface's normed_embedding
    return torch.from_numpy(np.concatenate([np.zeros_like(e), e]) if cfg else e)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(diffusers SD pipeline with the FaceID adapter, folder, minisd with it, minisd UNet
    params before loading as {key: copy})."""
    folder = tmp_path_factory.mktemp("ip_faceid") / "sd1"
    ref = build("sd1", folder)
    save_file(faceid_state_dict(ref.unet, seed=2), folder / WEIGHTS)
    ours = minisd.StableDiffusion.from_pretrained(folder)
    before = {k: np.array(v, copy=True) for k, v in flatten(ours.unet.params).items()}
    _load(ref, ours, folder, WEIGHTS)
    return ref, folder, ours, before


@pytest.mark.parametrize("kw", [dict(), dict(guidance_scale=1.0)])  # CFG; no CFG: no uncond rows
def test_sd1_same_latents(sd1, kw):
    ref, _, ours, _ = sd1
    args = _args(**kw)
    e = _faces(cfg="guidance_scale" not in kw)
    got = _same(ref, ours, f"SD1 IP-Adapter FaceID {kw}", ip_adapter_image_embeds=[e], **args)
    other = ours(**args, ip_adapter_image_embeds=_faces(cfg="guidance_scale" not in kw, seed=1),
                 scheduler="ddim", progress=False)  # fmt: skip
    assert np.abs(other - got).max() > 1e-3 * np.abs(got).max()  # the face matters
    three = e.numpy()[:, :, 0]  # (2 or 1, 1, D): the 3-axis form, a bare array
    np.testing.assert_array_equal(
        ours(**args, ip_adapter_image_embeds=three, scheduler="ddim", progress=False), got
    )


def test_sd1_two_faces_per_prompt_seeded(sd1):
    """(2, 2, 1, D): two faces seen by every prompt (6 image tokens), 2 images per prompt, a
    stochastic sampler seeded as diffusers."""
    ref, _, ours, _ = sd1
    args = dict(prompt=PROMPTS, num_inference_steps=2, guidance_scale=5.0,
                num_images_per_prompt=2, output_type="latent", seed=3)  # fmt: skip
    _same(ref, ours, "SD1 IP-Adapter FaceID, two faces, seeded", "euler_a",
          ip_adapter_image_embeds=[_faces(n=2, seed=4)], **args)  # fmt: skip


def test_sd1_one_face_per_prompt(sd1):
    """Beyond diffusers: 2 * prompts rows (negatives first) give each prompt its own face, as
    if run alone."""
    _, _, ours, _ = sd1
    a, b = _faces(seed=5).numpy(), _faces(seed=6).numpy()  # (2, 1, 1, D) each
    args = _args()
    both = np.concatenate([a[:1], b[:1], a[1:], b[1:]])  # [neg a; neg b; a; b]
    got = ours(**args, ip_adapter_image_embeds=both, scheduler="ddim", progress=False)
    for i, e in enumerate((a, b)):
        one = dict(args, prompt=PROMPTS[i], negative_prompt=args["negative_prompt"][i],
                   latents=args["latents"][i : i + 1])  # fmt: skip
        alone = ours(**one, ip_adapter_image_embeds=e, scheduler="ddim", progress=False)
        np.testing.assert_allclose(got[i : i + 1], alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_sd1_errors(sd1, tmp_path):
    """What a FaceID run needs is named: its embeddings (not an image, not an encoder), rows
    that fit the prompts and CFG, its 24-wide embedding; and both inputs at once are refused."""
    _, folder, ours, _ = sd1
    args = _args()
    e = _faces()
    cases = [
        (dict(), "ip_adapter_image_embeds: .* is an IP-Adapter FaceID.*normed_embedding"),
        (dict(ip_adapter_image=_image()), "ip_adapter_image: .* takes insightface's face"),
        (dict(ip_adapter_image=_image(), ip_adapter_image_embeds=[e]), "not both"),
        (dict(ip_adapter_image_embeds=[e, e]), "a list of 2 arrays"),
        (dict(ip_adapter_image_embeds=e[1:]), r"1 rows for 2 prompt\(s\) with classifier-free"),
        (dict(ip_adapter_image_embeds=e[..., :-1]), r"expected shape \(rows, n, 24\).*face ID"),
    ]
    for kw, needle in cases:
        with pytest.raises(InputError, match=needle):
            ours(**args, **kw, scheduler="ddim", progress=False)
    pipe = minisd.StableDiffusion.from_pretrained(folder)
    with pytest.raises(InputError, match=f"image_encoder: .*{WEIGHTS} is an IP-Adapter FaceID"):
        pipe.load_ip_adapter(folder / WEIGHTS, tmp_path, scale=SCALE)
    with pytest.raises(InputError, match="ip_adapter_image_embeds: no IP-Adapter is loaded"):
        pipe(**args, ip_adapter_image_embeds=[e], progress=False)
    assert pipe.unet.ip_adapter is None and pipe.image_encoder is None


def test_sd1_unload_restores_the_unet_and_its_lora(sd1):
    """unload takes the LoRA out too: the UNet's params bit for bit as before loading (diffusers'
    unload_ip_adapter leaves its faceid_0 LoRA in the UNet)."""
    ref, folder, ours, before = sd1
    args = _args()
    plain = minisd.StableDiffusion.from_pretrained(folder)(**args, progress=False)
    try:
        ours.unload_ip_adapter()
        after = flatten(ours.unet.params)
        assert after.keys() == before.keys()
        for k, v in before.items():
            np.testing.assert_array_equal(after[k], v, err_msg=k)
        np.testing.assert_array_equal(ours(**args, progress=False), plain)
    finally:
        ours.load_ip_adapter(folder / WEIGHTS, None, scale=SCALE)
    paths = processor_paths(ours.unet.params)  # attn1 and attn2 of every transformer block
    assert len(ours.unet.ip_adapter.lora) == 4 * len(paths) == 4 * 14


def test_sd1_base_adapter_without_encoder_runs_on_embeds(sd1, tmp_path):
    """Any adapter may be loaded without an image encoder; it then takes embeddings only."""
    from test_ip_adapter import adapter_state_dict

    ref, folder, _, _ = sd1
    save_file(adapter_state_dict(ref.unet, seed=3, embed_dim=12), tmp_path / "base.safetensors")
    pipe = minisd.StableDiffusion.from_pretrained(folder)
    pipe.load_ip_adapter(tmp_path / "base.safetensors", None)
    args = _args()
    with pytest.raises(InputError, match="without an image encoder.*ip_adapter_image_embeds"):
        pipe(**args, ip_adapter_image=_image(), progress=False)
    e = np.random.default_rng(0).standard_normal((2, 1, 12)).astype(np.float32)
    assert pipe(**args, ip_adapter_image_embeds=e, progress=False).shape == (2, 4, 8, 8)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(diffusers SDXL pipeline with a FaceID adapter (ip-adapter-faceid_sdxl's kind; 2048-wide
    tokens there, 24 here), folder, minisd with it)."""
    folder = tmp_path_factory.mktemp("xl_ip_faceid") / "base"
    ref, _ = build_xl("base", folder)
    save_file(faceid_state_dict(ref.unet, seed=4), folder / WEIGHTS_XL)
    ours = StableDiffusionXL.from_pretrained(folder)
    _load(ref, ours, folder, WEIGHTS_XL)
    return ref, folder, ours


@pytest.mark.parametrize("kw", [dict(), dict(guidance_scale=1.0)])
def test_sdxl_same_latents(sdxl, kw):
    ref, _, ours = sdxl
    cfg = "guidance_scale" not in kw
    args = _args(height=64, width=64, **kw)
    _same(ref, ours, f"SDXL IP-Adapter FaceID {kw}", "euler",
          ip_adapter_image_embeds=[_faces(n=2, cfg=cfg, seed=7)], **args)  # fmt: skip
