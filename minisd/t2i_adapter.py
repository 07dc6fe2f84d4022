"""T2I-Adapter (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable
Ability for Text-to-Image Diffusion Models", arXiv:2302.08453), as diffusers'
``models/adapter.py`` computes it (``T2IAdapter``, ``MultiAdapter``), for SD1.x / SD2.x and
SDXL UNets.

An adapter is a small convolutional network that turns a condition image (sketch, depth, pose,
color palette, ...) into one feature map per UNet down block, computed once per generation and
added inside the UNet's encoder (``down_intrablock_additional_residuals``, minisd/unet.py):

    x = pixel_unshuffle(image, f)          (N, Cin, fH, fW) -> (N, Cin f^2, H, W), f = 8 / 16
    full_adapter:  x = conv_in(x) (3x3, -> C0); body.0 (C0 -> C0), body.i (C_i-1 -> C_i, an
                   average pool 2x2 first; a 1x1 in_conv where the channels change)
    light_adapter: body.0 (Cin f^2 -> C0), body.i (C_i-1 -> C_i, pooled first), one more
                   pooled block (C_last -> C_last); each block in_conv (1x1, -> C/4), resnets,
                   out_conv (1x1, -> C)
    full_adapter_xl (SDXL, FullAdapterXL; f = 16 in its checkpoints): x = conv_in(x) (3x3,
                   -> C0); body.0 (C0 -> C0), body.1 (C0 -> C1), body.2 (C1 -> C2, pooled
                   first), body.i (C_i -> C_i) for i >= 3: one pooled block only
    features = [body.0(x), body.1(body.0(x)), ...]

A full block's resnets are AdapterResnetBlocks, x + block2(relu(block1(x))) with block1 3x3 and
block2 1x1; a light block's are LightAdapterResnetBlocks, the same with both convs 3x3. The
average pool is ``nn.AvgPool2d(2, 2, ceil_mode=True)``: odd sizes give ceil(H / 2), like the
UNet's stride-2 downsamplers, so feature i has the shape of the UNet's down block i output.
SD checkpoints: full (TencentARC/t2iadapter_*_sd14v1, *_sd15v2) channels (320, 640, 1280, 1280),
2 resnets per block; light (t2iadapter_color_sd14v1) channels (320, 640, 1280), 4 resnets.
SDXL checkpoints (TencentARC/t2i-adapter-{canny,sketch,lineart,depth-midas,openpose}-sdxl-1.0):
full_adapter_xl, channels (320, 640, 1280, 1280), 2 resnets, downscale_factor 16; features at
1/16, 1/16, 1/32, 1/32 of the image: SDXL's three down blocks (DownBlock2D's output after its
downsampler, the CrossAttnDownBlock2Ds' last layers) and, the fourth, the mid block's output
(minisd/unet.py). diffusers' FullAdapterXL builds body.i (i >= 3) as C_i -> C_i while it takes
C_i-1 channels, so it runs only where C_i-1 = C_i; other channel lists are refused at load.

Traced names (``minisd.trace()``): diffusers' module paths, ``adapter`` (its first feature),
``adapter.unshuffle``, ``adapter.conv_in``, ``adapter.body.i(.downsample/.in_conv/.resnets
(.j(.block1/.block2))/.out_conv)``; in a :class:`MultiAdapter`, prefixed ``adapters.k.``.
Not recorded: the parameter-free ReLU modules (``act``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import trace
from .backend import array_module, device_of, to_device
from .blocks import conv
from .config import check_numbers, is_number
from .errors import ConfigError, InputError
from .unet_blocks import conv_shapes, prefixed
from .unet_config import load_pretrained, parse_config, prepare_params
from .vae_tiny import relu

__all__ = ["MultiAdapter", "T2IAdapter", "T2IAdapterConfig", "param_shapes"]

_rec = trace.record
ADAPTER_TYPES = ("full_adapter", "light_adapter", "full_adapter_xl")


@dataclass(frozen=True)
class T2IAdapterConfig:
    """diffusers' T2IAdapter config.json (its ``__init__`` arguments), diffusers' defaults."""

    in_channels: int = 3
    channels: tuple = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"
    source: str = dataclasses.field(default="config", compare=False, repr=False)

    @classmethod
    def from_dict(cls, d, source="config"):
        name = d.get("_class_name", "T2IAdapter") if isinstance(d, dict) else "T2IAdapter"
        if name != "T2IAdapter":
            raise ConfigError(f"{source}: _class_name={name!r}: not a T2IAdapter")
        return parse_config(cls, d, must_be_default={}, ignored=set(), source=source)

    def __post_init__(self):
        if self.adapter_type not in ADAPTER_TYPES:
            raise ConfigError(
                f"{self.source}: adapter_type={self.adapter_type!r}: expected one of "
                f"{', '.join(map(repr, ADAPTER_TYPES))}"
            )
        if not isinstance(self.channels, tuple) or not self.channels:
            raise ConfigError(f"{self.source}: channels={self.channels!r}: expected a list")
        ints = ("in_channels", "channels", "num_res_blocks", "downscale_factor")
        check_numbers(self.source, self, ints=ints)
        if self.light and min(self.channels) < 4:  # a light block works at C // 4 channels
            raise ConfigError(f"{self.source}: channels={list(self.channels)}: light_adapter "
                              "channels must be at least 4")  # fmt: skip
        c = self.channels
        bad = [i for i in range(3, len(c)) if c[i] != c[i - 1]] if self.xl else []
        if bad:  # diffusers' FullAdapterXL: body.i is C_i -> C_i with no in_conv for i >= 3
            raise ConfigError(
                f"{self.source}: channels={list(c)}: full_adapter_xl blocks from the fourth on "
                f"keep their input's channels (channels[{bad[0]}] must equal "
                f"channels[{bad[0] - 1}])"
            )

    @property
    def light(self) -> bool:
        return self.adapter_type == "light_adapter"

    @property
    def xl(self) -> bool:
        return self.adapter_type == "full_adapter_xl"

    @property
    def total_downscale_factor(self) -> int:
        """Image size / size of the last feature: f * 2 per pooled block (diffusers' name;
        full_adapter_xl: f * 2, diffusers' number, even with fewer than 3 blocks)."""
        if self.xl:
            return self.downscale_factor * 2
        return self.downscale_factor * 2 ** (len(self.body()) - 1)

    def body(self) -> list:
        """(in channels, out channels, pooled first) of each body block."""
        c = self.channels
        if self.xl:  # FullAdapterXL: only body.2 is pooled
            return [(c[0], c[0], False)] + [(c[i - 1], c[i], i == 2) for i in range(1, len(c))]
        if self.light:
            first = self.in_channels * self.downscale_factor**2
            pairs = [(c[i], c[i + 1]) for i in range(len(c) - 1)] + [(c[-1], c[-1])]
            return [(first, c[0], False)] + [(a, b, True) for a, b in pairs]
        return [(c[0], c[0], False)] + [(c[i - 1], c[i], True) for i in range(1, len(c))]

    def features(self) -> list:
        """(channels, image size / feature size) of each feature (sizes rounded up)."""
        out, f = [], self.downscale_factor
        for _, cout, down in self.body():
            f *= 2 if down else 1
            out.append((cout, f))
        return out


def param_shapes(cfg: T2IAdapterConfig) -> dict:
    """{checkpoint key: shape} of every parameter of the adapter ``cfg`` describes."""
    k = 3 if cfg.light else 1  # block2: 3x3 in light resnets, 1x1 in full ones
    s = {}
    if not cfg.light:
        cin = cfg.in_channels * cfg.downscale_factor**2
        s.update(prefixed("adapter.conv_in", conv_shapes(cfg.channels[0], cin, 3)))
    for i, (cin, cout, _) in enumerate(cfg.body()):
        width = cout // 4 if cfg.light else cout  # the resnets' channels
        b = {}
        if cfg.light or cin != cout:
            b.update(prefixed("in_conv", conv_shapes(width, cin, 1)))
        for j in range(cfg.num_res_blocks):
            b.update(prefixed(f"resnets.{j}.block1", conv_shapes(width, width, 3)))
            b.update(prefixed(f"resnets.{j}.block2", conv_shapes(width, width, k)))
        if cfg.light:
            b.update(prefixed("out_conv", conv_shapes(cout, width, 1)))
        s.update(prefixed(f"adapter.body.{i}", b))
    return s


# --------------------------------------------------------------------------- layers


def pixel_unshuffle(x, f):
    """nn.PixelUnshuffle(f): each f x f patch becomes f^2 channels; output channel
    c f^2 + i f + j holds pixel (f y + i, f x + j) of input channel c.
    (N, C, fH, fW) -> (N, C f^2, H, W)."""
    n, c, hf, wf = x.shape
    h, w = hf // f, wf // f
    x = x.reshape(n, c, h, f, w, f)  # (N, C, H, f, W, f)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # (N, C, f, f, H, W)
    return x.reshape(n, c * f * f, h, w)  # (N, C f^2, H, W), a copy


def avg_pool_2x2(x):
    """nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True): the mean of each 2x2 window.
    At an odd edge the window is cut and torch divides by the pixels inside it; repeating the
    edge row / column gives the same mean. (N, C, H, W) -> (N, C, ceil(H/2), ceil(W/2))."""
    xp = array_module(x)
    if x.shape[2] % 2:
        x = xp.concatenate([x, x[:, :, -1:]], axis=2)  # (N, C, H + 1, W)
    if x.shape[3] % 2:
        x = xp.concatenate([x, x[:, :, :, -1:]], axis=3)  # (N, C, H', W + 1)
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))  # (N, C, H'/2, W'/2)


def resnet(x, p, *, light):
    """AdapterResnetBlock (block2 1x1) / LightAdapterResnetBlock (block2 3x3):
    x + block2(relu(block1(x))). Shape preserved."""
    h = relu(_rec("block1", conv(x, p["block1"], padding=1)))
    return x + _rec("block2", conv(h, p["block2"], padding=1 if light else 0))


def adapter_block(x, p, *, down, light):
    """AdapterBlock / LightAdapterBlock: [avg pool 2x2] -> [in_conv 1x1] -> resnets ->
    [out_conv 1x1] (light blocks have both convs, full ones an in_conv where the channels
    change). (N, Cin, H, W) -> (N, Cout, H', W'), H' = ceil(H / 2) if ``down``."""
    if down:
        x = _rec("downsample", avg_pool_2x2(x))  # (N, Cin, ceil(H/2), ceil(W/2))
    if "in_conv" in p:
        x = _rec("in_conv", conv(x, p["in_conv"]))  # (N, C, H', W')
    with trace.scope("resnets"):
        for j in range(len(p["resnets"])):
            with trace.scope(str(j)):
                x = resnet(x, p["resnets"][j], light=light)
            _rec(str(j), x)
    _rec("resnets", x)
    if "out_conv" in p:
        x = _rec("out_conv", conv(x, p["out_conv"]))  # (N, Cout, H', W')
    return x


def adapter_features(image, p, cfg: T2IAdapterConfig):
    """FullAdapter / LightAdapter forward: the feature after each body block.
    image (N, Cin, fH, fW) -> [(N, C_i, H_i, W_i)], H_0 = H, H_i+1 = ceil(H_i / 2)."""
    x = _rec("unshuffle", pixel_unshuffle(image, cfg.downscale_factor))  # (N, Cin f^2, H, W)
    if not cfg.light:
        x = _rec("conv_in", conv(x, p["conv_in"], padding=1))  # (N, C0, H, W)
    features = []
    for i, (_, _, down) in enumerate(cfg.body()):
        with trace.scope(f"body.{i}"):
            x = adapter_block(x, p["body"][i], down=down, light=cfg.light)  # (N, C_i, H_i, W_i)
        features.append(_rec(f"body.{i}", x))
    return features


# --------------------------------------------------------------------------- models


class T2IAdapter:
    """A T2I-Adapter. ``adapter(image)`` -> list of feature maps, one per UNet down block.

    Build it with :meth:`from_pretrained` (a diffusers T2IAdapter folder) or from a config
    dict and flat (``"adapter.body.0.resnets.0.block1.weight"``) or nested params.
    """

    def __init__(
        self, config, params, *, dtype=None, device=None, source="params", weights="eager"
    ):
        if not isinstance(config, T2IAdapterConfig):
            config = T2IAdapterConfig.from_dict(config, source=f"{source} (config)")
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
    def from_pretrained(cls, folder, dtype=None, device="cpu", *, weights="eager"):
        """Load diffusers' ``config.json`` (``_class_name`` "T2IAdapter") and
        ``diffusion_pytorch_model.safetensors``. ``dtype`` None: float32 on the CPU, float16
        on a GPU; ``weights``: "eager" | "lazy" | "stream" (minisd/weights.py)."""
        return load_pretrained(
            cls, T2IAdapterConfig, folder, dtype=dtype, device=device, weights=weights
        )

    def _first_param(self):
        return self.params["adapter"]["body"][0]["resnets"][0]["block1"]["weight"]

    @property
    def dtype(self):
        return self._first_param().dtype

    @property
    def device(self):
        return device_of(self._first_param())

    @property
    def downscale_factor(self) -> int:
        """The pixel unshuffle's factor: image sides must be multiples of it."""
        return self.config.downscale_factor

    @property
    def total_downscale_factor(self) -> int:
        return self.config.total_downscale_factor

    def _input(self, image):
        x = to_device(image, self.device, self.dtype)
        c, f = self.config.in_channels, self.downscale_factor
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % f or x.shape[3] % f:
            raise InputError(
                f"image: expected shape (N, {c}, H, W) with H and W multiples of "
                f"downscale_factor={f} (in_channels={c}), got {tuple(x.shape)}"
            )
        return x

    def __call__(self, image):
        """image (N, in_channels, H, W), the condition image in [0, 1] (H, W multiples of
        ``downscale_factor``) -> [feature i (N, C_i, H / s_i, W / s_i), sizes rounded up;
        s_i = downscale_factor * 2^(pooled blocks up to i), see ``config.features()``], as
        diffusers' ``T2IAdapter.forward``."""
        x = self._input(image)
        with trace.scope("adapter"):
            features = adapter_features(x, self.params["adapter"], self.config)
        _rec("adapter", features[0])
        return features


def _sizes(a):
    cfg = a.config
    return cfg.downscale_factor, cfg.total_downscale_factor, [c for _, c, _ in cfg.body()]


def float32_weight(w) -> float:
    """A MultiAdapter weight as diffusers uses it: ``torch.tensor(adapter_weights)`` holds
    float32 values whatever the model dtype (a precision island in float64 runs)."""
    return float(np.float32(w))


class MultiAdapter:
    """diffusers' MultiAdapter: several adapters whose features are summed with weights,
    ``sum_k w_k adapter_k(image_k)`` scale by scale. The adapters must downscale alike (same
    ``downscale_factor`` and ``total_downscale_factor``). Unlike diffusers, one adapter is
    allowed (its weighted features)."""

    def __init__(self, adapters):
        self.adapters = list(adapters)
        if not self.adapters or not all(isinstance(a, T2IAdapter) for a in self.adapters):
            raise InputError("adapters: expected a non-empty list of T2IAdapters")
        sizes = [_sizes(a) for a in self.adapters]
        for k, s in enumerate(sizes[1:], 1):
            if s != sizes[0]:
                raise InputError(
                    f"adapters[{k}]: (downscale_factor, total_downscale_factor, feature "
                    f"channels) = {s}, adapters[0] has {sizes[0]}: summed features need the "
                    "same shapes"
                )

    @property
    def downscale_factor(self) -> int:
        return self.adapters[0].downscale_factor

    @property
    def total_downscale_factor(self) -> int:
        return self.adapters[0].total_downscale_factor

    def __call__(self, images, adapter_weights=None):
        """images: one (N, in_channels_k, H, W) array per adapter (a list, or stacked on a
        first axis, as diffusers iterates ``xs``); adapter_weights: one number per adapter
        (None: 1 / n each), rounded to float32 as diffusers. -> summed features."""
        n = len(self.adapters)
        images = list(images)  # an array: its first axis
        weights = [1.0 / n] * n if adapter_weights is None else list(adapter_weights)
        if len(images) != n or len(weights) != n:
            raise InputError(
                f"MultiAdapter of {n} adapters: got {len(images)} images and {len(weights)} "
                "adapter_weights (one each per adapter)"
            )
        total = None
        for k, (a, img, w) in enumerate(zip(self.adapters, images, weights)):
            if not is_number(w):
                raise InputError(f"adapter_weights[{k}]={w!r}: expected a finite number")
            with trace.scope(f"adapters.{k}"):
                feats = a(img)
            _rec(f"adapters.{k}", feats[0])
            w = float32_weight(w)
            if total is None:
                total = [w * f for f in feats]
            else:
                total = [t + w * f for t, f in zip(total, feats)]
        return total
