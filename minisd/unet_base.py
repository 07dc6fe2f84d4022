"""What the text-conditioned UNet and its ControlNet copy share as model objects: building from
a config and checked params, loading a diffusers folder, dtype / device, the block options and
the LCM guidance embedding input (``timestep_cond``)."""

from __future__ import annotations

import dataclasses

from .backend import array_module, device_of, to_device
from .errors import InputError
from .unet_blocks import (
    BlockOpts,
    broadcast_timesteps,
    down_block,
    mid_block,
    time_embedding,
    traced,
)
from .unet_config import load_pretrained, prepare_params


class ConditionedModel:
    """Subclasses set ``CONFIG`` (the config dataclass) and ``param_shapes`` (config ->
    {checkpoint key: shape})."""

    CONFIG: type = None
    #: Self-attention queries processed at a time (None: all at once); see the UNet's note.
    attention_chunk_size: int | None = 1024

    @staticmethod
    def param_shapes(config) -> dict:
        raise NotImplementedError

    def __init__(
        self, config, params, *, dtype=None, device=None, source="params", weights="eager"
    ):
        if not isinstance(config, self.CONFIG):
            config = self.CONFIG.from_dict(config, source=f"{source} (config)")
        self.config = config
        self.params = prepare_params(
            params,
            self.param_shapes(config),
            dtype=dtype,
            device=device,
            source=source,
            weights=weights,
        )

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device="cpu", *, weights="eager"):
        """Load diffusers' ``config.json`` and ``diffusion_pytorch_model.safetensors``.
        ``weights``: "eager" | "lazy" | "stream", see minisd/weights.py (memory policy)."""
        return load_pretrained(cls, cls.CONFIG, folder, dtype=dtype, device=device, weights=weights)

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

    def _timestep_cond(self, cond, x):
        """LCM's guidance embedding (N, time_cond_proj_dim) on the device, in x's dtype."""
        if cond is None:
            return None
        dim = self.config.time_cond_proj_dim
        if dim is None:
            raise InputError(
                f"timestep_cond: this {type(self).__name__} has no time_cond_proj_dim (not "
                "LCM-distilled); leave it None"
            )
        cond = to_device(cond, self.device, x.dtype)
        if tuple(cond.shape) != (x.shape[0], dim):
            raise InputError(
                f"timestep_cond: expected shape ({x.shape[0]}, {dim}), got {tuple(cond.shape)}"
            )
        return cond

    def _temb(self, timestep, x, timestep_cond):
        """The timestep embedding (N, T) for x (N, C, H, W): sinusoidal features (time_proj),
        plus LCM's guidance embedding where given, through time_embedding's MLP."""
        cfg = self.config
        t = broadcast_timesteps(timestep, x.shape[0], array_module(x))  # (N,)
        return time_embedding(
            t,
            self.params["time_embedding"],
            dim=cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
            dtype=x.dtype,
            cond=self._timestep_cond(timestep_cond, x),
        )

    def _down(self, h, temb, ctx, opts):
        """The down path from conv_in's output h: returns the last block's output and every
        skip state (conv_in's output first), the inputs of the up path / ControlNet's zero
        convolutions."""
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
                heads=cfg.heads[i],
                context=ctx if kind == "CrossAttnDownBlock2D" else None,
            )
            states.extend(s)
        return h, states

    def _mid(self, h, temb, ctx, opts):
        """The mid block (resnet, cross-attention transformer, resnet; or resnets only for a
        ControlNet's UNetMidBlock2D), its output scaled by mid_block_scale_factor."""
        cfg = self.config
        mid_opts = dataclasses.replace(opts, out_scale=cfg.mid_block_scale_factor)
        cross = cfg.mid_block_type == "UNetMidBlock2DCrossAttn"
        return traced(
            "mid_block",
            mid_block,
            h,
            temb,
            self.params["mid_block"],
            mid_opts,
            heads=cfg.heads[-1],
            context=ctx if cross else None,
        )
