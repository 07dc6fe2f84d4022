"""IP-Adapter on the UNet (minisd/ip_adapter.py, ip_adapter_files.py) against diffusers: a
UNet2DConditionModel after ``_load_ip_adapter_weights`` from the same h94-layout state dict,
every traced module and eps, float64 and float32, scales 0 / 0.6 / 1; the image projection
alone; detaching restores the UNet bit for bit; the file errors.

The adapter weights are random (seeded torch generator), saved in float32 as
``image_proj.*`` / ``ip_adapter.{n}.to_k_ip.weight`` with n numbered over diffusers' own
``attn_processors`` (so minisd's numbering is checked against diffusers', not against itself).
In float64, time_proj is the reference's float32 island (tests/test_unet.py): compare_whole
feeds minisd's time_proj to the reference.
"""

from __future__ import annotations

import copy
import functools
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
    to_np,
    torch_dtype,
)
from test_unet import TINY as UNET_TINY
from test_unet import compare_whole

import minisd
from minisd import ip_adapter
from minisd.errors import InputError, WeightsError
from minisd.ip_adapter import attach, detach, processor_paths, read_ip_adapter, set_scale
from minisd.unet import UNet2DConditionModel
from minisd.weights import RecordingDict, flatten, save_file

EMBED_DIM = 24  # the CLIP image embedding size of the test adapters
MODELS = ("sd1", "sd2")  # SD1: head count, conv projections; SD2: head dims, linear, upcast


@pytest.fixture(scope="module")
def tiny(ref_cache):
    return diffusers_models(ref_cache, "UNet2DConditionModel", UNET_TINY, "ipunet", seed=1)


def adapter_state_dict(ref, seed=0, embed_dim=EMBED_DIM):
    """A random base IP-Adapter for diffusers UNet ``ref``, flat, h94 names, float32 numpy."""
    torch = need("torch")
    g = torch.Generator().manual_seed(seed)
    c = ref.config.cross_attention_dim

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).float().numpy()

    flat = {
        "image_proj.proj.weight": randn(4 * c, embed_dim, scale=embed_dim**-0.5),
        "image_proj.proj.bias": randn(4 * c, scale=0.1),
        "image_proj.norm.weight": 0.5 + np.abs(randn(c)),
        "image_proj.norm.bias": randn(c, scale=0.1),
    }
    for n, name in enumerate(ref.attn_processors):  # diffusers' own order
        if name.endswith("attn2.processor"):
            attn = ref.get_submodule(name[: -len(".processor")])
            inner = attn.to_k.out_features
            for w in ("to_k_ip", "to_v_ip"):
                flat[f"ip_adapter.{n}.{w}.weight"] = randn(inner, c, scale=c**-0.5)
    return flat


def nested(flat):
    """The {"image_proj": {...}, "ip_adapter": {...}} torch dict diffusers' loader takes."""
    torch = need("torch")
    out = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        group, rest = key.split(".", 1)
        out[group][rest] = torch.from_numpy(np.array(value))
    return out


def adapted_fixture(state_dict, file_name):
    """A module fixture ``adapted``: name -> (float32 diffusers UNet of the module's ``tiny``
    fixture with the IP-Adapter ``state_dict(ref, seed=5)`` loaded, UNet folder, h94 file)."""

    @pytest.fixture(scope="module")
    def adapted(tiny, tmp_path_factory):
        cache = {}

        def get(name):
            if name not in cache:
                ref, folder = tiny(name)
                flat = state_dict(ref, seed=5)
                path = tmp_path_factory.mktemp("ip") / file_name
                save_file(flat, path)
                ref = copy.deepcopy(ref)
                ref._load_ip_adapter_weights(nested(flat))
                cache[name] = (ref.eval(), folder, path)
            return cache[name]

        return get

    return adapted


adapted = adapted_fixture(adapter_state_dict, "ip-adapter.safetensors")


def set_ref_scale(ref, scale):
    for proc in ref.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [scale]


def inputs_of(one, each=None):
    """``inputs(cfg, n, dtype, images=None, seed=0)`` -> latents, text and image inputs of
    shape (n, *one) (one image per row) or (n, images, *each) (``each`` None: ``one``)."""

    def inputs(cfg, n, dtype, images=None, seed=0):
        x = rand(n, cfg.in_channels, 8, 12, seed=seed).astype(dtype)
        ctx = rand(n, 7, cfg.cross_attention_dim[0], seed=seed + 1).astype(dtype)
        shape = (n, *one) if images is None else (n, images, *(each or one))
        return x, ctx, rand(*shape, seed=seed + 2).astype(dtype)

    return inputs


inputs = inputs_of((EMBED_DIM,))  # CLIP image embeddings (n, D) or (n, images, D)


def compare_adapted(ref, folder, path, inputs, name, dtype, scale=0.6):
    """``ref``: an adapted diffusers UNet in ``dtype``; ours: ``folder``'s UNet with the adapter
    ``path`` attached, both at ``scale``, fed ``inputs`` (sd1: one image per row, sd2: two).
    Every layer is compared (compare_whole). -> (ours, {name: error})."""
    torch = need("torch")
    set_ref_scale(ref, scale)
    ours = UNet2DConditionModel.from_pretrained(folder, dtype=dtype)
    attach(ours, path, scale=scale)
    single = name == "sd1"
    x, ctx, e = inputs(ours.config, 2, dtype, images=None if single else 2)
    t = np.array([3, 800])
    embeds = e[:, None] if single else e  # diffusers: a list of (N, n, ...), one per adapter
    kw = {"added_cond_kwargs": {"image_embeds": [torch.from_numpy(embeds)]}}
    errs = compare_whole(
        functools.partial(ours, image_embeds=e),
        ref,
        [x, t, ctx],
        [torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)],
        dtype,
        ref_kwargs=kw,
    )
    return ours, errs


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("scale", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("name", MODELS)
def test_every_layer_matches_diffusers(adapted, name, scale, dtype):
    """(N, D) embeddings for sd1, (N, 2, D) (two images: 8 tokens) for sd2."""
    ref, folder, path = adapted(name)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    ours, errs = compare_adapted(ref, folder, path, inputs, name, dtype, scale)
    ip_names = [k for k in errs if "_ip.0" in k or "encoder_hid_proj" in k]
    assert len(ip_names) == (4 + 2 * len(ours.ip_adapter.paths) if scale else 4)
    print(f"{name} scale={scale} {dtype}: max rel. error {max(errs.values()):.2e}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_image_projection_matches_diffusers(dtype):
    torch, diffusers = need("torch", "diffusers")
    from diffusers.models.embeddings import ImageProjection
    from refharness import randomize_

    del diffusers
    proj = ImageProjection(image_embed_dim=20, cross_attention_dim=12, num_image_text_embeds=4)
    ref = randomize_(proj, seed=4)
    ref = ref.to(torch_dtype(dtype)).eval()
    p = {"proj": {k: to_np(v) for k, v in ref.image_embeds.state_dict().items()}}
    p["norm"] = {k: to_np(v) for k, v in ref.norm.state_dict().items()}
    e = rand(5, 20).astype(dtype)
    with torch.no_grad(), collect_outputs(ref) as racts:
        want = to_np(ref(torch.from_numpy(e)))
    with minisd.trace() as acts:
        got = ip_adapter.image_projection(e, p)
    assert got.shape == (5, 4, 12) and got.dtype == np.dtype(dtype)
    assert_rel(got, want, TOL[dtype], "ImageProjection")
    compare_traces(acts, racts, TOL[dtype], ["image_embeds", "norm"])


def test_processor_numbering_is_diffusers(tiny):
    for name in MODELS:
        ref, folder = tiny(name)
        ours = UNet2DConditionModel.from_pretrained(folder)
        want = [n[: -len(".processor")] for n in ref.attn_processors]
        assert processor_paths(ours.params) == want


@pytest.mark.parametrize("dtype", ["float32"])
def test_array_backend(adapted, xp, dtype):
    """The IP-adapted UNet on each array backend (fake_cupy: the device code path)."""
    compare_on_backend(adapted, inputs, xp, dtype)


def compare_on_backend(adapted, inputs, xp, dtype):
    """The "sd2" UNet with ``adapted``'s adapter attached at scale 0.6 on array module ``xp``
    against diffusers', image embeddings from ``inputs``. -> minisd's UNet."""
    torch = need("torch")
    from minisd.backend import to_numpy

    ref, folder, path = adapted("sd2")
    set_ref_scale(ref, 0.6)
    ours = UNet2DConditionModel.from_pretrained(
        folder, dtype=dtype, device="cpu" if xp is np else "cuda"
    )
    attach(ours, path, scale=0.6)
    x, ctx, e = inputs(ours.config, 2, dtype, seed=7)
    out = ours(xp.asarray(x), xp.asarray(np.array([7, 700])), xp.asarray(ctx), image_embeds=e)
    assert isinstance(out, xp.ndarray)
    with torch.no_grad():
        r = ref(
            torch.from_numpy(x),
            torch.tensor([7, 700]),
            torch.from_numpy(ctx),
            added_cond_kwargs={"image_embeds": [torch.from_numpy(e)[:, None]]},
        ).sample
    assert_rel(to_numpy(out), to_np(r), TOL[dtype], "output")
    return ours


# --------------------------------------------------------------------------- attach / detach


def test_detach_restores_the_unet_bit_for_bit(adapted):
    _, folder, path = adapted("sd1")
    unet = UNet2DConditionModel.from_pretrained(folder, dtype="float64")
    x, ctx, e = inputs(unet.config, 2, "float64")
    before = unet(x, 500, ctx)
    leaves = flatten(unet.params)
    attach(unet, path, scale=0.8)
    added = set(flatten(unet.params)) - set(leaves)
    assert len(added) == 2 * len(unet.ip_adapter.paths) == 2 * 11  # sd1: 11 attn2 layers
    assert all(
        k.endswith((".processor.to_k_ip.0.weight", ".processor.to_v_ip.0.weight")) for k in added
    )
    adapted_out = unet(x, 500, ctx, image_embeds=e)
    assert np.abs(adapted_out - before).max() > 1e-3  # the image prompt changes eps
    assert detach(unet) is True
    after = flatten(unet.params)
    assert after.keys() == leaves.keys() and all(after[k] is leaves[k] for k in leaves)
    assert unet.ip_adapter is None
    np.testing.assert_array_equal(unet(x, 500, ctx), before)
    assert detach(unet) is False  # nothing attached: nothing to do
    with pytest.raises(InputError, match="image_embeds: no IP-Adapter"):
        unet(x, 500, ctx, image_embeds=e)


def test_scale_zero_is_the_plain_unet_and_scale_is_settable(adapted):
    _, folder, path = adapted("sd2")
    unet = UNet2DConditionModel.from_pretrained(folder, dtype="float32")
    x, ctx, e = inputs(unet.config, 2, "float32")
    plain = unet(x, 10, ctx)
    attach(unet, path, scale=1.0)
    one = unet(x, 10, ctx, image_embeds=e)
    set_scale(unet, 0)
    np.testing.assert_array_equal(unet(x, 10, ctx, image_embeds=e), plain)
    set_scale(unet, 1)
    np.testing.assert_array_equal(unet(x, 10, ctx, image_embeds=e), one)
    for bad in ({"up": {"block_0": [0.0, 1.0]}}, [1.0, 0.5], "0.5", float("nan")):
        with pytest.raises(InputError, match="scale"):
            set_scale(unet, bad)
    attach(unet, path, scale=0.5)  # replaces the attached one
    assert unet.ip_adapter.scale == 0.5 and detach(unet) and unet.ip_adapter is None
    np.testing.assert_array_equal(unet(x, 10, ctx), plain)


def test_every_adapter_key_is_read(adapted):
    _, folder, path = adapted("sd1")
    unet = UNet2DConditionModel.from_pretrained(folder, dtype="float64")
    state = attach(unet, path)
    keys = {k for k in flatten(unet.params) if ".processor." in k}
    unet.params = RecordingDict(unet.params)
    state.image_proj = RecordingDict(state.image_proj)
    x, ctx, e = inputs(unet.config, 1, "float64")
    unet(x, 1, ctx, image_embeds=e)
    assert keys and keys <= unet.params.reads
    assert state.image_proj.reads == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}


def test_lazy_weights_give_the_eager_result(adapted):
    """A UNet loaded with weights="lazy" (CastOnRead params) takes the adapter the same way."""
    _, folder, path = adapted("sd1")
    x, ctx, e = inputs(UNet2DConditionModel.from_pretrained(folder).config, 1, "float32")
    outs = []
    for mode in ("eager", "lazy"):
        unet = UNet2DConditionModel.from_pretrained(folder, dtype="float32", weights=mode)
        attach(unet, path, scale=0.7)
        outs.append(unet(x, 300, ctx, image_embeds=e))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_diffusers_layout_reads_as_h94(adapted, tmp_path):
    """A diffusers UNet's IP-Adapter state dict (encoder_hid_proj..., attn2.processor...)."""
    ref, folder, path = adapted("sd1")
    sd = ref.state_dict()
    keys = [k for k in sd if "encoder_hid_proj" in k or ".processor." in k]
    save_file({f"unet.{k}": to_np(sd[k]) for k in keys}, tmp_path / "converted.safetensors")
    outs = []
    for source in (path, tmp_path / "converted.safetensors"):
        unet = UNet2DConditionModel.from_pretrained(folder, dtype="float64")
        attach(unet, source, scale=0.6)
        x, ctx, e = inputs(unet.config, 2, "float64")
        outs.append(unet(x, 42, ctx, image_embeds=e))
    np.testing.assert_array_equal(outs[0], outs[1])


# --------------------------------------------------------------------------- errors


def _flat(path):
    from minisd.weights import load_file

    return {k: np.array(v) for k, v in load_file(path).items()}


def test_file_errors(adapted, tmp_path):
    _, _, path = adapted("sd1")
    for suffix in (".bin", ".ckpt", ".pt"):
        (tmp_path / f"ip{suffix}").write_bytes(b"not a pickle")
        with pytest.raises(WeightsError, match=r"never loaded.*safetensors"):
            read_ip_adapter(tmp_path / f"ip{suffix}")
    with pytest.raises(WeightsError, match="no such IP-Adapter file"):
        read_ip_adapter(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="found 0"):
        read_ip_adapter(tmp_path)
    assert read_ip_adapter(path.parent).source == str(path)  # a folder with one file
    flat = _flat(path)
    variants = {
        "image_proj.proj.3.weight": "IP-Adapter Full",
        "image_proj.perceiver_resampler.proj_in.weight": "FaceID Plus",
        "ip_adapter.1.to_k_lora.down.weight": "FaceID",
    }
    for key, kind in variants.items():
        with pytest.raises(WeightsError, match=f"{key}.*{kind}"):
            read_ip_adapter({**flat, key: np.zeros((1, 4, 8), np.float32)})
    # IP-Adapter Plus is read (tests/test_ip_adapter_plus.py): latents make it a Resampler file
    with pytest.raises(WeightsError, match="missing key 'image_proj.proj_in.weight'"):
        read_ip_adapter({**flat, "image_proj.latents": np.zeros((1, 16, 8), np.float32)})
    faceid = {k: v for k, v in flat.items() if not k.startswith("image_proj.proj.")}
    faceid["image_proj.proj.0.weight"] = np.zeros((8, 4), np.float32)
    with pytest.raises(WeightsError, match="FaceID"):
        read_ip_adapter(faceid)


def _bad(flat, tmp_path, name):
    p = tmp_path / f"{name}.safetensors"
    save_file(flat, p)
    return p


def test_missing_misshapen_and_stray_keys_name_file_and_key(adapted, tmp_path):
    _, folder, path = adapted("sd1")
    unet = UNet2DConditionModel.from_pretrained(folder)
    flat = _flat(path)
    k3 = "ip_adapter.3.to_v_ip.weight"
    cases = {
        "no_v": ({k: v for k, v in flat.items() if k != k3}, f"missing key '{k3}'"),
        "no_layer": (
            {k: v for k, v in flat.items() if not k.startswith("ip_adapter.3.")},
            "missing key 'ip_adapter.3.to_k_ip.weight'",
        ),
        "no_norm": (
            {k: v for k, v in flat.items() if k != "image_proj.norm.bias"},
            "missing key 'image_proj.norm.bias'",
        ),
        "shape": ({**flat, k3: flat[k3][:, :-1]}, f"key '{k3}' has shape"),
        "proj_shape": (
            {**flat, "image_proj.proj.bias": flat["image_proj.proj.bias"][:-4]},
            "key 'image_proj.proj.bias' has shape",
        ),
        "attn1": (
            {
                **flat,
                "ip_adapter.2.to_k_ip.weight": flat[k3],
                "ip_adapter.2.to_v_ip.weight": flat[k3],
            },
            "'ip_adapter.2.to_k_ip.weight' names no cross-attention layer",
        ),
        "stray": ({**flat, "ip_adapter.1.to_q_ip.weight": flat[k3]}, "unexpected key"),
    }
    before = flatten(unet.params)
    for name, (bad, needle) in cases.items():
        p = _bad(bad, tmp_path, name)
        with pytest.raises(WeightsError, match=re.escape(p.name) + ": .*" + re.escape(needle)):
            attach(unet, p)
        assert unet.ip_adapter is None and flatten(unet.params).keys() == before.keys()


def test_adapter_for_another_unet_is_refused(adapted):
    """Widths that do not fit: sd2's adapter (48-wide tokens) on sd1 (32-wide text)."""
    _, folder1, _ = adapted("sd1")
    _, _, path2 = adapted("sd2")
    unet = UNet2DConditionModel.from_pretrained(folder1)
    with pytest.raises(WeightsError, match=r"image_proj\.norm\.weight.*48 wide.*32"):
        attach(unet, path2)


def test_image_embeds_errors(adapted):
    _, folder, path = adapted("sd1")
    unet = UNet2DConditionModel.from_pretrained(folder)
    attach(unet, path)
    x, ctx, e = inputs(unet.config, 2, "float32")
    with pytest.raises(InputError, match="image_embeds: an IP-Adapter is loaded"):
        unet(x, 1, ctx)
    for bad in (e[:1], e[:, :-1], e[None], e[:, None, None]):
        with pytest.raises(InputError, match=r"image_embeds: expected shape \(2, 24\)"):
            unet(x, 1, ctx, image_embeds=bad)
