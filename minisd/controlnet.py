"""ControlNetModel (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models", arXiv:2302.05543), as diffusers' ``models/controlnets/controlnet.py``
computes it.

A ControlNet is a trainable copy of the UNet's encoder half (conv_in, time embedding, down
blocks, mid block) that also sees a control image (edges, depth, pose, ...). Each skip state of
that copy, and its mid-block output, leaves through a 1x1 "zero convolution" (zero at the start
of training) as a residual for the frozen UNet's matching skip state / mid-block output:

    e    = controlnet_cond_embedding(image)       (N, Cc, F*H, F*W) -> (N, C0, H, W), F = 8
    h    = conv_in(x) + e                         (N, C0, H, W)
    h, s = down_blocks(h, temb, ctx)              s: the UNet's skip states (conv_in's first)
    h    = mid_block(h, temb, ctx)                (N, C3, H/8, W/8)
    down_k = controlnet_down_blocks.k(s_k) * g_k  mid = controlnet_mid_block(h) * g_mid

with temb = time_embedding(time_proj(t)) as in the UNet (plus, for SDXL ControlNets with
addition_embed_type "text_time", the UNet's micro-conditioning embedding of the pooled text
embedding and the size / crop numbers, minisd/micro_cond.py: diffusers' ControlNetModel adds it
to temb exactly as UNet2DConditionModel does, and the pipeline hands both models the same
``added_cond_kwargs`` rows). Scales: g = conditioning_scale; in guess mode
g_k = conditioning_scale * 10^(-1 + k/n) for the n down residuals and the mid one (0.1 for
conv_in's state up to 1 for the mid block). ``global_pool_conditions`` (shuffle ControlNets):
no guess-mode ramp, and every residual is averaged over H, W to (N, C, 1, 1).

The conditioning embedding (diffusers' ControlNetConditioningEmbedding; the paper's "tiny
network E") with channels E = conditioning_embedding_out_channels (16, 32, 96, 256):
conv_in (Cc -> E0), then per step i a 3x3 conv (Ei -> Ei) and a 3x3 stride-2 conv (Ei -> Ei+1),
each followed by silu, then conv_out (E_last -> C0, zero-initialized in training); F =
2^(len(E) - 1).

Traced names (``minisd.trace()``): the UNet's for ``time_proj``, ``time_embedding...``,
``conv_in``, ``down_blocks.i...``, ``mid_block...``, plus ``controlnet_cond_embedding(.conv_in/
.blocks.i/.conv_out)``, ``controlnet_down_blocks.k`` and ``controlnet_mid_block`` (conv outputs
before the scaling); for SDXL ControlNets also ``add_time_proj``, ``add_embedding(.linear_1/
.linear_2)``.

Precision islands (as diffusers): ``time_proj`` and SDXL's ``add_time_proj`` are float32 in
every model dtype (see unet_blocks.time_embedding); the guess-mode scales are float32
(``torch.logspace`` in the default dtype, times the scale in float32), so a float64 model
multiplies by float32 values.

Beyond diffusers: ``time_cond_proj_dim`` (a config key diffusers' ControlNetModel does not
have) adds ``time_embedding.cond_proj`` as in LCM UNets, so a ``timestep_cond`` can be fed;
diffusers' ControlNet pipelines never pass one to the ControlNet.
"""

from __future__ import annotations

import numpy as np

from . import ops, trace
from .backend import array_module, resolve_device_dtype, to_device
from .blocks import conv
from .config import is_number, path_arg
from .controlnet_config import ControlNetConfig, param_shapes
from .errors import InputError, WeightsError
from .unet_base import ConditionedModel
from .unet_blocks import (
    traced,
)
from .unet_config import load_pretrained, sample_input
from .weights import read_config, refuse_pickle

__all__ = ["ControlNetConfig", "ControlNetModel", "param_shapes"]

_rec = trace.record


def cond_embedding(img, p):
    """ControlNetConditioningEmbedding: conv_in, silu, then pairs of 3x3 convs (stride 1 at
    E_i, stride 2 from E_i to E_i+1), each followed by silu, then conv_out.
    img (N, Cc, F*H, F*W) -> (N, C0, H, W)."""
    h = ops.silu(_rec("conv_in", conv(img, p["conv_in"], padding=1)))  # (N, E0, FH, FW)
    for i in range(len(p["blocks"])):
        stride = 1 + i % 2  # odd blocks halve the size (ceil(H / 2))
        h = conv(h, p["blocks"][i], stride=stride, padding=1)  # (N, E, H', W')
        h = ops.silu(_rec(f"blocks.{i}", h))
    return _rec("conv_out", conv(h, p["conv_out"], padding=1))  # (N, C0, H, W)


def guess_mode_scales(n, conditioning_scale):
    """diffusers' ``torch.logspace(-1, 0, n + 1) * conditioning_scale``: n + 1 float32 values
    from 0.1 * scale (conv_in's residual) to 1 * scale (the mid block's). Float32 whatever the
    model dtype (torch's default dtype); np.logspace rounded to float32 equals torch's."""
    g = np.logspace(-1, 0, n + 1).astype(np.float32) * np.float32(conditioning_scale)
    return [float(v) for v in g]  # exact float32 values as Python floats


def scale_residuals(downs, mid, conditioning_scale, *, guess_mode, global_pool):
    """Step 6 of diffusers' forward: the conditioning scale (a guess-mode ramp unless
    ``global_pool``), then for ``global_pool`` the mean over H, W: (N, C, H, W) -> (N, C, 1, 1).
    Python-float scales keep the activation dtype (float32 rounds the scale, as torch does)."""
    if guess_mode and not global_pool:
        g = guess_mode_scales(len(downs), conditioning_scale)
    else:
        g = [float(conditioning_scale)] * (len(downs) + 1)
    downs = [d * g[k] for k, d in enumerate(downs)]
    mid = mid * g[-1]
    if global_pool:
        downs = [d.mean(axis=(2, 3), keepdims=True) for d in downs]  # (N, C, 1, 1)
        mid = mid.mean(axis=(2, 3), keepdims=True)  # (N, C, 1, 1)
    return downs, mid


def _union_class(config, cls):
    """ControlNetUnionModel for a union ControlNet's config (its ``_class_name``, or the union
    fields, which diffusers' ControlNetUnionModel configs always have), else ``cls``."""
    union = config.get("_class_name") == "ControlNetUnionModel" or "num_control_type" in config
    if not union or getattr(cls, "UNION", False):
        return cls
    from .controlnet_union import ControlNetUnionModel

    return ControlNetUnionModel


class ControlNetModel(ConditionedModel):
    """A ControlNet. ``cn(sample, t, ctx, controlnet_cond)`` -> (down residuals, mid residual)
    for ``UNet2DConditionModel(..., down_block_additional_residuals, mid_block_...)``.

    Build it with :meth:`from_pretrained` (a diffusers ControlNet folder, or an original
    single-file ControlNet) or from a config dict and flat (``"controlnet_down_blocks.0.weight"``)
    or nested params.
    """

    #: Queries per attention chunk, as UNet2DConditionModel.attention_chunk_size.
    attention_chunk_size: int | None = 1024
    CONFIG = ControlNetConfig
    param_shapes = staticmethod(param_shapes)

    @classmethod
    def from_pretrained(
        cls, path, dtype=None, device="cpu", *, weights="eager", config=None,
        global_pool_conditions=None,
    ):  # fmt: skip
        """A diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors) or
        a single ``.safetensors`` file: an original-layout ControlNet (lllyasviel's ControlNet
        1.0 / 1.1, e.g. control_v11p_sd15_canny.safetensors; converted in memory by
        weights_tools.controlnet) or bare diffusers-layout weights (as SDXL ControlNets are
        shared), the architecture inferred from the shapes. A union ControlNet (folder or
        file) loads as ControlNetUnionModel. For single files only: ``config``
        (dict, folder or config.json) sets what the weights cannot show (head counts, norm
        groups), ``global_pool_conditions=True`` marks a shuffle ControlNet.
        ``weights``: "eager" | "lazy" | "stream", as for folders (minisd/weights.py)."""
        path = path_arg(path, "path")
        refuse_pickle(path)
        if path.is_file() and path.suffix == ".safetensors":
            return cls._from_single_file(
                path, dtype, device, weights, config, global_pool_conditions
            )
        if config is not None or global_pool_conditions is not None:
            raise InputError(
                f"{path}: config= and global_pool_conditions= apply to single-file ControlNets; "
                "a folder brings its own config.json"
            )
        if path.is_file():
            raise WeightsError(f"{path}: expected a ControlNet folder or a .safetensors file")
        target = _union_class(read_config(path / "config.json"), cls)
        return load_pretrained(
            target, target.CONFIG, path, dtype=dtype, device=device, weights=weights
        )

    @classmethod
    def _from_single_file(cls, path, dtype, device, weights, config, global_pool):
        from weights_tools.controlnet import load_single_file_controlnet

        dtype = resolve_device_dtype(dtype, device)
        cfg, flat = load_single_file_controlnet(path, config, global_pool_conditions=global_pool)
        cls = _union_class(cfg, cls)
        return cls(cfg, flat, dtype=dtype, device=device, source=str(path), weights=weights)

    def _inputs(self, sample, context, image):
        """The three image / text inputs on the model's device and dtype, shapes checked; a
        control image of batch 1 is shared by the whole batch (broadcast, as in diffusers)."""
        cfg = self.config
        x = sample_input(sample, self)  # (N, Cin, H, W)
        n, _, h, w = x.shape
        ctx = to_device(context, self.device, self.dtype)
        if ctx.ndim != 3 or ctx.shape[0] != n or ctx.shape[2] != cfg.cross_attention_dim:
            raise InputError(
                f"encoder_hidden_states: expected shape ({n}, L, {cfg.cross_attention_dim}), "
                f"got {tuple(ctx.shape)}"
            )
        img = to_device(image, self.device, self.dtype)
        f, cc = cfg.cond_factor, cfg.conditioning_channels
        if img.ndim != 4 or img.shape[0] not in (1, n) or img.shape[1:] != (cc, f * h, f * w):
            raise InputError(
                f"controlnet_cond: expected shape ({n}, {cc}, {f * h}, {f * w}) ({f}x the "
                f"latent size {h}x{w}, conditioning_channels={cc}), got {tuple(img.shape)}"
            )
        if cfg.controlnet_conditioning_channel_order == "bgr":
            img = array_module(img).ascontiguousarray(img[:, ::-1])  # BGR-trained ControlNets
        return x, ctx, img

    def _encode(self, h, temb, ctx, opts):
        """Down blocks, mid block and zero convolutions of h (N, C0, H, W) -> (the unscaled
        down residuals, downs[k] of skip state k's shape (N, C_k, H_k, W_k); the mid one)."""
        p = self.params
        h, states = self._down(h, temb, ctx, opts)
        h = self._mid(h, temb, ctx, opts)
        # (N, C_last, H / 2^(blocks - 1), W / 2^(blocks - 1)), sizes rounded up
        zc = p["controlnet_down_blocks"]
        downs = [_rec(f"controlnet_down_blocks.{k}", conv(s, zc[k])) for k, s in enumerate(states)]
        return downs, _rec("controlnet_mid_block", conv(h, p["controlnet_mid_block"]))

    def __call__(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        controlnet_cond,
        conditioning_scale=1.0,
        guess_mode=False,
        timestep_cond=None,
        added_cond_kwargs=None,
    ):
        """sample (N, in_channels, H, W); timestep: a scalar or N values; encoder_hidden_states
        (N, L, cross_attention_dim); controlnet_cond (N or 1, conditioning_channels, 8H, 8W)
        (``config.cond_factor`` = 8 for every SD ControlNet), the control image in [0, 1]
        (RGB; flipped here for "bgr" ControlNets). ``guess_mode``: diffusers' log-space ramp of
        the scales (ignored when the config sets global_pool_conditions). ``timestep_cond``:
        only for configs with time_cond_proj_dim (minisd's extension, module docstring).
        ``added_cond_kwargs``: for SDXL ControlNets (addition_embed_type "text_time") exactly
        the UNet's, {"text_embeds": (N, P) pooled text embedding, "time_ids": (N, k) size / crop
        numbers}; None otherwise. -> (list of the down residuals, one per UNet skip state, mid
        residual)."""
        if not is_number(conditioning_scale):
            raise InputError(f"conditioning_scale={conditioning_scale!r}: expected a number")
        cfg, p, opts = self.config, self.params, self._opts()
        x, ctx, img = self._inputs(sample, encoder_hidden_states, controlnet_cond)
        temb = self._temb(timestep, x, timestep_cond, added_cond_kwargs)  # (N, T)
        h = _rec("conv_in", conv(x, p["conv_in"], padding=1))  # (N, C0, H, W)
        emb = traced(
            "controlnet_cond_embedding", cond_embedding, img, p["controlnet_cond_embedding"]
        )  # (N or 1, C0, H, W)
        h = h + emb  # (N, C0, H, W)
        downs, mid = self._encode(h, temb, ctx, opts)
        return scale_residuals(
            downs,
            mid,
            conditioning_scale,
            guess_mode=bool(guess_mode),
            global_pool=bool(cfg.global_pool_conditions),
        )
