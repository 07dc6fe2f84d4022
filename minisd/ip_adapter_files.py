"""IP-Adapter weight files (minisd/ip_adapter.py documents the model): the h94/IP-Adapter layout
and diffusers' converted one, read from .safetensors only, checked key by key; the kinds minisd
does not load are refused by name. The base adapter:

    image_proj.proj.weight (4C, D)   image_proj.proj.bias (4C,)   image_proj.norm.weight/bias (C,)
    ip_adapter.{n}.to_k_ip.weight (inner, C)   ip_adapter.{n}.to_v_ip.weight (inner, C)

The other kinds have the same ``ip_adapter.{n}`` layers and another ``image_proj``, told apart
by its keys as diffusers' loaders/unet.py tells them apart:

    Plus    (ip-adapter-plus(-face)_sd15, -plus(-face)_sdxl_vit-h): a Resampler, ``latents``,
            ``proj_in``, ``layers.i...`` (minisd/ip_adapter_plus.py)
    Full    (ip-adapter-full-face_sd15): ``proj.0``, ``proj.2``, ``proj.3`` (minisd/
            ip_adapter_mlp.py)
    FaceID  (ip-adapter-faceid(-portrait)_sd15, -faceid_sdxl): ``proj.0``, ``proj.2``,
            ``norm`` (ip_adapter_mlp.py), and LoRA layers ``ip_adapter.{n}.to_q_lora.down.
            weight``, ... for every attention layer (minisd/ip_adapter_lora.py)

Refused: FaceID Plus / PlusV2 (``perceiver_resampler.``: a Resampler over the CLIP hidden
states, fed by the face embedding, with a shortcut; not implemented) and several adapters in one
file. n numbers the UNet's attention processors (ip_adapter.processor_paths); the layers are
matched to a UNet, and their shapes checked against it, when the adapter is attached.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from . import ip_adapter_mlp, ip_adapter_plus
from .config import path_arg
from .errors import InputError, WeightsError
from .ip_adapter_lora import split_lora
from .ip_adapter_mlp import kind_of
from .weights import PICKLE_SUFFIXES, flatten, load_file, nest

NUM_TOKENS = 4  # image tokens of the base IP-Adapter (diffusers: num_image_text_embeds = 4)

IMAGE_PROJ = {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
# The kinds minisd does not load, found by a key of theirs (h94's names, then diffusers').
REFUSED = (
    ("perceiver_resampler.", "IP-Adapter FaceID Plus (perceiver resampler)"),
    ("image_projection_layers.0.proj.net.", "IP-Adapter FaceID Plus (perceiver resampler)"),
    ("image_projection_layers.1.", "several IP-Adapters at once"),
    (".processor.to_k_ip.1.", "several IP-Adapters at once"),
)
# What each kind's image projection takes: (axes of one image's input, what it is)
INPUTS = {
    "base": (1, "CLIP image embeddings"),
    "plus": (2, "the image encoder's penultimate hidden states"),
    "full": (2, "the image encoder's penultimate hidden states"),
    "faceid": (1, "face ID embeddings (insightface)"),
}
# diffusers' converted names -> h94's, for the base image projection (loaders/unet.py renames
# ``proj`` to ``image_embeds``; a Plus Resampler's: ip_adapter_plus.RENAMES; a Full / FaceID
# MLP's: ip_adapter_mlp.RENAMES); layer keys keep their module path (see _diffusers_layout).
DIFFUSERS_PROJ = "encoder_hid_proj.image_projection_layers.0."
DIFFUSERS_KEYS = {
    "encoder_hid_proj.image_projection_layers.0.image_embeds.weight": "proj.weight",
    "encoder_hid_proj.image_projection_layers.0.image_embeds.bias": "proj.bias",
    "encoder_hid_proj.image_projection_layers.0.norm.weight": "norm.weight",
    "encoder_hid_proj.image_projection_layers.0.norm.bias": "norm.bias",
}
H94_LAYER = re.compile(r"^ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight$")
DIFFUSERS_LAYER = re.compile(r"^(.+\.attn2)\.processor\.(to_k_ip|to_v_ip)\.0\.weight$")


# kind: (the key whose columns are embed_dim, the key whose length is cross_attention_dim, the
# image encoder's config field that must equal embed_dim; FaceID takes no image encoder)
KEYS = {
    "base": ("proj.weight", "norm.weight", "projection_dim"),
    "plus": ("proj_in.weight", "norm_out.weight", "hidden_size"),
    "full": ("proj.0.weight", "proj.3.weight", "hidden_size"),
    "faceid": ("proj.0.weight", "norm.weight", None),
}
LABELS = {
    "base": "the base IP-Adapter (ImageProjection)",
    "plus": "IP-Adapter Plus (Resampler)",
    "full": "IP-Adapter Full (MLP projection)",
    "faceid": "IP-Adapter FaceID (MLPProjModel)",
}


@dataclasses.dataclass
class IPAdapter:
    """An IP-Adapter file read and checked: ``image_proj`` nested as h94's file names it (base:
    {"proj": {...}, "norm": {...}}; Plus: {"latents": ..., "proj_in": ..., "layers": ...};
    Full: {"proj": {0: ..., 2: ..., 3: ...}}; FaceID: {"proj": {0: ..., 2: ...}, "norm": ...});
    ``layers``: {processor number (h94 layout) or attn2 module path (diffusers layout):
    {"to_k_ip": array, "to_v_ip": array}}; ``lora``: FaceID's LoRA layers, {processor number:
    {(name, "down" / "up"): array}} (minisd/ip_adapter_lora.py; h94 layout only)."""

    source: str
    image_proj: dict
    layers: dict
    lora: dict = dataclasses.field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The kind: "base", "plus", "full" or "faceid" (module doc)."""
        return kind_of(self.image_proj)

    @property
    def plus(self) -> bool:
        """IP-Adapter Plus: a Resampler on the encoder's penultimate hidden states."""
        return self.kind == "plus"

    @property
    def hidden_states(self) -> bool:
        """Plus and Full take the image encoder's penultimate hidden states (diffusers: every
        projection but ImageProjection, and FaceID takes no image)."""
        return self.kind in ("plus", "full")

    def _leaf(self, key):
        node = self.image_proj
        for part in key.split("."):
            node = node[int(part) if part.isdigit() else part]
        return node

    @property
    def embed_dim(self):
        """What the image projection takes: D, the CLIP image embedding size (base), W, the
        width of the image encoder's hidden states (Plus, Full), or the face embedding's
        (FaceID: 512)."""
        return self._leaf(KEYS[self.kind][0]).shape[1]

    @property
    def embed_key(self):
        """The key whose columns are ``embed_dim``."""
        return "image_proj." + KEYS[self.kind][0]

    @property
    def encoder_field(self):
        """The image encoder's config field that must equal ``embed_dim``. FaceID: InputError,
        it takes no image encoder."""
        field = KEYS[self.kind][2]
        if field is None:
            raise InputError(
                f"{self.source}: an IP-Adapter FaceID takes no image encoder: its input is a "
                "face embedding (insightface), passed as ip_adapter_image_embeds"
            )
        return field

    @property
    def cross_attention_dim(self):
        return self._leaf(KEYS[self.kind][1]).shape[0]

    @property
    def width_key(self):
        """The key whose length is ``cross_attention_dim``."""
        return "image_proj." + KEYS[self.kind][1]

    @property
    def num_tokens(self):
        """Image tokens per image: 4 (base), the Resampler's queries (Plus: 16), T (FaceID: rows
        of proj.2 / C), None for Full (one per hidden-state token: 257 with ViT-H)."""
        kind = self.kind
        if kind == "plus":
            return self.image_proj["latents"].shape[1]
        if kind == "faceid":
            return self._leaf("proj.2.weight").shape[0] // self.cross_attention_dim
        return NUM_TOKENS if kind == "base" else None

    @property
    def variant(self):
        return variant_of({"image_proj." + k: v for k, v in flatten(self.image_proj).items()})


def _shape(v):
    return tuple(getattr(v, "shape", v))


def variant_of(shapes) -> str:
    """The kind of a supported IP-Adapter from its {key: shape or array} (h94 or diffusers
    names): "base (ImageProjection, 4 image tokens)", "Plus (Resampler, Q image tokens)",
    "Full (MLP projection, one image token per hidden-state token)" or "FaceID (MLPProjModel,
    T image tokens)"."""
    proj = {}
    for key, shape in shapes.items():
        key = key.removeprefix("unet.")
        for prefix in ("image_proj.", DIFFUSERS_PROJ):
            if key.startswith(prefix):
                proj[key[len(prefix) :]] = _shape(shape)
    if "latents" in proj:
        q = proj["latents"][1] if len(proj["latents"]) == 3 else "?"
        return f"Plus (Resampler, {q} image tokens)"
    out = proj.get("proj.2.weight", proj.get("ff.net.2.weight"))
    norm = proj.get("norm.weight")
    if "proj.3.weight" in proj or (out and "ff.net.2.weight" in proj and out[:1] == norm):
        return "Full (MLP projection, one image token per hidden-state token)"
    if out or "proj.0.weight" in proj:
        ok = out and len(out) == 2 and norm and norm[0] and out[0] % norm[0] == 0
        return f"FaceID (MLPProjModel, {out[0] // norm[0] if ok else '?'} image tokens)"
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
                "(it loads the base IP-Adapter, Plus, Full and FaceID)"
            )
    flat = {k.removeprefix("unet."): v for k, v in flat.items()}
    lora = {}
    if any(k.startswith(DIFFUSERS_PROJ) for k in flat):
        proj, layers = _diffusers_layout(flat, source)
    else:
        flat, lora = split_lora(flat, source)  # FaceID's LoRA layers (ip_adapter_lora.py)
        proj, layers = _h94_layout(flat, source)
    _check_projection(proj, source)
    return IPAdapter(source, nest(proj), layers, lora)


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
    if any(k.startswith("ff.") for k in proj):  # Full / FaceID
        return ip_adapter_mlp.from_diffusers(proj, source, DIFFUSERS_PROJ), layers
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


def _family(key):
    """The kind a key of the image projection belongs to (flat, without ``image_proj.``)."""
    if key == "latents":
        return "plus"
    if re.match(r"^proj\.\d+\.", key):
        return "mlp"
    return "base" if key in ("proj.weight", "proj.bias") else None


def _check_one_kind(proj, source):
    """The kind of the projection's keys: Plus where there are latents, else Full / FaceID where
    there are ``proj.N`` keys, else base. ``proj.N`` keys next to a Resampler's or
    ImageProjection's are refused, naming a key of each kind."""
    mlp = "full" if "proj.3.weight" in proj else "faceid"
    first = {}
    for key in sorted(proj):
        family = _family(key)
        if family is not None:
            first.setdefault(mlp if family == "mlp" else family, key)
    if mlp in first and len(first) > 1:
        other = next(k for k in ("plus", "base") if k in first)
        raise WeightsError(
            f"{source}: keys of two IP-Adapter kinds: {'image_proj.' + first[other]!r} "
            f"({LABELS[other]}) and {'image_proj.' + first[mlp]!r} ({LABELS[mlp]}); one file "
            "holds one adapter"
        )
    return next((k for k in ("plus", mlp) if k in first), "base")


def _check_projection(proj, source):
    """The 4 keys of ImageProjection with consistent shapes: norm (C,), proj (4C, D); a Plus
    adapter's Resampler (ip_adapter_plus.check_resampler); a Full or FaceID adapter's MLP
    projection (ip_adapter_mlp.check_mlp)."""
    kind = _check_one_kind(proj, source)
    if kind == "plus":
        return ip_adapter_plus.check_resampler(proj, source)
    if kind in ("full", "faceid"):
        try:
            return ip_adapter_mlp.check_mlp(proj, source)
        except WeightsError as e:
            raise WeightsError(f"{e} ({LABELS[kind]})") from None
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
