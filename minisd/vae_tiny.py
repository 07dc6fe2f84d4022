"""AutoencoderTiny: TAESD, Ollin Boer Bohan's tiny distilled autoencoder (diffusers'
``AutoencoderTiny``), a drop-in for Stable Diffusion's VAE for fast previews and decoding.

Plain 3x3 convolutions and ReLUs, no norms, no attention. With the TAESD defaults (64 channels,
blocks (1, 3, 3, 3) / (3, 3, 3, 1), L = latent_channels = 4, factor f = 8):

    encoder  image (N, 3, H, W) in [-1, 1] -> (x + 1) / 2 -> layers.0 conv3x3 (N, 64, H, W)
             -> layers.1 block -> layers.2 conv3x3 stride 2, no bias (N, 64, H/2, W/2)
             -> 3 blocks -> ... (H/4, H/8) ... -> layers.14 conv3x3 -> latents (N, L, H/8, W/8)
    decoder  latents (N, L, h, w) -> tanh(z / 3) * 3 (a soft clamp to (-3, 3))
             -> layers.0 conv3x3 (N, 64, h, w) -> layers.1 act -> 3 blocks -> layers.5 upsample
             nearest x2 -> layers.6 conv3x3 no bias -> ... (2h, 4h, 8h) ... -> 1 block
             -> layers.18 conv3x3 (N, 3, 8h, 8w) in ~[0, 1] -> x * 2 - 1: image in ~[-1, 1]
    block    (AutoencoderTinyBlock) relu(conv.4(act(conv.2(act(conv.0(x))))) + x)

Stride-2 convolutions pad one pixel on every side, so odd sizes give ceil(H / 2). ``encode``
returns the latents themselves (diffusers' ``.latents``; no distribution, nothing to sample) and
``decode`` the image (diffusers' ``.sample``). TAESD's latents live on SD's *scaled* scale, so
``config.scaling_factor`` is 1.0 and a pipeline's ``z * scaling_factor`` changes nothing.
``latent_magnitude`` / ``latent_shift`` only map latents to [0, 1] for 8-bit storage
(``scale_latents``; ``__call__`` round-trips through it as diffusers' ``forward``).
Module and trace names are diffusers' (``encoder.layers.3.conv.2``, ``decoder.layers.5``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import blocks, ops, trace
from .backend import array_module, device_of, resolve_device_dtype, resolve_dtype
from .config import check_numbers, is_int
from .errors import ConfigError
from .vae_config import Sliced
from .weights import check_keys, find_weights, flatten, load_file, prepare_weights, read_config

ACTIVATIONS = ("relu", "silu", "swish", "gelu", "mish")  # diffusers' get_activation names


@dataclass(frozen=True)
class TinyVAEConfig:
    """diffusers' AutoencoderTiny config (config.json), with diffusers' defaults (TAESD's)."""

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple = (64, 64, 64, 64)
    decoder_block_out_channels: tuple = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple = (1, 3, 3, 3)
    num_decoder_blocks: tuple = (3, 3, 3, 1)
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    # diffusers registers force_upcast=False whatever config.json says: not a field
    force_upcast = False

    @classmethod
    def from_dict(cls, d, source="config"):
        """Build from a config.json dict; unknown keys (``block_out_channels``, which diffusers
        derives from decoder_block_out_channels, ``force_upcast``, ...) are ignored."""
        d = dict(d)
        name = d.get("_class_name", "AutoencoderTiny")
        if name != "AutoencoderTiny":
            raise ConfigError(f"{source}: _class_name={name!r}: not an AutoencoderTiny")
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k, v in kw.items():
            if isinstance(v, list):
                kw[k] = tuple(v)
        cfg = cls(**kw)
        cfg.validate(source)
        return cfg

    def validate(self, source="config"):
        ints = ("in_channels", "out_channels", "latent_channels", "upsampling_scaling_factor")
        ints += ("encoder_block_out_channels", "decoder_block_out_channels")
        floats = ("latent_magnitude", "latent_shift", "scaling_factor", "shift_factor")
        check_numbers(source, self, ints=ints, floats=floats)
        for part in ("encoder", "decoder"):
            self._check_stages(source, part)
        if str(self.act_fn).lower() not in ACTIVATIONS:
            raise ConfigError(f"{source}: act_fn={self.act_fn!r}: expected one of {ACTIVATIONS}")
        if self.upsample_fn != "nearest":
            raise ConfigError(f"{source}: upsample_fn={self.upsample_fn!r}: only 'nearest'")
        if self.latent_magnitude == 0:
            raise ConfigError(f"{source}: latent_magnitude=0: must not be zero")

    def _check_stages(self, source, part):
        ch, n = f"{part}_block_out_channels", f"num_{part}_blocks"
        channels, counts = getattr(self, ch), getattr(self, n)
        if not isinstance(channels, tuple):
            raise ConfigError(f"{source}: {ch}={channels!r}: expected a list")
        if not isinstance(counts, tuple) or not all(is_int(c) and c >= 0 for c in counts):
            raise ConfigError(f"{source}: {n}={counts!r}: expected non-negative integers")
        if len(counts) != len(channels):
            raise ConfigError(f"{source}: {n} has {len(counts)} entries, {ch} {len(channels)}")
        if len(set(channels)) != 1:  # Tiny{En,De}coder's stage convs map C_i -> C_i
            raise ConfigError(
                f"{source}: {ch}={list(channels)}: diffusers' {part} needs one channel count"
            )

    @property
    def block_out_channels(self) -> tuple:
        """As diffusers registers it (pipelines take vae_scale_factor from its length)."""
        return self.decoder_block_out_channels

    @property
    def vae_scale_factor(self) -> int:
        """2^(decoder stages - 1), as diffusers' pipelines compute it (8 for TAESD)."""
        return 2 ** (len(self.decoder_block_out_channels) - 1)


# --------------------------------------------------------------------------- layer plans


class Layer(NamedTuple):
    """One entry of an ``nn.Sequential`` ``layers``: a conv, a block, the act or an upsample."""

    kind: str  # "conv" | "block" | "act" | "up"
    cin: int = 0
    cout: int = 0
    stride: int = 1
    bias: bool = True


def encoder_plan(cfg: TinyVAEConfig) -> list:
    """EncoderTiny.layers: per stage a conv (the first 3x3, later 3x3 stride 2 without bias)
    and its blocks; then a conv to the latent channels."""
    ch, plan = cfg.encoder_block_out_channels, []
    for s, n in enumerate(cfg.num_encoder_blocks):
        cin, stride = (cfg.in_channels, 1) if s == 0 else (ch[s], 2)
        plan.append(Layer("conv", cin, ch[s], stride, bias=s == 0))
        plan += [Layer("block", ch[s], ch[s])] * n
    return plan + [Layer("conv", ch[-1], cfg.latent_channels)]


def decoder_plan(cfg: TinyVAEConfig) -> list:
    """DecoderTiny.layers: conv + act; per stage its blocks, then (except the last) an upsample,
    then a conv (bias only in the last, which maps to out_channels)."""
    ch = cfg.decoder_block_out_channels
    plan = [Layer("conv", cfg.latent_channels, ch[0]), Layer("act")]
    for s, n in enumerate(cfg.num_decoder_blocks):
        last = s == len(ch) - 1
        plan += [Layer("block", ch[s], ch[s])] * n
        plan += [] if last else [Layer("up")]
        plan.append(Layer("conv", ch[s], cfg.out_channels if last else ch[s], bias=last))
    return plan


def expected_shapes(cfg: TinyVAEConfig) -> dict:
    """{parameter name: shape} of a diffusers AutoencoderTiny checkpoint with this config."""
    s = {}

    def conv(name, cin, cout, bias=True):
        s[f"{name}.weight"] = (cout, cin, 3, 3)
        if bias:
            s[f"{name}.bias"] = (cout,)

    for part, plan in (("encoder", encoder_plan(cfg)), ("decoder", decoder_plan(cfg))):
        for i, layer in enumerate(plan):
            name = f"{part}.layers.{i}"
            if layer.kind == "conv":
                conv(name, layer.cin, layer.cout, layer.bias)
            elif layer.kind == "block":
                for j in (0, 2, 4):
                    conv(f"{name}.conv.{j}", layer.cin if j == 0 else layer.cout, layer.cout)
    return s


# --------------------------------------------------------------------------- layers


def activation(name):
    """diffusers' get_activation(name) as a function."""
    name = name.lower()
    if name == "relu":
        return relu
    if name in ("silu", "swish"):
        return ops.silu
    if name == "gelu":
        return ops.gelu  # nn.GELU(): exact erf form
    return mish


def relu(x):
    return array_module(x).maximum(x, 0)


def mish(x):
    """x * tanh(softplus(x)) (Misra 2019); logaddexp(0, x) = log(1 + e^x) without overflow."""
    xp = array_module(x)
    return x * xp.tanh(xp.logaddexp(0, x))


def tiny_block(x, p, act):
    """AutoencoderTinyBlock: relu(conv.4(act(conv.2(act(conv.0(x))))) + skip(x)), skip the
    identity (in == out channels). (N, C, H, W) -> (N, C, H, W)."""
    with trace.scope("conv"):
        h = trace.record("0", blocks.conv(x, p["conv"][0], padding=1))  # (N, C, H, W)
        h = trace.record("1", act(h))
        h = trace.record("2", blocks.conv(h, p["conv"][2], padding=1))
        # conv.1 and conv.3 are one module instance (hooked as "conv.1", last call kept)
        h = trace.record("1", act(h))
        h = trace.record("4", blocks.conv(h, p["conv"][4], padding=1))
    trace.record("conv", h)
    trace.record("skip", x)  # nn.Identity
    return trace.record("fuse", relu(h + x))  # the fuse ReLU is a ReLU whatever act_fn says


def upsample(x, k):
    """nn.Upsample(scale_factor=k, mode="nearest"). (N, C, H, W) -> (N, C, kH, kW)."""
    if k == 2:
        return ops.upsample_nearest2x(x)  # (N, C, 2H, 2W)
    xp = array_module(x)
    rows = xp.asarray(_nearest_index(x.shape[2], k))
    cols = xp.asarray(_nearest_index(x.shape[3], k))
    return x[:, :, rows][:, :, :, cols]  # (N, C, kH, kW)


def _nearest_index(n_in, k):
    """Source rows of torch's nearest upsampling by an integer ``k`` given as scale_factor:
    min(floor(dst * float32(1 / k)), n_in - 1) in float32 arithmetic, as ATen computes it."""
    dst = np.arange(n_in * k)
    if k == 1:
        return dst
    src = np.floor(dst.astype(np.float32) * np.float32(1.0 / k)).astype(np.int64)
    return np.minimum(src, n_in - 1)


def run_layers(h, p, plan, cfg: TinyVAEConfig):
    """The ``layers`` Sequential of the encoder or decoder, each output recorded as its index."""
    act = activation(cfg.act_fn)
    for i, layer in enumerate(plan):
        if layer.kind == "conv":
            h = blocks.conv(h, p[i], stride=layer.stride, padding=1)  # (N, Cout, H', W')
        elif layer.kind == "block":
            with trace.scope(str(i)):
                h = tiny_block(h, p[i], act)
        elif layer.kind == "act":
            h = act(h)
        else:
            h = upsample(h, cfg.upsampling_scaling_factor)  # (N, C, kH, kW)
        trace.record(str(i), h)
    return h


def encoder(x, p, cfg: TinyVAEConfig):
    """EncoderTiny: [-1, 1] images to [0, 1], then the layers. (N, 3, H, W) -> (N, L, h, w)."""
    h = (x + 1) / 2
    with trace.scope("layers"):
        h = run_layers(h, p["layers"], encoder_plan(cfg), cfg)  # (N, L, H/f, W/f)
    return trace.record("layers", h)


def decoder(z, p, cfg: TinyVAEConfig):
    """DecoderTiny: soft clamp tanh(z / 3) * 3, the layers, then [0, 1] to [-1, 1].
    (N, L, h, w) -> (N, 3, f h, f w)."""
    h = array_module(z).tanh(z / 3) * 3
    with trace.scope("layers"):
        h = run_layers(h, p["layers"], decoder_plan(cfg), cfg)  # (N, 3, f h, f w)
    return trace.record("layers", h) * 2 - 1


# --------------------------------------------------------------------------- model


def _read_all(p):
    """Nested params as the model reads them (through a CastOnRead's cast, if lazy)."""
    return {k: _read_all(p[k]) for k in p} if isinstance(p, dict) else p


class AutoencoderTiny(Sliced):
    """TAESD. ``AutoencoderTiny(config, params)`` or ``AutoencoderTiny.from_pretrained``; has
    the surface a pipeline uses of a VAE (config.scaling_factor, config.latent_channels,
    config.block_out_channels, needs_upcast, upcast, encode, decode, dtype, params)."""

    def __init__(
        self, config, params, *, dtype=None, device=None, source="params", weights="eager"
    ):
        """``weights``: "eager" casts now; "lazy" / "stream" cast on read (minisd/weights.py)."""
        self.config = (
            config if isinstance(config, TinyVAEConfig) else TinyVAEConfig.from_dict(config, source)
        )
        flat = flatten(params)
        check_keys(flat, expected_shapes(self.config), source)
        first = flat["encoder.layers.0.weight"]
        self.dtype = resolve_dtype(dtype) if dtype is not None else np.dtype(first.dtype)
        self.device = device or device_of(first)
        self.params = prepare_weights(flat, dtype=self.dtype, device=self.device, weights=weights)
        self.use_slicing = False

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device="cpu", *, weights="eager"):
        """Load a diffusers AutoencoderTiny folder (config.json + diffusion_pytorch_model
        .safetensors), or a pipeline folder's ``vae/``. ``dtype`` None: float32 on the CPU,
        float16 on a GPU (``backend.default_dtype``)."""
        dtype = resolve_device_dtype(dtype, device)
        folder = Path(folder)
        if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
            folder = folder / "vae"
        cfg = TinyVAEConfig.from_dict(read_config(folder / "config.json"), folder / "config.json")
        path = find_weights(folder)
        flat = load_file(path, dtype=dtype if weights == "eager" else None)
        return cls(cfg, flat, dtype=dtype, device=device, source=path, weights=weights)

    @property
    def needs_upcast(self) -> bool:
        """Always False: diffusers forces force_upcast=False for AutoencoderTiny."""
        return False

    def upcast(self, dtype="float32") -> AutoencoderTiny:
        """A decode-only copy in ``dtype`` (for a pipeline told to upcast the VAE anyway)."""
        up = copy.copy(self)
        up.dtype = resolve_dtype(dtype)
        dec = flatten({"decoder": _read_all(self.params["decoder"])})
        up.params = prepare_weights(dec, dtype=up.dtype, device=self.device)
        return up

    # ----------------------------------------------------------------- forward

    def _encode(self, x):
        with trace.scope("encoder"):
            h = encoder(x, self.params["encoder"], self.config)
        return trace.record("encoder", h)

    def _decode(self, z):
        with trace.scope("decoder"):
            out = decoder(z, self.params["decoder"], self.config)
        return trace.record("decoder", out)

    def encode(self, images):
        """images (N, 3, H, W) in [-1, 1] -> latents (N, L, ceil(H/f), ceil(W/f)), on the scale
        the UNet uses (config.scaling_factor is 1). diffusers: ``encode(x).latents``."""
        x = self._input(images, self.config.in_channels, "encode(images)")
        return self._batched(self._encode, x)

    def decode(self, latents):
        """latents (N, L, h, w) -> images (N, 3, f h, f w) in (-1, 1) roughly, as diffusers'
        ``decode(z).sample`` (not clipped)."""
        z = self._input(latents, self.config.latent_channels, "decode(latents)")
        return self._batched(self._decode, z)

    def scale_latents(self, z):
        """Raw latents -> [0, 1]: z / (2 latent_magnitude) + latent_shift, clipped."""
        xp = array_module(z)
        return xp.clip(z / (2 * self.config.latent_magnitude) + self.config.latent_shift, 0, 1)

    def unscale_latents(self, u):
        """[0, 1] -> raw latents: (u - latent_shift) * 2 latent_magnitude."""
        return (u - self.config.latent_shift) * (2 * self.config.latent_magnitude)

    def quantize_latents(self, z):
        """Latents through 8-bit storage, as diffusers' forward does: levels
        round(scale_latents(z) * 255) (half to even, as torch.round), unscaled back."""
        q = array_module(z).round(self.scale_latents(z) * 255)  # uint8 levels 0..255
        return self.unscale_latents(q / 255.0)

    def __call__(self, images):
        """Reconstruct as diffusers' forward: encode, quantize_latents, decode."""
        return self.decode(self.quantize_latents(self.encode(images)))
