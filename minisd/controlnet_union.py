"""ControlNetUnionModel: one ControlNet for several kinds of control image ("ControlNet++",
xinsir's controlnet-union-sdxl-1.0 and its ProMax version), as diffusers'
``models/controlnets/controlnet_union.py`` computes it.

It is a ControlNet (minisd/controlnet.py) whose conditioning embedding sees one or several
control images at once, each tagged with its control type (0 openpose, 1 depth, 2 hed / scribble,
3 canny / lineart, 4 normal, 5 segmentation, ... as the checkpoint's card numbers them). For the
K control types T and the n given images c_j of types m_j:

    temb  = time_embedding(t) + control_add_embedding(time_proj(onehot(m)))  (+ SDXL's aug_emb)
    x0    = conv_in(x)                                        (N, C0, H, W)
    e_j   = controlnet_cond_embedding(c_j) * s_j              (N, C0, H, W)
    tok_j = (mean_hw(e_j) + task_embedding[m_j]) * s_j        (N, C0), tok_n = mean_hw(x0)
    tok   = transformer_layes(tok_0..tok_n)                   (N, n + 1, C0)
    h     = x0 + sum_j (e_j + spatial_ch_projs(tok_j) * s_j)  (the "fuser")

then the down blocks, mid block and zero convolutions of a ControlNet. time_proj(onehot) is the
sinusoidal embedding of each of the K zeros and ones (addition_time_embed_dim wide), flattened to
(N, K * d). The scales s_j = conditioning_scale[j] act inside only when several images go
through one model; with one image (or ``from_multi``, one model among several) s_j = 1 inside and
the residuals are scaled at the end, as a ControlNet's. With several images the residuals are
not scaled at all (in guess mode: the bare 0.1 -> 1 log ramp), as in diffusers.

The transformer layers are CLIP-style residual attention blocks (ln_1, multi-head attention,
ln_2, a quick-GELU MLP) built on ``nn.MultiheadAttention`` without ``batch_first``: torch reads
the (N, n + 1, C0) tokens as (sequence, batch, channels), so each token slot attends over the N
samples of the batch (with CFG: the negative and positive rows of the same slot), not over the
n + 1 tokens of one sample. The checkpoints were trained so; minisd computes the same.

Traced names: the ControlNet's, plus ``control_type_proj``, ``control_add_embedding(.linear_1/
.linear_2)``, ``transformer_layes.i(.ln_1/.attn/.ln_2/.mlp(.c_fc/.gelu/.c_proj))`` and
``spatial_ch_projs``; ``controlnet_cond_embedding`` and ``spatial_ch_projs`` hold the last
image's (diffusers runs those modules once per image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ops, trace
from .backend import array_module, to_device
from .blocks import conv, lin, ln
from .config import is_number
from .controlnet import ControlNetModel, cond_embedding, scale_residuals
from .controlnet_config import ControlNetConfig, param_shapes
from .errors import ConfigError, InputError
from .unet_blocks import linear_shapes, norm_shapes, prefixed, traced

__all__ = ["ControlNetUnionConfig", "ControlNetUnionModel", "union_param_shapes"]

_rec = trace.record


@dataclass(frozen=True)
class ControlNetUnionConfig(ControlNetConfig):
    """ControlNetConfig plus the union fields of diffusers' ControlNetUnionModel: K =
    ``num_control_type`` control types (6; ProMax: 8), ``num_trans_layer`` attention blocks of
    width ``num_trans_channel`` with ``num_trans_head`` heads, and ``num_proj_channel`` (the
    last two must be block_out_channels[0]: the tokens are added to conv_in's channels)."""

    conditioning_embedding_out_channels: tuple = (48, 96, 192, 384)  # the union default
    num_control_type: int = 6
    num_trans_channel: int = 320
    num_trans_head: int = 8
    num_trans_layer: int = 1
    num_proj_channel: int = 320

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_control_type", "num_trans_channel", "num_trans_head", "num_proj_channel"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v > 0):
                raise ConfigError(f"{self.source}: {name}={v!r}: expected a positive int")
        if not (isinstance(self.num_trans_layer, int) and self.num_trans_layer >= 0):
            raise ConfigError(f"{self.source}: num_trans_layer={self.num_trans_layer!r}")
        c0 = self.block_out_channels[0]
        if self.num_trans_channel != c0 or self.num_proj_channel != c0:
            raise ConfigError(
                f"{self.source}: num_trans_channel={self.num_trans_channel} and num_proj_channel="
                f"{self.num_proj_channel} must equal block_out_channels[0]={c0}"
            )
        if self.num_trans_channel % self.num_trans_head:
            raise ConfigError(
                f"{self.source}: num_trans_head={self.num_trans_head} does not divide "
                f"num_trans_channel={self.num_trans_channel}"
            )
        if not self.addition_time_embed_dim:
            raise ConfigError(
                f"{self.source}: a union ControlNet embeds its control types with "
                "addition_time_embed_dim sinusoids; the config has none"
            )


def union_param_shapes(cfg: ControlNetUnionConfig) -> dict:
    """{checkpoint key: shape}: the ControlNet's, plus the union parameters."""
    s = param_shapes(cfg)
    c, k, temb = cfg.num_trans_channel, cfg.num_control_type, cfg.time_embed_dim
    s["task_embedding"] = (k, c)
    for i in range(cfg.num_trans_layer):
        layer = {"attn.in_proj_weight": (3 * c, c), "attn.in_proj_bias": (3 * c,)}
        layer.update(prefixed("attn.out_proj", linear_shapes(c, c)))
        layer.update(prefixed("ln_1", norm_shapes(c)))
        layer.update(prefixed("ln_2", norm_shapes(c)))
        layer.update(prefixed("mlp.c_fc", linear_shapes(4 * c, c)))
        layer.update(prefixed("mlp.c_proj", linear_shapes(c, 4 * c)))
        s.update(prefixed(f"transformer_layes.{i}", layer))
    s.update(prefixed("spatial_ch_projs", linear_shapes(cfg.num_proj_channel, c)))
    d = cfg.addition_time_embed_dim
    s.update(prefixed("control_add_embedding.linear_1", linear_shapes(temb, d * k)))
    s.update(prefixed("control_add_embedding.linear_2", linear_shapes(temb, temb)))
    return s


def control_type_embedding(control_type, p, cfg, dtype):
    """control_add_embedding(time_proj(control_type)): each of the K entries (0 or 1) embedded
    as a timestep (float32 sinusoids, as every diffusers time_proj), flattened, then the
    TimestepEmbedding MLP. control_type (N, K) -> (N, T)."""
    n, k = control_type.shape
    proj = ops.timestep_embedding(
        control_type.reshape(-1),  # (N*K,)
        cfg.addition_time_embed_dim,
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        downscale_freq_shift=cfg.freq_shift,
    )  # (N*K, d) float32
    proj = _rec("control_type_proj", proj).reshape(n, -1).astype(dtype)  # (N, K*d)
    with trace.scope("control_add_embedding"):
        e = _rec("linear_1", lin(proj, p["linear_1"]))  # (N, T)
        e = _rec("linear_2", lin(ops.silu(e), p["linear_2"]))  # (N, T)
    return _rec("control_add_embedding", e)


def attention_over_batch(x, p, heads):
    """torch's nn.MultiheadAttention(C, heads) on x (N, S, C) read as (L=N, batch=S, C):
    softmax(q k^T / sqrt(C / heads)) v over the N rows of each slot s. -> (N, S, C)."""
    n, s, c = x.shape
    d = c // heads
    qkv = ops.linear(x, p["in_proj_weight"], p["in_proj_bias"])  # (N, S, 3C)
    qkv = qkv.reshape(n, s, 3, heads, d).transpose(2, 1, 3, 0, 4)  # (3, S, heads, N, d)
    out = ops.attention(qkv[0], qkv[1], qkv[2], scale=d**-0.5)  # (S, heads, N, d)
    out = out.transpose(2, 0, 1, 3).reshape(n, s, c)  # (N, S, C)
    return lin(out, p["out_proj"])


def residual_attention_block(x, p, heads):
    """x + attn(ln_1(x)), then + c_proj(quick_gelu(c_fc(ln_2(x)))). x (N, S, C) -> same."""
    a = _rec("attn", attention_over_batch(_rec("ln_1", ln(x, p["ln_1"])), p["attn"], heads))
    x = x + a
    h = _rec("ln_2", ln(x, p["ln_2"]))  # (N, S, C)
    with trace.scope("mlp"):
        h = _rec("c_fc", lin(h, p["mlp"]["c_fc"]))  # (N, S, 4C)
        h = _rec("c_proj", lin(_rec("gelu", ops.quick_gelu(h)), p["mlp"]["c_proj"]))
    return x + _rec("mlp", h)  # (N, S, C)


def fuse_conditions(x0, embeds, modes, scales, p, cfg):
    """The fuser of the module docstring: sum_j (e_j + spatial_ch_projs(tok_j)), with the
    scales s_j where they act inside (``scales`` None where not). x0 (N, C0, H, W), embeds:
    n arrays (N or 1, C0, H, W) -> (N, C0, H, W)."""
    xp = array_module(x0)
    n = x0.shape[0]
    toks = []
    for e, m, s in zip(embeds, modes, scales):
        tok = e.mean(axis=(2, 3)) + p["task_embedding"][m]  # (N or 1, C0)
        toks.append(xp.broadcast_to(tok if s is None else tok * s, (n, tok.shape[1])))
    toks.append(x0.mean(axis=(2, 3)))  # conv_in's own token, (N, C0)
    tok = xp.stack(toks, axis=1)  # (N, n + 1, C0)
    for i in range(cfg.num_trans_layer):
        with trace.scope(f"transformer_layes.{i}"):
            out = residual_attention_block(tok, p["transformer_layes"][i], cfg.num_trans_head)
        tok = _rec(f"transformer_layes.{i}", out)  # (N, n + 1, C0)
    fuser = x0 * 0.0
    for e, s, j in zip(embeds, scales, range(len(embeds))):
        alpha = _rec("spatial_ch_projs", lin(tok[:, j], p["spatial_ch_projs"]))  # (N, C0)
        alpha = alpha[:, :, None, None]  # (N, C0, 1, 1)
        fuser += e + alpha if s is None else e * s + alpha * s
    return fuser  # (N, C0, H, W)


class ControlNetUnionModel(ControlNetModel):
    """A union ControlNet. ``cn(sample, t, ctx, [image, ...], control_type, [mode, ...])`` ->
    (down residuals, mid residual), as a ControlNetModel's. ``from_pretrained``: a diffusers
    folder (config.json with the union fields) or a single diffusers-layout .safetensors file;
    ``ControlNetModel.from_pretrained`` returns this class for those too."""

    CONFIG = ControlNetUnionConfig
    UNION = True  # ControlNetModel.from_pretrained loads union configs as this class
    param_shapes = staticmethod(union_param_shapes)

    def _control_type(self, control_type, n, dtype):
        """The flags (N or 1, K) or (K,) on the device, checked -> (N, K)."""
        k = self.config.num_control_type
        ct = to_device(control_type, self.device, dtype)
        if ct.ndim == 1:
            ct = ct[None]
        if ct.ndim != 2 or ct.shape[0] not in (1, n) or ct.shape[1] != k:
            raise InputError(
                f"control_type: expected shape ({n}, {k}) (a 0/1 flag per control type), got "
                f"{tuple(ct.shape)}"
            )
        return array_module(ct).broadcast_to(ct, (n, k))

    def _arguments(self, controlnet_cond, control_type_idx, conditioning_scale):
        """The n control types and n scales, checked against the n control images."""
        if not isinstance(controlnet_cond, (list, tuple)) or not controlnet_cond:
            raise InputError("controlnet_cond: expected a list of control images, one per mode")
        n, k = len(controlnet_cond), self.config.num_control_type
        scales = conditioning_scale
        scales = [scales] * n if is_number(scales) else list(scales)
        modes = [int(m) if isinstance(m, np.integer) else m for m in control_type_idx]
        if len(modes) != n or len(scales) != n:
            raise InputError(
                f"control_type_idx / conditioning_scale: {len(modes)} / {len(scales)} values "
                f"for {n} control images"
            )
        if not all(is_number(s) for s in scales):
            raise InputError(f"conditioning_scale={conditioning_scale!r}: expected numbers")
        for m in modes:
            if not (isinstance(m, int) and 0 <= m < k):
                raise InputError(f"control_type_idx: {m!r} is no control type (0 to {k - 1})")
        return modes, scales

    def __call__(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        controlnet_cond,
        control_type,
        control_type_idx,
        conditioning_scale=1.0,
        guess_mode=False,
        timestep_cond=None,
        added_cond_kwargs=None,
        from_multi=False,
    ):
        """sample (N, in_channels, H, W); controlnet_cond: a list of n control images (N or 1,
        conditioning_channels, 8H, 8W) in [0, 1]; control_type (N or 1, K): 1.0 at every
        control type in use, else 0.0; control_type_idx: the n types of the images;
        conditioning_scale: a number or n numbers; ``from_multi``: this model is one of
        several (each with one image; the pipeline sums their residuals). The rest as
        ControlNetModel's. -> (down residuals, mid residual)."""
        modes, scales = self._arguments(controlnet_cond, control_type_idx, conditioning_scale)
        inside = not from_multi and len(modes) > 1  # the scales act on each condition
        cfg, p, opts = self.config, self.params, self._opts()
        embeds = []
        for img in controlnet_cond:
            x, ctx, img = self._inputs(sample, encoder_hidden_states, img)
            emb = traced("controlnet_cond_embedding", cond_embedding, img, p[
                "controlnet_cond_embedding"])  # fmt: skip
            embeds.append(emb)  # (N or 1, C0, H, W)
        ct = self._control_type(control_type, x.shape[0], x.dtype)
        extra = control_type_embedding(ct, p["control_add_embedding"], cfg, x.dtype)
        temb = self._temb(timestep, x, timestep_cond, added_cond_kwargs, extra=extra)
        x0 = _rec("conv_in", conv(x, p["conv_in"], padding=1))  # (N, C0, H, W)
        inner = scales if inside else [None] * len(modes)
        h = x0 + fuse_conditions(x0, embeds, modes, inner, p, cfg)  # (N, C0, H, W)
        downs, mid = self._encode(h, temb, ctx, opts)
        return scale_residuals(
            downs,
            mid,
            1.0 if inside else float(scales[0]),
            guess_mode=bool(guess_mode),
            global_pool=bool(cfg.global_pool_conditions),
        )
