"""IP-Adapter FaceID (minisd/ip_adapter_mlp.py's faceid_projection, ip_adapter_lora.py;
ip_adapter.py, ip_adapter_files.py, pipeline_ip.py) against diffusers: the projection alone vs
IPAdapterFaceIDImageProjection with every parameter randomized, every traced module, float64 and
float32; a UNet with a FaceID adapter and its LoRA vs diffusers' UNet2DConditionModel after
``_load_ip_adapter_weights`` and the LoRA as diffusers' ``load_ip_adapter`` loads it
(``_load_ip_adapter_loras`` -> ``load_lora_weights`` as PEFT adapter ``faceid_0``); the LoRA
merged and taken out again; the file errors; and the SD1 and SDXL pipelines vs diffusers'
after ``load_ip_adapter(..., image_encoder_folder=None)``, on ``ip_adapter_image_embeds``.

The every-layer comparison fuses diffusers' PEFT LoRA into its weights (``fuse_lora`` +
``unload_lora``: diffusers' own merge, so the module names are the plain ones); the backend
and pipeline tests run diffusers' unfused PEFT layers, as ``load_ip_adapter`` leaves them.
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
    nested,
)
from test_unet import TINY as UNET_TINY
from test_unet_blocks import traced_names

import minisd
from minisd.errors import InputError, WeightsError
from minisd.ip_adapter import attach, detach, processor_paths, read_ip_adapter, set_scale
from minisd.ip_adapter_mlp import faceid_projection
from minisd.unet import UNet2DConditionModel
from minisd.weights import flatten, load_file, nest, save_file

EMBED = 24  # the face embedding width of the test adapters (insightface: 512)
FACEID = dict(mult=2, num_tokens=3)  # h94's faceid: 1024 = 2 * 512 hidden, 4 tokens
RANK = 4  # LoRA rank (h94's faceid: 128)
TO_H94 = {"ff.net.0.proj.": "proj.0.", "ff.net.2.": "proj.2.", "norm.": "norm."}
LORA = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


def faceid_ref(embed, cross_attention_dim, *, seed, **kw):
    """A randomized float32 diffusers IPAdapterFaceIDImageProjection (FACEID sizes unless
    given)."""
    torch, _ = need("torch", "diffusers")
    from diffusers.models.embeddings import IPAdapterFaceIDImageProjection

    torch.manual_seed(0)
    kw = {**FACEID, **kw}
    ref = IPAdapterFaceIDImageProjection(embed, cross_attention_dim, **kw)
    return randomize_(ref, seed=seed).eval()


def to_h94(state_dict):
    """An IPAdapterFaceIDImageProjection state dict as h94's MLPProjModel keys (flat numpy)."""
    out = {}
    for key, value in state_dict.items():
        d, h94 = next((d, h) for d, h in TO_H94.items() if key.startswith(d))
        out[h94 + key[len(d) :]] = to_np(value)
    return out


def faceid_state_dict(unet, seed=0, embed=EMBED, lora=True):
    """A random IP-Adapter FaceID for diffusers UNet ``unet``: h94 names, float32 numpy, the
    layers and (``lora``) a rank-RANK LoRA for every attention processor, numbered over
    diffusers' own attn_processors (delta up @ down about half of W)."""
    torch = need("torch")
    flat = {k: v for k, v in adapter_state_dict(unet, seed=seed).items() if "ip_adapter." in k}
    proj = to_h94(faceid_ref(embed, unet.config.cross_attention_dim, seed=seed + 100).state_dict())
    flat.update({f"image_proj.{k}": v.astype(np.float32) for k, v in proj.items()})
    g = torch.Generator().manual_seed(seed + 200)
    for n, name in enumerate(unet.attn_processors if lora else ()):
        attn = unet.get_submodule(name[: -len(".processor")])
        for short, module in LORA.items():
            lin = attn.get_submodule(module)
            down = ("down", (RANK, lin.in_features), lin.in_features**-0.5)
            for role, shape, scale in (down, ("up", (lin.out_features, RANK), 0.5 * RANK**-0.5)):
                w = torch.randn(shape, generator=g, dtype=torch.float64) * scale
                flat[f"ip_adapter.{n}.{short}_lora.{role}.weight"] = w.float().numpy()
    return flat


def with_peft_lora(ref, flat):
    """A copy of diffusers UNet ``ref`` (its adapter loaded) with the file's LoRA as diffusers'
    load_ip_adapter adds it: _load_ip_adapter_loras, load_lora_weights' conversion, PEFT
    adapter "faceid_0" at weight 1.0."""
    need("peft")
    from diffusers import StableDiffusionPipeline

    ref = copy.deepcopy(ref)
    (lora,) = ref._load_ip_adapter_loras([nested(flat)]).values()
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(lora)
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, ref, adapter_name="faceid_0")
    ref.set_adapters(["faceid_0"], weights=[1.0])
    return ref


def fused(ref, dtype):
    """``ref`` (PEFT LoRA) in ``dtype`` with its LoRA fused by diffusers and the PEFT layers
    removed: the plain module names, the merged weights."""
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    ref.fuse_lora(lora_scale=1.0)
    ref.unload_lora()
    return ref


# --------------------------------------------------------------------------- the projection


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("sizes", [(5, 24, 12, dict()), (2, 16, 40, dict(mult=1, num_tokens=16))])
def test_faceid_projection_matches_diffusers(sizes, dtype):
    """Output and every traced submodule (ff.net.0.proj, ff.net.0, ff.net.2, ff, norm); diffusers
    takes (M, D) and (M, 1, D)."""
    torch = need("torch")
    m, embed, c, kw = sizes
    ref = faceid_ref(embed, c, seed=3, **kw).to(torch_dtype(dtype))
    params = nest(to_h94(ref.state_dict()))
    x = rand(m, embed, seed=1).astype(dtype)
    with torch.no_grad():
        want3 = to_np(ref(torch.from_numpy(x[:, None])))
    with torch.no_grad(), collect_outputs(ref) as racts:
        want = to_np(ref(torch.from_numpy(x)))
    np.testing.assert_array_equal(want, want3)
    with minisd.trace() as acts:
        got = faceid_projection(x, params)
    tokens = kw.get("num_tokens", FACEID["num_tokens"])
    assert got.shape == (m, tokens, c) and got.dtype == np.dtype(dtype)
    err = assert_rel(got, want, TOL[dtype], "IPAdapterFaceIDImageProjection")
    names = traced_names(ref, racts)
    assert sorted(names) == ["ff", "ff.net.0", "ff.net.0.proj", "ff.net.2", "norm"]
    compare_traces(acts, racts, TOL[dtype], names)
    print(f"FaceID projection {sizes[:3]} {dtype}: rel. error {err:.2e}")


# --------------------------------------------------------------------------- on a UNet

MODELS = ("sd1", "sd2")


@pytest.fixture(scope="module")
def tiny(ref_cache):
    return diffusers_models(ref_cache, "UNet2DConditionModel", UNET_TINY, "ipfaceidunet", seed=1)


adapted = adapted_fixture(faceid_state_dict, "ip-adapter-faceid.safetensors")


@pytest.fixture(scope="module")
def faceid(adapted):
    """name -> (adapted's diffusers UNet with the file's LoRA (PEFT, unfused), folder, file)."""
    cache = {}

    def get(name):
        if name not in cache:
            ref, folder, path = adapted(name)
            flat = {k: np.array(v) for k, v in load_file(path).items()}
            cache[name] = (with_peft_lora(ref, flat), folder, path)
        return cache[name]

    return get


inputs = inputs_of((EMBED,), (1, EMBED))  # face embeddings (n, D), or diffusers' (n, images, 1, D)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", MODELS)
def test_every_layer_matches_diffusers(faceid, name, dtype):
    """sd1: one face per row (3 image tokens); sd2: two, as (N, 2, 1, D). Every projection
    module, every attention projection the LoRA changed and every to_k_ip / to_v_ip."""
    ref, folder, path = faceid(name)
    ours, errs = compare_adapted(fused(ref, dtype), folder, path, inputs, name, dtype)
    assert len([k for k in errs if "image_projection_layers.0." in k]) == 5
    assert len([k for k in errs if "_ip.0" in k]) == 2 * len(ours.ip_adapter.paths)
    assert len(ours.ip_adapter.lora) == 4 * len(processor_paths(ours.params))
    print(f"FaceID {name} {dtype}: max rel. error {max(errs.values()):.2e}")


@pytest.mark.parametrize("dtype", ["float32"])
def test_array_backend(faceid, xp, dtype):
    """The FaceID-adapted UNet (LoRA merged) on each array backend vs diffusers' unfused PEFT
    LoRA."""
    ours = compare_on_backend(faceid, inputs, xp, dtype)
    _, merged, _ = ours.ip_adapter.lora[0]
    assert isinstance(merged, xp.ndarray)


def test_lora_merged_and_taken_out(adapted):
    """attach merges W + up @ down into to_q / to_k / to_v / to_out.0 of every attention layer;
    the scale leaves the LoRA as it is; detach puts the very same arrays back, and refuses
    (changing nothing) while a weight it merged was replaced since."""
    _, folder, path = adapted("sd1")
    flat = {k: np.array(v) for k, v in load_file(path).items()}
    unet = UNet2DConditionModel.from_pretrained(folder, dtype="float64")
    x, ctx, e = inputs(unet.config, 2, "float64")
    plain = unet(x, 500, ctx)
    leaves = flatten(unet.params)
    state = attach(unet, path, scale=0.0)
    paths = processor_paths(unet.params)
    for n, attn in enumerate(paths):
        for short, module in LORA.items():
            key = f"{attn}.{module}.weight"
            up, down = (flat[f"ip_adapter.{n}.{short}_lora.{r}.weight"] for r in ("up", "down"))
            want = leaves[key] + up.astype(np.float64) @ down.astype(np.float64)
            np.testing.assert_allclose(flatten(unet.params)[key], want, rtol=0, atol=1e-15)
    assert {k for k, _, _ in state.lora} == {
        f"{p}.{m}.weight" for p in paths for m in LORA.values()
    }
    lora_only = unet(x, 500, ctx, image_embeds=e)  # scale 0: no image branch, the LoRA stays
    assert np.abs(lora_only - plain).max() > 1e-3
    set_scale(unet, 0.7)
    assert np.abs(unet(x, 500, ctx, image_embeds=e) - lora_only).max() > 1e-3
    key, _, merged = state.lora[5]
    merged_params = flatten(unet.params)
    node = unet.params
    for part in key.split(".")[:-1]:
        node = node[int(part) if part.isdigit() else part]
    dict.__setitem__(node, "weight", merged + 1)  # as a LoRA merged later would
    with pytest.raises(InputError, match=f"{re.escape(key)} was changed after the IP-Adapter"):
        detach(unet)
    assert unet.ip_adapter is state
    assert all(flatten(unet.params)[k] is v for k, v in merged_params.items() if k != key)
    dict.__setitem__(node, "weight", merged)
    assert detach(unet) is True
    after = flatten(unet.params)
    assert after.keys() == leaves.keys() and all(after[k] is leaves[k] for k in leaves)
    np.testing.assert_array_equal(unet(x, 500, ctx), plain)


def test_lazy_weights_give_the_eager_result(adapted):
    """weights="lazy" (CastOnRead params: float32 file arrays read as float64): the LoRA merges
    into the stored arrays as into eager ones; detaching gives the plain UNet back."""
    _, folder, path = adapted("sd1")
    x, ctx, e = inputs(UNet2DConditionModel.from_pretrained(folder).config, 1, "float64")
    outs = []
    for mode in ("eager", "lazy"):
        unet = UNet2DConditionModel.from_pretrained(folder, dtype="float64", weights=mode)
        plain = unet(x, 300, ctx)
        attach(unet, path, scale=0.7)
        outs.append(unet(x, 300, ctx, image_embeds=e))
        detach(unet)
        np.testing.assert_array_equal(unet(x, 300, ctx), plain)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_read_and_diffusers_layout(adapted, tmp_path):
    """read: FaceID, 3 tokens, no image encoder, LoRA for each of sd2's 14 attention layers; a
    diffusers UNet's converted state dict (ff.net..., norm; no LoRA) is the same projection."""
    ref, folder, path = adapted("sd2")
    adapter = read_ip_adapter(path)
    assert adapter.kind == "faceid" and not adapter.hidden_states and adapter.num_tokens == 3
    assert adapter.variant == "FaceID (MLPProjModel, 3 image tokens)"
    assert (adapter.embed_dim, adapter.cross_attention_dim, len(adapter.lora)) == (EMBED, 48, 14)
    with pytest.raises(InputError, match="takes no image encoder.*ip_adapter_image_embeds"):
        _ = adapter.encoder_field
    sd = ref.state_dict()
    keys = [k for k in sd if "encoder_hid_proj" in k or ".processor." in k]
    save_file({f"unet.{k}": to_np(sd[k]) for k in keys}, tmp_path / "converted.safetensors")
    converted = read_ip_adapter(tmp_path / "converted.safetensors")
    assert converted.kind == "faceid" and converted.lora == {}
    fa, fb = flatten(adapter.image_proj), flatten(converted.image_proj)
    assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_file_errors_name_file_and_key(adapted, tmp_path):
    _, folder, path = adapted("sd1")
    unet = UNet2DConditionModel.from_pretrained(folder)
    flat = {k: np.array(v) for k, v in load_file(path).items()}
    qd, p2 = "ip_adapter.2.to_q_lora.down.weight", "image_proj.proj.2.weight"
    cases = {
        "lora_missing": ({k: v for k, v in flat.items() if k != qd},
                         f"FaceID's LoRA keys.*missing key '{qd}'"),
        "lora_shape": ({**flat, qd: flat[qd][:, :-1]},
                       f"'{re.escape(qd)}' \\(4, 31\\) do not make the shape"),
        "lora_layer": ({**flat, **{k.replace("ip_adapter.3.", "ip_adapter.30."): v
                                   for k, v in flat.items() if "ip_adapter.3.to_" in k
                                   and "_lora." in k}},
                       "'ip_adapter.30.to_q_lora.down.weight' names no attention layer .*0 ... 21"),
        "tokens": ({**flat, p2: flat[p2][:-1], "image_proj.proj.2.bias": flat[p2][:-1, 0]},
                   f"'{p2}' has 95 rows, expected a multiple of 32"),
        "no_norm": ({k: v for k, v in flat.items() if k != "image_proj.norm.bias"},
                    "missing key 'image_proj.norm.bias'.*FaceID"),
        "faceid_plus": ({**flat, "image_proj.perceiver_resampler.proj_in.weight": flat[p2]},
                        "FaceID Plus.*does not support"),
    }  # fmt: skip
    before = flatten(unet.params)
    for name, (bad, needle) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        save_file(bad, p)
        with pytest.raises(WeightsError, match=re.escape(p.name) + ": .*" + needle):
            attach(unet, p)
        assert unet.ip_adapter is None and flatten(unet.params).keys() == before.keys()
    attach(unet, path)
    x, ctx, e = inputs(unet.config, 2, "float32")
    for bad in (e[:1], e[:, :-1], e[None], np.zeros((2, 1, 2, EMBED), np.float32)):
        with pytest.raises(InputError, match=r"expected shape \(2, 24\).*face ID"):
            unet(x, 1, ctx, image_embeds=bad)
