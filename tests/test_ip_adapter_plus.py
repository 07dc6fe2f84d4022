"""IP-Adapter Plus (minisd/ip_adapter_plus.py: the Resampler; ip_adapter.py, ip_adapter_files.py)
against diffusers: the Resampler alone vs IPAdapterPlusImageProjection with every parameter
randomized, every traced module, float64 and float32; a UNet with a Plus adapter vs diffusers'
UNet2DConditionModel after ``_load_ip_adapter_weights`` from the same h94-layout state dict;
the diffusers layout; detaching; every key read; the file errors.

The h94 files are written from a randomized diffusers IPAdapterPlusImageProjection by
:func:`to_h94`, this file's own inverse of diffusers' conversion (to_k / to_v stacked into
to_kv): diffusers loads those files strictly, so the names are checked by diffusers' loader.
Tiny Resamplers still have 64-wide heads (diffusers' conversion fixes dim_head = 64) and, for
diffusers' loader, depth 4; the alone-test also runs other depths and feed-forward ratios.
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
from minisd.ip_adapter_plus import resampler
from minisd.unet import UNet2DConditionModel
from minisd.weights import RecordingDict, flatten, load_file, nest, save_file

WIDTH = 20  # the image encoder's hidden size of the test adapters (ViT-H: 1280)
TOKENS = 10  # image feature tokens per image (ViT-H at 224 px: 257)
PLUS = dict(hidden_dims=24, heads=2, num_queries=5)  # 5 image tokens: not the base's 4
# diffusers' IPAdapterPlusImageProjection names -> h94's Resampler names, after "layers.i."
TO_H94 = {"ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_out.0": "0.to_out",
          "ff.0": "1.0", "ff.1.net.0.proj": "1.1", "ff.1.net.2": "1.3"}  # fmt: skip


def resampler_ref(embed_dims, output_dims, *, seed, **kw):
    """A randomized float32 diffusers IPAdapterPlusImageProjection (PLUS sizes unless given)."""
    torch, _ = need("torch", "diffusers")
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    torch.manual_seed(0)
    kw = {**PLUS, **kw}
    ref = IPAdapterPlusImageProjection(embed_dims=embed_dims, output_dims=output_dims, **kw)
    return randomize_(ref, seed=seed).eval()


def to_h94(state_dict):
    """A diffusers IPAdapterPlusImageProjection state dict as h94's Resampler keys (flat numpy,
    no ``image_proj.``): the inverse of diffusers' loaders/unet.py conversion."""
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"^layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            out[key] = to_np(value)
        elif m[2] == "attn.to_k":
            v = state_dict[f"layers.{m[1]}.attn.to_v.weight"]
            out[f"layers.{m[1]}.0.to_kv.weight"] = np.concatenate([to_np(value), to_np(v)])
        elif m[2] != "attn.to_v":
            out[f"layers.{m[1]}.{TO_H94[m[2]]}.{m[3]}"] = to_np(value)
    return out


def plus_state_dict(unet, seed=0, width=WIDTH, **kw):
    """A random IP-Adapter Plus for diffusers UNet ``unet``: h94 names, float32 numpy, the
    layers numbered over diffusers' own attn_processors."""
    flat = {k: v for k, v in adapter_state_dict(unet, seed=seed).items() if "ip_adapter." in k}
    ref = resampler_ref(width, unet.config.cross_attention_dim, seed=seed + 100, **kw)
    proj = to_h94(ref.state_dict())
    return {**{f"image_proj.{k}": v.astype(np.float32) for k, v in proj.items()}, **flat}


# --------------------------------------------------------------------------- the Resampler


RESAMPLERS = {  # name: (embed_dims, output_dims, tokens, kw)
    "tiny": (20, 12, 9, dict(hidden_dims=16, heads=1, num_queries=4)),
    "three_heads": (24, 32, 17, dict(hidden_dims=40, heads=3, num_queries=7, depth=2)),
    "ffn2_batch": (8, 16, 5, dict(hidden_dims=12, heads=2, num_queries=16, ffn_ratio=2, depth=1)),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(RESAMPLERS))
def test_resampler_matches_diffusers(name, dtype):
    """Output and every traced submodule (proj_in, layers.i.ln0/ln1/attn.to_q/to_k/to_v/
    to_out.0, ff.0/ff.1.net.0.proj/..., layers.i, proj_out, norm_out)."""
    torch = need("torch")
    embed, out, tokens, kw = RESAMPLERS[name]
    ref = resampler_ref(embed, out, seed=3, **kw).to(torch_dtype(dtype))
    p = nest(to_h94(ref.state_dict()))
    x = rand(3, tokens, embed, seed=1).astype(dtype)
    with torch.no_grad(), collect_outputs(ref) as racts:
        want = to_np(ref(torch.from_numpy(x)))
    with minisd.trace() as acts:
        got = resampler(x, p)
    assert got.shape == (3, kw["num_queries"], out) and got.dtype == np.dtype(dtype)
    err = assert_rel(got, want, TOL[dtype], f"Resampler {name}")
    names = traced_names(ref, racts)
    assert "layers.0.attn.to_k" in names and "layers.0.ff.1.net.0" in names
    compare_traces(acts, racts, TOL[dtype], names)
    print(f"Resampler {name} {dtype}: rel. error {err:.2e}")


FULL_SIZE = {  # h94's Resamplers on ViT-H's 257 x 1280 hidden states: (output_dims, kw, dtypes)
    "plus_sd15": (768, dict(hidden_dims=768, heads=12, num_queries=16), ["float64", "float32"]),
    "plus_sdxl_vit-h": (2048, dict(hidden_dims=1280, heads=20, num_queries=16), ["float32"]),
}
FULL_CASES = [(n, d) for n, (_, _, dtypes) in FULL_SIZE.items() for d in dtypes]


@pytest.mark.slow
@pytest.mark.parametrize("name, dtype", FULL_CASES)
def test_full_size_resampler_matches_diffusers(name, dtype):
    """ip-adapter-plus(-face)_sd15's and ip-adapter-plus(-face)_sdxl_vit-h's Resampler sizes
    (4 layers, 16 queries, 12 / 20 heads of 64), randomized, on 257 tokens."""
    torch = need("torch")
    out, kw, _ = FULL_SIZE[name]
    ref = resampler_ref(1280, out, seed=8, **kw).to(torch_dtype(dtype))
    p = nest(to_h94(ref.state_dict()))
    x = rand(2, 257, 1280, seed=2).astype(dtype)
    with torch.no_grad():
        want = to_np(ref(torch.from_numpy(x)))
    got = resampler(x, p)
    assert got.shape == (2, 16, out)
    err = assert_rel(got, want, TOL[dtype], f"full-size Resampler {name}")
    print(f"full-size Resampler {name} {dtype}: rel. error {err:.2e}")


# --------------------------------------------------------------------------- on a UNet

MODELS = ("sd1", "sd2")


@pytest.fixture(scope="module")
def tiny(ref_cache):
    return diffusers_models(ref_cache, "UNet2DConditionModel", UNET_TINY, "ipplusunet", seed=1)


adapted = adapted_fixture(plus_state_dict, "ip-adapter-plus.safetensors")


inputs = inputs_of((TOKENS, WIDTH))  # penultimate hidden states (n, [images,] TOKENS, WIDTH)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", MODELS)
def test_every_layer_matches_diffusers(adapted, name, dtype):
    """sd1: one image per row; sd2: two (10 image tokens). Every Resampler module and every
    attn2's to_k_ip / to_v_ip (B, n, 5, inner) is compared."""
    ref, folder, path = adapted(name)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    ours, errs = compare_adapted(ref, folder, path, inputs, name, dtype)
    resampler_names = [k for k in errs if "image_projection_layers.0." in k]
    assert len(resampler_names) == 3 + 4 * 14  # proj_in, proj_out, norm_out; 14 per layer
    assert len([k for k in errs if "_ip.0" in k]) == 2 * len(ours.ip_adapter.paths)
    print(f"Plus {name} {dtype}: max rel. error {max(errs.values()):.2e}")


@pytest.mark.parametrize("dtype", ["float32"])
def test_array_backend(adapted, xp, dtype):
    """The Plus-adapted UNet on each array backend (fake_cupy: the device code path)."""
    ours = compare_on_backend(adapted, inputs, xp, dtype)
    assert isinstance(ours.ip_adapter.image_proj["layers"][0][0]["to_kv"]["weight"], xp.ndarray)


def test_read_attach_detach_and_every_key(adapted):
    """read: Plus, 5 tokens, widths from the file; attach / detach leaves the UNet's params
    exactly as they were; every Resampler key is read by a forward pass."""
    _, folder, path = adapted("sd1")
    adapter = read_ip_adapter(path)
    assert adapter.plus and adapter.num_tokens == 5 and adapter.variant.startswith("Plus")
    assert (adapter.embed_dim, adapter.cross_attention_dim) == (WIDTH, 32)
    unet = UNet2DConditionModel.from_pretrained(folder, dtype="float64")
    x, ctx, e = inputs(unet.config, 2, "float64")
    before = unet(x, 500, ctx)
    leaves = flatten(unet.params)
    state = attach(unet, path, scale=0.8)
    state.image_proj = RecordingDict(state.image_proj)
    assert np.abs(unet(x, 500, ctx, image_embeds=e) - before).max() > 1e-3
    assert state.image_proj.reads == {k.removeprefix("image_proj.") for k in _flat(path)
                                      if k.startswith("image_proj.")}  # fmt: skip
    assert detach(unet) is True
    after = flatten(unet.params)
    assert after.keys() == leaves.keys() and all(after[k] is leaves[k] for k in leaves)
    np.testing.assert_array_equal(unet(x, 500, ctx), before)


def test_diffusers_layout_reads_as_h94(adapted, tmp_path):
    """A diffusers UNet's state dict after loading the Plus adapter (encoder_hid_proj.
    image_projection_layers.0.layers.0.attn.to_k.weight, ...): the same UNet output."""
    ref, folder, path = adapted("sd2")
    sd = ref.state_dict()
    keys = [k for k in sd if "encoder_hid_proj" in k or ".processor." in k]
    converted = tmp_path / "converted.safetensors"
    save_file({f"unet.{k}": to_np(sd[k]) for k in keys}, converted)
    a, b = read_ip_adapter(path), read_ip_adapter(converted)
    fa, fb = flatten(a.image_proj), flatten(b.image_proj)
    assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
    outs = []
    for source in (path, converted):
        unet = UNet2DConditionModel.from_pretrained(folder, dtype="float64")
        attach(unet, source, scale=0.6)
        x, ctx, e = inputs(unet.config, 2, "float64")
        outs.append(unet(x, 42, ctx, image_embeds=e))
    np.testing.assert_array_equal(outs[0], outs[1])


# --------------------------------------------------------------------------- errors


def _flat(path):
    return {k: np.array(v) for k, v in load_file(path).items()}


def _replace(flat, key, value):
    return {**flat, key: value}


def test_file_errors_name_file_and_key(adapted, tmp_path):
    _, folder, path = adapted("sd1")
    unet = UNet2DConditionModel.from_pretrained(folder)
    flat = _flat(path)
    kv = "image_proj.layers.2.0.to_kv.weight"
    q = "image_proj.layers.0.0.to_q.weight"
    cases = {
        "no_ff": ({k: v for k, v in flat.items() if k != "image_proj.layers.3.1.3.weight"},
                  "missing key 'image_proj.layers.3.1.3.weight'"),
        "no_proj_out_bias": ({k: v for k, v in flat.items() if k != "image_proj.proj_out.bias"},
                            "missing key 'image_proj.proj_out.bias'"),
        "kv_shape": (_replace(flat, kv, flat[kv][:-2]),
                     f"key '{kv}' has shape \\(254, 24\\), expected \\(256, 24\\)"),
        "latents_2d": (_replace(flat, "image_proj.latents", flat["image_proj.latents"][0]),
                       r"key 'image_proj.latents' has shape \(5, 24\), expected 3 axes"),
        "q_rows": (_replace(flat, q, flat[q][:100]), "has 100 rows.*multiple of 64"),
        "gap": ({**flat, **{k.replace("layers.3.", "layers.5."): v for k, v in flat.items()
                            if "layers.3." in k}}, "missing key 'image_proj.layers.4.0.norm1"),
        "pos_emb": (_replace(flat, "image_proj.pos_emb.weight", flat["image_proj.latents"][0]),
                    "unexpected key 'image_proj.pos_emb.weight'"),
        "no_layer": ({k: v for k, v in flat.items() if not k.startswith("ip_adapter.3.")},
                     "missing key 'ip_adapter.3.to_k_ip.weight'"),
    }  # fmt: skip
    before = flatten(unet.params)
    for name, (bad, needle) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        save_file(bad, p)
        with pytest.raises(WeightsError, match=re.escape(p.name) + ": .*" + needle):
            attach(unet, p)
        assert unet.ip_adapter is None and flatten(unet.params).keys() == before.keys()


def test_faceid_plus_is_still_refused(adapted):
    _, _, path = adapted("sd1")
    flat = _flat(path)
    for key in ("image_proj.perceiver_resampler.proj_in.weight", "image_proj.proj.0.weight"):
        with pytest.raises(WeightsError, match=f"{re.escape(key)}.*FaceID"):
            read_ip_adapter(_replace(flat, key, np.zeros((4, 4), np.float32)))


def test_adapter_for_another_unet_and_bad_embeds(adapted):
    """sd2's Plus adapter (48-wide tokens) on sd1 (32-wide text): named by norm_out; hidden
    states of the wrong width or batch."""
    _, folder1, path1 = adapted("sd1")
    _, _, path2 = adapted("sd2")
    unet = UNet2DConditionModel.from_pretrained(folder1)
    with pytest.raises(WeightsError, match=r"image_proj\.norm_out\.weight.*48 wide.*32"):
        attach(unet, path2)
    attach(unet, path1)
    x, ctx, e = inputs(unet.config, 2, "float32")
    for bad in (e[:1], e[..., :-1], e[:, 0], e[:, None, None]):
        with pytest.raises(InputError, match=r"expected shape \(2, P, 20\).*penultimate"):
            unet(x, 1, ctx, image_embeds=bad)
