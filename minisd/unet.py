"""UNet2DConditionModel: Stable Diffusion's text-conditioned denoiser (Rombach et al. 2022), as
diffusers' ``unets/unet_2d_condition.py`` computes it.

    eps = conv_out(silu(conv_norm_out(up(mid(down(conv_in(x), temb, ctx))))))

with temb = time_embedding(time_proj(t)) and ctx the text encoder's hidden states. The down
path keeps every layer's output as a skip state; the up path concatenates them back in reverse.

Traced names (``minisd.trace()``) are the diffusers module paths whose forward hooks fire:
``time_proj``, ``time_embedding(.cond_proj/.linear_1/.linear_2)`` (cond_proj: LCM UNets),
``class_embedding`` (UNets with num_class_embeds: the x4 upscaler),
``conv_in``, ``down_blocks.i`` (its hidden-state output), ``...resnets.j(.norm1/.conv1/
.time_emb_proj/.norm2/.conv2/.conv_shortcut)``, ``...attentions.j(.norm/.proj_in/
.transformer_blocks.k(.norm1/.attn1(.to_q/.to_k/.to_v/.to_out.0)/.norm2/.attn2/.norm3/
.ff(.net.0(.proj)/.net.2))/.proj_out)``,
``...downsamplers.0(.conv)``, ``mid_block``, ``up_blocks.i`` (``.upsamplers.0(.conv)``),
``conv_norm_out``, ``conv_out``. Not recorded: dropouts (identity at inference) and the
parameter-free activation modules (``conv_act``, ``time_embedding.act``, the ResNets'
``nonlinearity``, which diffusers calls several times per block).
"""

from __future__ import annotations

from . import trace
from .backend import device_of, to_device
from .blocks import conv, gn_silu
from .errors import InputError
from .freeu import FreeU
from .ip_adapter import Attached, ip_context
from .unet_base import ConditionedModel, mid_intrablock, with_only_cross
from .unet_blocks import (
    traced,
    up_block,
)

# The config, its shape table and the loading helpers live in unet_config (shared with
# unet2d); they stay importable from here.
from .unet_config import (  # noqa: F401
    _DOWN,
    _IGNORED,
    _MID,
    _MUST_BE_DEFAULT,
    UNetConfig,
    _is_default,
    load_pretrained,
    param_shapes,
    parse_config,
    per_block,
    prepare_params,
    sample_input,
)

_rec = trace.record


class UNet2DConditionModel(ConditionedModel):
    """Stable Diffusion's UNet. ``unet(sample, timestep, encoder_hidden_states)`` -> eps.

    Build it with :meth:`from_pretrained` (a diffusers ``unet/`` folder) or from a config dict
    and flat (``"down_blocks.0.resnets.0.conv1.weight"``) or nested params.
    """

    #: Self-attention queries processed at a time: 64x64 latents (4096 tokens), 8 heads and a
    #: CFG batch of 2 make (2, 8, 1024, 4096) score chunks (256 MiB float32) instead of 1 GiB.
    attention_chunk_size: int | None = 1024
    CONFIG = UNetConfig
    param_shapes = staticmethod(param_shapes)
    #: FreeU's factors (minisd/freeu.py) while :meth:`enable_freeu` is on; None: off.
    freeu: FreeU | None = None
    #: The attached IP-Adapter (minisd/ip_adapter.py: ``attach`` / ``detach``); None: none.
    ip_adapter: Attached | None = None

    def enable_freeu(self, s1, s2, b1, b2):
        """FreeU (Si et al. 2023) on ``up_blocks.0`` (s1, b1) and ``up_blocks.1`` (s2, b2), as
        diffusers' ``enable_freeu``: b scales the first half of the backbone's channels, s the
        skip features' lowest frequencies. SD1.5: (0.9, 0.2, 1.5, 1.6); SD2.1: (0.9, 0.2, 1.4,
        1.6). Factors: finite, non-zero numbers (InputError naming the first bad one)."""
        self.freeu = FreeU.checked(s1, s2, b1, b2)

    def disable_freeu(self):
        """Turn FreeU off: the UNet computes exactly what it computed before enable_freeu."""
        self.freeu = None

    def _inputs(self, sample, context):
        x = sample_input(sample, self)
        ctx = to_device(context, self.device, self.dtype)
        dim = self.config.cross_attention_dim[0]
        if ctx.ndim != 3 or ctx.shape[0] != x.shape[0] or ctx.shape[2] != dim:
            raise InputError(
                f"encoder_hidden_states: expected shape ({x.shape[0]}, L, {dim}), "
                f"got {tuple(ctx.shape)}"
            )
        return x, ctx

    def __call__(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        down_block_additional_residuals=None,
        mid_block_additional_residual=None,
        timestep_cond=None,
        down_intrablock_additional_residuals=None,
        image_embeds=None,
        added_cond_kwargs=None,
        class_labels=None,
    ):
        """sample (N, in_channels, H, W); timestep: a scalar or N values; encoder_hidden_states
        (N, L, cross_attention_dim). ControlNet residuals (both or neither): one per skip state
        (added to them) and one added to the mid block's output. timestep_cond (N,
        time_cond_proj_dim): LCM's guidance-scale embedding (pipeline_steps.
        guidance_scale_embedding); only UNets with a time_cond_proj_dim take one; when None they
        run unconditioned, as diffusers. down_intrablock_additional_residuals: T2I-Adapter
        features (minisd/t2i_adapter.py), one per down block from the first, added inside the
        down path (ConditionedModel._down), and one more added to the mid block's output
        (T2I-Adapter-XL's fourth on SDXL's three blocks); the list is not modified.
        image_embeds (N, D) or (N, n, D): CLIP image embeddings for an attached IP-Adapter
        (minisd/ip_adapter.py; needed exactly when one is attached). added_cond_kwargs
        {"text_embeds": (N, P), "time_ids": (N, k)}: SDXL's micro-conditioning, needed exactly
        by UNets with addition_embed_type "text_time" (minisd/micro_cond.py). class_labels: N
        ints (or one for all) in [0, num_class_embeds), needed exactly by UNets with
        num_class_embeds (the SD x4 upscaler's noise level, minisd/pipeline_upscale.py).
        -> (N, out_channels, H, W)."""
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise InputError(
                "down_block_additional_residuals and mid_block_additional_residual are "
                "ControlNet outputs: pass both or neither (T2I-Adapter features go in "
                "down_intrablock_additional_residuals)"
            )
        cfg, p, opts = self.config, self.params, self._opts()
        x, ctx = self._inputs(sample, encoder_hidden_states)
        ctx = ip_context(self, ctx, image_embeds)  # IP-Adapter: (text, image tokens)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        temb = self._temb(timestep, x, timestep_cond, added_cond_kwargs, class_labels)  # (N, T)
        h = _rec("conv_in", conv(x, p["conv_in"], padding=cfg.conv_in_kernel // 2))  # (N, C0, H, W)
        h, states = self._down(h, temb, ctx, opts, down_intrablock_additional_residuals)
        if down_block_additional_residuals is not None:
            states = _add_residuals(states, down_block_additional_residuals)
        if cfg.mid_block_type:
            h = self._mid(h, temb, ctx, opts)
            n = len(cfg.down_block_types)  # T2I-Adapter-XL's last feature:
            h = mid_intrablock(h, down_intrablock_additional_residuals, n)
        if mid_block_additional_residual is not None:
            h = h + _residual(mid_block_additional_residual, h, "mid_block_additional_residual")
        h = self._up(h, states, temb, ctx, opts)  # (N, C0, H, W)
        h = gn_silu(h, p["conv_norm_out"], "conv_norm_out", groups=opts.groups, eps=opts.eps)
        pad = cfg.conv_out_kernel // 2
        return _rec("conv_out", conv(h, p["conv_out"], padding=pad))  # (N, Cout, H, W)

    def _up(self, h, states, temb, ctx, opts):
        """Each up block takes the last ``layers + 1`` skip states. Latent sizes that are not
        multiples of 2^(blocks - 1) upsample to the next skip state's size (diffusers'
        ``forward_upsample_size``) instead of exactly 2x."""
        cfg = self.config
        n = len(cfg.up_block_types)
        factor = 2 ** (n - 1)
        forward_size = any(d % factor for d in states[0].shape[-2:])
        for i, kind in enumerate(cfg.up_block_types):
            k = cfg.layers_per_block[n - 1 - i] + 1
            skips, states = states[-k:], states[:-k]
            size = tuple(states[-1].shape[-2:]) if forward_size and i < n - 1 else None
            h = traced(
                f"up_blocks.{i}",
                up_block,
                h,
                skips,
                temb,
                self.params["up_blocks"][i],
                with_only_cross(opts, cfg, n - 1 - i),  # diffusers' reversed list
                heads=cfg.attention_head_dim[n - 1 - i],
                size=size,
                context=ctx if kind == "CrossAttnUpBlock2D" else None,
                freeu=None if self.freeu is None else self.freeu.stage(i),
            )
        return h


def _residual(r, like, what):
    """A residual of ``like``'s shape, or (N, C, 1, 1): global-pool ControlNets (shuffle)
    return spatial means, which broadcast over the skip state as in diffusers."""
    r = to_device(r, device_of(like), like.dtype)
    pooled = r.ndim == 4 and r.shape[:2] == like.shape[:2] and r.shape[2:] == (1, 1)
    if tuple(r.shape) != tuple(like.shape) and not pooled:
        raise InputError(f"{what}: shape {tuple(r.shape)}, expected {tuple(like.shape)}")
    return r


def _add_residuals(states, residuals):
    """ControlNet: residual i is added to skip state i (conv_in's output first)."""
    residuals = list(residuals)
    if len(residuals) != len(states):
        raise InputError(
            f"down_block_additional_residuals: {len(residuals)} arrays, the UNet has "
            f"{len(states)} skip states"
        )
    return [
        s + _residual(r, s, f"down_block_additional_residuals[{i}]")
        for i, (s, r) in enumerate(zip(states, residuals))
    ]
