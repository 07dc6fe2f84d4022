"""Diffusers pipeline folders: where the weights and configs of each component live.

SD folders hold unet / vae / text_encoder; SDXL folders (model_index.json lists
``text_encoder_2``) add text_encoder_2 and tokenizer_2, and a refiner has no text_encoder /
tokenizer (listed as [null, null]).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from minisd.errors import ConfigError, WeightsError
from minisd.weights import find_weights, read_config, read_header

from .keymaps import TEXT_MODEL_PREFIX
from .output import path_arg

# component -> (subfolder, weights file name as save_pretrained writes it)
COMPONENTS = {
    "unet": ("unet", "diffusion_pytorch_model.safetensors"),
    "vae": ("vae", "diffusion_pytorch_model.safetensors"),
    "text_encoder": ("text_encoder", "model.safetensors"),
    "text_encoder_2": ("text_encoder_2", "model.safetensors"),
}
CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "scheduler": "scheduler/scheduler_config.json",
    "model_index": "model_index.json",
}
TOKENIZERS = {"tokenizer": "tokenizer", "tokenizer_2": "tokenizer_2"}
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "tokenizer.json",
)


def is_pipeline_folder(path):
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


def folder_parts(index):
    """The weight components a pipeline folder with model_index.json ``index`` holds."""
    if "text_encoder_2" not in index:
        return ("unet", "vae", "text_encoder")
    first = (index.get("text_encoder") or [None])[0] is not None
    return ("unet", "vae") + (("text_encoder",) if first else ()) + ("text_encoder_2",)


def weights_paths(folder):
    """{component: weights file} of a pipeline folder (fp16 variants accepted)."""
    folder = Path(folder)
    if not is_pipeline_folder(folder):
        raise WeightsError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    out = {}
    for part in folder_parts(read_config(folder / "model_index.json")):
        sub, name = COMPONENTS[part]
        out[part] = find_weights(folder / sub, names=(name,))
    return out


def pad_token_of(folder):
    """The pad token of a ``tokenizer/`` folder (SD1: <|endoftext|>, SD2: "!"), or None."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = Path(folder) / name
        if path.is_file():
            pad = read_config(path).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad is not None:
                return pad
    return None


def read_folder_configs(folder):
    """{"unet", "vae", "text_encoder", "scheduler", "model_index", "tokenizer"} configs of a
    diffusers pipeline folder (used by ``config=``); SDXL: "text_encoder_2" and "tokenizer_2"
    too (a refiner has no "text_encoder" / "tokenizer")."""
    folder = path_arg(folder, "config")
    if not folder.is_dir():
        raise ConfigError(f"{folder}: config folder not found")
    index = folder / CONFIG_FILES["model_index"]
    parts = folder_parts(read_config(index)) if index.is_file() else folder_parts({})
    out = {}
    for part in (*parts, "scheduler", "model_index"):
        path = folder / CONFIG_FILES[part]
        if not path.is_file():
            raise ConfigError(f"{folder}: config folder lacks {CONFIG_FILES[part]}")
        out[part] = read_config(path)
    for name, sub in TOKENIZERS.items():
        pad = pad_token_of(folder / sub)
        if pad is not None:
            out[name] = {"pad_token": pad}
    return out


def text_prefix_of(path):
    """ "text_model." when a CLIP text encoder file uses transformers' older key layout."""
    tensors = read_header(path)[0]
    return TEXT_MODEL_PREFIX if any(k.startswith(TEXT_MODEL_PREFIX) for k in tensors) else ""


def write_configs(out, configs, tokenizer_source=None, tokenizer_2_source=None):
    """Write model_index.json, each component's config and the tokenizer/ folder (SDXL:
    tokenizer_2/ too; parts whose config is None are left out).

    ``tokenizer_source`` / ``tokenizer_2_source``: a tokenizer folder to copy; otherwise the
    bundled CLIP vocabulary is written with ``configs["tokenizer"]["pad_token"]`` (or
    ``configs["tokenizer_2"]``'s).
    """
    out = Path(out)
    for part, rel in CONFIG_FILES.items():
        if configs.get(part) is None:
            continue
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(configs[part], indent=2, sort_keys=True) + "\n")
    sources = {"tokenizer": tokenizer_source, "tokenizer_2": tokenizer_2_source}
    for name, sub in TOKENIZERS.items():
        if configs.get(name) is not None:
            _write_tokenizer(out / sub, configs[name], sources[name])


def _write_tokenizer(tok, config, source):
    tok.mkdir(parents=True, exist_ok=True)
    if source is not None and Path(source).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, tok / name)
    else:
        from minisd.tokenizer import write_vocab_files

        write_vocab_files(tok, pad_token=config["pad_token"])
