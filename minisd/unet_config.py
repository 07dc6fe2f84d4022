"""UNet configs and checkpoint layout, shared by :mod:`minisd.unet` (UNet2DConditionModel) and
:mod:`minisd.unet2d` (UNet2DModel): parsing diffusers' config.json into frozen dataclasses,
the {key: shape} table of UNet2DConditionModel, and loading / checking the parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .backend import device_of, resolve_device_dtype, to_device
from .config import check_divides, check_numbers
from .errors import ConfigError, InputError
from .unet_blocks import (
    block_shapes,
    conv_shapes,
    linear_shapes,
    norm_shapes,
    prefixed,
    transformer_shapes,
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


def per_block_flags(cfg, name, n):
    """Normalize a bool-or-list config field to a tuple of ``n`` bools (frozen dataclass)."""
    value = getattr(cfg, name)
    flags = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(flags) != n or not all(isinstance(v, bool) for v in flags):
        raise ConfigError(f"{cfg.source}: {name}={value!r}: expected a bool or {n} bools")
    object.__setattr__(cfg, name, flags)


def check_block_types(cfg, known):
    """down_block_types, up_block_types and block_out_channels have one entry per block, and
    every listed field holds values minisd implements. ``known``: {field: allowed values}; a
    tuple field is checked entry by entry, any other field as one value."""
    n = len(cfg.block_out_channels)
    if not (len(cfg.down_block_types) == len(cfg.up_block_types) == n):
        raise ConfigError(
            f"{cfg.source}: down_block_types, up_block_types and block_out_channels "
            "must have the same length"
        )
    for name, allowed in known.items():
        value = getattr(cfg, name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ConfigError(f"{cfg.source}: {name}: {bad[0]!r} is not supported")


def check_addition(cfg):
    """addition_embed_type: None, or SDXL's "text_time" with both of its widths (the UNet's and
    the ControlNet's configs share these three fields)."""
    kind = cfg.addition_embed_type
    if kind not in (None, "text_time"):
        raise ConfigError(
            f"{cfg.source}: addition_embed_type={kind!r} is not supported (minisd "
            "implements None and SDXL's 'text_time')"
        )
    widths = (cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim)
    if kind == "text_time" and None in widths:
        raise ConfigError(
            f"{cfg.source}: addition_embed_type='text_time' needs addition_time_embed_dim "
            "and projection_class_embeddings_input_dim"
        )


def text_time_shapes(cfg, temb):
    """{key: shape} of SDXL's add_embedding, diffusers' TimestepEmbedding(pooled width + time
    ids x addition_time_embed_dim -> T); {} unless addition_embed_type is "text_time"."""
    if cfg.addition_embed_type != "text_time":
        return {}
    s = prefixed(
        "add_embedding.linear_1", linear_shapes(temb, cfg.projection_class_embeddings_input_dim)
    )
    s.update(prefixed("add_embedding.linear_2", linear_shapes(temb, temb)))
    return s


_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID = ("UNetMidBlock2DCrossAttn", None)
_MUST_BE_DEFAULT = {
    "act_fn": "silu",
    "dual_cross_attention": False,
    "class_embeddings_concat": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "attention_type": "default",
    "cross_attention_norm": None,
    "num_attention_heads": None,
    "reverse_transformer_layers_per_block": None,
}
# No effect on inference with the supported blocks (resnet_out_scale_factor / skip_time_act
# only reach diffusers' ResnetDownsampleBlock2D / Simple* blocks; mid_block_only_cross_attention
# only UNetMidBlock2DSimpleCrossAttn: UNetMidBlock2DCrossAttn never takes it).
_IGNORED = {
    "dropout",
    "mid_block_only_cross_attention",
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
    time_cond_proj_dim: int | None = None  # LCM-distilled UNets: guidance-scale embedding width
    # SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2): "text_time" adds
    # add_embedding([pooled text embeds, time_proj(each size / crop number)]) to the time embedding
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None  # sinusoid width per micro-conditioning number
    projection_class_embeddings_input_dim: int | None = None  # pooled width + 6 * that width
    # Class conditioning (the SD x4 upscaler's noise level): class_embedding = nn.Embedding(
    # num_class_embeds, T), its row added to the time embedding; class_embed_type: None only
    num_class_embeds: int | None = None
    class_embed_type: str | None = None
    # attn1 of the Transformer2Ds of each down block (the up blocks mirror it) attends to the
    # text embedding instead of the image tokens; a bool is the same for every block
    only_cross_attention: bool | tuple = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    source: str = dataclasses.field(default="config", compare=False, repr=False)

    @classmethod
    def from_dict(cls, d, source="config"):
        return parse_config(
            cls, d, must_be_default=_MUST_BE_DEFAULT, ignored=_IGNORED, source=source
        )

    def __post_init__(self):
        check_numbers(self.source, self, ints=("block_out_channels",))
        n = len(self.block_out_channels)
        check_block_types(
            self, {"down_block_types": _DOWN, "up_block_types": _UP, "mid_block_type": _MID}
        )
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
        per_block_flags(self, "only_cross_attention", n)
        _check_class_embedding(self)
        self._check_sizes()

    def _check_sizes(self):
        """Every size is a positive int, and group and head counts divide their channels."""
        ints = ("in_channels", "out_channels", "layers_per_block", "norm_num_groups")
        ints += ("cross_attention_dim", "transformer_layers_per_block", "attention_head_dim")
        ints += ("conv_in_kernel", "conv_out_kernel", "time_embedding_dim", "sample_size")
        ints += ("time_cond_proj_dim", "addition_time_embed_dim")
        ints += ("projection_class_embeddings_input_dim", "num_class_embeds")
        floats = ("freq_shift", "mid_block_scale_factor", "norm_eps")
        optional = ("time_embedding_dim", "sample_size", "time_cond_proj_dim")
        optional += ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
        optional += ("num_class_embeds",)
        check_numbers(self.source, self, ints=ints, floats=floats, optional=optional)
        check_addition(self)
        c = self.block_out_channels
        check_divides(self.source, "norm_num_groups", self.norm_num_groups, "channels", c)
        # attention_head_dim is diffusers' misnomer for the number of heads (see the docstring)
        check_divides(self.source, "attention_head_dim", self.attention_head_dim, "channels", c)

    @property
    def time_embed_dim(self):
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def heads(self):
        """Attention heads per down block (``attention_head_dim``, see the class doc)."""
        return self.attention_head_dim


def _check_class_embedding(cfg):
    """class_embed_type: None (an nn.Embedding when num_class_embeds is set) is the only kind
    minisd implements (diffusers' "timestep", "identity", "projection", "simple_projection"
    are refused by name)."""
    if cfg.class_embed_type is not None:
        raise ConfigError(
            f"{cfg.source}: class_embed_type={cfg.class_embed_type!r} is not supported (minisd "
            "implements class_embed_type None with num_class_embeds: an nn.Embedding, as the SD "
            "x4 upscaler's noise-level embedding)"
        )


def param_shapes(cfg: UNetConfig) -> dict:
    """{checkpoint key: shape} of every parameter of the UNet ``cfg`` describes."""
    c, n, temb = cfg.block_out_channels, len(cfg.block_out_channels), cfg.time_embed_dim
    tn = cfg.resnet_time_scale_shift
    s = prefixed("conv_in", conv_shapes(c[0], cfg.in_channels, cfg.conv_in_kernel))
    s.update(prefixed("time_embedding.linear_1", linear_shapes(temb, c[0])))
    s.update(prefixed("time_embedding.linear_2", linear_shapes(temb, temb)))
    if cfg.time_cond_proj_dim:  # Linear(time_cond_proj_dim -> C0), no bias
        s["time_embedding.cond_proj.weight"] = (c[0], cfg.time_cond_proj_dim)
    s.update(text_time_shapes(cfg, temb))  # SDXL's micro-conditioning MLP
    if cfg.num_class_embeds:  # nn.Embedding(num_class_embeds, T)
        s["class_embedding.weight"] = (cfg.num_class_embeds, temb)

    def xattn(i, mid=False):  # shapes of one Transformer2D of block i (down-block numbering)
        return lambda ch: transformer_shapes(
            ch,
            cfg.cross_attention_dim[i],
            cfg.transformer_layers_per_block[i],
            cfg.use_linear_projection,
            only_cross=cfg.only_cross_attention[i] and not mid,
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
        attn = xattn(n - 1, mid=True)  # UNetMidBlock2DCrossAttn: never only_cross_attention
        mid = block_shapes([(c[-1], c[-1])] * 2, temb, attn, time_norm=tn, mid=True)
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


def load_pretrained(cls, config_cls, folder, *, dtype, device, weights="eager"):
    """``cls(config, params)`` from a diffusers folder: ``config.json`` (parsed by
    ``config_cls.from_dict``) and ``diffusion_pytorch_model.safetensors``. ``weights``: "eager"
    casts while loading; "lazy" / "stream" keep the file's dtype and cast on read. ``dtype``
    None: float32 on the CPU, float16 on a GPU (``backend.default_dtype``)."""
    dtype = resolve_device_dtype(dtype, device)
    folder = Path(folder)
    config = config_cls.from_dict(
        read_config(folder / "config.json"), source=str(folder / "config.json")
    )
    path = find_weights(folder)
    if check_weights_mode(weights) != "eager":  # keep the file's dtype, cast on read
        flat = load_file(path)
        return cls(config, flat, dtype=dtype, device=device, source=str(path), weights=weights)
    return cls(config, load_file(path, dtype=dtype, device=device), source=str(path))


def sample_input(sample, model):
    """``sample`` on the model's device and dtype, checked to be (N, in_channels, H, W)."""
    cfg = model.config
    x = to_device(sample, model.device, model.dtype)
    if x.ndim != 4 or x.shape[1] != cfg.in_channels:
        raise InputError(
            f"sample: expected shape (N, {cfg.in_channels}, H, W) for in_channels="
            f"{cfg.in_channels}, got {tuple(x.shape)}"
        )
    return x
