"""UNet2DConditionModel: Stable Diffusion's text-conditioned denoiser (Rombach et al. 2022), as
diffusers' ``unets/unet_2d_condition.py`` computes it.

    eps = conv_out(silu(conv_norm_out(up(mid(down(conv_in(x), temb, ctx))))))

with temb = time_embedding(time_proj(t)) and ctx the text encoder's hidden states. The down
path keeps every layer's output as a skip state; the up path concatenates them back in reverse.

Traced names (``minisd.trace()``) are the diffusers module paths whose forward hooks fire:
``time_proj``, ``time_embedding(.linear_1/.linear_2)``, ``conv_in``, ``down_blocks.i`` (its
hidden-state output), ``...resnets.j(.norm1/.conv1/.time_emb_proj/.norm2/.conv2/
.conv_shortcut)``, ``...attentions.j(.norm/.proj_in/.transformer_blocks.k(.norm1/.attn1(.to_q/
.to_k/.to_v/.to_out.0)/.norm2/.attn2/.norm3/.ff(.net.0(.proj)/.net.2))/.proj_out)``,
``...downsamplers.0(.conv)``, ``mid_block``, ``up_blocks.i`` (``.upsamplers.0(.conv)``),
``conv_norm_out``, ``conv_out``. Not recorded: dropouts (identity at inference) and the
parameter-free activation modules (``conv_act``, ``time_embedding.act``, the ResNets'
``nonlinearity``, which diffusers calls several times per block).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from . import ops, trace
from .backend import array_module, device_of, to_device
from .blocks import conv, gn
from .errors import ConfigError, InputError
from .unet_blocks import (
    BlockOpts,
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
    transformer_shapes,
    up_block,
)
from .weights import (
    check_keys,
    check_weights_mode,
    find_weights,
    flatten,
    load_file,
    nest,
    prepare_weights,
    read_config,
)

_rec = trace.record


def _is_default(value, default):
    if default == "silu":
        return value in ("silu", "swish")  # two names of x * sigmoid(x)
    if isinstance(value, (list, tuple)):
        return all(_is_default(v, default) for v in value)
    return value == default or (value in (None, False) and default in (None, False))


def parse_config(cls, d, *, must_be_default, ignored, source):
    """A config dataclass from a diffusers config dict. Keys starting with "_" and ``ignored``
    keys are skipped; ``must_be_default`` keys (features minisd does not implement) must hold
    diffusers' default; unknown keys must be null/false. Lists become tuples."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in d.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in fields:
            kw[key] = tuple(value) if isinstance(value, list) else value
        elif key in must_be_default:
            if not _is_default(value, must_be_default[key]):
                raise ConfigError(
                    f"{source}: {key}={value!r} is not supported "
                    f"(minisd implements only {must_be_default[key]!r})"
                )
        elif value not in (None, False):
            raise ConfigError(f"{source}: unknown config key {key!r}={value!r}")
    try:
        return cls(**kw, source=source)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def per_block(cfg, name, n):
    """Normalize an int-or-list config field to a tuple of ``n`` ints (frozen dataclass)."""
    value = getattr(cfg, name)
    value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(value) != n or not all(isinstance(v, int) for v in value):
        raise ConfigError(f"{cfg.source}: {name}={value!r}: expected an int or {n} ints")
    object.__setattr__(cfg, name, value)


_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID = ("UNetMidBlock2DCrossAttn", None)
_MUST_BE_DEFAULT = {
    "act_fn": "silu",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "cross_attention_norm": None,
    "num_attention_heads": None,
    "reverse_transformer_layers_per_block": None,
}
# No effect on inference with the supported blocks (resnet_out_scale_factor / skip_time_act
# only reach diffusers' ResnetDownsampleBlock2D / Simple* blocks).
_IGNORED = {
    "dropout",
    "addition_time_embed_dim",
    "addition_embed_type_num_heads",
    "resnet_skip_time_act",
    "resnet_out_scale_factor",
}


@dataclass(frozen=True)
class UNetConfig:
    """The fields of diffusers' UNet2DConditionModel config.json that shape the computation.

    ``attention_head_dim`` keeps diffusers' historical misnomer: it is the number of attention
    heads per block (SD1: 8 everywhere; SD2: [5, 10, 20, 20], i.e. 64 channels per head).
    Per-block fields are normalized to tuples with one entry per down block.
    """

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int | tuple | None = None
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int | tuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple = 1280
    transformer_layers_per_block: int | tuple = 1
    attention_head_dim: int | tuple = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    source: str = dataclasses.field(default="config", compare=False, repr=False)

    @classmethod
    def from_dict(cls, d, source="config"):
        return parse_config(
            cls, d, must_be_default=_MUST_BE_DEFAULT, ignored=_IGNORED, source=source
        )

    def __post_init__(self):
        n = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == n):
            raise ConfigError(
                f"{self.source}: down_block_types, up_block_types and block_out_channels "
                "must have the same length"
            )
        for name, value, known in (
            ("down_block_types", self.down_block_types, _DOWN),
            ("up_block_types", self.up_block_types, _UP),
            ("mid_block_type", (self.mid_block_type,), _MID),
        ):
            bad = [v for v in value if v not in known]
            if bad:
                raise ConfigError(f"{self.source}: {name}: {bad[0]!r} is not supported")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ConfigError(
                f"{self.source}: resnet_time_scale_shift={self.resnet_time_scale_shift!r} "
                "is not supported"
            )
        for name in (
            "layers_per_block",
            "cross_attention_dim",
            "transformer_layers_per_block",
            "attention_head_dim",
        ):
            per_block(self, name, n)

    @property
    def time_embed_dim(self):
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


def param_shapes(cfg: UNetConfig) -> dict:
    """{checkpoint key: shape} of every parameter of the UNet ``cfg`` describes."""
    c, n, temb = cfg.block_out_channels, len(cfg.block_out_channels), cfg.time_embed_dim
    tn = cfg.resnet_time_scale_shift
    s = prefixed("conv_in", conv_shapes(c[0], cfg.in_channels, cfg.conv_in_kernel))
    s.update(prefixed("time_embedding.linear_1", linear_shapes(temb, c[0])))
    s.update(prefixed("time_embedding.linear_2", linear_shapes(temb, temb)))

    def xattn(i):  # shapes of one Transformer2D of block i (down-block numbering)
        return lambda ch: transformer_shapes(
            ch,
            cfg.cross_attention_dim[i],
            cfg.transformer_layers_per_block[i],
            cfg.use_linear_projection,
        )

    for i, kind in enumerate(cfg.down_block_types):
        cin, cout = c[max(i - 1, 0)], c[i]
        io = [(cin if j == 0 else cout, cout) for j in range(cfg.layers_per_block[i])]
        attn = xattn(i) if kind == "CrossAttnDownBlock2D" else None
        down = cout if i < n - 1 else None
        s.update(
            prefixed(f"down_blocks.{i}", block_shapes(io, temb, attn, time_norm=tn, down=down))
        )
    if cfg.mid_block_type:
        mid = block_shapes([(c[-1], c[-1])] * 2, temb, xattn(n - 1), time_norm=tn, mid=True)
        s.update(prefixed("mid_block", mid))
    rc = c[::-1]
    for i, kind in enumerate(cfg.up_block_types):
        prev, cout, cin = rc[max(i - 1, 0)], rc[i], rc[min(i + 1, n - 1)]
        layers = cfg.layers_per_block[n - 1 - i] + 1
        io = [
            ((prev if j == 0 else cout) + (cin if j == layers - 1 else cout), cout)
            for j in range(layers)
        ]
        attn = xattn(n - 1 - i) if kind == "CrossAttnUpBlock2D" else None
        up = cout if i < n - 1 else None
        s.update(prefixed(f"up_blocks.{i}", block_shapes(io, temb, attn, time_norm=tn, up=up)))
    s.update(prefixed("conv_norm_out", norm_shapes(c[0])))
    s.update(prefixed("conv_out", conv_shapes(cfg.out_channels, c[0], cfg.conv_out_kernel)))
    return s


def prepare_params(params, shapes, *, dtype=None, device=None, source="params", weights="eager"):
    """Flat or nested params -> nested dict, after checking every key and shape.

    ``weights``: "eager" casts now; "lazy" / "stream" keep the stored dtype and cast each
    tensor when a layer reads it (weights.CastOnRead; the memory policy is described there)."""
    flat = params if all(not isinstance(v, dict) for v in params.values()) else flatten(params)
    check_keys(flat, shapes, source)
    if check_weights_mode(weights) != "eager":
        first = next(iter(flat.values()))
        return prepare_weights(
            flat,
            dtype=dtype or first.dtype,
            device=device or device_of(first),
            weights=weights,
        )
    if dtype is not None or device is not None:
        device = device or device_of(next(iter(flat.values())))
        flat = {k: to_device(v, device, dtype) for k, v in flat.items()}
    return nest(flat)


class UNet2DConditionModel:
    """Stable Diffusion's UNet. ``unet(sample, timestep, encoder_hidden_states)`` -> eps.

    Build it with :meth:`from_pretrained` (a diffusers ``unet/`` folder) or from a config dict
    and flat (``"down_blocks.0.resnets.0.conv1.weight"``) or nested params.
    """

    #: Self-attention queries processed at a time: 64x64 latents (4096 tokens), 8 heads and a
    #: CFG batch of 2 make (2, 8, 1024, 4096) score chunks (256 MiB float32) instead of 1 GiB.
    attention_chunk_size: int | None = 1024

    def __init__(
        self, config, params, *, dtype=None, device=None, source="params", weights="eager"
    ):
        if not isinstance(config, UNetConfig):
            config = UNetConfig.from_dict(config, source=f"{source} (config)")
        self.config = config
        self.params = prepare_params(
            params,
            param_shapes(config),
            dtype=dtype,
            device=device,
            source=source,
            weights=weights,
        )

    @classmethod
    def from_pretrained(cls, folder, dtype="float32", device="cpu", *, weights="eager"):
        """Load diffusers' ``config.json`` and ``diffusion_pytorch_model.safetensors``.
        ``weights``: "eager" | "lazy" | "stream", see minisd/weights.py (memory policy)."""
        folder = Path(folder)
        config = UNetConfig.from_dict(
            read_config(folder / "config.json"), source=str(folder / "config.json")
        )
        path = find_weights(folder)
        if check_weights_mode(weights) != "eager":  # keep the file's dtype, cast on read
            flat = load_file(path)
            return cls(config, flat, dtype=dtype, device=device, source=str(path), weights=weights)
        return cls(config, load_file(path, dtype=dtype, device=device), source=str(path))

    @property
    def dtype(self):
        return self.params["conv_in"]["weight"].dtype

    @property
    def device(self):
        return device_of(self.params["conv_in"]["weight"])

    def _opts(self):
        cfg = self.config
        return BlockOpts(
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            time_norm=cfg.resnet_time_scale_shift,
            downsample_padding=cfg.downsample_padding,
            linear_projection=cfg.use_linear_projection,
            upcast=cfg.upcast_attention,
            chunk_size=self.attention_chunk_size,
        )

    def _inputs(self, sample, context):
        cfg = self.config
        x = to_device(sample, self.device, self.dtype)
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise InputError(
                f"sample: expected shape (N, {cfg.in_channels}, H, W) for in_channels="
                f"{cfg.in_channels}, got {tuple(x.shape)}"
            )
        ctx = to_device(context, self.device, self.dtype)
        dim = cfg.cross_attention_dim[0]
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
    ):
        """sample (N, in_channels, H, W); timestep: a scalar or N values; encoder_hidden_states
        (N, L, cross_attention_dim). ControlNet residuals (both or neither): one per skip state
        (added to them) and one added to the mid block's output. -> (N, out_channels, H, W)."""
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise InputError(
                "down_block_additional_residuals and mid_block_additional_residual are "
                "ControlNet outputs: pass both or neither (T2I-Adapter residuals are not "
                "supported)"
            )
        cfg, p, opts = self.config, self.params, self._opts()
        x, ctx = self._inputs(sample, encoder_hidden_states)
        xp = array_module(x)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        t = broadcast_timesteps(timestep, x.shape[0], xp)  # (N,)
        temb = time_embedding(
            t,
            p["time_embedding"],
            dim=cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
            dtype=x.dtype,
        )  # (N, T)
        h = _rec("conv_in", conv(x, p["conv_in"], padding=cfg.conv_in_kernel // 2))  # (N, C0, H, W)
        h, states = self._down(h, temb, ctx, opts)
        if down_block_additional_residuals is not None:
            states = _add_residuals(states, down_block_additional_residuals)
        if cfg.mid_block_type:
            mid_opts = dataclasses.replace(opts, out_scale=cfg.mid_block_scale_factor)
            h = traced(
                "mid_block",
                mid_block,
                h,
                temb,
                p["mid_block"],
                mid_opts,
                heads=cfg.attention_head_dim[-1],
                context=ctx,
            )
        if mid_block_additional_residual is not None:
            h = h + _residual(mid_block_additional_residual, h, "mid_block_additional_residual")
        h = self._up(h, states, temb, ctx, opts)  # (N, C0, H, W)
        h = _rec("conv_norm_out", gn(h, p["conv_norm_out"], groups=opts.groups, eps=opts.eps))
        pad = cfg.conv_out_kernel // 2
        return _rec("conv_out", conv(ops.silu(h), p["conv_out"], padding=pad))  # (N, Cout, H, W)

    def _down(self, h, temb, ctx, opts):
        cfg = self.config
        states = [h]
        for i, kind in enumerate(cfg.down_block_types):
            h, s = traced(
                f"down_blocks.{i}",
                down_block,
                h,
                temb,
                self.params["down_blocks"][i],
                opts,
                heads=cfg.attention_head_dim[i],
                context=ctx if kind == "CrossAttnDownBlock2D" else None,
            )
            states.extend(s)
        return h, states

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
                opts,
                heads=cfg.attention_head_dim[n - 1 - i],
                size=size,
                context=ctx if kind == "CrossAttnUpBlock2D" else None,
            )
        return h


def _residual(r, like, what):
    r = to_device(r, device_of(like), like.dtype)
    if tuple(r.shape) != tuple(like.shape):
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
