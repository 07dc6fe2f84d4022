"""Single-file SDXL ControlNets (weights_tools/controlnet.py): bare diffusers-layout weights, the
usual form (e.g. diffusers_xl_canny_full.safetensors; SD ones too), and the original
``control_model.*`` layout with sgm's ``label_emb`` (tests/test_controlnet_single_file.py's
inverse mapping).

The published SDXL architectures (diffusers/controlnet-canny-sdxl-1.0 and -mid / -small-like
variants) are inferred from their shapes alone (meta device, no weights). The tiny models carry
what their shapes cannot show (8 norm groups, 2-4 heads, 8-wide time-id sinusoids) in a config
or the file's metadata, and are compared with diffusers every layer, float64 and float32.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
from refharness import TOL, diffusers_models, need, to_np, torch_dtype
from test_controlnet import compare_controlnet, make_inputs
from test_controlnet_single_file import TINY as SD_SINGLE
from test_controlnet_single_file import P, to_original, write
from test_controlnet_xl import FULL, TINY, added_kwargs

from minisd.controlnet import ControlNetConfig, ControlNetModel, param_shapes
from minisd.errors import ConfigError, WeightsError
from minisd.weights import save_file
from weights_tools.controlnet import load_single_file_controlnet, plan_controlnet


@pytest.fixture(scope="module")
def refs(ref_cache):
    """name -> (randomized float32 diffusers ControlNetModel of TINY[name], its folder)."""
    return diffusers_models(ref_cache, "ControlNetModel", TINY, "cnxl_single", seed=12)


def _built_depths(cfg):
    """transformer_layers_per_block with 1 for the blocks without attention (their depth is
    never built, so the shapes cannot show it); the last entry is also the mid block's."""
    kinds, depths = cfg.down_block_types, cfg.transformer_layers_per_block
    n = len(kinds)
    return tuple(
        d if kind == "CrossAttnDownBlock2D" or i == n - 1 else 1
        for i, (d, kind) in enumerate(zip(depths, kinds))
    )


def same_model(a, b):
    """Two ControlNetConfigs describe the same model: the same key table, and equal fields up
    to the depths of blocks without attention."""
    assert param_shapes(a) == param_shapes(b)
    a = dataclasses.replace(a, transformer_layers_per_block=_built_depths(a))
    return a == dataclasses.replace(b, transformer_layers_per_block=_built_depths(b))


@pytest.mark.parametrize("layout", ["diffusers", "original", "original_bare"])
@pytest.mark.parametrize("name", list(FULL))
def test_published_architectures_are_inferred(name, layout):
    """From the shapes alone: SDXL's heads of 64 channels, the 2048-wide context, the
    micro-conditioning MLP (2816 inputs, 256-wide time-id sinusoids), per-block depths."""
    torch, diffusers = need("torch", "diffusers")
    with torch.device("meta"):
        ref = diffusers.ControlNetModel.from_config(FULL[name])
    sd = ref.state_dict()
    prefix = P if layout == "original" else ""  # "original_bare": keys without control_model.
    files = dict(sd) if layout == "diffusers" else to_original(sd, ref.config, prefix)
    cfg, names = plan_controlnet({k: tuple(v.shape) for k, v in files.items()})
    ours, theirs = ControlNetConfig.from_dict(cfg), ControlNetConfig.from_dict(dict(ref.config))
    assert ours.addition_embed_type == "text_time" and ours.addition_time_embed_dim == 256
    assert ours.heads == (5, 10, 20) and ours.cross_attention_dim == 2048
    assert same_model(ours, theirs)
    assert set(names) == set(sd) and set(names.values()) == set(files)
    if layout == "diffusers":
        assert all(k == v for k, v in names.items())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["base", "mid"])
def test_original_layout_matches_diffusers(refs, tmp_path, name, dtype):
    """control_model.* with label_emb; what the shapes cannot show in the metadata hints."""
    ref, _ = refs(name)
    hints = {k: TINY[name][k] for k in ("norm_num_groups", "attention_head_dim")}
    hints["addition_time_embed_dim"] = TINY[name]["addition_time_embed_dim"]
    meta = {"minisd_configs": json.dumps({"controlnet": hints})}
    orig = to_original(ref.state_dict(), ref.config)
    assert P + "label_emb.0.2.bias" in orig
    path = write(orig, tmp_path / "control_sdxl_tiny.safetensors", metadata=meta)
    ours = ControlNetModel.from_pretrained(path, dtype=dtype)
    assert same_model(ours.config, ControlNetConfig.from_dict(dict(ref.config)))
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    x, ctx, img, _ = make_inputs(ours.config, 2, 8, 8, dtype)
    added = added_kwargs(ours.config, 2, dtype)
    errs, _ = compare_controlnet(ours, ref, x, 500, ctx, img, None, dtype, added=added)
    assert len(errs) > 30 and max(errs.values()) <= TOL[dtype]
    assert "add_embedding.linear_1" in errs


def test_diffusers_layout_file_with_config(refs, tmp_path):
    """A folder's weights file alone, its config given as config= (a folder, a config.json or
    a dict): the folder's residuals bit for bit; a config that contradicts the shapes (the
    add_embedding's input width) is refused naming the field."""
    ref, folder = refs("mid")
    single = tmp_path / "diffusers_xl_tiny_mid.safetensors"
    single.write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    cfg, flat = load_single_file_controlnet(single, config=folder)
    sd = {k: to_np(v) for k, v in ref.state_dict().items()}
    assert set(flat) == set(sd) and all(np.array_equal(flat[k], sd[k]) for k in sd)
    a = ControlNetModel.from_pretrained(single, config=folder / "config.json")
    b = ControlNetModel.from_pretrained(folder)
    assert same_model(a.config, b.config)
    x, ctx, img, _ = make_inputs(a.config, 2, 4, 6, "float32")
    added = added_kwargs(a.config, 2, "float32")
    (d1, m1), (d2, m2) = (m(x, 9, ctx, img, added_cond_kwargs=added) for m in (a, b))
    assert np.array_equal(m1, m2) and all(np.array_equal(p, q) for p, q in zip(d1, d2))
    bad = {
        **json.loads((folder / "config.json").read_text()),
        "projection_class_embeddings_input_dim": 96,
    }
    with pytest.raises(ConfigError, match="projection_class_embeddings_input_dim=96 does not fit"):
        ControlNetModel.from_pretrained(single, config=bad)
    with pytest.raises(ConfigError, match="addition_embed_type=None does not fit"):
        ControlNetModel.from_pretrained(single, config={"addition_embed_type": None})


def test_sd_diffusers_layout_file_loads(ref_cache, tmp_path):
    """Bare diffusers-layout weights of an SD2-like ControlNet (a folder's weights file alone):
    the file's own keys, the architecture inferred, the folder's outputs bit for bit; missing
    keys named by their diffusers names (one the inference reads, one it does not)."""
    get = diffusers_models(ref_cache, "ControlNetModel", SD_SINGLE, "cnxl_single_sd", seed=11)
    ref, folder = get("sd2")
    single = tmp_path / "controlnet_sd2.safetensors"
    single.write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    cfg, flat = load_single_file_controlnet(single)
    sd = {k: to_np(v) for k, v in ref.state_dict().items()}
    assert set(flat) == set(sd) and all(np.array_equal(flat[k], sd[k]) for k in sd)
    assert ControlNetConfig.from_dict(cfg) == ControlNetConfig.from_dict(dict(ref.config))
    a, b = ControlNetModel.from_pretrained(single), ControlNetModel.from_pretrained(folder)
    x, ctx, img, _ = make_inputs(a.config, 1, 4, 6, "float32")
    (d1, m1), (d2, m2) = a(x, 9, ctx, img), b(x, 9, ctx, img)
    assert np.array_equal(m1, m2) and all(np.array_equal(p, q) for p, q in zip(d1, d2))
    flat = {k: v for k, v in sd.items() if k != "down_blocks.1.resnets.0.conv2.weight"}
    save_file(flat, tmp_path / "broken.safetensors")  # a key the inference reads
    with pytest.raises(WeightsError, match="missing key 'down_blocks.1.resnets.0.conv2.weight'"):
        ControlNetModel.from_pretrained(tmp_path / "broken.safetensors")
    flat = {k: v for k, v in sd.items() if k != "controlnet_down_blocks.2.bias"}
    save_file(flat, tmp_path / "broken.safetensors")  # any other key
    with pytest.raises(WeightsError, match="'controlnet_down_blocks.2.bias'"):
        ControlNetModel.from_pretrained(tmp_path / "broken.safetensors")
