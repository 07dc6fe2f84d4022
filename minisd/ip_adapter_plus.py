"""IP-Adapter Plus's image projection: the Resampler (Ye et al. 2023, "IP-Adapter: Text Compatible
Image Prompt Adapter for Text-to-Image Diffusion Models", arXiv:2308.06721, and its h94/IP-Adapter
code), a Perceiver-style resampler (Jaegle et al. 2021, "Perceiver"; Alayrac et al. 2022,
"Flamingo", sec. 2.1 and appendix A.1.1), as diffusers' ``IPAdapterPlusImageProjection``
(models/embeddings.py) computes it. minisd/ip_adapter.py has the rest of the adapter.

The input is the CLIP image encoder's penultimate hidden state X (M, P, W) (P = 257 tokens for
ViT-H/14 at 224 px, W = 1280), not its pooled embedding. Q learned latents (the queries) read it:

    x = proj_in(X)                                                               (M, P, H)
    l = latents                                                                  (M, Q, H)
    for each of the ``depth`` layers:
        l = to_out(Attn(to_q(norm2(l)), to_kv([norm1(x); norm2(l)]))) + l        perceiver attn.
        l = W_3 gelu(W_1 LayerNorm(l)) + l                                       feed-forward
    c = norm_out(proj_out(l))                                                    (M, Q, C)

Attention is multi-head with 64-wide heads (h94's dim_head; diffusers' conversion takes
heads = rows of to_q // 64); the keys and values come from the image features and the latents
together (Flamingo's resampler). Every LayerNorm has eps 1e-5; the attention and feed-forward
Linears have no bias, GELU is exact. The Q tokens (16 in h94's files) replace the base adapter's
4 in every cross-attention layer's image branch.

Weights: h94's layout, ``image_proj.`` + (i numbers the ``depth`` layers; I = 64 * heads):

    latents (1, Q, H)   proj_in.weight (H, W) .bias (H,)   proj_out.weight (C, H) .bias (C,)
    norm_out.weight/bias (C,)    layers.i.0.norm1/norm2.weight/bias (H,)    (x's / the latents')
    layers.i.0.to_q.weight (I, H)   layers.i.0.to_kv.weight (2I, H)   layers.i.0.to_out.weight
    (H, I)   layers.i.1.0.weight/bias (H,)   layers.i.1.1.weight (F, H)   layers.i.1.3.weight (H, F)

to_kv's first I rows make the keys, the last I the values. diffusers' converted names
(``layers.i.ln0``, ``attn.to_k`` / ``attn.to_v``, ``ff.1.net.0.proj``, ...; :data:`RENAMES`) are
read too: to_k and to_v are stacked back into to_kv there, the one place a weight is joined.
Traced names are diffusers' module paths (``proj_in``, ``layers.0.ln0``, ``layers.0.attn.to_k``,
``layers.0.ff.1.net.0.proj``, ``layers.0``, ``norm_out``, ...).
"""

from __future__ import annotations

import re

from . import ops, trace
from .backend import array_module
from .blocks import attention, lin, ln
from .errors import WeightsError
from .weights import check_keys

__all__ = ["DIM_HEAD", "RENAMES", "check_resampler", "from_diffusers", "key_shape", "resampler"]
_rec = trace.record

DIM_HEAD = 64  # the width of the Resampler's attention heads (h94's dim_head; diffusers' too)
EPS = 1e-5  # every LayerNorm's (torch's default)
# diffusers' IPAdapterPlusImageProjection names -> the Resampler's (h94's), after "layers.i."
# (loaders/unet.py's _convert_ip_adapter_image_proj_to_diffusers, read backwards); to_k / to_v
# are stacked into to_kv by from_diffusers.
RENAMES = {
    "ln0.": "0.norm1.",
    "ln1.": "0.norm2.",
    "attn.to_q.": "0.to_q.",
    "attn.to_out.0.": "0.to_out.",
    "ff.0.": "1.0.",
    "ff.1.net.0.proj.": "1.1.",
    "ff.1.net.2.": "1.3.",
}
LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------- layers


def _traced(name, fn, *args, **kw):
    """``fn`` inside trace scope ``name``, its output recorded as ``name``."""
    with trace.scope(name):
        out = fn(*args, **kw)
    return _rec(name, out)


def perceiver_attention(x, latents, p, *, heads, eps=EPS):
    """The latents attend to [norm1(x); norm2(latents)] (Flamingo's Perceiver Resampler), as
    diffusers' IPAdapterPlusImageProjectionBlock's ln0 / ln1 / attn. to_kv is applied as its
    two halves (views): to_k and to_v. x (M, P, H), latents (M, Q, H) -> (M, Q, H), before the
    residual."""
    xp = array_module(x)
    x = _rec("ln0", ln(x, p["norm1"], eps=eps))  # (M, P, H)
    q_in = _rec("ln1", ln(latents, p["norm2"], eps=eps))  # (M, Q, H)
    kv_in = xp.concatenate([x, q_in], axis=1)  # (M, P + Q, H)
    w = p["to_kv"]["weight"]  # (2I, H): the keys' rows, then the values'
    inner = w.shape[0] // 2
    attn = {"to_q": p["to_q"], "to_k": {"weight": w[:inner]}, "to_v": {"weight": w[inner:]}}
    attn["to_out"] = {0: p["to_out"]}
    return _traced("attn", attention, q_in, attn, heads=heads, context=kv_in)  # (M, Q, H)


def feed_forward(x, p, *, eps=EPS):
    """LayerNorm, Linear (H -> F), exact GELU, Linear (F -> H), no biases: h94's FeedForward
    (``1.0``, ``1.1``, ``1.3``), diffusers' ``ff.0`` + FeedForward ``ff.1``. (M, Q, H) ->
    (M, Q, H), before the residual."""
    h = _rec("0", ln(x, p[0], eps=eps))  # (M, Q, H)
    with trace.scope("1"):
        with trace.scope("net.0"):
            h = _rec("proj", lin(h, p[1]))  # (M, Q, F)
        h = _rec("net.0", ops.gelu(h))  # (M, Q, F)
        h = _rec("net.2", lin(h, p[3]))  # (M, Q, H)
    return _rec("1", h)


def resampler_block(x, latents, p, *, heads, eps=EPS):
    """One layer: perceiver attention, then the feed-forward, each with its residual.
    x (M, P, H) image features, latents (M, Q, H) -> (M, Q, H)."""
    latents = perceiver_attention(x, latents, p[0], heads=heads, eps=eps) + latents  # (M, Q, H)
    return _traced("ff", feed_forward, latents, p[1], eps=eps) + latents  # (M, Q, H)


def resampler(features, p, *, eps=EPS):
    """IPAdapterPlusImageProjection: image features (M, P, W) (the encoder's penultimate hidden
    states) -> (M, Q, C) image tokens. ``p``: the Resampler's params, h94's names nested."""
    xp = array_module(features)
    layers = p["layers"]
    heads = layers[0][0]["to_q"]["weight"].shape[0] // DIM_HEAD
    x = _rec("proj_in", lin(features, p["proj_in"]))  # (M, P, H)
    lat = xp.repeat(p["latents"], x.shape[0], axis=0)  # (1, Q, H) -> (M, Q, H)
    for i in range(len(layers)):
        with trace.scope(f"layers.{i}"):
            lat = resampler_block(x, lat, layers[i], heads=heads, eps=eps)  # (M, Q, H)
        _rec(f"layers.{i}", lat)
    h = _rec("proj_out", lin(lat, p["proj_out"]))  # (M, Q, C)
    return _rec("norm_out", ln(h, p["norm_out"], eps=eps))  # (M, Q, C)


# --------------------------------------------------------------------------- files


def key_shape(proj, key, ndim, source):
    """The shape of ``proj[key]``, which must exist with ``ndim`` axes (``proj``: flat h94
    keys without ``image_proj.``; also minisd/ip_adapter_mlp.py's)."""
    if key not in proj:
        raise WeightsError(f"{source}: missing key {'image_proj.' + key!r}")
    shape = tuple(proj[key].shape)
    if len(shape) != ndim:
        raise WeightsError(
            f"{source}: key {'image_proj.' + key!r} has shape {shape}, expected {ndim} axes"
        )
    return shape


def expected_shapes(proj, source) -> dict:
    """{key: shape} of the Resampler whose sizes ``proj``'s latents, proj_in, norm_out, layer 0's
    to_q and feed-forward give (flat h94 keys without ``image_proj.``)."""
    _, q, h = key_shape(proj, "latents", 3, source)
    w = key_shape(proj, "proj_in.weight", 2, source)[1]
    c = key_shape(proj, "norm_out.weight", 1, source)[0]
    inner = key_shape(proj, "layers.0.0.to_q.weight", 2, source)[0]
    ff = key_shape(proj, "layers.0.1.1.weight", 2, source)[0]
    if inner % DIM_HEAD:
        raise WeightsError(
            f"{source}: key 'image_proj.layers.0.0.to_q.weight' has {inner} rows; the "
            f"Resampler's heads are {DIM_HEAD} wide, so they must be a multiple of {DIM_HEAD}"
        )
    shapes = {"latents": (1, q, h), "proj_in.weight": (h, w), "proj_in.bias": (h,)}
    shapes.update({"proj_out.weight": (c, h), "proj_out.bias": (c,)})
    shapes.update({"norm_out.weight": (c,), "norm_out.bias": (c,)})
    depth = 1 + max(int(m[1]) for k in proj if (m := LAYER.match(k)))
    for i in range(depth):
        pre = f"layers.{i}."
        for norm in ("0.norm1", "0.norm2", "1.0"):
            shapes[f"{pre}{norm}.weight"] = shapes[f"{pre}{norm}.bias"] = (h,)
        shapes.update({f"{pre}0.to_q.weight": (inner, h), f"{pre}0.to_kv.weight": (2 * inner, h)})
        shapes.update({f"{pre}0.to_out.weight": (h, inner), f"{pre}1.1.weight": (ff, h)})
        shapes[f"{pre}1.3.weight"] = (h, ff)
    return shapes


def check_resampler(proj, source):
    """Every key of a Resampler and nothing else, in consistent shapes (module doc).
    ``proj``: flat {key without ``image_proj.``: array}."""
    want = expected_shapes(proj, source)
    named = {"image_proj." + k: v for k, v in proj.items()}
    check_keys(named, {"image_proj." + k: s for k, s in want.items()}, source)


def from_diffusers(proj, source, prefix=""):
    """diffusers' IPAdapterPlusImageProjection state dict (flat, keys after ``prefix``) with h94's
    names: :data:`RENAMES`, and to_k / to_v stacked into to_kv (keys' rows first)."""
    xp = array_module(next(iter(proj.values())))
    out, kv = {}, {}
    for key, value in proj.items():
        m = LAYER.match(key)
        rest = m[2] if m else None
        if m and rest in ("attn.to_k.weight", "attn.to_v.weight"):
            kv.setdefault(int(m[1]), {})[rest] = value
            continue
        new = key
        if m:
            new = next((f"layers.{m[1]}.{h94}{rest[len(d) :]}" for d, h94 in RENAMES.items()
                        if rest.startswith(d)), None)  # fmt: skip
        if new is None:
            raise WeightsError(f"{source}: unexpected key {prefix + key!r} (not an IP-Adapter key)")
        out[new] = value
    for i, pair in sorted(kv.items()):
        for w in ("attn.to_k.weight", "attn.to_v.weight"):
            if w not in pair:
                raise WeightsError(f"{source}: missing key {f'{prefix}layers.{i}.{w}'!r}")
        k, v = pair["attn.to_k.weight"], pair["attn.to_v.weight"]
        if k.shape != v.shape:
            raise WeightsError(
                f"{source}: key {f'{prefix}layers.{i}.attn.to_v.weight'!r} has shape "
                f"{tuple(v.shape)}, expected to_k's {tuple(k.shape)}"
            )
        out[f"layers.{i}.0.to_kv.weight"] = xp.concatenate([xp.asarray(k), xp.asarray(v)])
    return out
