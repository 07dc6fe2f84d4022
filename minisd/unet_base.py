"""What the text-conditioned UNet and its ControlNet copy share as model objects: building from
a config and checked params, loading a diffusers folder, dtype / device, the block options and
the LCM guidance embedding input (``timestep_cond``)."""

from __future__ import annotations

import dataclasses

import numpy as np

from . import trace
from .backend import array_module, device_of, to_device, to_numpy
from .errors import InputError
from .micro_cond import text_time_embedding
from .unet_blocks import (
    BlockOpts,
    broadcast_timesteps,
    down_block,
    mid_block,
    time_embedding,
    traced,
)
from .unet_config import load_pretrained, prepare_params

_rec = trace.record


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

    def _temb(
        self, timestep, x, timestep_cond, added_cond_kwargs=None, class_labels=None, extra=None
    ):
        """The timestep embedding (N, T) for x (N, C, H, W): sinusoidal features (time_proj),
        plus LCM's guidance embedding where given, through time_embedding's MLP; plus the class
        embedding of UNets with num_class_embeds (``class_labels``); plus SDXL's
        micro-conditioning embedding for "text_time" (SDXL) UNets and ControlNets, added after
        the MLP as diffusers' ``emb + aug_emb`` (minisd/micro_cond.py). ``extra`` (N, T): an
        embedding added before SDXL's (a union ControlNet's control-type embedding)."""
        cfg = self.config
        t = broadcast_timesteps(timestep, x.shape[0], array_module(x))  # (N,)
        temb = time_embedding(
            t,
            self.params["time_embedding"],
            dim=cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
            dtype=x.dtype,
            cond=self._timestep_cond(timestep_cond, x),
        )
        temb = self._class_emb(temb, class_labels, x)  # (N, T), before SDXL's (diffusers' order)
        if extra is not None:
            temb = temb + extra  # (N, T)
        if getattr(cfg, "addition_embed_type", None) == "text_time":
            p = self.params["add_embedding"]
            aug = text_time_embedding(added_cond_kwargs, x, p, cfg, type(self).__name__)
            return temb + aug  # (N, T)
        if added_cond_kwargs is not None:
            raise InputError(
                f"added_cond_kwargs: this {type(self).__name__} has no addition_embed_type "
                "(not SDXL); leave it None"
            )
        return temb

    def _class_emb(self, temb, labels, x):
        """temb + class_embedding[labels] (diffusers' ``emb + class_emb``, class_embeddings_concat
        False): an nn.Embedding row per sample, cast to x's dtype. The SD x4 upscaler's labels
        are the noise level of its low-resolution input (noise augmentation, Ho et al. 2022,
        "Cascaded Diffusion Models", sec. 3.2). ``labels``: N ints, or one int (or (1,)) for
        every sample; needed exactly by models with ``num_class_embeds``."""
        n_classes = getattr(self.config, "num_class_embeds", None)
        name = type(self).__name__
        if not n_classes:
            if labels is not None:
                raise InputError(
                    f"class_labels: this {name} has no num_class_embeds; leave it None"
                )
            return temb
        if labels is None:
            raise InputError(
                f"class_labels: this {name} has a class embedding (num_class_embeds="
                f"{n_classes}; the x4 upscaler's noise level); give one int per sample"
            )
        idx = class_indices(labels, x.shape[0], n_classes)  # () or (1,) or (N,)
        table = self.params["class_embedding"]["weight"]  # (num_class_embeds, T)
        emb = table[array_module(table).asarray(idx)].astype(x.dtype, copy=False)  # (.., T)
        return temb + _rec("class_embedding", emb)  # (N, T)

    def _down(self, h, temb, ctx, opts, intrablock=None):
        """The down path from conv_in's output h: returns the last block's output and every
        skip state (conv_in's output first), the inputs of the up path / ControlNet's zero
        convolutions. ``intrablock``: T2I-Adapter features, one for each of the first blocks
        (diffusers' down_intrablock_additional_residuals, never modified here): a
        CrossAttnDownBlock2D adds its feature to its last layer's output (down_block's
        ``residual``), a DownBlock2D to its output, which is also its last skip state."""
        cfg = self.config
        extra = _intrablock(intrablock, len(cfg.down_block_types), cfg.mid_block_type)
        states = [h]
        for i, kind in enumerate(cfg.down_block_types):
            cross = kind == "CrossAttnDownBlock2D"
            block_opts = with_only_cross(opts, cfg, i)
            shape = (h.shape[0], cfg.block_out_channels[i], *h.shape[2:])  # last layer's output
            r = _feature(extra, i, shape, h) if cross else None
            h, s = traced(
                f"down_blocks.{i}",
                down_block,
                h,
                temb,
                self.params["down_blocks"][i],
                block_opts,
                heads=cfg.heads[i],
                context=ctx if cross else None,
                residual=r,
            )
            if not cross and i < len(extra):  # DownBlock2D: after the block (diffusers' +=)
                h = h + _feature(extra, i, h.shape, h)
                s = (*s[:-1], h)
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


def with_only_cross(opts, cfg, i):
    """The block options of down block ``i`` (down-block numbering; up block j is down block
    n - 1 - j, diffusers' reversed list): ``only_cross`` from the config's
    only_cross_attention (ControlNet configs have none)."""
    only = getattr(cfg, "only_cross_attention", None)
    return dataclasses.replace(opts, only_cross=True) if only and only[i] else opts


def class_indices(labels, n, n_classes):
    """Class labels (host or device ints: a scalar, (1,) or (N,)) -> host int64 indices, each
    in [0, n_classes) (nn.Embedding's range)."""
    idx = np.asarray(to_numpy(labels))
    if idx.dtype.kind not in "iu" or idx.ndim > 1 or idx.size not in (1, n):
        raise InputError(
            f"class_labels: expected an int or {n} ints, got {idx.dtype} of shape {idx.shape}"
        )
    if idx.size and not (0 <= idx.min() and idx.max() < n_classes):
        raise InputError(f"class_labels: values must lie in [0, {n_classes}), got {idx.tolist()}")
    return idx.astype(np.int64)


def _intrablock(features, n, mid=False):
    """down_intrablock_additional_residuals as a new list (the caller's stays as it is; diffusers
    pops from the one it is given), at most one per down block and, with a mid block
    (``mid``), one more: T2I-Adapter-XL's, added to the mid block's output (mid_intrablock)."""
    extra = [] if features is None else list(features)
    if len(extra) > n + bool(mid):
        raise InputError(
            f"down_intrablock_additional_residuals: {len(extra)} arrays, the UNet has {n} down "
            "blocks (one T2I-Adapter feature per block"
            + (", and one for the mid block's output)" if mid else ")")
        )
    return extra


def mid_intrablock(h, features, n):
    """The mid block's output plus the feature after the n down blocks' (T2I-Adapter-XL's;
    diffusers' UNet adds it where its shape is the output's): h unchanged without one."""
    extra = [] if features is None else list(features)
    r = _feature(extra, n, h.shape, h, "mid_block")
    return h if r is None else h + r  # (N, C, h, w)


def _feature(extra, i, shape, like, where=None):
    """T2I-Adapter feature i on ``like``'s device and dtype, checked to be ``shape``; None
    when there are fewer features than blocks (diffusers then leaves the block alone)."""
    if i >= len(extra):
        return None
    r = to_device(extra[i], device_of(like), like.dtype)
    if tuple(r.shape) != tuple(shape):
        raise InputError(
            f"down_intrablock_additional_residuals[{i}]: shape {tuple(r.shape)}, expected "
            f"{tuple(shape)} ({where or f'down_blocks.{i}'})"
        )
    return r
