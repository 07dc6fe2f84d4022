"""Building blocks shared by the UNets and the VAE: ResNet block, down/up-sampling, attention.

Each block is a function ``block(x, ..., p, *, hyperparameters)`` where ``p`` is the nested
params dict of the matching diffusers module (``p["conv1"]["weight"]`` is the checkpoint's
``...conv1.weight``). Shapes: activations NCHW; token sequences (B, L, C).
"""

from __future__ import annotations

from . import ops, trace


def conv(x, p, **kw):
    """A Conv2d module's forward: ``p`` holds weight (Cout, Cin, kh, kw) and optional bias."""
    return ops.conv2d(x, p["weight"], p.get("bias"), **kw)


def lin(x, p):
    """A Linear module's forward: ``p`` holds weight (out, in) and optional bias."""
    return ops.linear(x, p["weight"], p.get("bias"))


def gn(x, p, *, groups, eps):
    """A GroupNorm module's forward."""
    return ops.group_norm(x, p["weight"], p["bias"], groups=groups, eps=eps)


# Submodule outputs are recorded for minisd.trace() under their diffusers names ("norm1",
# "to_q", ...), relative to the scope the caller opened; free when no trace is active.
_rec = trace.record


def gn_silu(x, p, name, *, groups, eps):
    """silu(GroupNorm(x)) with the GroupNorm's output recorded as ``name``: one fused pass
    (``ops.group_norm(..., act="silu")``) unless a trace is recording, which needs it."""
    if trace.active():
        return ops.silu(_rec(name, gn(x, p, groups=groups, eps=eps)))
    return ops.group_norm(x, p["weight"], p["bias"], groups=groups, eps=eps, act="silu")


def ln(x, p, *, eps=1e-5):
    """A LayerNorm module's forward."""
    return ops.layer_norm(x, p["weight"], p["bias"], eps=eps)


def resnet_block(
    x,
    temb,
    p,
    *,
    groups=32,
    groups_out=None,
    eps=1e-6,
    time_norm="default",
    output_scale_factor=1.0,
):
    """diffusers' ResnetBlock2D (He et al. 2016, with the DDPM time-embedding injection).

    h = conv1(silu(norm1(x)));  h += time_emb_proj(silu(temb))   ("default")
    h = conv2(silu(norm2(h)))                                   (dropout is identity at inference)
    out = (shortcut(x) + h) / output_scale_factor
    "scale_shift" instead applies norm2(h) * (1 + scale) + shift with (scale, shift) from temb.
    x (N, Cin, H, W), temb (N, T) or None -> (N, Cout, H, W).
    """
    groups_out = groups if groups_out is None else groups_out
    h = gn_silu(x, p["norm1"], "norm1", groups=groups, eps=eps)  # silu(norm1(x))
    h = _rec("conv1", conv(h, p["conv1"], padding=1))  # (N, Cout, H, W)
    t = None
    if temb is not None and "time_emb_proj" in p:
        t = _rec("time_emb_proj", lin(ops.silu(temb), p["time_emb_proj"]))  # (N, Cout or 2Cout)
        t = t[:, :, None, None]  # (N, Cout or 2Cout, 1, 1)
    if time_norm == "scale_shift":
        c = h.shape[1]
        h = _rec("norm2", gn(h, p["norm2"], groups=groups_out, eps=eps))
        h = ops.silu(h * (1 + t[:, :c]) + t[:, c:])
    else:
        if t is not None:
            h = h + t
        h = gn_silu(h, p["norm2"], "norm2", groups=groups_out, eps=eps)  # silu(norm2(h))
    h = _rec("conv2", conv(h, p["conv2"], padding=1))  # (N, Cout, H, W)
    if "conv_shortcut" in p:
        x = _rec("conv_shortcut", conv(x, p["conv_shortcut"]))  # (N, Cout, H, W)
    out = x + h
    if output_scale_factor != 1.0:
        out = out / output_scale_factor
    return out


def downsample(x, p, *, padding=1):
    """diffusers' Downsample2D. With a conv: 3x3 stride 2; ``padding=0`` (the VAE) pads only
    right and bottom by one pixel first, as the original LDM code does. Without params: 2x2
    average pooling. (N, C, H, W) -> (N, C', ceil(H/2), ceil(W/2)) for even sizes H/2."""
    if p is None or "conv" not in p:
        n, c, h, w = x.shape
        return (
            x[:, :, : h // 2 * 2, : w // 2 * 2]
            .reshape(n, c, h // 2, 2, w // 2, 2)
            .mean(axis=(3, 5))
        )  # (N, C, H/2, W/2)
    pad = (0, 1, 0, 1) if padding == 0 else padding
    return _rec("conv", conv(x, p["conv"], stride=2, padding=pad))  # (N, C', Ho, Wo)


def upsample_nearest(x, size=None):
    """Nearest-neighbour upsampling as torch's ``interpolate(mode="nearest")`` (same float32
    index arithmetic). Exactly 2x when ``size`` is None."""
    if size is None:
        return ops.upsample_nearest2x(x)
    return ops.resize_nearest(x, size)  # (N, C, *size)


def upsample(x, p, *, size=None):
    """diffusers' Upsample2D: nearest 2x (or to ``size``), then a 3x3 conv if present."""
    x = upsample_nearest(x, size)  # (N, C, 2H, 2W)
    if p is not None and "conv" in p:
        x = _rec("conv", conv(x, p["conv"], padding=1))
    return x


def attention(
    x,
    p,
    *,
    heads,
    context=None,
    groups=None,
    eps=1e-5,
    residual=False,
    rescale=1.0,
    chunk_size=None,
    upcast=False,
    mask=None,
):
    """diffusers' ``Attention`` module (to_q, to_k, to_v, to_out.0), multi-head.

    x: tokens (B, L, C) or an image (B, C, H, W), which is flattened to (B, HW, C) and restored.
    context: (B, Lk, Cc) for cross-attention, else self-attention. ``groups``: a GroupNorm
    (``p["group_norm"]``) applied first, as in the VAE and UNet2DModel attention blocks.
    ``residual``: add the input back; the result is divided by ``rescale``.
    """
    image = x.ndim == 4
    if image:
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w).swapaxes(1, 2)  # (B, HW, C)
    inp = x
    if groups is not None:
        x = _rec("group_norm", gn(x.swapaxes(1, 2), p["group_norm"], groups=groups, eps=eps))
        x = x.swapaxes(1, 2)  # (B, HW, C)
    ctx = x if context is None else context
    q = _rec("to_q", lin(x, p["to_q"]))  # (B, L, inner)
    k = _rec("to_k", lin(ctx, p["to_k"]))  # (B, Lk, inner)
    v = _rec("to_v", lin(ctx, p["to_v"]))  # (B, Lk, inner)
    bsz, lq, inner = q.shape
    d = inner // heads
    q = q.reshape(bsz, lq, heads, d).swapaxes(1, 2)  # (B, heads, L, d)
    k = k.reshape(bsz, -1, heads, d).swapaxes(1, 2)  # (B, heads, Lk, d)
    v = v.reshape(bsz, -1, heads, d).swapaxes(1, 2)  # (B, heads, Lk, d)
    o = ops.attention(q, k, v, chunk_size=chunk_size, upcast=upcast, mask=mask)
    o = o.swapaxes(1, 2).reshape(bsz, lq, inner)  # (B, L, inner)
    out = _rec("to_out.0", lin(o, p["to_out"][0]))  # (B, L, C)
    if image:
        out = out.swapaxes(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        inp = inp.swapaxes(1, 2).reshape(b, c, h, w)
    if residual:
        out = out + inp
    if rescale != 1.0:
        out = out / rescale
    return out
