"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for
Text-to-Image Diffusion Models", arXiv:2308.06721) on an SD1.x / SD2.x or SDXL UNet, as diffusers'
``ImageProjection`` (models/embeddings.py), ``IPAdapterAttnProcessor2_0``
(models/attention_processor.py) and ``_load_ip_adapter_weights`` (loaders/unet.py) compute it.

A CLIP image embedding e (N, D) (minisd/clip_vision.py) becomes 4 extra context tokens

    c_i = LayerNorm(reshape(proj(e), (N, 4, C)))                       ImageProjection (sec. 3.2.1)

and every cross-attention layer (``attn2``) attends to the text and to those tokens separately,
with its own key / value projections for the image (decoupled cross-attention, eq. 5):

    out = to_out(Attention(q, K_text, V_text) + scale * Attention(q, c_i W_k', c_i W_v'))

The other kinds replace the projection; the layers are the same:

    Plus    a Resampler (minisd/ip_adapter_plus.py): the image encoder's penultimate hidden
            states (N, P, W) -> Q tokens (16 in h94's files)
    Full    an MLP (minisd/ip_adapter_mlp.py): the same hidden states -> P tokens, one per
            hidden-state token (257 with ViT-H)
    FaceID  an MLP (ip_adapter_mlp.py): a face ID embedding (N, 512) from insightface, which
            the caller computes -> T tokens (4); its file also holds LoRA layers for every
            attention layer, merged while the adapter is attached (minisd/ip_adapter_lora.py)

Several images for one adapter (``image_embeds`` (N, n, D), Plus / Full (N, n, P, W)) give 4n
(Qn, Pn, Tn) tokens, as diffusers concatenates them. ``scale`` 0 skips the image branch
(diffusers does too): the UNet then computes exactly what it computes without the adapter (but
for FaceID's LoRA, which diffusers keeps too).

Weights (.safetensors only; pickle files are refused): h94/IP-Adapter's layout

    image_proj.proj.weight (4C, D)   image_proj.proj.bias (4C,)   image_proj.norm.weight/bias (C,)
    ip_adapter.{n}.to_k_ip.weight (inner, C)   ip_adapter.{n}.to_v_ip.weight (inner, C)

with n numbering the UNet's attention processors in diffusers' order (down blocks, up blocks,
then the mid block; attn1 then attn2 in each transformer block): the cross-attention layers are
the odd numbers (SD1.5: 1, 3, ..., 31; SDXL base, 70 transformer blocks: 1, 3, ..., 139). A
diffusers UNet's state dict after ``load_ip_adapter``
(``encoder_hid_proj.image_projection_layers.0.image_embeds.weight``, ``<attn2 path>.processor.
to_k_ip.0.weight``, optionally under ``unet.``) is read too (minisd/ip_adapter_files.py).
Refused by name: FaceID Plus / PlusV2 (perceiver resampler fed by the face embedding and the CLIP
hidden states) and several adapters at once.

Attached (:func:`attach`), the UNet holds the image projection in ``unet.ip_adapter`` and each
cross-attention layer's ``attn2`` params gain ``processor.to_k_ip.0.weight`` /
``processor.to_v_ip.0.weight``, where diffusers' state dict has them (FaceID: its LoRA is merged
into to_q / to_k / to_v / to_out.0); :func:`detach` removes exactly those entries (and puts the
original weights back). ``unet(..., image_embeds=e)`` projects e and hands ``attn2`` an
:class:`IPContext` (text, image tokens, scale) instead of the text alone.

Traced names (diffusers' module paths): ``encoder_hid_proj`` (B, n, 4, C), ``encoder_hid_proj.
image_projection_layers.0(.image_embeds/.norm)`` (Plus: the Resampler's modules; Full / FaceID:
``ff.net.0.proj``, ``ff.net.2``, ``ff``, ``norm``) and, in each attn2 while the scale is not 0,
``processor.to_k_ip.0`` / ``processor.to_v_ip.0`` (B, n, 4, inner); Plus: Q instead of 4, Full:
P, FaceID: T.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from . import ip_adapter_lora, ops, trace
from .backend import device_of, to_device
from .blocks import attention, lin, ln
from .config import is_number
from .errors import InputError, WeightsError
from .ip_adapter_files import INPUTS, KEYS, NUM_TOKENS, IPAdapter, read_ip_adapter
from .ip_adapter_mlp import faceid_projection, full_projection, kind_of
from .ip_adapter_plus import resampler

__all__ = ["Attached", "IPAdapter", "IPContext", "attach", "detach", "image_projection"]
__all__ += ["input_shape", "ip_attention", "ip_context", "processor_paths", "read_ip_adapter"]
__all__ += ["set_scale"]
_rec = trace.record


class IPContext(NamedTuple):
    """What a cross-attention layer attends to with an IP-Adapter attached: the text
    embedding (B, Lt, Ct), the image tokens (B, Tn, C), the adapter's scale and T, the tokens
    per image (4; Plus: its Resampler's queries; Full: P; FaceID: T)."""

    text: object
    tokens: object
    scale: float
    num_tokens: int = NUM_TOKENS


@dataclasses.dataclass
class Attached:
    """``unet.ip_adapter`` while an adapter is attached: the image projection (model dtype,
    device), the scale, the attn2 paths that gained ``processor`` entries and FaceID's merged
    LoRA weights ((param key, original, merged), ...; ip_adapter_lora.merge)."""

    source: str
    image_proj: dict
    scale: float
    paths: tuple
    lora: tuple = ()

    @property
    def kind(self) -> str:
        """The kind: "base", "plus", "full" or "faceid" (minisd/ip_adapter_files.py)."""
        return kind_of(self.image_proj)

    @property
    def plus(self) -> bool:
        """IP-Adapter Plus: a Resampler on the encoder's penultimate hidden states."""
        return self.kind == "plus"

    @property
    def hidden_states(self) -> bool:
        """Plus and Full take the image encoder's penultimate hidden states."""
        return self.kind in ("plus", "full")


# --------------------------------------------------------------------------- layers


def image_projection(image_embeds, p, *, num_tokens=NUM_TOKENS, eps=1e-5):
    """diffusers' ImageProjection: LayerNorm(reshape(proj(e), (M, num_tokens, C))).
    image_embeds (M, D) -> (M, num_tokens, C). ``proj`` is diffusers' ``image_embeds``."""
    m = image_embeds.shape[0]
    h = _rec("image_embeds", lin(image_embeds, p["proj"]))  # (M, num_tokens * C)
    h = h.reshape(m, num_tokens, -1)  # (M, num_tokens, C)
    return _rec("norm", ln(h, p["norm"], eps=eps))  # (M, num_tokens, C)


def _split_heads(t, heads):
    b, length, inner = t.shape
    return t.reshape(b, length, heads, inner // heads).swapaxes(1, 2)  # (B, heads, L, d)


def _attend(q, k, v, heads, chunk_size, upcast):
    """Multi-head softmax(q k^T / sqrt(d)) v on (B, L, inner) projections -> (B, Lq, inner)."""
    b, lq, inner = q.shape
    o = ops.attention(
        _split_heads(q, heads),
        _split_heads(k, heads),
        _split_heads(v, heads),
        chunk_size=chunk_size,
        upcast=upcast,
    )  # (B, heads, Lq, d)
    return o.swapaxes(1, 2).reshape(b, lq, inner)  # (B, Lq, inner)


def ip_attention(x, p, *, heads, context, chunk_size=None, upcast=False):
    """IPAdapterAttnProcessor2_0 on an ``attn2`` layer (eq. 5 of the paper):
    to_out(attn(q, to_k(text), to_v(text)) + scale * attn(q, to_k_ip(c), to_v_ip(c))).
    x (B, L, C), context an :class:`IPContext` -> (B, L, C)."""
    text, tokens, scale, per_image = context
    if scale == 0:  # diffusers skips the image branch: the plain cross-attention, bit for bit
        return attention(x, p, heads=heads, context=text, chunk_size=chunk_size, upcast=upcast)
    q = _rec("to_q", lin(x, p["to_q"]))  # (B, L, inner)
    k = _rec("to_k", lin(text, p["to_k"]))  # (B, Lt, inner)
    v = _rec("to_v", lin(text, p["to_v"]))  # (B, Lt, inner)
    o = _attend(q, k, v, heads, chunk_size, upcast)  # (B, L, inner)
    ip = p["processor"]
    k_ip = lin(tokens, ip["to_k_ip"][0])  # (B, 4n, inner)
    v_ip = lin(tokens, ip["to_v_ip"][0])  # (B, 4n, inner)
    if trace.active():  # diffusers projects the (B, n, T, C) tokens
        _rec("processor.to_k_ip.0", k_ip.reshape(k_ip.shape[0], -1, per_image, k_ip.shape[-1]))
        _rec("processor.to_v_ip.0", v_ip.reshape(v_ip.shape[0], -1, per_image, v_ip.shape[-1]))
    o = o + scale * _attend(q, k_ip, v_ip, heads, chunk_size, upcast)  # (B, L, inner)
    return _rec("to_out.0", lin(o, p["to_out"][0]))  # (B, L, C)


# --------------------------------------------------------------------------- a UNet


def _node(params, path):
    """The params dict at a dotted module path; no CastOnRead casts on the way."""
    node = params
    for part in path.split("."):
        node = dict.__getitem__(node, int(part) if part.isdigit() else part)
    return node


def processor_paths(params):
    """The UNet's attention layers in diffusers' ``attn_processors`` order (its modules'
    registration order): down blocks, up blocks, mid block; in each transformer block attn1,
    then attn2. The IP-Adapter file numbers them from 0 in this order."""
    groups = [(f"down_blocks.{i}", b) for i, b in sorted(params["down_blocks"].items())]
    groups += [(f"up_blocks.{i}", b) for i, b in sorted(params["up_blocks"].items())]
    if "mid_block" in params:
        groups.append(("mid_block", params["mid_block"]))
    paths = []
    for name, block in groups:
        for j, attn in sorted(block.get("attentions", {}).items()):
            for k in sorted(attn["transformer_blocks"]):
                pre = f"{name}.attentions.{j}.transformer_blocks.{k}"
                paths += [f"{pre}.attn1", f"{pre}.attn2"]
    return paths


def _key(n, w):
    """The file's name of weight ``w`` of layer ``n`` (a number: h94; a path: diffusers)."""
    return f"ip_adapter.{n}.{w}.weight" if isinstance(n, int) else f"{n}.processor.{w}.0.weight"


def resolve(adapter, unet) -> dict:
    """{attn2 path: {"to_k_ip": w, "to_v_ip": w}} for ``unet``, after checking that the image
    tokens are as wide as the text, that the file has one pair for each cross-attention
    layer and nothing else, in the layer's shapes, and that FaceID's LoRA fits
    (:func:`lora_targets`)."""
    cross = {i: p for i, p in enumerate(processor_paths(unet.params)) if p.endswith(".attn2")}
    shapes = {p: _to_k_shape(unet.params, p) for p in cross.values()}  # (inner, text width)
    for _, width in shapes.values():
        if adapter.cross_attention_dim != width:  # diffusers: both are cross_attention_dim
            raise WeightsError(
                f"{adapter.source}: key {adapter.width_key!r}: the image tokens are "
                f"{adapter.cross_attention_dim} wide, this UNet's cross-attention takes {width} "
                "(an IP-Adapter made for another model: SD1.x 768, SD2.x 1024, SDXL 2048)"
            )
    layers = {}
    for n, pair in adapter.layers.items():
        path = cross.get(n) if isinstance(n, int) else n if n in shapes else None
        if path is None:
            raise WeightsError(
                f"{adapter.source}: key {_key(n, 'to_k_ip')!r} names no cross-attention layer "
                f"of this UNet (its cross-attention processors: {_numbers(cross)})"
            )
        for w in ("to_k_ip", "to_v_ip"):  # (inner, C), as to_k's (inner, text width)
            if tuple(pair[w].shape) != shapes[path]:
                raise WeightsError(
                    f"{adapter.source}: key {_key(n, w)!r} has shape {tuple(pair[w].shape)}, "
                    f"expected {shapes[path]}"
                )
        layers[path] = pair
    h94 = isinstance(next(iter(adapter.layers)), int)
    for n, path in cross.items():
        if path not in layers:
            raise WeightsError(
                f"{adapter.source}: missing key {_key(n if h94 else path, 'to_k_ip')!r}"
            )
    lora_targets(adapter, unet)
    return layers


def lora_targets(adapter, unet) -> dict:
    """{UNet param key: (up, down)} of the adapter's LoRA layers (FaceID; else empty), checked
    against the UNet's attention layers (minisd/ip_adapter_lora.py)."""
    paths = processor_paths(unet.params)
    return ip_adapter_lora.targets(adapter.lora, paths, unet.params, adapter.source)


def _to_k_shape(params, path):
    return tuple(dict.__getitem__(dict.__getitem__(_node(params, path), "to_k"), "weight").shape)


def _numbers(cross):
    n = sorted(cross)
    return ", ".join(map(str, n)) if len(n) <= 4 else f"{n[0]}, {n[1]}, ..., {n[-1]}"


def check_scale(scale) -> float:
    """One finite number (diffusers' per-block dict / list scales are not supported)."""
    if isinstance(scale, (dict, list, tuple)):
        raise InputError(
            f"scale={scale!r}: per-block or per-adapter IP-Adapter scales (diffusers' dict / "
            "list forms) are not supported; pass one number"
        )
    if not is_number(scale):
        raise InputError(f"scale={scale!r}: expected a finite number")
    return float(scale)


def attach(unet, adapter, scale=1.0) -> Attached:
    """Attach ``adapter`` (an IPAdapter, a path or a state dict) to ``unet`` (replacing an
    attached one): the image projection goes to ``unet.ip_adapter``, each cross-attention
    layer's pair to its ``attn2`` params as ``processor.to_k_ip.0`` / ``processor.to_v_ip.0``,
    cast to the UNet's dtype and device; FaceID's LoRA is merged into the attention weights.
    Every check runs before the first change."""
    adapter, scale = read_ip_adapter(adapter), check_scale(scale)
    layers = resolve(adapter, unet)
    merges = lora_targets(adapter, unet)
    dtype, device = unet.dtype, unet.device

    def cast(tree):
        return {
            k: cast(v) if isinstance(v, dict) else to_device(v, device, dtype)
            for k, v in tree.items()
        }

    proj = cast(adapter.image_proj)
    entries = {p: cast({w: {0: {"weight": pair[w]}} for w in pair}) for p, pair in layers.items()}
    detach(unet)
    for path, entry in entries.items():
        dict.__setitem__(_node(unet.params, path), "processor", entry)
    changes = ip_adapter_lora.merge(unet.params, merges)
    unet.ip_adapter = Attached(adapter.source, proj, scale, tuple(entries), changes)
    return unet.ip_adapter


def detach(unet) -> bool:
    """Remove an attached IP-Adapter: the UNet's params are again exactly what they were
    (FaceID: the weights its LoRA changed too; InputError, changing nothing, if a LoRA merged
    since changed them again). Returns whether one was attached."""
    state = getattr(unet, "ip_adapter", None)
    if state is None:
        return False
    ip_adapter_lora.restore(unet.params, state.lora, state.source)
    for path in state.paths:
        dict.__delitem__(_node(unet.params, path), "processor")
    unet.ip_adapter = None
    return True


def set_scale(unet, scale) -> None:
    """diffusers' ``set_ip_adapter_scale`` with one number (0: the image prompt is off)."""
    state = getattr(unet, "ip_adapter", None)
    if state is None:
        raise InputError("set_ip_adapter_scale: no IP-Adapter is loaded")
    state.scale = check_scale(scale)


PROJECTIONS = {  # kind -> the image projection (diffusers' image_projection_layers.0)
    "base": image_projection,
    "plus": resampler,
    "full": full_projection,
    "faceid": faceid_projection,
}


def ip_context(unet, text, image_embeds):
    """The cross-attention context for ``unet(..., image_embeds=)``: the text (B, Lt, Ct)
    alone without an adapter, else an IPContext with the projected image tokens (B, Tn, C).
    image_embeds: (B, D) or (B, n, D) CLIP image embeddings; Plus / Full: (B, P, W) or
    (B, n, P, W) penultimate hidden states; FaceID: (B, 512), (B, n, 512) or (B, n, 1, 512)
    face embeddings (``encoder_hid_proj`` as diffusers' MultiIPAdapterImageProjection: n images
    per row give Tn tokens)."""
    state = getattr(unet, "ip_adapter", None)
    if state is None:
        if image_embeds is not None:
            raise InputError("image_embeds: no IP-Adapter is loaded into this UNet")
        return text
    if image_embeds is None:
        raise InputError(
            f"image_embeds: an IP-Adapter is loaded ({state.source}); pass the image "
            "embeddings (pipe(..., ip_adapter_image=...) or ip_adapter_image_embeds=...) or "
            "unload it"
        )
    e = _embeds(state, image_embeds, text)  # (B, n, D) or (B, n, P, W)
    b, n = e.shape[:2]
    e = e.reshape(b * n, *e.shape[2:])  # (B*n, D) or (B*n, P, W) (FaceID: or (B*n, 1, D))
    with trace.scope("encoder_hid_proj"), trace.scope("image_projection_layers.0"):
        c = PROJECTIONS[state.kind](e, state.image_proj)  # (B*n, T, C)
    with trace.scope("encoder_hid_proj"):
        _rec("image_projection_layers.0", c)
    _rec("encoder_hid_proj", c.reshape(b, n, *c.shape[1:]))  # (B, n, T, C)
    tokens = c.reshape(b, n * c.shape[1], -1)  # (B, Tn, C)
    return IPContext(text, tokens, state.scale, c.shape[1])


def input_shape(state):
    """(axes of one image's input, their last size, what it is) for the attached adapter
    ``state``: base (1, D, CLIP image embeddings), Plus / Full (2, W, hidden states), FaceID
    (1, 512, face ID embeddings)."""
    axes, what = INPUTS[state.kind]
    return axes, _first_weight(state).shape[1], what


def _first_weight(state):
    """The image projection's first weight (out, in): proj, Plus proj_in, Full / FaceID proj.0."""
    node = state.image_proj
    for part in KEYS[state.kind][0].split("."):
        node = node[int(part) if part.isdigit() else part]
    return node


def _embeds(state, image_embeds, text):
    """image_embeds on the text's device in the adapter's dtype, with the images axis:
    (B, n, D), Plus / Full (B, n, P, W); checked against the batch and the projection's input
    width. FaceID also takes diffusers' (B, n, 1, D), kept so (its projection's trace too)."""
    axes, d, what = input_shape(state)
    e = to_device(image_embeds, device_of(text), _first_weight(state).dtype)
    ndim = axes + 2
    e = e[:, None] if e.ndim == ndim - 1 else e  # (B, n, ...)
    faceid = state.kind == "faceid" and e.ndim == 4 and e.shape[2] == 1  # (B, n, 1, D)
    b = text.shape[0]
    if (e.ndim != ndim and not faceid) or e.shape[0] != b or e.shape[-1] != d:
        one = f"P, {d}" if axes == 2 else f"{d}"
        raise InputError(
            f"image_embeds: expected shape ({b}, {one}) or ({b}, n, {one}) ({what}), got "
            f"{tuple(image_embeds.shape)}"
        )
    return e
