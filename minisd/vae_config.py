"""AutoencoderKL's config (diffusers' config.json) and checkpoint layout: the {key: shape} table a
diffusers VAE file must match, and the fix-ups of older VAE files. Used by :mod:`minisd.vae`,
which re-exports every name here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .backend import array_module, to_device
from .config import check_divides, check_numbers
from .errors import ConfigError, InputError, WeightsError


@dataclass(frozen=True)
class VAEConfig:
    """diffusers' AutoencoderKL config (config.json), with diffusers' defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple | None = None
    latents_std: tuple | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d, source="config"):
        """Build from a config.json dict; unknown keys (``_class_name``, ...) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in dict(d).items() if k in known}
        for k in ("down_block_types", "up_block_types", "block_out_channels"):
            if k in kw:
                kw[k] = tuple(kw[k])
        for k in ("latents_mean", "latents_std"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        if isinstance(kw.get("sample_size"), (list, tuple)):  # diffusers tiles with the first
            kw["sample_size"] = int(kw["sample_size"][0])
        cfg = cls(**kw)
        cfg.validate(source)
        return cfg

    def validate(self, source="config"):
        ints = ("in_channels", "out_channels", "block_out_channels", "layers_per_block")
        ints += ("latent_channels", "norm_num_groups", "sample_size")
        floats = ("scaling_factor", "shift_factor")
        check_numbers(source, self, ints=ints, floats=floats, optional=("shift_factor",))
        n = len(self.block_out_channels)
        for key, kind in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            types = getattr(self, key)
            if len(types) != n:
                raise ConfigError(f"{source}: {key} has {len(types)} entries, expected {n}")
            if any(t != kind for t in types):
                raise ConfigError(f"{source}: {key}={list(types)}: only {kind} is supported")
        if self.act_fn not in ("silu", "swish"):
            raise ConfigError(f"{source}: act_fn={self.act_fn!r}: only 'silu' is supported")
        c = self.block_out_channels
        check_divides(source, "norm_num_groups", self.norm_num_groups, "block_out_channels", c)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along each axis: 2^(number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)


# --------------------------------------------------------------------------- expected keys


def expected_shapes(cfg: VAEConfig) -> dict:
    """{parameter name: shape} of a diffusers AutoencoderKL checkpoint with this config."""
    s = {}

    def conv(name, cin, cout, k=3):
        s[f"{name}.weight"], s[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        s[f"{name}.weight"], s[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.conv_shortcut", cin, cout, 1)

    def mid(name, c):
        resnet(f"{name}.resnets.0", c, c)
        if cfg.mid_block_add_attention:
            norm(f"{name}.attentions.0.group_norm", c)
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                s[f"{name}.attentions.0.{proj}.weight"] = (c, c)
                s[f"{name}.attentions.0.{proj}.bias"] = (c,)
        resnet(f"{name}.resnets.1", c, c)

    ch, n, layers = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
    conv("encoder.conv_in", cfg.in_channels, ch[0])
    for i in range(n):
        cin = ch[max(i - 1, 0)]
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else ch[i], ch[i])
        if i < n - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", ch[i], ch[i])
    mid("encoder.mid_block", ch[-1])
    norm("encoder.conv_norm_out", ch[-1])
    conv("encoder.conv_out", ch[-1], 2 * cfg.latent_channels)
    rev = ch[::-1]
    conv("decoder.conv_in", cfg.latent_channels, rev[0])
    mid("decoder.mid_block", rev[0])
    for i in range(n):
        cin = rev[max(i - 1, 0)]
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else rev[i], rev[i])
        if i < n - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", rev[i], rev[i])
    norm("decoder.conv_norm_out", ch[0])
    conv("decoder.conv_out", ch[0], cfg.out_channels)
    if cfg.use_quant_conv:
        conv("quant_conv", 2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
    if cfg.use_post_quant_conv:
        conv("post_quant_conv", cfg.latent_channels, cfg.latent_channels, 1)
    return s


_ATTN_PROJ = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


def fix_legacy_keys(flat: dict) -> dict:
    """Older VAE files: ``query/key/value/proj_attn`` names (renamed by weights_tools.keymaps)
    and attention projections stored as 1x1 conv kernels (out, in, 1, 1) or (out, in, 1).
    The kernels become (out, in) matrices, as diffusers' single-file converter
    (``conv_attn_to_linear``) does; a squeeze is the same numbers."""
    from weights_tools.keymaps import rename_legacy_vae_attention

    out = rename_legacy_vae_attention(flat)
    for name, w in out.items():
        if ".attentions." in name and name.endswith(_ATTN_PROJ) and w.ndim > 2:
            if any(d != 1 for d in w.shape[2:]):
                raise WeightsError(f"key {name!r}: attention kernel {w.shape} is not 1x1")
            out[name] = w.reshape(w.shape[:2])  # (out, in)
    return out


class Sliced:
    """What AutoencoderKL and AutoencoderTiny share: the input check and batch slicing (one
    image at a time: lower peak memory, the same result)."""

    use_slicing = False

    def enable_slicing(self):
        """Run a batch one image at a time (lower peak memory, same result)."""
        self.use_slicing = True

    def disable_slicing(self):
        self.use_slicing = False

    def _input(self, x, channels, what):
        x = to_device(x, self.device, self.dtype)
        if x.ndim != 4 or x.shape[1] != channels:
            raise InputError(f"{what}: expected shape (N, {channels}, H, W), got {x.shape}")
        return x

    def _batched(self, fn, x):
        """fn(x), or fn on each image of x concatenated back when slicing is on."""
        if self.use_slicing and x.shape[0] > 1:
            return array_module(x).concatenate([fn(x[i : i + 1]) for i in range(x.shape[0])])
        return fn(x)
