"""AutoencoderKL: the KL-regularized autoencoder of latent diffusion (Rombach et al. 2022, sec. 3).

    image (N, 3, H, W) in [-1, 1] --encoder--> moments (N, 2L, H/f, W/f) --quant_conv-->
    DiagonalGaussian(mean, logvar) --sample / mode--> z (N, L, H/f, W/f)
    z --post_quant_conv--> --decoder--> image (N, 3, H, W)

with f = 2^(len(block_out_channels) - 1) (8 for Stable Diffusion) and L = latent_channels (4).
Module and parameter names are diffusers' (``encoder.down_blocks.0.resnets.1.conv2.weight``), as
are the names ``minisd.trace()`` records (``decoder.up_blocks.2``, ``quant_conv``, ...).

The diffusion model works on *scaled* latents ``z * scaling_factor`` (sec. 4.3.2 / D.1 of the
paper). ``encode`` and ``decode`` do not scale: as in diffusers, the caller multiplies after
sampling and divides before decoding.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from . import blocks, trace, vae_tiling
from .backend import array_module, device_of, resolve_device_dtype, resolve_dtype
from .errors import InputError
from .rng import standard_normal
from .vae_config import (  # noqa: F401
    _ATTN_PROJ,
    Sliced,
    VAEConfig,
    expected_shapes,
    fix_legacy_keys,
)
from .weights import (
    check_keys,
    find_weights,
    flatten,
    load_file,
    prepare_weights,
    read_config,
)

# Largest attention score block (elements) of the mid-block attention: queries are processed in
# chunks so that a 2048^2 decode (65536 tokens) never builds a 65536 x 65536 matrix.
ATTENTION_SCORES_LIMIT = 1 << 24
EPS = 1e-6  # every GroupNorm of the VAE (resnets, attention, conv_norm_out) uses eps = 1e-6


# --------------------------------------------------------------------------- layers


def _attention_chunk(tokens: int) -> int | None:
    """Query rows per chunk so a score block stays under ATTENTION_SCORES_LIMIT elements."""
    return None if tokens * tokens <= ATTENTION_SCORES_LIMIT else ATTENTION_SCORES_LIMIT // tokens


def _resnet(name, h, p, groups):
    """ResnetBlock2D ``name`` without a time embedding (temb_channels=None in the VAE)."""
    with trace.scope(name):
        h = blocks.resnet_block(h, None, p, groups=groups, eps=EPS)
    return trace.record(name, h)


def mid_block(h, p, cfg: VAEConfig):
    """UNetMidBlock2D: ResNet, single-head self-attention with GroupNorm and a residual
    (Attention(heads=1, dim_head=C, upcast_softmax=True)), ResNet. (N, C, h, w) -> same."""
    g = cfg.norm_num_groups
    h = _resnet("resnets.0", h, p["resnets"][0], g)
    if cfg.mid_block_add_attention:
        chunk = _attention_chunk(h.shape[2] * h.shape[3])
        with trace.scope("attentions.0"):
            h = blocks.attention(
                h, p["attentions"][0], heads=1, groups=g, eps=EPS, residual=True, chunk_size=chunk
            )  # upcast_softmax: ops.attention already scores float16 inputs in float32
        trace.record("attentions.0", h)
    return _resnet("resnets.1", h, p["resnets"][1], g)


def _out(h, p, groups):
    """conv_norm_out -> conv_act (SiLU) -> conv_out, shared by encoder and decoder."""
    h = blocks.gn_silu(h, p["conv_norm_out"], "conv_norm_out", groups=groups, eps=EPS)
    h = trace.record("conv_act", h)  # silu(conv_norm_out(h))
    return trace.record("conv_out", blocks.conv(h, p["conv_out"], padding=1))  # (N, Cout, H, W)


def encoder(x, p, cfg: VAEConfig):
    """diffusers' Encoder (double_z=True). (N, 3, H, W) -> moments (N, 2L, H/f, W/f)."""
    g = cfg.norm_num_groups
    h = trace.record("conv_in", blocks.conv(x, p["conv_in"], padding=1))  # (N, C0, H, W)
    for i in range(len(cfg.block_out_channels)):  # DownEncoderBlock2D
        pb, name = p["down_blocks"][i], f"down_blocks.{i}"
        with trace.scope(name):
            for j in range(cfg.layers_per_block):
                h = _resnet(f"resnets.{j}", h, pb["resnets"][j], g)  # (N, Ci, ., .)
            if "downsamplers" in pb:  # 3x3 stride 2 after padding right/bottom by one
                with trace.scope("downsamplers.0"):
                    h = blocks.downsample(h, pb["downsamplers"][0], padding=0)  # (N, Ci, h', w')
                trace.record("downsamplers.0", h)
        trace.record(name, h)
    with trace.scope("mid_block"):
        h = mid_block(h, p["mid_block"], cfg)
    trace.record("mid_block", h)
    return _out(h, p, g)  # (N, 2L, H/f, W/f)


def decoder(z, p, cfg: VAEConfig):
    """diffusers' Decoder (norm_type="group"). (N, L, h, w) -> (N, 3, f h, f w)."""
    g = cfg.norm_num_groups
    h = trace.record("conv_in", blocks.conv(z, p["conv_in"], padding=1))  # (N, C_last, h, w)
    with trace.scope("mid_block"):
        h = mid_block(h, p["mid_block"], cfg)
    trace.record("mid_block", h)
    for i in range(len(cfg.block_out_channels)):  # UpDecoderBlock2D
        pb, name = p["up_blocks"][i], f"up_blocks.{i}"
        with trace.scope(name):
            for j in range(cfg.layers_per_block + 1):
                h = _resnet(f"resnets.{j}", h, pb["resnets"][j], g)  # (N, Ci, ., .)
            if "upsamplers" in pb:  # nearest 2x, then a 3x3 conv
                with trace.scope("upsamplers.0"):
                    h = blocks.upsample(h, pb["upsamplers"][0])  # (N, Ci, 2h, 2w)
                trace.record("upsamplers.0", h)
        trace.record(name, h)
    return _out(h, p, g)  # (N, 3, H, W)


# --------------------------------------------------------------------------- distribution


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) from encoder moments (N, 2L, h, w), as diffusers'
    DiagonalGaussianDistribution: the first L channels are the mean, the last L the log
    variance, clamped to [-30, 20]; std = exp(logvar / 2), var = exp(logvar)."""

    def __init__(self, moments, deterministic=False):
        xp = array_module(moments)
        self.parameters = moments
        c = moments.shape[1] // 2
        self.mean = moments[:, :c]  # (N, L, h, w)
        self.logvar = xp.clip(moments[:, c:], -30.0, 20.0)  # (N, L, h, w)
        self.deterministic = deterministic
        self.std = xp.exp(0.5 * self.logvar)
        self.var = xp.exp(self.logvar)
        if deterministic:
            self.std = xp.zeros_like(self.mean)
            self.var = xp.zeros_like(self.mean)

    def sample(self, rng=None, noise=None):
        """mean + std * noise. ``noise`` (same shape as mean) is used as given; otherwise it is
        drawn from ``rng`` in the moments' dtype: an int seed or numpy Generator (numpy's
        normal), or an object with ``standard_normal(shape, dtype=)`` such as
        minisd.rng.TorchGenerator (then the numbers are torch.randn's, as diffusers draws)."""
        xp = array_module(self.mean)
        if noise is None:
            noise = standard_normal(rng, self.mean.shape, self.mean.dtype)
        noise = xp.asarray(noise).astype(self.mean.dtype, copy=False)
        if noise.shape != self.mean.shape:
            raise InputError(f"noise: shape {noise.shape}, expected {self.mean.shape}")
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def kl(self, other=None):
        """KL(self || other), other = N(0, I) by default; summed over (L, h, w) -> (N,)."""
        if other is None:
            t = self.mean**2 + self.var - 1.0 - self.logvar
        else:
            t = (self.mean - other.mean) ** 2 / other.var + self.var / other.var
            t = t - 1.0 - self.logvar + other.logvar
        return 0.5 * t.sum(axis=(1, 2, 3))  # (N,)

    def nll(self, sample, dims=(1, 2, 3)):
        """Negative log-likelihood of ``sample``, summed over ``dims``."""
        t = np.log(2.0 * np.pi) + self.logvar + (sample - self.mean) ** 2 / self.var
        return 0.5 * t.sum(axis=tuple(dims))


# --------------------------------------------------------------------------- model


def _cast_tree(p, dtype):
    """Nested params with every array cast to ``dtype`` (arrays already in it are shared)."""
    if isinstance(p, dict):
        return {k: _cast_tree(v, dtype) for k, v in p.items()}
    return p.astype(dtype, copy=False)


class AutoencoderKL(Sliced):
    """The Stable Diffusion VAE. ``AutoencoderKL(config, params)`` or ``from_pretrained``."""

    def __init__(
        self, config, params, *, dtype=None, device=None, source="params", weights="eager"
    ):
        """``weights``: "eager" casts now; "lazy" / "stream" keep the stored dtype and cast on
        read (weights.CastOnRead; the memory policy is described in minisd/weights.py)."""
        self.config = (
            config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config, source)
        )
        flat = fix_legacy_keys(flatten(params))
        check_keys(flat, expected_shapes(self.config), source)
        first = flat["encoder.conv_in.weight"]
        self.dtype = resolve_dtype(dtype) if dtype is not None else np.dtype(first.dtype)
        self.device = device or device_of(first)
        self.params = prepare_weights(flat, dtype=self.dtype, device=self.device, weights=weights)
        self.use_tiling = False
        self.use_slicing = False
        self.tile_sample_min_size = self.config.sample_size
        self.tile_overlap_factor = 0.25

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device="cpu", *, weights="eager"):
        """Load a diffusers ``vae/`` folder (config.json + diffusion_pytorch_model.safetensors);
        a pipeline folder with a ``vae/`` subfolder also works. ``weights``: see __init__.
        ``dtype`` None: float32 on the CPU, float16 on a GPU (``backend.default_dtype``)."""
        dtype = resolve_device_dtype(dtype, device)
        folder = Path(folder)
        if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
            folder = folder / "vae"
        cfg = VAEConfig.from_dict(read_config(folder / "config.json"), folder / "config.json")
        path = find_weights(folder)
        flat = load_file(path, dtype=dtype if weights == "eager" else None)
        return cls(cfg, flat, dtype=dtype, device=device, source=path, weights=weights)

    @property
    def needs_upcast(self) -> bool:
        """True for a float16 VAE whose config sets ``force_upcast``: decode it in float32 (the
        rule of diffusers' SDXL pipelines; its SD pipelines decode in the model dtype)."""
        return self.dtype == np.float16 and bool(self.config.force_upcast)

    def upcast(self, dtype="float32", *, encoder=False) -> AutoencoderKL:
        """A decode-only copy in ``dtype`` (float32): the decoder and post_quant_conv weights are
        cast (a transient copy, ~200 MB for SD's VAE in float32); options are shared.
        ``encoder``: an encode-only copy instead (encoder and quant_conv)."""
        up = copy.copy(self)
        up.dtype = resolve_dtype(dtype)
        parts = ("encoder", "quant_conv") if encoder else ("decoder", "post_quant_conv")
        up.params = {k: _cast_tree(v, up.dtype) for k, v in self.params.items() if k in parts}
        return up

    @property
    def tile_latent_min_size(self) -> int:
        return int(self.tile_sample_min_size / self.config.vae_scale_factor)

    # ----------------------------------------------------------------- options

    def enable_tiling(self, tile_sample_size=None, overlap_factor=0.25):
        """Encode / decode large inputs tile by tile (see vae_tiling.py): tiles of
        ``tile_sample_size`` pixels (default config.sample_size, as diffusers)."""
        self.use_tiling = True
        if tile_sample_size is not None:
            self.tile_sample_min_size = int(tile_sample_size)
        self.tile_overlap_factor = float(overlap_factor)

    def disable_tiling(self):
        self.use_tiling = False

    # ----------------------------------------------------------------- forward

    def _moments(self, x):
        """Encoder + quant_conv for one batch. (N, 3, H, W) -> (N, 2L, h, w)."""
        if self.use_tiling and max(x.shape[2:]) > self.tile_sample_min_size:
            return vae_tiling.tiled_moments(self, x)
        return self._moments_whole(x)

    def _moments_whole(self, x):
        """Encoder + quant_conv in one piece (or of one tile), recorded under their names."""
        with trace.scope("encoder"):
            h = encoder(x, self.params["encoder"], self.config)
        trace.record("encoder", h)
        if self.config.use_quant_conv:
            h = trace.record("quant_conv", blocks.conv(h, self.params["quant_conv"]))
        return h

    def encode(self, images) -> DiagonalGaussian:
        """images (N, 3, H, W) in [-1, 1] -> DiagonalGaussian over latents (N, L, h, w)."""
        x = self._input(images, self.config.in_channels, "encode(images)")
        f = self.config.vae_scale_factor  # each downsampler halves, and needs 2 pixels or more
        if min(x.shape[2:]) < f:
            raise InputError(f"encode(images): {x.shape[2]}x{x.shape[3]} pixels; needs >= {f}")
        return DiagonalGaussian(self._batched(self._moments, x))

    def _decode(self, z):
        if self.use_tiling and max(z.shape[2:]) > self.tile_latent_min_size:
            return vae_tiling.tiled_decode(self, z)
        return self._decode_whole(z)

    def _decode_whole(self, z):
        """post_quant_conv + decoder in one piece (or of one tile), recorded under their names
        (the last tile's outputs are what a trace keeps, as forward hooks would)."""
        if self.config.use_post_quant_conv:
            z = trace.record("post_quant_conv", blocks.conv(z, self.params["post_quant_conv"]))
        with trace.scope("decoder"):
            out = decoder(z, self.params["decoder"], self.config)
        return trace.record("decoder", out)

    def decode(self, latents):
        """latents (N, L, h, w), NOT scaled (divide by config.scaling_factor first) ->
        images (N, 3, f h, f w), roughly in [-1, 1]."""
        z = self._input(latents, self.config.latent_channels, "decode(latents)")
        return self._batched(self._decode, z)

    # ----------------------------------------------------------------- tiling

    def tiled_encode(self, images) -> DiagonalGaussian:
        """Encode tile by tile whatever the image size (see vae_tiling.py for the seams)."""
        x = self._input(images, self.config.in_channels, "tiled_encode(images)")
        return DiagonalGaussian(vae_tiling.tiled_moments(self, x))

    def tiled_decode(self, latents):
        """Decode tile by tile whatever the latent size: bounded memory for large images."""
        z = self._input(latents, self.config.latent_channels, "tiled_decode(latents)")
        return vae_tiling.tiled_decode(self, z)

    def __call__(self, images, sample_posterior=False, rng=None):
        """Reconstruct: decode(encode(images).mode()), or a posterior sample."""
        dist = self.encode(images)
        z = dist.sample(rng) if sample_posterior else dist.mode()
        return self.decode(z)
