"""IP-Adapter weight files (minisd/ip_adapter.py documents the model): the h94/IP-Adapter layout
and diffusers' converted one, read from .safetensors only, checked key by key; the other
IP-Adapter kinds are refused by name. The base adapter:

    image_proj.proj.weight (4C, D)   image_proj.proj.bias (4C,)   image_proj.norm.weight/bias (C,)
    ip_adapter.{n}.to_k_ip.weight (inner, C)   ip_adapter.{n}.to_v_ip.weight (inner, C)

IP-Adapter Plus (ip-adapter-plus(-face)_sd15, ip-adapter-plus(-face)_sdxl_vit-h) has the same
``ip_adapter.{n}`` layers and a Resampler as ``image_proj`` (``image_proj.latents``, ...;
minisd/ip_adapter_plus.py). n numbers the UNet's attention processors
(ip_adapter.processor_paths); the layers are matched to a UNet, and their shapes checked against
it, when the adapter is attached.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from . import ip_adapter_plus
from .config import path_arg
from .errors import WeightsError
from .weights import PICKLE_SUFFIXES, load_file, nest

NUM_TOKENS = 4  # image tokens of the base IP-Adapter (diffusers: num_image_text_embeds = 4)

IMAGE_PROJ = {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
# Other IP-Adapter kinds, found by a key of theirs, in diffusers' order of checking.
# (Key parts of the diffusers layout after the h94 ones.)
REFUSED = (
    ("perceiver_resampler.", "IP-Adapter FaceID Plus (perceiver resampler)"),
    ("image_proj.proj.3.weight", "IP-Adapter Full (MLP image projection)"),
    ("image_proj.proj.0.weight", "IP-Adapter FaceID (MLPProjModel)"),
    ("_lora.", "IP-Adapter FaceID (its LoRA layers)"),
    ("image_projection_layers.0.ff.", "IP-Adapter Full / FaceID (MLP image projection)"),
    ("image_projection_layers.1.", "several IP-Adapters at once"),
    (".processor.to_k_ip.1.", "several IP-Adapters at once"),
)
# diffusers' converted names -> h94's, for the base image projection (loaders/unet.py renames
# ``proj`` to ``image_embeds``; a Plus Resampler's: ip_adapter_plus.RENAMES); layer keys keep
# their module path (see _diffusers_layout).
DIFFUSERS_PROJ = "encoder_hid_proj.image_projection_layers.0."
DIFFUSERS_KEYS = {
    "encoder_hid_proj.image_projection_layers.0.image_embeds.weight": "proj.weight",
    "encoder_hid_proj.image_projection_layers.0.image_embeds.bias": "proj.bias",
    "encoder_hid_proj.image_projection_layers.0.norm.weight": "norm.weight",
    "encoder_hid_proj.image_projection_layers.0.norm.bias": "norm.bias",
}
H94_LAYER = re.compile(r"^ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight$")
DIFFUSERS_LAYER = re.compile(r"^(.+\.attn2)\.processor\.(to_k_ip|to_v_ip)\.0\.weight$")


@dataclasses.dataclass
class IPAdapter:
    """An IP-Adapter file read and checked: ``image_proj`` nested as h94's file names it (base:
    {"proj": {...}, "norm": {...}}; Plus: {"latents": ..., "proj_in": ..., "layers": ...});
    ``layers``: {processor number (h94 layout) or attn2 module path (diffusers layout):
    {"to_k_ip": array, "to_v_ip": array}}."""

    source: str
    image_proj: dict
    layers: dict

    @property
    def plus(self) -> bool:
        """IP-Adapter Plus: a Resampler on the encoder's penultimate hidden states."""
        return "latents" in self.image_proj

    @property
    def embed_dim(self):
        """What the image projection takes: D, the CLIP image embedding size (base), or W,
        the width of the image encoder's hidden states (Plus)."""
        return self.image_proj["proj_in" if self.plus else "proj"]["weight"].shape[1]

    @property
    def embed_key(self):
        """The key whose columns are ``embed_dim``."""
        return "image_proj.proj_in.weight" if self.plus else "image_proj.proj.weight"

    @property
    def encoder_field(self):
        """The image encoder's config field that must equal ``embed_dim``."""
        return "hidden_size" if self.plus else "projection_dim"

    @property
    def cross_attention_dim(self):
        return self.image_proj["norm_out" if self.plus else "norm"]["weight"].shape[0]

    @property
    def width_key(self):
        """The key whose length is ``cross_attention_dim``."""
        return "image_proj.norm_out.weight" if self.plus else "image_proj.norm.weight"

    @property
    def num_tokens(self):
        """Image tokens per image: 4 (base), the Resampler's queries (Plus: 16)."""
        return self.image_proj["latents"].shape[1] if self.plus else NUM_TOKENS

    @property
    def variant(self):
        return variant_of({"image_proj.latents": self.image_proj["latents"]} if self.plus else {})


def variant_of(shapes) -> str:
    """The kind of a supported IP-Adapter from its {key: shape or array} (h94 or diffusers
    names): "base (ImageProjection, 4 image tokens)" or "Plus (Resampler, Q image tokens)"."""
    for key, shape in shapes.items():
        if key.removeprefix("unet.") in ("image_proj.latents", DIFFUSERS_PROJ + "latents"):
            shape = tuple(getattr(shape, "shape", shape))
            return f"Plus (Resampler, {shape[1] if len(shape) == 3 else '?'} image tokens)"
    return f"base (ImageProjection, {NUM_TOKENS} image tokens)"


# --------------------------------------------------------------------------- reading


def read_ip_adapter(source) -> IPAdapter:
    """An IPAdapter from a ``.safetensors`` file, a folder holding one, or a flat {key: numpy
    array} dict, in the h94 or the diffusers layout (module doc). Pickle files are refused."""
    if isinstance(source, IPAdapter):
        return source
    if isinstance(source, dict):
        return parse(source, "IP-Adapter state dict")
    path = _weights_file(path_arg(source, "weights"))
    return parse(load_file(path), str(path))


def _weights_file(path: Path) -> Path:
    if str(path).endswith(PICKLE_SUFFIXES):
        raise WeightsError(
            f"{path}: pickle files (.bin / .ckpt / .pt) are never loaded, since unpickling can "
            "run arbitrary code. Convert the IP-Adapter to safetensors once, where you trust "
            'the file: `python -c "import torch, safetensors.torch as st; sd = torch.load('
            "'ip-adapter_sd15.bin', weights_only=True); st.save_file({f'{g}.{k}': v.contiguous() "
            "for g in sd for k, v in sd[g].items()}, 'ip-adapter_sd15.safetensors')\"`"
        )
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        raise WeightsError(
            f"{path}: expected a single .safetensors file in the folder, found {len(files)}"
        )
    if not path.is_file():
        raise WeightsError(f"{path}: no such IP-Adapter file")
    return path


def parse(flat, source) -> IPAdapter:
    """Check a flat state dict and split it into the image projection and the layers."""
    for part, kind in REFUSED:
        key = next((k for k in flat if part in k), None)
        if key is not None:
            raise WeightsError(
                f"{source}: key {key!r} belongs to {kind}, which minisd does not support "
                "(only the base IP-Adapter and IP-Adapter Plus)"
            )
    flat = {k.removeprefix("unet."): v for k, v in flat.items()}
    if any(k.startswith(DIFFUSERS_PROJ) for k in flat):
        proj, layers = _diffusers_layout(flat, source)
    else:
        proj, layers = _h94_layout(flat, source)
    _check_projection(proj, source)
    return IPAdapter(source, nest(proj), layers)


def _h94_layout(flat, source):
    proj, layers = {}, {}
    for key, value in flat.items():
        m = H94_LAYER.match(key)
        if key.startswith("image_proj."):
            proj[key[len("image_proj.") :]] = value  # checked by _check_projection
        elif m:
            layers.setdefault(int(m[1]), {})[m[2]] = value
        else:
            raise WeightsError(f"{source}: unexpected key {key!r} (not an IP-Adapter key)")
    _check_pairs(layers, source, lambda n, w: f"ip_adapter.{n}.{w}.weight")
    return proj, layers


def _diffusers_layout(flat, source):
    proj, layers = {}, {}
    for key, value in flat.items():
        m = DIFFUSERS_LAYER.match(key)
        if key.startswith(DIFFUSERS_PROJ):
            proj[key[len(DIFFUSERS_PROJ) :]] = value
        elif m:
            layers.setdefault(m[1], {})[m[2]] = value
        else:
            raise WeightsError(f"{source}: unexpected key {key!r} (not an IP-Adapter key)")
    _check_pairs(layers, source, lambda n, w: f"{n}.processor.{w}.0.weight")
    if "latents" in proj:
        return ip_adapter_plus.from_diffusers(proj, source, DIFFUSERS_PROJ), layers
    renamed = {}
    for key, value in proj.items():
        if DIFFUSERS_PROJ + key not in DIFFUSERS_KEYS:
            raise WeightsError(f"{source}: unexpected key {DIFFUSERS_PROJ + key!r} (not an "
                               "IP-Adapter key)")  # fmt: skip
        renamed[DIFFUSERS_KEYS[DIFFUSERS_PROJ + key]] = value
    return renamed, layers


def _check_pairs(layers, source, name):
    for n, pair in layers.items():
        for w in ("to_k_ip", "to_v_ip"):
            if w not in pair:
                raise WeightsError(f"{source}: missing key {name(n, w)!r}")
            if pair[w].ndim != 2:
                raise WeightsError(
                    f"{source}: key {name(n, w)!r} has shape {tuple(pair[w].shape)}, "
                    "expected a matrix (inner, cross_attention_dim)"
                )
    if not layers:
        raise WeightsError(f"{source}: no IP-Adapter layer keys (ip_adapter.N.to_k_ip.weight)")


def _check_projection(proj, source):
    """The 4 keys of ImageProjection with consistent shapes: norm (C,), proj (4C, D); or a
    Plus adapter's Resampler (ip_adapter_plus.check_resampler)."""
    if "latents" in proj:
        return ip_adapter_plus.check_resampler(proj, source)
    stray = sorted(set(proj) - IMAGE_PROJ)
    if stray:
        raise WeightsError(f"{source}: unexpected key {'image_proj.' + stray[0]!r} (not an "
                           "IP-Adapter key)")  # fmt: skip
    missing = sorted(IMAGE_PROJ - set(proj))
    if missing:
        raise WeightsError(f"{source}: missing key {'image_proj.' + missing[0]!r}")
    c = proj["norm.weight"].shape[0] if proj["norm.weight"].ndim == 1 else -1
    d = proj["proj.weight"].shape[-1] if proj["proj.weight"].ndim else -1
    want = {"norm.weight": (c,), "norm.bias": (c,)}
    want.update({"proj.weight": (NUM_TOKENS * c, d), "proj.bias": (NUM_TOKENS * c,)})
    for key, shape in want.items():  # norm.weight first: it gives C
        if tuple(proj[key].shape) != shape:
            raise WeightsError(
                f"{source}: key {'image_proj.' + key!r} has shape {tuple(proj[key].shape)}, "
                f"expected {shape} (norm: (C,), proj: ({NUM_TOKENS} * C, D))"
            )
