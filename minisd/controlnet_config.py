"""ControlNetModel's config and checkpoint layout (minisd/controlnet.py has the model): diffusers'
ControlNetModel config.json parsed into a frozen dataclass, and the {key: shape} table of its
parameters. Loading and the key checks are the UNet's (unet_config.load_pretrained /
prepare_params).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import check_divides, check_numbers, is_int
from .errors import ConfigError
from .unet_blocks import (
    block_shapes,
    conv_shapes,
    linear_shapes,
    prefixed,
    transformer_shapes,
)
from .unet_config import check_addition, parse_config, per_block, text_time_shapes

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_MID = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
# Features of diffusers' ControlNetModel that minisd does not implement (class embeddings,
# Kandinsky's "text" / "text_image" added embeddings and projections) must hold the default.
_MUST_BE_DEFAULT = {
    "act_fn": "silu",
    "only_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
}
# Only read by addition_embed_type "text" (not supported); sample_size is no ControlNetModel
# argument (diffusers ignores it too).
_IGNORED = {"addition_embed_type_num_heads", "sample_size"}
_CHOICES = {
    "mid_block_type": _MID,
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "controlnet_conditioning_channel_order": ("rgb", "bgr"),
}


@dataclass(frozen=True)
class ControlNetConfig:
    """The fields of diffusers' ControlNetModel config.json. As in diffusers, the heads of
    block i are ``num_attention_heads[i]`` if given, else ``attention_head_dim[i]`` (the
    historical misnomer, see UNetConfig); ``layers_per_block`` and ``cross_attention_dim`` are
    single ints (one value for every block). Per-block fields become tuples;
    ``transformer_layers_per_block[-1]`` is also the mid block's depth (as in diffusers), and a
    depth may be 0 (a Transformer2D of norm, proj_in and proj_out only, as in diffusers' "mid"
    SDXL ControlNets). SDXL ControlNets set ``addition_embed_type="text_time"`` with the UNet's
    micro-conditioning widths (minisd/micro_cond.py)."""

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple = 1
    attention_head_dim: int | tuple = 8
    num_attention_heads: int | tuple | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    time_cond_proj_dim: int | None = None  # minisd only: an LCM-style cond_proj (see above)
    addition_embed_type: str | None = None  # None, or SDXL's "text_time"
    addition_time_embed_dim: int | None = None  # sinusoid width per time id (SDXL: 256)
    projection_class_embeddings_input_dim: int | None = None  # pooled + ids x that (SDXL: 2816)
    source: str = dataclasses.field(default="config", compare=False, repr=False)

    @classmethod
    def from_dict(cls, d, source="config"):
        return parse_config(
            cls, d, must_be_default=_MUST_BE_DEFAULT, ignored=_IGNORED, source=source
        )

    def __post_init__(self):
        ints = ("block_out_channels", "conditioning_embedding_out_channels")
        check_numbers(self.source, self, ints=ints)
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n:
            raise ConfigError(
                f"{self.source}: down_block_types and block_out_channels must have the same length"
            )
        for name, allowed in {"down_block_types": _DOWN, **_CHOICES}.items():
            value = getattr(self, name)
            for v in value if isinstance(value, tuple) else (value,):
                if v not in allowed:
                    raise ConfigError(
                        f"{self.source}: {name}={v!r} is not supported (minisd implements "
                        f"{', '.join(map(repr, allowed))})"
                    )
        for name in ("layers_per_block", "cross_attention_dim"):
            if isinstance(getattr(self, name), tuple):
                raise ConfigError(
                    f"{self.source}: {name}={getattr(self, name)!r}: ControlNetModel takes one "
                    "int for all blocks"
                )
        for name in ("transformer_layers_per_block", "attention_head_dim"):
            per_block(self, name, n)
        if self.upcast_attention is None:  # SDXL ControlNet configs say null: diffusers' False
            object.__setattr__(self, "upcast_attention", False)
        if self.num_attention_heads is not None:
            per_block(self, "num_attention_heads", n)
        self._check_sizes()

    def _check_sizes(self):
        ints = ("in_channels", "conditioning_channels", "layers_per_block", "norm_num_groups")
        ints += ("cross_attention_dim", "attention_head_dim", "num_attention_heads")
        ints += ("time_cond_proj_dim", "addition_time_embed_dim")
        ints += ("projection_class_embeddings_input_dim",)
        floats = ("freq_shift", "mid_block_scale_factor", "norm_eps")
        optional = ("num_attention_heads", "time_cond_proj_dim", "addition_time_embed_dim")
        optional += ("projection_class_embeddings_input_dim",)
        check_numbers(self.source, self, ints=ints, floats=floats, optional=optional)
        depths = self.transformer_layers_per_block
        if not all(is_int(d) and d >= 0 for d in depths):
            raise ConfigError(
                f"{self.source}: transformer_layers_per_block={depths!r}: expected integers >= 0"
            )
        check_addition(self)
        c = self.block_out_channels
        check_divides(self.source, "norm_num_groups", self.norm_num_groups, "channels", c)
        name = "attention_head_dim" if self.num_attention_heads is None else "num_attention_heads"
        check_divides(self.source, name, self.heads, "channels", c)

    @property
    def heads(self):
        """Attention heads per block (diffusers: ``num_attention_heads or attention_head_dim``)."""
        return self.num_attention_heads or self.attention_head_dim

    @property
    def time_embed_dim(self):
        return 4 * self.block_out_channels[0]

    @property
    def cond_factor(self):
        """Control image size / latent size: 2 per stride-2 conv of the embedding (8 in SD)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def skip_channels(self):
        """Channels of the skip states (conv_in's, each layer's, each downsampler's)."""
        c, n = self.block_out_channels, len(self.block_out_channels)
        out = [c[0]]
        for i in range(n):
            out += [c[i]] * (self.layers_per_block + (i < n - 1))
        return out


def param_shapes(cfg: ControlNetConfig) -> dict:
    """{checkpoint key: shape} of every parameter of the ControlNet ``cfg`` describes."""
    c, n, temb = cfg.block_out_channels, len(cfg.block_out_channels), cfg.time_embed_dim
    tn, e = cfg.resnet_time_scale_shift, cfg.conditioning_embedding_out_channels
    s = prefixed("conv_in", conv_shapes(c[0], cfg.in_channels, 3))
    s.update(prefixed("time_embedding.linear_1", linear_shapes(temb, c[0])))
    s.update(prefixed("time_embedding.linear_2", linear_shapes(temb, temb)))
    if cfg.time_cond_proj_dim:  # Linear(time_cond_proj_dim -> C0), no bias
        s["time_embedding.cond_proj.weight"] = (c[0], cfg.time_cond_proj_dim)
    s.update(text_time_shapes(cfg, temb))  # SDXL's micro-conditioning MLP, as in the UNet
    emb = conv_shapes(e[0], cfg.conditioning_channels, 3)
    emb = prefixed("conv_in", emb)
    for i in range(len(e) - 1):
        emb.update(prefixed(f"blocks.{2 * i}", conv_shapes(e[i], e[i], 3)))
        emb.update(prefixed(f"blocks.{2 * i + 1}", conv_shapes(e[i + 1], e[i], 3)))
    emb.update(prefixed("conv_out", conv_shapes(c[0], e[-1], 3)))
    s.update(prefixed("controlnet_cond_embedding", emb))

    def xattn(i):
        lpb, lin = cfg.transformer_layers_per_block[i], cfg.use_linear_projection
        return lambda ch: transformer_shapes(ch, cfg.cross_attention_dim, lpb, lin)

    for i, kind in enumerate(cfg.down_block_types):
        cin, cout = c[max(i - 1, 0)], c[i]
        io = [(cin if j == 0 else cout, cout) for j in range(cfg.layers_per_block)]
        attn = xattn(i) if kind == "CrossAttnDownBlock2D" else None
        down = cout if i < n - 1 else None
        s.update(
            prefixed(f"down_blocks.{i}", block_shapes(io, temb, attn, time_norm=tn, down=down))
        )
    cross = cfg.mid_block_type == "UNetMidBlock2DCrossAttn"
    io = [(c[-1], c[-1])] * (2 if cross else 1)
    attn = xattn(n - 1) if cross else None
    s.update(prefixed("mid_block", block_shapes(io, temb, attn, time_norm=tn, mid=True)))
    for k, ch in enumerate(cfg.skip_channels()):
        s.update(prefixed(f"controlnet_down_blocks.{k}", conv_shapes(ch, ch, 1)))
    s.update(prefixed("controlnet_mid_block", conv_shapes(c[-1], c[-1], 1)))
    return s
