"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685),
merged into the weights of a StableDiffusion pipeline's UNet and text encoder, and of a
StableDiffusionXL pipeline's UNet and two text encoders (``text_encoder``, ``text_encoder_2``).

A LoRA stores, for some Linear / Conv2d weights W (out, in[, kh, kw]) of the model, two factors
of rank r: ``down`` A (r, in[, kh, kw]) and ``up`` B (out, r[, 1, 1]), and optionally an
``alpha``. Merging replaces each W by

    W' = W + scale * (alpha / r) * B @ A                                               (eq. 3)

B @ A of conv factors (LoCon: A a kh x kw conv into r channels, B a 1x1 conv out of them) is
delta[o, i, y, x] = sum_r B[o, r] A[r, i, y, x]: the product of the two convolutions. ``scale``
is diffusers' ``lora_scale``: ``pipe.fuse_lora(lora_scale=s)`` and, unfused,
``pipe(..., cross_attention_kwargs={"scale": s})``, which scale both the UNet's and the text
encoders' LoRA layers; 0 leaves the weights as they are (bit for bit), 1 is the LoRA as trained.

    lora = read_lora("style.safetensors")            # formats: minisd/lora_formats.py
    handle = apply_lora(pipe, lora, scale=0.8)        # or apply_lora(pipe, "style.safetensors")
    remove_lora(pipe, handle)                         # the original arrays again, bit for bit

alpha / r, as diffusers 0.42 reads each format:
- kohya / A1111: the ``.alpha`` key of the module; without one, alpha = r (a scale of 1, as
  sd-scripts, A1111 and ComfyUI read it). Where diffusers differs, minisd keeps the format's
  meaning: diffusers applies one alpha (the most frequent) to every attention projection
  (``to_q`` ... ``to_out.0``) and every text-encoder layer when the alphas differ between
  modules, and to modules without an alpha when others have one.
- diffusers / peft: 1 (``W + B @ A``), or alpha / r from the file's ``lora_adapter_metadata``
  (peft's LoraConfig: r, lora_alpha, rank_pattern, alpha_pattern, use_rslora: alpha / sqrt(r)).
  ``<module>.alpha`` keys next to lora_A / lora_B are read as kohya's (ComfyUI does so; diffusers
  refuses such files).
A 1x1 conv weight and a Linear weight of the same (out, in) take each other's factors (SD1's
``proj_in`` / ``proj_out`` are 1x1 convs, SD2's are Linear); diffusers refuses the mismatch,
A1111 and ComfyUI reshape as minisd does.

Components, as diffusers' StableDiffusion{,XL}LoraLoaderMixin: keys of a component the pipeline
does not have at all (``text_encoder_2`` / ``lora_te2_`` for SD1.x / SD2.x) are ignored with a
warning, as diffusers ignores them; keys of a component the pipeline has as None (SDXL refiner:
no ``text_encoder``, so no ``lora_te1_`` / ``text_encoder.`` keys) are refused naming the key,
before anything is merged (diffusers fails there with an AttributeError on None).

kohya names of UNet modules (``lora_unet_…``) resolve two ways, for any UNet: the diffusers
module path (sd-scripts' SD1.x / SD2.x files) and the original LDM / SGM one (its SDXL files:
``input_blocks_4_1_proj_in``, ``middle_block_0_in_layers_2``, ``output_blocks_2_2_conv``,
``time_embed_0``, ``label_emb_0_0``, ``out_2``), from weights_tools' single-file key map of the
UNet's block layout (:func:`original_unet_modules`). diffusers maps SGM names only for SDXL (its
``_maybe_map_sgm_blocks_to_diffusers``, with the UNet's layers_per_block); they land on the
same modules, except past ``input_blocks_9`` (the refiner's four blocks), where diffusers, which
matches block numbers as substrings (``input_blocks_1`` in ``input_blocks_10``), fails.

The delta is computed in float32 (float64 for a float64 model) on the device of the weight,
added, and the sum cast to the model's dtype (diffusers/peft: B @ A * scale, added in the
weight's dtype). With weights="lazy" / "stream" the stored (file-dtype, memory-mapped) array of
each changed weight is replaced by the merged array in the compute dtype, so results equal the
"eager" ones bit for bit; those layers then live in memory, not in the file's pages.

Not supported (refused with an error naming the key kind): LoHa (``hada_w1_a``), LoKr
(``lokr_w1``), DoRA (``dora_scale``, ``lora_magnitude_vector``), LoCon's Tucker core
(``lora_mid``), OFT, IA3, GLoRA, LyCORIS full ``diff`` weights, LoRA biases, embedding LoRAs,
LoRAs of SDXL's ``text_projection`` (no LoRA trainer targets it), and pickle files (.ckpt / .pt /
.bin: convert them to safetensors).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from . import conv_fast
from .backend import array_module
from .config import is_number, path_arg
from .errors import InputError, WeightsError
from .lora_formats import Factors, parse
from .weights import PICKLE_SUFFIXES, CastOnRead, flatten, load_file, read_header

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"

log = logging.getLogger("minisd")


@dataclasses.dataclass
class LoRA:
    """A LoRA file read and checked: factors keyed by (component, module, kohya) where module is
    a diffusers module path ("down_blocks.0.attentions.0.proj_in"), or for kohya keys its
    ``_``-joined spelling, resolved against a model by :func:`resolve_lora`."""

    source: str
    modules: dict  # (component, module, kohya: bool) -> Factors

    def __len__(self):
        return len(self.modules)


@dataclasses.dataclass
class LoraHandle:
    """What :func:`apply_lora` changed: [(component, param key, original, merged)]."""

    source: str
    scale: float
    changes: list


def read_lora(source) -> LoRA:
    """A LoRA from a ``.safetensors`` file, a folder holding one (diffusers'
    ``pytorch_lora_weights.safetensors``), or a ``{key: numpy array}`` dict. Pickle files are
    refused (unpickling can run code)."""
    if isinstance(source, LoRA):
        return source
    if isinstance(source, dict):
        return LoRA("LoRA state dict", parse(source, None, "LoRA state dict"))
    path = _lora_file(path_arg(source, "lora"))
    _, metadata, _, _ = read_header(path)
    return LoRA(str(path), parse(load_file(path), metadata, str(path)))


def _lora_file(path: Path) -> Path:
    if str(path).endswith(PICKLE_SUFFIXES):
        raise WeightsError(
            f"{path}: pickle files (.ckpt / .pt / .bin) are never loaded, since unpickling can "
            "run arbitrary code. Convert the LoRA to safetensors once, where you trust the file: "
            "`python -c \"import torch, safetensors.torch as st; sd = torch.load('in.bin', "
            "weights_only=True); st.save_file({k: v.contiguous() for k, v in sd.items()}, "
            "'out.safetensors')\"`"
        )
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if (path / DIFFUSERS_FILE).is_file():
            return path / DIFFUSERS_FILE
        if len(files) == 1:
            return files[0]
        raise WeightsError(
            f"{path}: expected {DIFFUSERS_FILE} or a single .safetensors file in the folder, "
            f"found {len(files)}"
        )
    if not path.is_file():
        raise WeightsError(f"{path}: no such LoRA file")
    return path


# --------------------------------------------------------------------------- model names


def _targets(flat, component):
    """{module path: (param key, stored shape)} of the Linear / Conv2d weights among a
    component's flat parameters (a text encoder's token / position embeddings are not LoRA
    targets)."""
    out = {}
    for key, value in flat.items():
        skip = component != "unet" and key.startswith("embeddings.")
        if key.endswith(".weight") and value.ndim >= 2 and not skip:
            out[key[: -len(".weight")]] = (key, tuple(value.shape))
    return out


def original_unet_modules(keys, modules) -> dict:
    """{diffusers module path: original (LDM / SGM) module path} of a UNet's ``modules``, by
    weights_tools' single-file key map of the block layout its parameter ``keys`` show: down
    block b, layer l is ``input_blocks.{1 + b (L + 1) + l}`` (``.0`` resnet, ``.1`` attention),
    its downsampler ``input_blocks.{1 + b (L + 1) + L}.0.op``; up block b, layer l is
    ``output_blocks.{b (L + 1) + l}``; inside resnets conv1 = ``in_layers.2``, time_emb_proj =
    ``emb_layers.1``, conv2 = ``out_layers.3``, conv_shortcut = ``skip_connection``. SDXL (L = 2):
    down_blocks.1.attentions.0.proj_in -> input_blocks.4.1.proj_in, conv_in -> input_blocks.0.0,
    add_embedding.linear_1 -> label_emb.0.0. Modules the map lacks (LCM's cond_proj) have none."""
    from weights_tools.configs import unet_arch_diffusers
    from weights_tools.keymaps import rename, unet_modules

    table = unet_modules(unet_arch_diffusers(keys))
    out = {}
    for module in modules:
        original = rename(module + ".weight", table)
        if original is not None:
            out[module] = original.removesuffix(".weight")
    return out


def _kohya_names(flat, targets, component):
    """kohya spelling ('.' -> '_') -> module paths having it: a text encoder's with and without
    kohya's ``text_model_`` prefix, a UNet's diffusers and original (SGM) paths."""
    if component == "unet":
        aliases = original_unet_modules(flat, targets)
    else:
        aliases = {module: "text_model." + module for module in targets}
    names = {}
    for module in targets:
        for spelling in sorted({module, aliases.get(module, module)}):
            names.setdefault(spelling.replace(".", "_"), []).append(module)
    return names


def resolve_lora(lora, pipe) -> dict:
    """{(component, param key): (up, down, alpha_over_rank)} for ``pipe``'s parameters, e.g.
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"), after checking
    that every module names a weight of the model and that the factors fit its shape. Modules
    of components the pipeline does not have (module doc) are left out, with a warning."""
    lora = read_lora(lora)
    found, kohya, out, ignored = {}, {}, {}, []
    for (component, module, is_kohya), f in sorted(lora.modules.items()):
        if not hasattr(pipe, component):
            ignored.append(f.key)
            continue
        if component not in found:
            flat = flatten(_model(pipe, component, lora, f).params)  # raw leaves, no casts
            found[component] = _targets(flat, component)
            kohya[component] = _kohya_names(flat, found[component], component)
        path = _module_path(module, is_kohya, found[component], kohya[component], f, lora)
        key, shape = found[component][path]
        _fit_shape(f, shape, lora.source)
        if (component, key) in out:
            raise WeightsError(f"{lora.source}: key {f.key!r}: {component} {key} is given twice")
        out[(component, key)] = (f.up, f.down, f.alpha_over_rank)
    _ignored(lora.source, ignored, out)
    return out


def _ignored(source, ignored, resolved):
    if ignored:
        log.warning(
            "%s: %d modules of a second text encoder (lora_te2_ / text_encoder_2., SDXL) "
            "ignored: this model has none, and diffusers ignores them too (first key: %s)",
            source, len(ignored), ignored[0],
        )  # fmt: skip
    if not resolved:
        raise WeightsError(
            f"{source}: no LoRA weights for a UNet or a text encoder this model has (all "
            f"{len(ignored)} modules are for a second text encoder, SDXL's)"
        )


def _model(pipe, component, lora, f):
    model = getattr(pipe, component, None)
    if model is None:
        raise WeightsError(f"{lora.source}: key {f.key!r} is for a {component}; the model has none")
    return model


def _module_path(module, is_kohya, targets, kohya, f, lora):
    if not is_kohya:
        if module in targets:
            return module
    elif len(kohya.get(module, ())) == 1:
        return kohya[module][0]
    elif module in kohya:
        raise WeightsError(
            f"{lora.source}: key {f.key!r} is ambiguous: it spells {kohya[module]} of the model"
        )
    raise WeightsError(
        f"{lora.source}: key {f.key!r} names no Linear / Conv2d weight of the model "
        f"({module!r} not found; a LoRA for another architecture, e.g. an SDXL LoRA on SD1.x "
        "or a base LoRA on the SDXL refiner, does not fit)"
    )


def _fit_shape(f: Factors, shape, source):
    """The delta's shape must be the weight's; 1x1 conv <-> Linear is allowed (module doc)."""
    out, kernel = f.up.shape[0], f.down.shape[2:]
    delta = (out, f.down.shape[1], *kernel)  # (out, in[, kh, kw])
    square = delta[:2] == shape[:2] and {len(shape), len(delta)} == {2, 4}
    unit = shape[2:] in ((), (1, 1)) and kernel in ((), (1, 1))
    if delta != shape and not (square and unit):
        raise WeightsError(
            f"{source}: key {f.key!r}: the LoRA's delta up @ down has shape {delta}, the "
            f"model's weight has shape {shape}"
        )


# --------------------------------------------------------------------------- merging


def param_slot(params, key):
    """(dict holding the leaf, leaf name) of a dotted key; no CastOnRead casts on the way."""
    node = params
    parts = [int(p) if p.isdigit() else p for p in key.split(".")]
    for p in parts[:-1]:
        node = dict.__getitem__(node, p)
    return node, parts[-1]


def put_back(items, why):
    """Undo merges: ``items`` are (params, key, original array, merged array). Every slot is
    checked first: if one no longer holds its merged array (merged over again since),
    InputError(why(i)) and nothing changes; else every original is put back."""
    slots = []
    for i, (params, key, original, merged) in enumerate(items):
        node, leaf = param_slot(params, key)
        if dict.__getitem__(node, leaf) is not merged:
            raise InputError(why(i))
        slots.append((node, leaf, original))
    for node, leaf, original in slots:
        dict.__setitem__(node, leaf, original)


def merged_weight(w, dtype, up, down, factor):
    """(w + factor * up @ down) as ``dtype``, computed in float32 (float64 for a float64
    ``dtype``) with ``w``'s array module. up (out, r[,1,1]), down (r, in[,kh,kw])."""
    xp = array_module(w)
    ct = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    u = xp.asarray(up, dtype=ct).reshape(up.shape[0], -1)  # (out, r)
    d = xp.asarray(down, dtype=ct).reshape(down.shape[0], -1)  # (r, in*kh*kw)
    delta = (u @ d) * factor  # (out, in*kh*kw)
    return (w.astype(ct, copy=False) + delta.reshape(w.shape)).astype(dtype)  # w's shape


def apply_lora(pipe, lora, scale=1.0) -> LoraHandle:
    """Merge ``lora`` (a LoRA, a path or a state dict) into ``pipe.unet`` / ``pipe.text_encoder``
    / ``pipe.text_encoder_2`` in place, W' = W + scale * alpha / r * up @ down. Returns a handle
    for :func:`remove_lora`; the handles of applied LoRAs are also listed in ``pipe.loras``, in
    order."""
    if not is_number(scale):
        raise InputError(f"scale={scale!r}: expected a finite number")
    lora = read_lora(lora)
    targets = resolve_lora(lora, pipe)  # every check before the first change
    changes = []
    try:
        for (component, key), (up, down, aor) in targets.items():
            node, leaf = param_slot(getattr(pipe, component).params, key)
            w = dict.__getitem__(node, leaf)  # stored array (file dtype under CastOnRead)
            dtype = node.dtype if isinstance(node, CastOnRead) else w.dtype
            new = merged_weight(w, dtype, up, down, aor * float(scale))
            dict.__setitem__(node, leaf, new)
            changes.append((component, key, w, new))
    except BaseException:  # e.g. out of GPU memory: leave the model as it was
        for component, key, w, _ in changes:
            dict.__setitem__(*param_slot(getattr(pipe, component).params, key), w)
        raise
    conv_fast.clear_cache()  # derived conv weights of the originals are not needed any more
    handle = LoraHandle(lora.source, float(scale), changes)
    _applied(pipe).append(handle)
    return handle


def _applied(pipe) -> list:
    if getattr(pipe, "loras", None) is None:
        pipe.loras = []
    return pipe.loras


def remove_lora(pipe, handle=None) -> None:
    """Put back the arrays ``handle``'s LoRA replaced (bit-identical originals); None: every
    applied LoRA, last first. A LoRA whose weights a later one changed again must wait for
    that one to be removed first (InputError)."""
    applied = _applied(pipe)
    for h in reversed(list(applied)) if handle is None else [handle]:
        _restore(pipe, h, applied)


def _restore(pipe, handle, applied):
    if not any(h is handle for h in applied):
        raise InputError(f"remove_lora: {handle.source} is not applied to this pipeline")
    changes = handle.changes
    put_back(
        [(getattr(pipe, c).params, key, original, merged) for c, key, original, merged in changes],
        lambda i: (
            f"remove_lora: {changes[i][0]} {changes[i][1]} was changed after "
            f"{handle.source} was applied (another LoRA?); remove the later LoRAs first"
        ),
    )
    applied[:] = [h for h in applied if h is not handle]
    conv_fast.clear_cache()


def parse_lora_arg(text) -> tuple[str, float]:
    """A CLI ``--lora PATH[:SCALE]`` value -> (path, scale); scale 1.0 when not given."""
    path, sep, tail = str(text).rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            return str(text), 1.0  # a ':' of the path itself
        if not math.isfinite(scale):
            raise InputError(f"--lora {text}: the scale must be a finite number")
        return path, scale
    return str(text), 1.0
