"""The configs a conversion is told rather than infers: a diffusers folder given as ``config=``,
or the configs :func:`weights_tools.to_original` stored in a file's safetensors metadata (key
``minisd_configs``). Unusable hints are ignored with a warning (the tensors are then the only
source); a config folder that cannot be read is an error.
"""

from __future__ import annotations

import json
import warnings

from minisd.errors import ConfigError

from .presets import PREDICTION_TYPES

HINTS_KEY = "minisd_configs"


def given_configs(config, hints, source):
    """{part: config} from ``config`` (a folder) or ``hints`` (a dict, or the metadata dict
    holding ``minisd_configs``); {} when neither says anything."""
    if config is not None:
        from .folders import read_folder_configs

        return read_folder_configs(config)
    if isinstance(hints, dict) and HINTS_KEY in hints:
        return _parse_hints(hints[HINTS_KEY], source)
    if not isinstance(hints, dict):
        return {}
    return {k: v for k, v in hints.items() if isinstance(v, dict)}  # not metadata's strings


def _parse_hints(raw, source):
    """The configs that to_original stored in a file's metadata, or {} with a warning when they
    cannot be used (the architecture is then inferred from the tensors alone)."""
    try:
        hints = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        problem = "is not valid JSON"
    else:
        problem = _hints_problem(hints)
    if problem is None:
        return hints
    warnings.warn(
        f"{source or 'checkpoint'}: metadata {HINTS_KEY} {problem}; ignored", stacklevel=5
    )
    return {}


def _hints_problem(hints):
    """What is wrong with decoded hints (None: nothing)."""
    if not isinstance(hints, dict):
        return "is not a JSON object"
    for part, cfg in hints.items():
        if not isinstance(cfg, dict):
            return f"has {part!r} of type {type(cfg).__name__}, not a JSON object"
    pred = hints.get("scheduler", {}).get("prediction_type")
    if pred is not None and pred not in PREDICTION_TYPES:
        return f"has prediction_type={pred!r}, not one of {', '.join(PREDICTION_TYPES)}"
    if "scheduler" in hints and not isinstance(hints["scheduler"].get("_class_name"), str):
        return "has a scheduler config without _class_name"
    for tok in ("tokenizer", "tokenizer_2"):
        if tok in hints and not isinstance(hints[tok].get("pad_token"), str):
            return f"has a {tok} entry without pad_token"
    return None


def apply_given(out, config, hints, source, structure):
    """Put the configs given by a config folder or hints into ``out`` (inferred configs), each
    checked against the tensors on its ``structure`` fields ({part: field names}, see
    configs.STRUCTURE). Returns (given configs, "config" | "hints" | "inferred")."""
    given = given_configs(config, hints, source)
    if not given:
        return given, "inferred"
    kind = "config" if config is not None else "hints"
    for part, fields in structure.items():
        if part in given and out.get(part) is not None:
            out[part] = _checked(out[part], given[part], part, kind, config, fields)
    return given, kind


def given_prediction(prediction_type, given, config):
    """The prediction type asked for, else the given scheduler's, else None."""
    pred = prediction_type or given.get("scheduler", {}).get("prediction_type")
    if pred is not None and pred not in PREDICTION_TYPES:  # (hints are checked when read)
        raise ConfigError(
            f"{config}: scheduler/scheduler_config.json: prediction_type={pred!r}: expected one "
            f"of {', '.join(PREDICTION_TYPES)}"
        )
    return pred


def _checked(inferred, given, part, source, config, fields):
    """The given config, after checking it agrees with the tensors on structural fields."""
    for field in fields:
        want, have = inferred.get(field), given.get(field)
        if isinstance(want, list) and isinstance(have, (list, tuple)):
            have = list(have)
        if have != want:
            msg = (
                f"{part}: {field}={have!r} in the {source} config does not fit the "
                f"checkpoint's tensors, which say {want!r}"
            )
            if source == "config":
                raise ConfigError(f"{config}: {msg}")
            warnings.warn(msg + "; hints ignored", stacklevel=4)
            return inferred
    return dict(given)
