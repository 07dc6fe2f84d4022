"""UNet2DModel: the unconditional DDPM denoiser (Ho et al. 2020), as diffusers'
``unets/unet_2d.py`` computes it (e.g. google/ddpm-cat-256).

    eps = conv_out(silu(conv_norm_out(up(mid(down(conv_in(x), temb))))))

Down / up blocks are DownBlock2D / AttnDownBlock2D / UpBlock2D / AttnUpBlock2D: ResNet blocks
with the time embedding injected, optionally each followed by a single-head-or-more
self-attention with its own GroupNorm and a residual connection. Traced names follow
:mod:`minisd.unet` (diffusers' module paths; dropouts and activation modules not recorded).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import trace
from .backend import array_module, device_of
from .blocks import conv, gn_silu
from .errors import InputError
from .unet_blocks import (
    BlockOpts,
    attention_shapes,
    block_shapes,
    broadcast_timesteps,
    conv_shapes,
    down_block,
    linear_shapes,
    mid_block,
    norm_shapes,
    prefixed,
    time_embedding,
    traced,
    up_block,
)
from .unet_config import (
    check_block_types,
    load_pretrained,
    parse_config,
    prepare_params,
    sample_input,
)

_rec = trace.record
_DOWN = ("DownBlock2D", "AttnDownBlock2D")
_UP = ("UpBlock2D", "AttnUpBlock2D")
_MUST_BE_DEFAULT = {
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "downsample_type": "conv",
    "upsample_type": "conv",
    "class_embed_type": None,
    "num_class_embeds": None,
}
_IGNORED = {"dropout", "num_train_timesteps"}  # num_train_timesteps: "learned" embeddings only


@dataclass(frozen=True)
class UNet2DConfig:
    """The fields of diffusers' UNet2DModel config.json that shape the computation.

    ``attention_head_dim`` here is channels per head (None: one head over all channels).
    ``attn_norm_num_groups``: GroupNorm groups of the mid block's attention (None: the ResNet
    groups with "default" time norm, no norm with "scale_shift"), as diffusers.
    """

    in_channels: int = 3
    out_channels: int = 3
    sample_size: int | tuple | None = None
    center_input_sample: bool = False
    time_embedding_dim: int | None = None
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple = ("DownBlock2D",) + ("AttnDownBlock2D",) * 3
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple = ("AttnUpBlock2D",) * 3 + ("UpBlock2D",)
    block_out_channels: tuple = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    source: str = field(default="config", compare=False, repr=False)

    @classmethod
    def from_dict(cls, d, source="config"):
        return parse_config(
            cls, d, must_be_default=_MUST_BE_DEFAULT, ignored=_IGNORED, source=source
        )

    def __post_init__(self):
        check_block_types(
            self,
            {
                "down_block_types": _DOWN,
                "up_block_types": _UP,
                "mid_block_type": ("UNetMidBlock2D", None),
                "resnet_time_scale_shift": ("default", "scale_shift"),
            },
        )

    @property
    def time_embed_dim(self):
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def heads(self, channels):
        """Heads of an attention over ``channels``: channels / attention_head_dim."""
        return channels // (self.attention_head_dim or channels)

    @property
    def mid_attn_groups(self):
        if self.attn_norm_num_groups is not None:
            return self.attn_norm_num_groups
        return self.norm_num_groups if self.resnet_time_scale_shift == "default" else None


def param_shapes(cfg: UNet2DConfig) -> dict:
    """{checkpoint key: shape} of every parameter of the UNet2DModel ``cfg`` describes."""
    c, n, temb = cfg.block_out_channels, len(cfg.block_out_channels), cfg.time_embed_dim
    tn, layers = cfg.resnet_time_scale_shift, cfg.layers_per_block
    s = prefixed("conv_in", conv_shapes(c[0], cfg.in_channels, 3))
    s.update(prefixed("time_embedding.linear_1", linear_shapes(temb, c[0])))
    s.update(prefixed("time_embedding.linear_2", linear_shapes(temb, temb)))

    def attn(ch):
        return attention_shapes(ch, group_norm=True)

    for i, kind in enumerate(cfg.down_block_types):
        cin, cout = c[max(i - 1, 0)], c[i]
        io = [(cin if j == 0 else cout, cout) for j in range(layers)]
        a = attn if kind == "AttnDownBlock2D" else None
        down = cout if i < n - 1 else None
        s.update(prefixed(f"down_blocks.{i}", block_shapes(io, temb, a, time_norm=tn, down=down)))
    if cfg.mid_block_type:
        groups = cfg.mid_attn_groups is not None
        a = (lambda ch: attention_shapes(ch, group_norm=groups)) if cfg.add_attention else None
        mid = block_shapes([(c[-1], c[-1])] * 2, temb, a, time_norm=tn, mid=True)
        s.update(prefixed("mid_block", mid))
    rc = c[::-1]
    for i, kind in enumerate(cfg.up_block_types):
        prev, cout, cin = rc[max(i - 1, 0)], rc[i], rc[min(i + 1, n - 1)]
        io = [
            ((prev if j == 0 else cout) + (cin if j == layers else cout), cout)
            for j in range(layers + 1)
        ]
        a = attn if kind == "AttnUpBlock2D" else None
        up = cout if i < n - 1 else None
        s.update(prefixed(f"up_blocks.{i}", block_shapes(io, temb, a, time_norm=tn, up=up)))
    s.update(prefixed("conv_norm_out", norm_shapes(c[0])))
    s.update(prefixed("conv_out", conv_shapes(cfg.out_channels, c[0], 3)))
    return s


class UNet2DModel:
    """Unconditional UNet. ``unet2d(sample, timestep)`` -> the model output (N, C, H, W).

    Build it with :meth:`from_pretrained` (a diffusers folder) or from a config dict and flat
    or nested params. H and W must be multiples of 2^(number of blocks - 1), as in diffusers.
    """

    #: Self-attention queries processed at a time (None: all at once).
    attention_chunk_size: int | None = 1024

    def __init__(self, config, params, *, dtype=None, device=None, source="params"):
        if not isinstance(config, UNet2DConfig):
            config = UNet2DConfig.from_dict(config, source=f"{source} (config)")
        self.config = config
        self.params = prepare_params(
            params, param_shapes(config), dtype=dtype, device=device, source=source
        )

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device="cpu"):
        """Load diffusers' ``config.json`` and ``diffusion_pytorch_model.safetensors``."""
        return load_pretrained(cls, UNet2DConfig, folder, dtype=dtype, device=device)

    @property
    def dtype(self):
        return self.params["conv_in"]["weight"].dtype

    @property
    def device(self):
        return device_of(self.params["conv_in"]["weight"])

    def _inputs(self, sample):
        cfg = self.config
        x = sample_input(sample, self)
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if any(d % factor for d in x.shape[2:]):
            raise InputError(
                f"sample: height and width must be multiples of {factor} for this UNet2DModel, "
                f"got {tuple(x.shape[2:])}"
            )
        return x

    def __call__(self, sample, timestep):
        """sample (N, in_channels, H, W); timestep: a scalar (python floats are truncated to
        integers, as diffusers' UNet2DModel does) or N values. -> (N, out_channels, H, W)."""
        cfg, p = self.config, self.params
        opts = BlockOpts(
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            time_norm=cfg.resnet_time_scale_shift,
            downsample_padding=cfg.downsample_padding,
            chunk_size=self.attention_chunk_size,
        )
        x = self._inputs(sample)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        t = broadcast_timesteps(timestep, x.shape[0], array_module(x), integer=True)  # (N,)
        temb = time_embedding(
            t,
            p["time_embedding"],
            dim=cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
            dtype=x.dtype,
        )  # (N, T)
        h = _rec("conv_in", conv(x, p["conv_in"], padding=1))  # (N, C0, H, W)
        states = [h]
        for i, kind in enumerate(cfg.down_block_types):
            heads = cfg.heads(cfg.block_out_channels[i]) if kind == "AttnDownBlock2D" else None
            h, s = traced(
                f"down_blocks.{i}", down_block, h, temb, p["down_blocks"][i], opts, heads=heads
            )
            states.extend(s)
        if cfg.mid_block_type:
            mid_opts = dataclasses.replace(opts, out_scale=cfg.mid_block_scale_factor)
            h = traced(
                "mid_block",
                mid_block,
                h,
                temb,
                p["mid_block"],
                mid_opts,
                heads=cfg.heads(cfg.block_out_channels[-1]),
                attn_groups=cfg.mid_attn_groups,
            )
        for i, kind in enumerate(cfg.up_block_types):
            k = cfg.layers_per_block + 1
            skips, states = states[-k:], states[:-k]
            heads = cfg.heads(cfg.block_out_channels[::-1][i]) if kind == "AttnUpBlock2D" else None
            h = traced(
                f"up_blocks.{i}", up_block, h, skips, temb, p["up_blocks"][i], opts, heads=heads
            )
        h = gn_silu(h, p["conv_norm_out"], "conv_norm_out", groups=opts.groups, eps=opts.eps)
        return _rec("conv_out", conv(h, p["conv_out"], padding=1))  # (N, Cout, H, W)
