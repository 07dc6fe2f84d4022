"""The MLP image projections of IP-Adapter Full and IP-Adapter FaceID (Ye et al. 2023,
"IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models",
arXiv:2308.06721, and h94/IP-Adapter's ``MLPProjModel`` classes), as diffusers'
``IPAdapterFullImageProjection`` and ``IPAdapterFaceIDImageProjection`` (models/embeddings.py)
compute them. minisd/ip_adapter.py has the rest of the adapter (the decoupled cross-attention is
the same for every kind); the FaceID files' LoRA layers: minisd/ip_adapter_lora.py.

Both are diffusers' FeedForward(activation_fn="gelu") (h94: ``nn.Sequential(Linear, GELU,
Linear)``, exact GELU, biases) and a LayerNorm (eps 1e-5):

    Full   (ip-adapter-full-face_sd15): the image encoder's penultimate hidden states X (M, P, W)
           c = LayerNorm(W_2 gelu(W_0 X + b_0) + b_2)                                (M, P, C)
           one token per hidden-state token (P = 257 for ViT-H/14 at 224 px: 256 patches + CLS)
    FaceID (ip-adapter-faceid(-portrait)_sd15, ip-adapter-faceid_sdxl): a face ID embedding e
           (M, D), insightface's 512-d ArcFace ``normed_embedding`` (Deng et al. 2019), which
           minisd does not compute (the caller passes it: ``ip_adapter_image_embeds``)
           c = LayerNorm(reshape(W_2 gelu(W_0 e + b_0) + b_2, (M, T, C)))            (M, T, C)
           T tokens per face (4 in h94's faceid files, 16 in faceid-portrait)

Weights, h94's layout (``image_proj.`` +; H: the hidden width, W / D: the input width):

    Full    proj.0.weight (H, W) .bias (H,)   proj.2.weight (C, H) .bias (C,)
            proj.3.weight/bias (C,)          (the LayerNorm: index 3 of h94's nn.Sequential)
    FaceID  proj.0.weight (H, D) .bias (H,)   proj.2.weight (TC, H) .bias (TC,)
            norm.weight/bias (C,)

diffusers' converted names (loaders/unet.py's ``_convert_ip_adapter_image_proj_to_diffusers``,
read backwards): ``ff.net.0.proj`` = proj.0, ``ff.net.2`` = proj.2, ``norm`` = proj.3 (Full) or
norm (FaceID). A converted file does not say which of the two it is: an output as wide as the
norm (T = 1) is read as Full, a multiple of it as FaceID. Traced names are diffusers' module
paths: ``ff.net.0.proj``, ``ff.net.0`` (after GELU), ``ff.net.2``, ``ff``, ``norm``.
"""

from __future__ import annotations

from . import ops, trace
from .blocks import lin, ln
from .errors import WeightsError
from .ip_adapter_plus import key_shape
from .weights import check_keys

__all__ = ["check_mlp", "faceid_projection", "feed_forward", "from_diffusers", "full_projection"]
__all__ += ["kind_of"]
_rec = trace.record

EPS = 1e-5  # the LayerNorm's (torch's default)
# diffusers' names -> h94's, after ``encoder_hid_proj.image_projection_layers.0.``
RENAMES = {"ff.net.0.proj.": "proj.0.", "ff.net.2.": "proj.2."}


def kind_of(image_proj) -> str:
    """The IP-Adapter kind of an image projection nested with h94's names: "plus" (a Resampler:
    ``latents``), "full" (``proj.3``), "faceid" (``proj.0`` and ``norm``) or "base"."""
    if "latents" in image_proj:
        return "plus"
    proj = image_proj.get("proj", {})
    if 3 in proj:
        return "full"
    return "faceid" if 0 in proj else "base"


# --------------------------------------------------------------------------- layers


def feed_forward(x, p):
    """diffusers' FeedForward(dim, dim_out, activation_fn="gelu") as ``ff``: Linear ``p[0]``,
    exact GELU, Linear ``p[2]`` (h94's proj.0, proj.1, proj.2). (..., Din) -> (..., Dout)."""
    with trace.scope("ff"):
        with trace.scope("net.0"):
            h = _rec("proj", lin(x, p[0]))  # (..., H)
        h = _rec("net.0", ops.gelu(h))  # (..., H)
        h = _rec("net.2", lin(h, p[2]))  # (..., Dout)
    return _rec("ff", h)


def full_projection(hidden_states, p, *, eps=EPS):
    """IPAdapterFullImageProjection: LayerNorm(ff(X)), one token per input token.
    hidden_states (M, P, W) -> (M, P, C)."""
    h = feed_forward(hidden_states, p["proj"])  # (M, P, C)
    return _rec("norm", ln(h, p["proj"][3], eps=eps))  # (M, P, C)


def faceid_projection(id_embeds, p, *, eps=EPS):
    """IPAdapterFaceIDImageProjection: LayerNorm(reshape(ff(e), (M, T, C))).
    id_embeds (M, D) or diffusers' (M, 1, D) -> (M, T, C), T = rows of proj.2 / C."""
    m, c = id_embeds.shape[0], p["norm"]["weight"].shape[0]
    h = feed_forward(id_embeds, p["proj"])  # (M, T * C) or (M, 1, T * C)
    h = h.reshape(m, -1, c)  # (M, T, C)
    return _rec("norm", ln(h, p["norm"], eps=eps))  # (M, T, C)


# --------------------------------------------------------------------------- files


def expected_shapes(proj, source) -> dict:
    """{key: shape} of the Full or FaceID projection whose sizes proj.0, proj.2 and the norm
    give (flat h94 keys without ``image_proj.``)."""
    h, d = key_shape(proj, "proj.0.weight", 2, source)
    out = key_shape(proj, "proj.2.weight", 2, source)[0]
    norm = "proj.3" if "proj.3.weight" in proj else "norm"
    c = key_shape(proj, f"{norm}.weight", 1, source)[0]
    if norm == "proj.3" and out != c:
        raise WeightsError(
            f"{source}: key 'image_proj.proj.2.weight' has {out} rows, expected {c} (the width "
            "of 'image_proj.proj.3.weight', IP-Adapter Full's LayerNorm)"
        )
    if norm == "norm" and (c == 0 or out % c):
        raise WeightsError(
            f"{source}: key 'image_proj.proj.2.weight' has {out} rows, expected a multiple of "
            f"{c} (T image tokens of the width of 'image_proj.norm.weight', IP-Adapter FaceID)"
        )
    shapes = {"proj.0.weight": (h, d), "proj.0.bias": (h,)}
    shapes.update({"proj.2.weight": (out, h), "proj.2.bias": (out,)})
    shapes.update({f"{norm}.weight": (c,), f"{norm}.bias": (c,)})
    return shapes


def check_mlp(proj, source):
    """Every key of a Full or FaceID projection and nothing else, in consistent shapes (module
    doc). ``proj``: flat {key without ``image_proj.``: array}."""
    want = expected_shapes(proj, source)
    named = {"image_proj." + k: v for k, v in proj.items()}
    check_keys(named, {"image_proj." + k: s for k, s in want.items()}, source)


def from_diffusers(proj, source, prefix=""):
    """diffusers' IPAdapterFullImageProjection / IPAdapterFaceIDImageProjection state dict
    (flat, keys after ``prefix``) with h94's names: :data:`RENAMES`; ``norm`` is Full's proj.3
    when ff.net.2 is as wide as the norm, else FaceID's norm."""
    out_rows = getattr(proj.get("ff.net.2.weight"), "shape", (0,))[0]
    norm_width = getattr(proj.get("norm.weight"), "shape", (-1,))[0]
    renames = {**RENAMES, "norm.": "proj.3." if out_rows == norm_width else "norm."}
    out = {}
    for key, value in proj.items():
        new = next((h94 + key[len(d) :] for d, h94 in renames.items() if key.startswith(d)), None)
        if new is None:
            raise WeightsError(f"{source}: unexpected key {prefix + key!r} (not an IP-Adapter key)")
        out[new] = value
    return out
