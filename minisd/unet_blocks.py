"""The UNet blocks of diffusers as functions: Transformer2DModel, BasicTransformerBlock, the GEGLU
feed-forward, the down / up / mid blocks of ``unet_2d_blocks.py``, and the timestep embedding.

Every function takes the activation, the block's nested params (checkpoint names: ``p["resnets"]
[0]["conv1"]["weight"]``) and keyword-only hyperparameters. Whole blocks share one
:class:`BlockOpts` (what the UNet's config.json says about norms, projections and attention).
Every submodule's output is recorded for ``minisd.trace()`` under its diffusers module path.
Shapes: images (N, C, H, W), token sequences (B, L, C); L = H*W for image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import blocks, ops, parallel, trace
from .backend import array_module
from .blocks import gn, lin, ln
from .errors import InputError
from .freeu import apply_freeu
from .ip_adapter import IPContext, ip_attention

_rec = trace.record


@dataclass(frozen=True)
class BlockOpts:
    """Hyperparameters shared by the blocks of one UNet (diffusers' names in comments)."""

    groups: int = 32  # resnet_groups = norm_num_groups
    eps: float = 1e-5  # resnet_eps = norm_eps (ResNet and group-norm attention GroupNorms)
    time_norm: str = "default"  # resnet_time_scale_shift: "default" or "scale_shift"
    out_scale: float = 1.0  # output_scale_factor of ResNets (and rescale of attention)
    downsample_padding: int = 1
    linear_projection: bool = False  # Transformer2D proj_in / proj_out: Linear, else 1x1 Conv
    upcast: bool = False  # upcast_attention (SD2.1-v)
    chunk_size: int | None = None  # queries per attention chunk (None: all at once)
    only_cross: bool = False  # only_cross_attention of this block: attn1 attends to the context


def traced(name, fn, *args, **kw):
    """Run ``fn`` inside trace scope ``name``; record its output (first of a tuple) as ``name``."""
    with trace.scope(name):
        out = fn(*args, **kw)
    _rec(name, out[0] if isinstance(out, tuple) else out)
    return out


# --------------------------------------------------------------------------- transformer


def geglu(x, p):
    """GEGLU (Shazeer 2020): [a, g] = proj(x) split on the last axis; a * gelu(g) (exact erf)."""
    xp = array_module(x)
    w, b = p["proj"]["weight"], p["proj"].get("bias")
    shape = x.shape[:-1] + w.shape[:1]  # (B, L, 2 * inner)
    # NumPy: the projection (84 MB at 64x64 latents) goes to a reused work array, not a fresh
    # one that the kernel must fault in page by page; a trace must keep it, so gets a new one.
    out = None if xp is not np or trace.active() else parallel.scratch("ff.proj", shape, x.dtype)
    h = _rec("proj", ops.linear(x, w, b, out=out))  # (B, L, 2 * inner)
    a, g = xp.split(h, 2, axis=-1)  # (B, L, inner) each
    return ops.geglu(a, g)  # (B, L, inner)  a * gelu(g)


def feed_forward(x, p):
    """diffusers' FeedForward: net.0 = GEGLU (C -> 4C), net.1 = dropout, net.2 = Linear."""
    h = traced("net.0", geglu, x, p["net"][0])  # (B, L, inner)
    return _rec("net.2", lin(h, p["net"][2]))  # (B, L, C)


def _mha(x, p, *, heads, context, chunk_size, upcast):
    # ops.attention's ``upcast`` computes scores in float32; it exists for float16 only (and
    # ops.attention already accumulates every float16 input in float32), so it must never
    # apply to float32/float64 activations, where it would lose precision.
    upcast = bool(upcast) and x.dtype == np.float16
    if isinstance(context, IPContext):  # IP-Adapter's decoupled cross-attention (ip_adapter.py)
        kw = {"chunk_size": chunk_size, "upcast": upcast}
        return ip_attention(x, p, heads=heads, context=context, **kw)  # (B, L, C)
    return blocks.attention(
        x, p, heads=heads, context=context, chunk_size=chunk_size, upcast=upcast
    )  # (B, L, C)


def basic_transformer_block(
    x, context, p, *, heads, chunk_size=None, upcast=False, only_cross=False
):
    """diffusers' BasicTransformerBlock with layer norms (Vaswani et al. 2017, pre-norm):

    x = x + attn1(norm1(x))                  self-attention over the image tokens
    x = x + attn2(norm2(x), context)         cross-attention on the text embedding
    x = x + ff(norm3(x))                     GEGLU feed-forward
    ``only_cross`` (diffusers' only_cross_attention; the SD x4 upscaler's first levels): attn1
    attends to the text embedding too, so both attentions are cross-attentions (an attached
    IP-Adapter's image tokens still reach attn2 only). x (B, L, C), context (B, Lc, Cc) ->
    (B, L, C).
    """
    kw = {"heads": heads, "chunk_size": chunk_size, "upcast": upcast}
    ctx1 = None
    if only_cross:
        ctx1 = context.text if isinstance(context, IPContext) else context
    h = _rec("norm1", ln(x, p["norm1"]))
    x = x + traced("attn1", _mha, h, p["attn1"], context=ctx1, **kw)
    h = _rec("norm2", ln(x, p["norm2"]))
    x = x + traced("attn2", _mha, h, p["attn2"], context=context, **kw)
    h = _rec("norm3", ln(x, p["norm3"]))
    return x + traced("ff", feed_forward, h, p["ff"])  # (B, L, C)


def transformer_2d(
    x,
    context,
    p,
    *,
    heads,
    groups=32,
    linear_projection=False,
    chunk_size=None,
    upcast=False,
    only_cross=False,
):
    """diffusers' Transformer2DModel on continuous inputs (the LDM SpatialTransformer):

    h = proj_in(GroupNorm(x)) as tokens; h = BasicTransformerBlock(h)...; out = proj_out(h) + x.
    proj_in / proj_out are 1x1 convs (SD1) or Linear layers on tokens (SD2,
    ``use_linear_projection``). ``only_cross``: see basic_transformer_block.
    x (B, C, H, W), context (B, Lc, Cc) -> (B, C, H, W).
    """
    b, c, hgt, wid = x.shape
    h = _rec("norm", gn(x, p["norm"], groups=groups, eps=1e-6))  # GroupNorm eps fixed at 1e-6
    if linear_projection:
        h = h.reshape(b, c, hgt * wid).swapaxes(1, 2)  # (B, HW, C)
        h = _rec("proj_in", lin(h, p["proj_in"]))  # (B, HW, inner)
    else:  # the 1x1 conv as one GEMM on the transposed view, straight into token order
        w = p["proj_in"]["weight"]  # (inner, C, 1, 1)
        h = h.reshape(b, c, hgt * wid).swapaxes(1, 2)  # (B, HW, C), a view
        h = ops.matmul(h, w.reshape(-1, c).T, p["proj_in"].get("bias"))  # (B, HW, inner)
        if trace.active():  # as the module's (B, inner, H, W) output
            _rec("proj_in", h.swapaxes(1, 2).reshape(b, -1, hgt, wid))
    tb = p.get("transformer_blocks", {})  # none at depth 0 (diffusers' "mid" SDXL ControlNets)
    for i in range(len(tb)):
        h = traced(
            f"transformer_blocks.{i}",
            basic_transformer_block,
            h,
            context,
            tb[i],
            heads=heads,
            chunk_size=chunk_size,
            upcast=upcast,
            only_cross=only_cross,
        )  # (B, HW, inner)
    if linear_projection:
        h = _rec("proj_out", lin(h, p["proj_out"]))  # (B, HW, C)
        h = h.swapaxes(1, 2).reshape(b, c, hgt, wid)  # (B, C, H, W)
    else:  # the 1x1 conv on the transposed tokens: NCHW out, no reordering copy
        w, bias = p["proj_out"]["weight"], p["proj_out"].get("bias")  # (C, inner, 1, 1)
        bias = None if bias is None else bias.reshape(c, 1)
        h = ops.matmul(w.reshape(c, -1), h.swapaxes(1, 2), bias)  # (B, C, HW)
        h = _rec("proj_out", h.reshape(b, c, hgt, wid))  # (B, C, H, W)
    return h + x


# --------------------------------------------------------------------------- blocks


def _resnet(x, temb, p, opts):
    return blocks.resnet_block(
        x,
        temb,
        p,
        groups=opts.groups,
        eps=opts.eps,
        time_norm=opts.time_norm,
        output_scale_factor=opts.out_scale,
    )


def _attend(x, p, opts, *, heads, context=None, attn_groups=-1):
    """The attention of a block: Transformer2D when a ``context`` is given (cross-attention
    blocks), else the group-norm self-attention of UNet2DModel's Attn*Block2D."""
    if context is not None:
        return transformer_2d(
            x,
            context,
            p,
            heads=heads,
            groups=opts.groups,
            linear_projection=opts.linear_projection,
            chunk_size=opts.chunk_size,
            upcast=opts.upcast,
            only_cross=opts.only_cross,
        )
    return blocks.attention(
        x,
        p,
        heads=heads,
        groups=opts.groups if attn_groups == -1 else attn_groups,
        eps=opts.eps,
        residual=True,
        rescale=opts.out_scale,
        chunk_size=opts.chunk_size,
    )  # (B, C, H, W)


def _layer(j, x, temb, p, opts, *, heads, context):
    """Layer j of a down / up block: resnets.j, then attentions.j if the block has attention."""
    x = traced(f"resnets.{j}", _resnet, x, temb, p["resnets"][j], opts)  # (N, Cout, H, W)
    if "attentions" in p:
        x = traced(
            f"attentions.{j}", _attend, x, p["attentions"][j], opts, heads=heads, context=context
        )
    return x


def down_block(x, temb, p, opts, *, heads=None, context=None, residual=None):
    """DownBlock2D / CrossAttnDownBlock2D (``context``) / AttnDownBlock2D (``heads`` only).

    For each layer j: x = resnets.j(x, temb), then attentions.j(x) if the block has attention;
    every layer's output is a skip state; then downsamplers.0 (3x3 conv, stride 2), whose output
    is a skip state too. Returns (x, states): x (N, Cout, ceil(H/2), ceil(W/2)).
    ``residual`` (N, Cout, H, W): a T2I-Adapter feature, added to the last layer's output (its
    skip state and the downsampler's input), as CrossAttnDownBlock2D's additional_residuals.
    """
    states = []
    last = len(p["resnets"]) - 1
    for j in range(last + 1):
        x = _layer(j, x, temb, p, opts, heads=heads, context=context)  # (N, Cout, H, W)
        if residual is not None and j == last:
            x = x + residual  # (N, Cout, H, W)
        states.append(x)
    if "downsamplers" in p:
        pad = opts.downsample_padding
        x = traced("downsamplers.0", blocks.downsample, x, p["downsamplers"][0], padding=pad)
        states.append(x)  # (N, Cout, ceil(H/2), ceil(W/2))
    return x, tuple(states)


def up_block(x, skips, temb, p, opts, *, heads=None, context=None, size=None, freeu=None):
    """UpBlock2D / CrossAttnUpBlock2D (``context``) / AttnUpBlock2D (``heads`` only).

    For each layer j the last unused skip state is concatenated on channels,
    x = resnets.j([x, skip]), then attentions.j(x); then upsamplers.0: nearest 2x (or to
    ``size``, diffusers' forward_upsample_size) and a 3x3 conv. skips: this block's states.
    ``freeu``: this stage's FreeU factors (minisd/freeu.py), applied to x and the skip before
    each concatenation; None (the default) leaves them as they are.
    """
    xp = array_module(x)
    skips = list(skips)
    for j in range(len(p["resnets"])):
        skip = skips.pop()  # (N, Cskip, H, W)
        if freeu is not None:
            x, skip = apply_freeu(x, skip, **freeu)
        x = xp.concatenate([x, skip], axis=1)  # (N, C + Cskip, H, W)
        x = _layer(j, x, temb, p, opts, heads=heads, context=context)  # (N, Cout, H, W)
    if "upsamplers" in p:
        x = traced("upsamplers.0", blocks.upsample, x, p["upsamplers"][0], size=size)
    return x  # (N, Cout, 2H, 2W) or (N, Cout, *size)


def mid_block(x, temb, p, opts, *, heads=None, context=None, attn_groups=-1):
    """UNetMidBlock2DCrossAttn (``context``) / UNetMidBlock2D: resnets.0, then for each j
    attentions.j and resnets.j+1. ``attn_groups``: GroupNorm groups of UNetMidBlock2D's
    attention (None: no norm); -1 means ``opts.groups``. Shape preserved."""
    x = traced("resnets.0", _resnet, x, temb, p["resnets"][0], opts)  # (N, C, H, W)
    for j in range(len(p["resnets"]) - 1):
        if "attentions" in p:
            x = traced(
                f"attentions.{j}",
                _attend,
                x,
                p["attentions"][j],
                opts,
                heads=heads,
                context=context,
                attn_groups=attn_groups,
            )
        x = traced(f"resnets.{j + 1}", _resnet, x, temb, p["resnets"][j + 1], opts)
    return x


# --------------------------------------------------------------------------- time embedding


def broadcast_timesteps(timestep, n, xp, *, integer=False):
    """A scalar or (1,) / (N,) array of timesteps -> (N,), as diffusers' ``expand``.

    ``integer``: python scalars become int64 (UNet2DModel's ``torch.tensor([t],
    dtype=torch.long)``, which truncates floats)."""
    if integer and isinstance(timestep, (int, float)):
        timestep = int(timestep)
    t = xp.asarray(timestep)
    if t.ndim == 0:
        t = t[None]  # (1,)
    if t.ndim != 1 or t.shape[0] not in (1, n):
        raise InputError(f"timestep: expected a scalar or {n} values, got shape {t.shape}")
    return xp.broadcast_to(t, (n,))  # (N,)


def time_embedding(t, p, *, dim, flip_sin_to_cos, freq_shift, dtype, cond=None):
    """Timesteps (``time_proj``) then TimestepEmbedding: linear_2(silu(linear_1(emb))).

    ``cond`` (N, time_cond_proj_dim), LCM-distilled UNets only (Luo et al. 2023, sec. 4.2):
    the guidance-scale embedding, added as emb + cond_proj(cond) before linear_1.
    Precision island: ``time_proj`` is float32 whatever the model dtype, as in diffusers
    (``get_timestep_embedding`` works in float32); it is cast to the model dtype afterwards.
    t (N,) -> (N, T).
    """
    emb = _rec(
        "time_proj",
        ops.timestep_embedding(
            t, dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=freq_shift
        ),
    )  # (N, dim) float32
    emb = emb.astype(dtype)
    with trace.scope("time_embedding"):
        if cond is not None:
            emb = emb + _rec("cond_proj", lin(cond, p["cond_proj"]))  # (N, C0)
        e = _rec("linear_1", lin(emb, p["linear_1"]))  # (N, T)
        e = _rec("linear_2", lin(ops.silu(e), p["linear_2"]))  # (N, T)
    return _rec("time_embedding", e)


# --------------------------------------------------------------------------- parameter shapes
# The exact {name: shape} a block's params must have, to check a checkpoint before running it.


def prefixed(prefix, shapes):
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def norm_shapes(c):
    return {"weight": (c,), "bias": (c,)}


def linear_shapes(cout, cin, bias=True):
    return {"weight": (cout, cin), **({"bias": (cout,)} if bias else {})}


def conv_shapes(cout, cin, k):
    return {"weight": (cout, cin, k, k), "bias": (cout,)}


def resnet_shapes(cin, cout, temb, time_norm="default"):
    t = 2 * cout if time_norm == "scale_shift" else cout
    s = {
        **prefixed("norm1", norm_shapes(cin)),
        **prefixed("conv1", conv_shapes(cout, cin, 3)),
        **prefixed("time_emb_proj", linear_shapes(t, temb)),
        **prefixed("norm2", norm_shapes(cout)),
        **prefixed("conv2", conv_shapes(cout, cout, 3)),
    }
    if cin != cout:
        s.update(prefixed("conv_shortcut", conv_shapes(cout, cin, 1)))
    return s


def attention_shapes(c, *, cross=None, bias=True, group_norm=False):
    """Attention with inner dim = c: to_q/to_k/to_v (bias only in the group-norm kind), to_out.0."""
    s = prefixed("group_norm", norm_shapes(c)) if group_norm else {}
    s.update(prefixed("to_q", linear_shapes(c, c, bias)))
    s.update(prefixed("to_k", linear_shapes(c, cross or c, bias)))
    s.update(prefixed("to_v", linear_shapes(c, cross or c, bias)))
    s.update(prefixed("to_out.0", linear_shapes(c, c)))
    return s


def transformer_shapes(c, cross, layers, linear_projection, only_cross=False):
    """A Transformer2D's shapes; ``only_cross``: attn1's keys and values come from the context
    (in features ``cross``), as attn2's."""
    proj = linear_shapes(c, c) if linear_projection else conv_shapes(c, c, 1)
    s = {**prefixed("norm", norm_shapes(c)), **prefixed("proj_in", proj)}
    for i in range(layers):
        b = {f"norm{k}.{n}": (c,) for k in (1, 2, 3) for n in ("weight", "bias")}
        b.update(
            prefixed("attn1", attention_shapes(c, cross=cross if only_cross else None, bias=False))
        )
        b.update(prefixed("attn2", attention_shapes(c, cross=cross, bias=False)))
        b.update(prefixed("ff.net.0.proj", linear_shapes(8 * c, c)))
        b.update(prefixed("ff.net.2", linear_shapes(c, 4 * c)))
        s.update(prefixed(f"transformer_blocks.{i}", b))
    s.update(prefixed("proj_out", proj))
    return s


def block_shapes(resnet_io, temb, attn, *, time_norm="default", down=None, up=None, mid=False):
    """Shapes of a down / up / mid block: ``resnet_io`` lists each ResNet's (cin, cout);
    ``attn(c)`` gives the shapes of one attention layer (None: no attention; a ``mid`` block
    has one fewer attention than ResNets); ``down`` / ``up``: channels of the resampling conv."""
    s = {}
    for j, (cin, cout) in enumerate(resnet_io):
        s.update(prefixed(f"resnets.{j}", resnet_shapes(cin, cout, temb, time_norm)))
        if attn is not None and not (mid and j == len(resnet_io) - 1):
            s.update(prefixed(f"attentions.{j}", attn(cout)))
    if down:
        s.update(prefixed("downsamplers.0.conv", conv_shapes(down, down, 3)))
    if up:
        s.update(prefixed("upsamplers.0.conv", conv_shapes(up, up, 3)))
    return s
