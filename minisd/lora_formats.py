"""LoRA file formats: key names -> (component, module, factors, alpha / rank).

Three spellings of the same thing are read (the ones diffusers' ``load_lora_weights`` reads for
SD1.x / SD2.x and SDXL; minisd/lora.py documents the math and where minisd differs from
diffusers):

kohya / A1111 (sd-scripts, LyCORIS LoCon)   one module name, ``.`` of the module path as ``_``:
    lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight   (r, in[, kh, kw])
    lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight     (out, r[, 1, 1])
    lora_unet_down_blocks_0_attentions_0_proj_in.alpha              ()    scale alpha / r
    lora_te_text_model_encoder_layers_0_self_attn_q_proj...         (lora_te1_ too)
    lora_te2_text_model_encoder_layers_0_mlp_fc1...                 SDXL's text_encoder_2
  SDXL files (sd-scripts trains SDXL on the original SGM UNet) name UNet modules by their
  original paths, ``.`` as ``_`` as well:
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q...   (down_blocks.1.attentions.0...)
    lora_unet_middle_block_0_in_layers_2...                         (mid_block.resnets.0.conv1)
    lora_unet_output_blocks_2_2_conv..., lora_unet_label_emb_0_0... (up_blocks.0.upsamplers.0...)
diffusers / peft                             the module path itself:
    unet.down_blocks.0.attentions.0.proj_in.lora_A.weight           down
    unet.down_blocks.0.attentions.0.proj_in.lora_B.weight           up
    text_encoder.[text_model.]encoder.layers.0.mlp.fc1.lora_A.weight
    text_encoder_2.[text_model.]encoder.layers.0.self_attn.q_proj.lora_A.weight   (SDXL)
    (also ``.lora.down/up.weight`` and ``.lora_linear_layer.down/up.weight``)
older diffusers attention processors:
    unet.<attention>.processor.to_q_lora.down.weight                (to_k, to_v, to_out too)
    text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight

A kohya name is resolved later, against the model's own parameter names and, for a UNet, the
original names of its modules (minisd/lora.py), so ``_`` inside names (``proj_in``,
``transformer_blocks``) needs no guessing here. Keys are read whatever the pipeline; which
components it has is decided there too (a second text encoder's keys are ignored for SD1.x /
SD2.x, as diffusers ignores them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np

from .errors import WeightsError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # the pipeline's attribute names
# kohya prefixes -> component (text_encoder_2: SDXL's OpenCLIP bigG encoder)
KOHYA_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)
KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
DOTTED_ROLES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)
# <attention>[.processor].to_q_lora.down.weight: the attention-processor layout of diffusers < 0.21
PROCESSOR = re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_CLIP_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
PROCESSOR_MODULE = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": _CLIP_PROJ,
    "text_encoder_2": _CLIP_PROJ,
}
# Adapter kinds that are not a low-rank product, found by a part of their key names.
REFUSED = (
    ("hada_", "LoHa (Hadamard product)"),
    ("lokr_", "LoKr (Kronecker product)"),
    ("dora_scale", "DoRA (weight-decomposed LoRA)"),
    ("lora_magnitude_vector", "DoRA (weight-decomposed LoRA)"),
    ("lora_mid", "LoCon with a Tucker core (lora_mid)"),
    ("oft_", "OFT / BOFT"),
    ("lora_B.bias", "LoRA with a bias (peft lora_bias)"),
    ("lora_up.bias", "LoRA with a bias"),
)
REFUSED_SUFFIXES = (
    (".diff", "a full weight difference (LyCORIS 'full')"),
    (".diff_b", "a full bias difference (LyCORIS 'full')"),
    (".w_norm", "norm-layer weights (LyCORIS)"),
    (".b_norm", "norm-layer weights (LyCORIS)"),
    (".a1.weight", "GLoRA"),
    (".on_input", "IA3"),
)
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig per component, as JSON


@dataclasses.dataclass(frozen=True)
class Factors:
    """One module's LoRA: delta W = alpha_over_rank * up @ down (before the user's scale)."""

    up: np.ndarray  # (out, r) or (out, r, 1, 1)
    down: np.ndarray  # (r, in) or (r, in, kh, kw)
    alpha_over_rank: float
    key: str  # the file's key of ``down``, for messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]


# --------------------------------------------------------------------------- key names


def refuse_other_kinds(key, source) -> None:
    """WeightsError for keys of adapter kinds other than LoRA / LoCon, naming the kind."""
    kinds = [kind for part, kind in REFUSED if part in key]
    kinds += [kind for suffix, kind in REFUSED_SUFFIXES if key.endswith(suffix)]
    if kinds:
        raise WeightsError(
            f"{source}: key {key!r}: {kinds[0]} adapters are not supported; minisd merges plain "
            "LoRA / LoCon factors (lora_down / lora_up, lora_A / lora_B)"
        )


def classify(key, source):
    """``key`` -> (component, module, kohya, role); role: "down" | "up" | "alpha"."""
    refuse_other_kinds(key, source)
    if key.startswith("lora_"):
        return _classify_kohya(key, source)
    component, _, rest = key.partition(".")
    if component not in COMPONENTS or not rest:
        raise WeightsError(
            f"{source}: key {key!r} is not a LoRA key of a known layout: expected "
            "'lora_unet_…' / 'lora_te_…' / 'lora_te2_…' (kohya) or 'unet.…' / "
            "'text_encoder.…' / 'text_encoder_2.…' (diffusers, peft). (diffusers' "
            "load_lora_weights ignores keys without such a prefix.)"
        )
    module, role = _dotted_role(rest, component, key, source)
    if component != "unet":
        module = module.removeprefix("text_model.")  # transformers 5 names; minisd's params
    return component, module, False, role


def _classify_kohya(key, source):
    name, _, suffix = key.partition(".")
    match = [(p, c) for p, c in KOHYA_PREFIXES if name.startswith(p)]
    if not match:
        raise WeightsError(
            f"{source}: key {key!r}: unknown kohya prefix (expected lora_unet_, lora_te_, "
            "lora_te1_ or lora_te2_)"
        )
    if suffix not in KOHYA_ROLES:
        raise WeightsError(
            f"{source}: key {key!r}: unknown LoRA tensor {suffix!r} (expected lora_down.weight, "
            "lora_up.weight or alpha)"
        )
    prefix, component = match[0]
    return component, name[len(prefix) :], True, KOHYA_ROLES[suffix]


def _dotted_role(rest, component, key, source):
    """(module path, role) of a diffusers / peft key without its component prefix."""
    m = PROCESSOR.match(rest)
    if m:
        attention, proj, role = m.groups()
        return f"{attention}.{PROCESSOR_MODULE[component][proj]}", role
    for suffix, role in DOTTED_ROLES:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return rest[: -len(suffix)], role
    raise WeightsError(
        f"{source}: key {key!r}: unknown LoRA tensor (expected <module>.lora_A.weight / "
        ".lora_B.weight, .lora.down/up.weight, .lora_linear_layer.down/up.weight, .alpha, or "
        "<attention>.processor.to_q_lora.down/up.weight)"
    )


# --------------------------------------------------------------------------- tensors


def parse(flat, metadata, source):
    """``{key: array}`` of a LoRA file -> {(component, module, kohya): Factors}.

    Checks: every module has a float ``down`` and ``up`` whose ranks agree, conv factors have
    the LoCon layout, alphas are scalars, and no module is given twice."""
    if not flat:
        raise WeightsError(f"{source}: no LoRA weights in it")
    groups = {}
    for key in sorted(flat):
        c = classify(key, source)
        roles = groups.setdefault(c[:3], {})
        if c[3] in roles:
            raise WeightsError(f"{source}: key {key!r}: module given twice ({roles[c[3]][0]!r})")
        roles[c[3]] = (key, flat[key])
    meta = component_metadata(metadata, source)
    return {m: _factors(m, roles, meta, source) for m, roles in groups.items()}


def _factors(module, roles, meta, source):
    """Factors of one module from its {role: (key, array)}."""
    for role in ("down", "up"):
        if role not in roles:
            other = next(iter(roles.values()))[0]
            raise WeightsError(f"{source}: key {other!r} has no matching LoRA {role} factor")
    (kd, down), (ku, up) = roles["down"], roles["up"]
    down, up = _float(down, kd, source), _float(up, ku, source)
    _check_layout(down, up, kd, ku, source)
    rank = down.shape[0]
    if "alpha" in roles:
        if meta.get(module[0]):
            raise WeightsError(
                f"{source}: key {roles['alpha'][0]!r}: alphas both as keys and in the "
                f"'{METADATA_KEY}' metadata; keep one"
            )
        aor = _alpha(*roles["alpha"], source) / rank
    else:
        aor = metadata_scale(meta.get(module[0]), _peft_names(*module[:2]), rank, kd, source)
    return Factors(up=up, down=down, alpha_over_rank=aor, key=kd)


def _float(a, key, source):
    a = np.asarray(a)
    if a.dtype.kind != "f":
        raise WeightsError(
            f"{source}: key {key!r} is stored as {a.dtype}; LoRA factors must be floating point"
        )
    return a


def _check_layout(down, up, kd, ku, source):
    """down (r, in) or (r, in, kh, kw); up (out, r) or (out, r, 1, 1); ranks agree."""
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or 0 in down.shape or 0 in up.shape:
        raise WeightsError(
            f"{source}: key {kd!r} / {ku!r}: LoRA factors must be 2-D (linear) or 4-D (conv) "
            f"and non-empty, got shapes {down.shape} and {up.shape}"
        )
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        raise WeightsError(
            f"{source}: key {ku!r}: a conv LoRA's up factor must be a 1x1 kernel "
            f"(out, r, 1, 1), got {up.shape}"
        )
    if up.shape[1] != down.shape[0]:
        raise WeightsError(
            f"{source}: key {kd!r} / {ku!r}: ranks disagree: down {down.shape} has rank "
            f"{down.shape[0]}, up {up.shape} has {up.shape[1]}"
        )


def _alpha(key, a, source) -> float:
    a = np.asarray(a)
    value = a.reshape(-1)[0] if a.size == 1 else None
    if value is None or a.dtype.kind not in "fiu" or not math.isfinite(value):
        raise WeightsError(f"{source}: key {key!r}: alpha must be one finite number, got {a!r}")
    return float(value)


# --------------------------------------------------------------------------- diffusers metadata


def component_metadata(metadata, source):
    """diffusers' ``lora_adapter_metadata`` (the LoraConfig of each component, as saved by
    ``save_lora_weights(..., unet_lora_adapter_metadata=...)``) -> {component: config dict}."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{source}: metadata {METADATA_KEY!r} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{source}: metadata {METADATA_KEY!r} is not a JSON object")
    out = {}
    for c in COMPONENTS:
        cfg = {k[len(c) + 1 :]: v for k, v in data.items() if k.startswith(c + ".")}
        if cfg.get("use_dora"):
            raise WeightsError(f"{source}: {c}: DoRA adapters (use_dora) are not supported")
        out[c] = cfg
    return out


def _peft_names(component, module):
    """The module's names as peft may have seen them: a text encoder's with and without
    transformers' ``text_model.`` (CLIPTextModel has none in transformers 5,
    CLIPTextModelWithProjection still has it)."""
    return (module,) if component == "unet" else (module, "text_model." + module)


def metadata_scale(cfg, names, rank, key, source) -> float:
    """alpha / r of a module under a peft LoraConfig dict (1.0 without one: peft's and
    diffusers' ``W + B @ A`` when a file carries no alphas). ``names``: the module's paths
    (:func:`_peft_names`). Patterns match as in peft's ``get_pattern_key``: the first whose regex
    matches the end of a module path."""
    if not cfg:
        return 1.0
    r = _pattern(cfg.get("rank_pattern") or {}, names, cfg.get("r", 8))
    alpha = _pattern(cfg.get("alpha_pattern") or {}, names, cfg.get("lora_alpha", 8))
    if r != rank:
        raise WeightsError(
            f"{source}: key {key!r} has rank {rank}, but the '{METADATA_KEY}' metadata gives "
            f"r={r} for {names[0]}"
        )
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _pattern(patterns, names, default):
    for pattern, value in patterns.items():
        if any(re.match(rf"(.*\.)?({pattern})$", name) for name in names):
            return value
    return default
