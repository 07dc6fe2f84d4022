"""Diffusers pipeline folders: where the weights and configs of each component live."""

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
}
CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
    "model_index": "model_index.json",
}
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "tokenizer.json",
)


def is_pipeline_folder(path):
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


def weights_paths(folder):
    """{component: weights file} of a pipeline folder (fp16 variants accepted)."""
    folder = Path(folder)
    if not is_pipeline_folder(folder):
        raise WeightsError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    out = {}
    for part, (sub, name) in COMPONENTS.items():
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
    diffusers pipeline folder (used by ``config=``)."""
    folder = path_arg(folder, "config")
    if not folder.is_dir():
        raise ConfigError(f"{folder}: config folder not found")
    out = {}
    for part, rel in CONFIG_FILES.items():
        path = folder / rel
        if not path.is_file():
            raise ConfigError(f"{folder}: config folder lacks {rel}")
        out[part] = read_config(path)
    pad = pad_token_of(folder / "tokenizer")
    if pad is not None:
        out["tokenizer"] = {"pad_token": pad}
    return out


def text_prefix_of(path):
    """ "text_model." when a CLIP text encoder file uses transformers' older key layout."""
    tensors = read_header(path)[0]
    return TEXT_MODEL_PREFIX if any(k.startswith(TEXT_MODEL_PREFIX) for k in tensors) else ""


def write_configs(out, configs, tokenizer_source=None):
    """Write model_index.json, each component's config and the tokenizer/ folder.

    ``tokenizer_source``: a tokenizer folder to copy; otherwise the bundled CLIP vocabulary is
    written with ``configs["tokenizer"]["pad_token"]``.
    """
    out = Path(out)
    for part, rel in CONFIG_FILES.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(configs[part], indent=2, sort_keys=True) + "\n")
    tok = out / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    if tokenizer_source is not None and Path(tokenizer_source).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_source) / name).is_file():
                shutil.copyfile(Path(tokenizer_source) / name, tok / name)
    else:
        from minisd.tokenizer import write_vocab_files

        write_vocab_files(tok, pad_token=configs["tokenizer"]["pad_token"])
