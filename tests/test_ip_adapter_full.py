"""IP-Adapter Full (minisd/ip_adapter_mlp.py's full_projection; ip_adapter.py, ip_adapter_files.py,
pipeline_ip.py) against diffusers: the projection alone vs IPAdapterFullImageProjection with
every parameter randomized, every traced module, float64 and float32; a UNet with a Full adapter
vs diffusers' UNet2DConditionModel after ``_load_ip_adapter_weights`` from the same h94-layout
state dict; the diffusers layout; detaching; every key read; the file errors; and the SD1
pipeline vs diffusers' StableDiffusionPipeline after ``load_ip_adapter`` (hidden states of the
image and of an all-zeros image, as diffusers asks for every projection that is not an
ImageProjection), from an image and from ``ip_adapter_image_embeds``.

The h94 files are written from a randomized diffusers IPAdapterFullImageProjection by
:func:`to_h94` (ff.net.0.proj -> proj.0, ff.net.2 -> proj.2, norm -> proj.3: diffusers'
conversion backwards), so the names are checked by diffusers' loader.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
from refharness import (
    TOL,
    assert_rel,
    collect_outputs,
    compare_traces,
    diffusers_models,
    need,
    rand,
    randomize_,
    to_np,
    torch_dtype,
)
from test_ip_adapter import (
    adapted_fixture,
    adapter_state_dict,
    compare_adapted,
    compare_on_backend,
    inputs_of,
)
from test_unet import TINY as UNET_TINY
from test_unet_blocks import traced_names

import minisd
from minisd.errors import InputError, WeightsError
from minisd.ip_adapter import attach, detach, read_ip_adapter
from minisd.ip_adapter_mlp import full_projection
from minisd.unet import UNet2DConditionModel
from minisd.weights import RecordingDict, flatten, load_file, nest, save_file

WIDTH = 20  # the image encoder's hidden size of the test adapters (ViT-H: 1280)
TOKENS = 9  # hidden-state tokens per image (ViT-H at 224 px: 257), so 9 image tokens
TO_H94 = {"ff.net.0.proj.": "proj.0.", "ff.net.2.": "proj.2.", "norm.": "proj.3."}


def full_ref(width, cross_attention_dim, *, seed):
    """A randomized float32 diffusers IPAdapterFullImageProjection."""
    torch, _ = need("torch", "diffusers")
    from diffusers.models.embeddings import IPAdapterFullImageProjection

    torch.manual_seed(0)
    ref = IPAdapterFullImageProjection(
        image_embed_dim=width, cross_attention_dim=cross_attention_dim
    )
    return randomize_(ref, seed=seed).eval()


def to_h94(state_dict):
    """A diffusers IPAdapterFullImageProjection state dict as h94's keys (flat numpy, no
    ``image_proj.``)."""
    out = {}
    for key, value in state_dict.items():
        d, h94 = next((d, h) for d, h in TO_H94.items() if key.startswith(d))
        out[h94 + key[len(d) :]] = to_np(value)
    return out


def full_state_dict(unet, seed=0, width=WIDTH):
    """A random IP-Adapter Full for diffusers UNet ``unet``: h94 names, float32 numpy, the layers
    numbered over diffusers' own attn_processors."""
    flat = {k: v for k, v in adapter_state_dict(unet, seed=seed).items() if "ip_adapter." in k}
    proj = to_h94(full_ref(width, unet.config.cross_attention_dim, seed=seed + 100).state_dict())
    return {**{f"image_proj.{k}": v.astype(np.float32) for k, v in proj.items()}, **flat}


# --------------------------------------------------------------------------- the projection


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", [(3, 9, 20, 12), (1, 257, 40, 24)])
def test_full_projection_matches_diffusers(shape, dtype):
    """Output and every traced submodule (ff.net.0.proj, ff.net.0, ff.net.2, ff, norm)."""
    torch = need("torch")
    m, p, width, c = shape
    ref = full_ref(width, c, seed=3).to(torch_dtype(dtype))
    params = nest(to_h94(ref.state_dict()))
    x = rand(m, p, width, seed=1).astype(dtype)
    with torch.no_grad(), collect_outputs(ref) as racts:
        want = to_np(ref(torch.from_numpy(x)))
    with minisd.trace() as acts:
        got = full_projection(x, params)
    assert got.shape == (m, p, c) and got.dtype == np.dtype(dtype)
    err = assert_rel(got, want, TOL[dtype], "IPAdapterFullImageProjection")
    names = traced_names(ref, racts)
    assert sorted(names) == ["ff", "ff.net.0", "ff.net.0.proj", "ff.net.2", "norm"]
    compare_traces(acts, racts, TOL[dtype], names)
    print(f"Full projection {shape} {dtype}: rel. error {err:.2e}")


# --------------------------------------------------------------------------- on a UNet

MODELS = ("sd1", "sd2")


@pytest.fixture(scope="module")
def tiny(ref_cache):
    return diffusers_models(ref_cache, "UNet2DConditionModel", UNET_TINY, "ipfullunet", seed=1)


adapted = adapted_fixture(full_state_dict, "ip-adapter-full-face.safetensors")


inputs = inputs_of((TOKENS, WIDTH))  # penultimate hidden states (n, [images,] TOKENS, WIDTH)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", MODELS)
def test_every_layer_matches_diffusers(adapted, name, dtype):
    """sd1: one image per row (9 image tokens); sd2: two (18). Every projection module and
    every attn2's to_k_ip / to_v_ip (B, n, 9, inner) is compared."""
    ref, folder, path = adapted(name)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    ours, errs = compare_adapted(ref, folder, path, inputs, name, dtype)
    assert len([k for k in errs if "image_projection_layers.0." in k]) == 5
    assert len([k for k in errs if "_ip.0" in k]) == 2 * len(ours.ip_adapter.paths)
    print(f"Full {name} {dtype}: max rel. error {max(errs.values()):.2e}")


@pytest.mark.parametrize("dtype", ["float32"])
def test_array_backend(adapted, xp, dtype):
    """The Full-adapted UNet on each array backend (fake_cupy: the device code path)."""
    ours = compare_on_backend(adapted, inputs, xp, dtype)
    assert isinstance(ours.ip_adapter.image_proj["proj"][3]["weight"], xp.ndarray)


def _flat(path):
    return {k: np.array(v) for k, v in load_file(path).items()}


def test_read_attach_detach_and_every_key(adapted):
    """read: Full, one token per hidden-state token, widths from the file; attach / detach
    leaves the UNet's params exactly as they were; every projection key is read."""
    _, folder, path = adapted("sd1")
    adapter = read_ip_adapter(path)
    assert adapter.kind == "full" and adapter.hidden_states and not adapter.plus
    assert adapter.num_tokens is None and adapter.variant.startswith("Full (MLP projection")
    assert (adapter.embed_dim, adapter.cross_attention_dim) == (WIDTH, 32)
    assert (adapter.encoder_field, adapter.width_key) == ("hidden_size", "image_proj.proj.3.weight")
    assert not adapter.lora
    unet = UNet2DConditionModel.from_pretrained(folder, dtype="float64")
    x, ctx, e = inputs(unet.config, 2, "float64")
    before = unet(x, 500, ctx)
    leaves = flatten(unet.params)
    state = attach(unet, path, scale=0.8)
    state.image_proj = RecordingDict(state.image_proj)
    assert np.abs(unet(x, 500, ctx, image_embeds=e) - before).max() > 1e-3
    want = {k.removeprefix("image_proj.") for k in _flat(path) if k.startswith("image_proj.")}
    assert state.image_proj.reads == want and len(want) == 6
    assert detach(unet) is True
    after = flatten(unet.params)
    assert after.keys() == leaves.keys() and all(after[k] is leaves[k] for k in leaves)
    np.testing.assert_array_equal(unet(x, 500, ctx), before)


def test_diffusers_layout_reads_as_h94(adapted, tmp_path):
    """A diffusers UNet's state dict after loading the Full adapter (encoder_hid_proj.
    image_projection_layers.0.ff.net.0.proj.weight, ..., norm): the same projection."""
    ref, folder, path = adapted("sd2")
    sd = ref.state_dict()
    keys = [k for k in sd if "encoder_hid_proj" in k or ".processor." in k]
    converted = tmp_path / "converted.safetensors"
    save_file({f"unet.{k}": to_np(sd[k]) for k in keys}, converted)
    a, b = read_ip_adapter(path), read_ip_adapter(converted)
    assert b.kind == "full"
    fa, fb = flatten(a.image_proj), flatten(b.image_proj)
    assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
    outs = []
    for source in (path, converted):
        unet = UNet2DConditionModel.from_pretrained(folder, dtype="float64")
        attach(unet, source, scale=0.6)
        x, ctx, e = inputs(unet.config, 2, "float64")
        outs.append(unet(x, 42, ctx, image_embeds=e))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_file_errors_name_file_and_key(adapted, tmp_path):
    _, folder, path = adapted("sd1")
    unet = UNet2DConditionModel.from_pretrained(folder)
    flat = _flat(path)
    p2, p3 = "image_proj.proj.2.weight", "image_proj.proj.3.bias"
    cases = {
        "rows": ({**flat, p2: flat[p2][:-1], "image_proj.proj.2.bias": flat[p2][:-1, 0]},
                 f"key '{p2}' has 31 rows, expected 32"),
        "no_norm_bias": ({k: v for k, v in flat.items() if k != p3},
                         f"missing key '{p3}'.*IP-Adapter Full"),
        "bias_shape": ({**flat, p3: flat[p3][:-1]}, rf"key '{p3}' has shape \(31,\)"),
        "proj0_1d": ({**flat, "image_proj.proj.0.weight": flat[p3]},
                     r"key 'image_proj.proj.0.weight' has shape \(32,\), expected 2 axes"),
        "stray": ({**flat, "image_proj.proj.4.weight": flat[p3]},
                  "unexpected key 'image_proj.proj.4.weight'"),
        "mixed": ({**flat, "image_proj.proj.weight": flat[p2]},
                  "'image_proj.proj.weight' .*base.* and 'image_proj.proj.0.bias' .*Full"),
    }  # fmt: skip
    before = flatten(unet.params)
    for name, (bad, needle) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        save_file(bad, p)
        with pytest.raises(WeightsError, match=re.escape(p.name) + ": .*" + needle):
            attach(unet, p)
        assert unet.ip_adapter is None and flatten(unet.params).keys() == before.keys()


def test_adapter_for_another_unet_and_bad_embeds(adapted):
    """sd2's Full adapter (48-wide tokens) on sd1 (32-wide text): named by proj.3; hidden
    states of the wrong width or batch."""
    _, folder1, path1 = adapted("sd1")
    _, _, path2 = adapted("sd2")
    unet = UNet2DConditionModel.from_pretrained(folder1)
    with pytest.raises(WeightsError, match=r"image_proj\.proj\.3\.weight.*48 wide.*32"):
        attach(unet, path2)
    attach(unet, path1)
    x, ctx, e = inputs(unet.config, 2, "float32")
    for bad in (e[:1], e[..., :-1], e[:, 0], e[:, None, None]):
        with pytest.raises(InputError, match=r"expected shape \(2, P, 20\).*penultimate"):
            unet(x, 1, ctx, image_embeds=bad)


# --------------------------------------------------------------------------- the pipeline

WEIGHTS = "ip-adapter-full-face_sd15.safetensors"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(diffusers SD pipeline with the Full adapter and the image encoder, folder, minisd with
    them)."""
    from pipelines import build
    from test_pipeline_ip import VISION
    from test_pipeline_ip_plus import _encoder, _load

    folder = tmp_path_factory.mktemp("ip_full") / "sd1"
    ref = build("sd1", folder)
    _encoder(folder / "image_encoder")
    save_file(full_state_dict(ref.unet, seed=2, width=VISION["hidden_size"]), folder / WEIGHTS)
    ours = minisd.StableDiffusion.from_pretrained(folder)
    _load(ref, ours, folder, WEIGHTS)
    return ref, folder, ours


@pytest.mark.parametrize("kw", [dict(), dict(guidance_scale=1.0)])  # CFG; no CFG: no uncond rows
def test_sd1_same_latents(sd1, kw):
    from test_pipeline import _image
    from test_pipeline_ip_plus import _args, _same

    ref, _, ours = sd1
    args = _args(**kw)
    got = _same(ref, ours, f"SD1 IP-Adapter Full {kw}", ip_adapter_image=_image(50, 70, seed=4),
                **args)  # fmt: skip
    other = ours(**args, ip_adapter_image=_image(40, 40, seed=5), scheduler="ddim", progress=False)
    assert np.abs(other - got).max() > 1e-3 * np.abs(got).max()  # the image prompt matters


def test_sd1_image_embeds_as_diffusers(sd1):
    """ip_adapter_image_embeds: diffusers' own prepare_ip_adapter_image_embeds output, (2, 2,
    17, 16) for two images [uncond; cond], in both pipelines; minisd's image run agrees."""
    torch = need("torch")
    from test_pipeline import _image
    from test_pipeline_ip_plus import _args, _same

    ref, _, ours = sd1
    images = [[_image(64, 48, seed=1), _image(33, 65, seed=2)]]
    with torch.no_grad():
        (e,) = ref.prepare_ip_adapter_image_embeds(images, None, "cpu", 1, True)
    assert tuple(e.shape) == (2, 2, 17, 16)
    args = _args()
    got = _same(ref, ours, "SD1 IP-Adapter Full, embeds", ip_adapter_image_embeds=[e], **args)
    from_image = ours(**args, ip_adapter_image=images, scheduler="ddim", progress=False)
    assert_rel(from_image, got, 1e-5, "Full: ip_adapter_image vs its embeddings")
    np.testing.assert_array_equal(
        ours(**args, ip_adapter_image_embeds=e.numpy(), scheduler="ddim", progress=False), got
    )
