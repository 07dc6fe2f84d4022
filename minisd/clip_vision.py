"""CLIP vision tower with projection (Radford et al. 2021; the ViT of Dosovitskiy et al. 2021), as
transformers' ``CLIPVisionModelWithProjection``: the image encoder of IP-Adapter.

    x_0 = [class_embedding; patch_embedding(patches)] + position_embedding      (N, 1 + P, D)
    x_0 = pre_layrnorm(x_0)                                                     hidden_states[0]
    x_i = CLIPEncoderLayer(x_{i-1})          (pre-LN, no mask: minisd/clip.py's encoder_layer)
    image_embeds = visual_projection(post_layernorm(x_n[:, 0]))                 (N, projection_dim)

IP-Adapter takes image_embeds; IP-Adapter Plus the penultimate hidden state x_{n-1}
(:meth:`CLIPVisionModelWithProjection.hidden_state`, transformers' ``hidden_states[-2]``).

P = (image_size / patch_size)^2 patches, each a patch_size^2 pixel square (a Conv2d whose stride
is its kernel, computed here as one GEMM on the unfolded patches). h94/IP-Adapter's
``models/image_encoder`` is OpenCLIP ViT-H/14 (32 layers x 1280, 16 heads, gelu, 1024-d
projection), its ``sdxl_models/image_encoder`` OpenCLIP ViT-bigG/14 (48 layers x 1664, 16 heads,
gelu, 1280-d projection); everything is read from config.json.

Parameters keep the file's names, ``vision_model.`` prefix included (``vision_model.encoder.
layers.3.self_attn.q_proj.weight``, ``visual_projection.weight``); traced names are the same
module paths.

:func:`preprocess` is transformers' ``CLIPImageProcessor`` with CLIP's defaults, as its PIL
backend computes it (the one transformers 5 uses without torchvision; its torchvision backend
resizes with torch's antialiased bicubic, which differs by a few pixel levels).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from . import clip, parallel, trace
from .backend import array_module, device_of, resolve_device_dtype, to_device
from .blocks import ln
from .config import check_divides, check_numbers
from .errors import ConfigError, InputError
from .weights import check_keys, find_weights, flatten, load_file, nest, read_config

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (image_utils.py)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' CLIPVisionConfig that the forward pass uses."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    projection_dim: int = 512
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d, source="config"):
        """Known fields from a config.json dict (unknown ones are ignored), validated."""
        if "vision_config" in d:  # a full CLIPModel config: take its vision tower
            d = {"projection_dim": d.get("projection_dim", 512), **d["vision_config"]}
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        ints = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        ints += ("num_channels", "image_size", "patch_size", "projection_dim")
        check_numbers(source, cfg, ints=ints, floats=("layer_norm_eps",))
        if cfg.hidden_act not in clip.ACTIVATIONS:
            raise ConfigError(
                f"{source}: hidden_act={cfg.hidden_act!r} is not supported "
                f"(expected one of {sorted(clip.ACTIVATIONS)})"
            )
        heads = cfg.num_attention_heads
        check_divides(source, "num_attention_heads", heads, "hidden_size", (cfg.hidden_size,))
        check_divides(source, "patch_size", cfg.patch_size, "image_size", (cfg.image_size,))
        return cfg

    @property
    def num_positions(self):
        return (self.image_size // self.patch_size) ** 2 + 1


def expected_shapes(cfg):
    """{key: shape} of a CLIPVisionModelWithProjection checkpoint."""
    d, p = cfg.hidden_size, cfg.patch_size
    pre = "vision_model."
    shapes = {
        f"{pre}embeddings.class_embedding": (d,),
        f"{pre}embeddings.patch_embedding.weight": (d, cfg.num_channels, p, p),
        f"{pre}embeddings.position_embedding.weight": (cfg.num_positions, d),
        "visual_projection.weight": (cfg.projection_dim, d),
    }
    for name in ("pre_layrnorm", "post_layernorm"):
        shapes[f"{pre}{name}.weight"] = shapes[f"{pre}{name}.bias"] = (d,)
    layers = dataclasses.replace(clip.CLIPTextConfig(), **_layer_fields(cfg), vocab_size=1)
    for k, shape in clip.expected_shapes(layers).items():
        if k.startswith("encoder."):  # the encoder layers are the text tower's, key for key
            shapes[pre + k] = shape
    return shapes


def _layer_fields(cfg):
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return {n: getattr(cfg, n) for n in names}


# --------------------------------------------------------------------------- layers


def embeddings(pixels, p, *, patch, positions):
    """CLIPVisionEmbeddings: the class token, then one token per patch (the stride-``patch``
    Conv2d without bias as a GEMM on unfolded patches), plus learned position embeddings.
    pixels (N, C, S, S) -> (N, 1 + (S/patch)^2, D)."""
    xp = array_module(pixels)
    n, c, s, _ = pixels.shape
    g = s // patch
    w = p["patch_embedding"]["weight"]  # (D, C, patch, patch)
    x = pixels.reshape(n, c, g, patch, g, patch).transpose(0, 2, 4, 1, 3, 5)  # (N, g, g, C, p, p)
    x = clip.lin(x.reshape(n, g * g, -1), {"weight": w.reshape(w.shape[0], -1)})  # (N, g*g, D)
    if trace.active():  # as the Conv2d module's (N, D, g, g) output
        trace.record("patch_embedding", x.swapaxes(1, 2).reshape(n, -1, g, g))
    cls = xp.broadcast_to(p["class_embedding"], (n, 1, x.shape[-1]))  # (N, 1, D)
    x = xp.concatenate([cls.astype(x.dtype), x], axis=1)  # (N, 1 + g*g, D)
    pos = p["position_embedding"]["weight"][positions]  # (1 + g*g, D)
    trace.record("position_embedding", pos[None])
    return x + pos  # (N, 1 + g*g, D)


# --------------------------------------------------------------------------- model


class CLIPVisionModelWithProjection:
    """CLIP image encoder: ``enc(pixel_values)`` -> image_embeds (N, projection_dim);
    ``enc.hidden_state(pixel_values, -2)`` -> the penultimate hidden state (N, 1 + P, D)."""

    def __init__(self, config, params, source="CLIPVisionModelWithProjection params"):
        """config: CLIPVisionConfig or a config.json dict; params: nested dict with the
        checkpoint's keys (:func:`expected_shapes`, optionally ``vision_model.embeddings.
        position_ids``)."""
        if not isinstance(config, CLIPVisionConfig):
            config = CLIPVisionConfig.from_dict(config, source)
        self.config = config
        self.params = params
        flat = flatten(params)
        want = expected_shapes(config)
        if "vision_model.embeddings.position_ids" in flat:  # a buffer older files carry
            want["vision_model.embeddings.position_ids"] = (1, config.num_positions)
        check_keys(flat, want, source)

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device="cpu"):
        """Load a transformers folder (config.json + model.safetensors). ``dtype`` None:
        float32 on the CPU, float16 on a GPU (``backend.default_dtype``)."""
        dtype = resolve_device_dtype(dtype, device)
        folder = Path(folder)
        cfg_path = folder / "config.json"
        config = CLIPVisionConfig.from_dict(read_config(cfg_path), cfg_path)
        path = find_weights(folder, names=("model.safetensors",))
        return cls.from_state_dict(load_file(path, dtype=dtype, device=device), config, path)

    @classmethod
    def from_state_dict(cls, flat, config, source="state dict"):
        """From a flat {key: array} (arrays used as given), with errors that name ``source``."""
        if not isinstance(config, CLIPVisionConfig):
            config = CLIPVisionConfig.from_dict(config, source)
        return cls(config, nest(dict(flat)), source=str(source))

    @property
    def dtype(self):
        return self.params["visual_projection"]["weight"].dtype

    @property
    def device(self):
        return device_of(self.params["visual_projection"]["weight"])

    def _check_pixels(self, pixel_values):
        cfg = self.config
        x = to_device(pixel_values, self.device, self.dtype)
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise InputError(
                f"pixel_values: expected shape (N, {', '.join(map(str, want))}) (see "
                f"clip_vision.preprocess), got {tuple(x.shape)}"
            )
        return x

    def _positions(self, xp):
        emb = self.params["vision_model"]["embeddings"]
        if "position_ids" in emb:  # the checkpoint's own buffer (always 0..P)
            return xp.asarray(emb["position_ids"])[0].astype(np.int64)  # (1 + P,)
        return xp.arange(self.config.num_positions)  # (1 + P,)

    def _encode(self, x, keep_states, layers=None):
        """pre_layrnorm(embeddings) through the first ``layers`` encoder layers (None: every
        one): (x_layers, states or None)."""
        cfg, p = self.config, self.params["vision_model"]
        act = clip.ACTIVATIONS[cfg.hidden_act]
        with trace.scope("embeddings"):
            x = embeddings(
                x, p["embeddings"], patch=cfg.patch_size, positions=self._positions(array_module(x))
            )  # (N, 1 + P, D)
        trace.record("embeddings", x)
        x = trace.record("pre_layrnorm", ln(x, p["pre_layrnorm"], eps=cfg.layer_norm_eps))
        states = [x] if keep_states else None
        for i in range(cfg.num_hidden_layers if layers is None else layers):
            with trace.scope(f"encoder.layers.{i}"):
                x = clip.encoder_layer(
                    x,
                    p["encoder"]["layers"][i],
                    heads=cfg.num_attention_heads,
                    act=act,
                    eps=cfg.layer_norm_eps,
                    mask=None,
                )  # (N, 1 + P, D)
            trace.record(f"encoder.layers.{i}", x)
            if keep_states:
                states.append(x)
        return x, states

    def __call__(self, pixel_values, output_hidden_states=False):
        """pixel_values (N, C, S, S) (:func:`preprocess`'s output) -> image_embeds (N,
        projection_dim). With ``output_hidden_states``: (image_embeds, states), states as
        transformers' hidden_states: pre_layrnorm's output, then each layer's output."""
        x = self._check_pixels(pixel_values)
        eps = self.config.layer_norm_eps
        with parallel.blas_threads():
            with trace.scope("vision_model"):
                x, states = self._encode(x, output_hidden_states)  # (N, 1 + P, D)
                trace.record("encoder", x)
                pooled = ln(x[:, 0], self.params["vision_model"]["post_layernorm"], eps=eps)
                trace.record("post_layernorm", pooled)  # (N, D)
            trace.record("vision_model", x)  # its first output: last_hidden_state
            embeds = clip.lin(pooled, self.params["visual_projection"])  # (N, projection_dim)
            trace.record("visual_projection", embeds)
        return (embeds, tuple(states)) if output_hidden_states else embeds

    def hidden_state(self, pixel_values, index=-2):
        """transformers' ``hidden_states[index]`` alone, computing only the layers it needs:
        IP-Adapter Plus's image features are index -2, the penultimate layer's output (diffusers'
        ``encode_image(..., output_hidden_states=True)``). pixel_values (N, C, S, S) ->
        (N, 1 + P, D)."""
        n = self.config.num_hidden_layers
        if not isinstance(index, int) or not -(n + 1) <= index <= n:
            raise InputError(f"index={index!r}: expected an int in [{-(n + 1)}, {n}]")
        x = self._check_pixels(pixel_values)
        with parallel.blas_threads(), trace.scope("vision_model"):
            x, _ = self._encode(x, False, layers=index % (n + 1))  # (N, 1 + P, D)
        return x


# --------------------------------------------------------------------------- preprocessing


def _as_rgb(image, i):
    """A PIL image or a uint8 (H, W, 3) array as an RGB PIL image; transparency is composited
    onto white, as transformers' ``convert_to_rgb``."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise InputError(
                f"images[{i}]: expected a PIL image or a uint8 (H, W, 3) array, got "
                f"{image.dtype} {image.shape}"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"images[{i}]: expected a PIL image, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _resize_crop(image, size):
    """Shortest edge to ``size`` (bicubic; the long edge int(size * long / short)), then the
    centre ``size`` x ``size`` crop. -> uint8 (size, size, 3)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    a = np.asarray(image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return a[top : top + size, left : left + size]  # (size, size, 3)


def preprocess(images, size=224):
    """transformers' CLIPImageProcessor (CLIP defaults, PIL backend): RGB, resize the shortest
    edge to ``size`` (bicubic), centre crop ``size`` x ``size``, rescale by 1/255 (in float64,
    then float32) and normalize with OpenAI CLIP's mean / std in float32.
    images: a PIL image / uint8 (H, W, 3) array, or a list of them -> float32 (N, 3, size, size).
    """
    if isinstance(images, (list, tuple)):
        images = list(images)
    else:
        images = [images]
    if not images:
        raise InputError("images: expected at least one image")
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    out = []
    for i, image in enumerate(images):
        a = _resize_crop(_as_rgb(image, i), int(size))  # (size, size, 3) uint8
        x = (a.astype(np.float64) * (1 / 255)).astype(np.float32)  # rescale_factor = 1/255
        out.append(((x - mean) / std).transpose(2, 0, 1))  # (3, size, size)
    return np.stack(out)  # (N, 3, size, size)
