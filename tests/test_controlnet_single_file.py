"""Original single-file ControlNets (lllyasviel's ``control_model.*`` layout, weights_tools/
controlnet.py) against diffusers.

The original-layout files are written from randomized diffusers ControlNets by this file's own
inverse mapping (:func:`to_original`, written from ldm's cldm.ControlNet module order, not from
weights_tools' tables). Diffusers' converter (``convert_controlnet_checkpoint``) turns them back
into exactly the diffusers state dict, so this file, diffusers and minisd agree on the layout;
minisd then loads the files and its outputs are compared with the diffusers model, every layer.
The tiny models keep the SD defaults that the weights cannot show (32 norm groups; 8 heads for
conv-projection SD1, 64-channel heads for SD2).
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import numpy as np
import pytest
from pipelines import build
from refharness import TOL, assert_rel, need, randomize_, save_pretrained, to_np, torch_dtype
from test_controlnet import compare_controlnet, make_inputs

import minisd
from minisd.controlnet import ControlNetConfig, ControlNetModel
from minisd.errors import ConfigError, InputError, WeightsError
from minisd.weights import save_file
from weights_tools.controlnet import load_single_file_controlnet, plan_controlnet

P = "control_model."
XATTN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
TINY = {
    "sd1": dict(  # conv projection, 8 heads, 2 layers per block
        block_out_channels=(32, 64, 64), layers_per_block=2, down_block_types=XATTN,
        cross_attention_dim=32, attention_head_dim=8,
        conditioning_embedding_out_channels=(8, 8, 16, 16),
    ),
    "sd2": dict(  # linear projection, 64-channel heads per block, depth 2 in block 1
        block_out_channels=(64, 128, 128), layers_per_block=1, down_block_types=XATTN,
        cross_attention_dim=48, attention_head_dim=(1, 2, 2), use_linear_projection=True,
        transformer_layers_per_block=(1, 2, 1), conditioning_channels=1,
        conditioning_embedding_out_channels=(8, 16, 16, 32),
    ),
}  # fmt: skip
FULL = {  # lllyasviel/control_v11p_sd15_*, thibaud/controlnet-sd21-*, an SD2 conv-projection one
    "sd15": dict(cross_attention_dim=768),
    "sd21": dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True),
    "sd2_conv": dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20)),
}  # fmt: skip

# --------------------------------------------------------------------------- original layout

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3",
          "conv_shortcut": "skip_connection"}  # fmt: skip


def _resnet(rest):
    head, tail = rest.split(".", 1)
    return f"{RESNET[head]}.{tail}"


def ldm_name(key, L, hint_blocks):
    """The original (cldm.ControlNet) name of a diffusers ControlNetModel key. ldm numbers
    input_blocks 0 (conv_in), then 1 + b (L + 1) + l (resnet .0, attention .1), the downsampler
    (.0.op) last in each block; the hint Sequential interleaves SiLUs, so convs are even."""
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, l, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + b * (L + 1) + l
        return (
            f"input_blocks.{i}.0.{_resnet(rest)}"
            if kind == "resnets"
            else f"input_blocks.{i}.1.{rest}"
        )
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (L + 1) + L}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key):
        return f"input_hint_block.{2 * int(m[1]) + 2}.{m[2]}"
    fixed = {"controlnet_mid_block": "middle_block_out.0", "conv_in": "input_blocks.0.0",
             "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             # SDXL: sgm's label_emb Sequential(Sequential(Linear, SiLU, Linear)), as in SDXL
             # UNet files (diffusers' converter has no SDXL ControlNet table to check it with)
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "controlnet_cond_embedding.conv_in": "input_hint_block.0",
             "controlnet_cond_embedding.conv_out": f"input_hint_block.{2 * hint_blocks + 2}",
             }  # fmt: skip
    module, param = key.rsplit(".", 1)
    return f"{fixed[module]}.{param}"


def to_original(sd, config, prefix=P):
    """{original key: tensor} of a diffusers ControlNet state dict."""
    hint = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    return {prefix + ldm_name(k, config["layers_per_block"], hint): v for k, v in sd.items()}


def diffusers_convert(orig, config):
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    return convert_controlnet_checkpoint(dict(orig), dict(config))


def write(orig, path, metadata=None):
    """Save {key: torch tensor} as safetensors (numpy arrays; float16 stays float16)."""
    save_file({k: to_np(v) for k, v in orig.items()}, path, metadata=metadata)
    return path


@pytest.fixture(scope="module")
def refs():
    """name -> randomized float32 diffusers ControlNetModel (every parameter, zero convs too)."""
    _, diffusers = need("torch", "diffusers")
    cache = {}

    def get(name):
        if name not in cache:
            model = diffusers.ControlNetModel(**TINY[name])
            cache[name] = randomize_(model, seed=11).eval()
        return cache[name]

    return get


def _file(ref, tmp_path, prefix=P, name="control_tiny.safetensors", **kw):
    return write(to_original(ref.state_dict(), ref.config, prefix), tmp_path / name, **kw)


# --------------------------------------------------------------------------- layout and config


@pytest.mark.parametrize("prefix", [P, ""])
@pytest.mark.parametrize("name", list(TINY))
def test_original_layout_agrees_with_diffusers_converter(refs, name, prefix):
    """This file's inverse mapping, converted back by diffusers, is the diffusers state dict."""
    torch = need("torch")
    ref = refs(name)
    sd = ref.state_dict()
    orig = to_original(sd, ref.config, prefix)
    assert len(orig) == len(sd) and f"{prefix}input_hint_block.14.weight" in orig
    back = diffusers_convert(orig, ref.config)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("prefix", [P, ""])
@pytest.mark.parametrize("name", list(TINY))
def test_loaded_tensors_and_config_equal_diffusers(refs, tmp_path, name, prefix):
    """Every tensor lands under its diffusers name, unchanged and memory-mapped; the inferred
    config is the reference's."""
    ref = refs(name)
    cfg, flat = load_single_file_controlnet(_file(ref, tmp_path, prefix))
    sd = {k: to_np(v) for k, v in ref.state_dict().items()}
    assert set(flat) == set(sd)
    assert all(np.array_equal(flat[k], sd[k]) for k in sd)
    assert all(isinstance(a.base, np.memmap) for a in flat.values())  # not read into memory
    assert ControlNetConfig.from_dict(cfg) == ControlNetConfig.from_dict(dict(ref.config))
    json.dumps(cfg)  # a diffusers config.json as it is


@pytest.mark.parametrize("name", list(FULL))
def test_full_size_key_table_and_config(name):
    """Full SD1.5 / SD2.1 ControlNet architectures on the meta device (keys and shapes only):
    diffusers' converter agrees with this file's layout, and the plan (config + key table)
    is diffusers'."""
    torch, diffusers = need("torch", "diffusers")
    with torch.device("meta"):
        ref = diffusers.ControlNetModel(**FULL[name])
    sd = ref.state_dict()
    orig = to_original(sd, ref.config)
    assert set(diffusers_convert(orig, ref.config)) == set(sd)
    cfg, names = plan_controlnet({k: tuple(v.shape) for k, v in orig.items()})
    assert ControlNetConfig.from_dict(cfg) == ControlNetConfig.from_dict(dict(ref.config))
    assert names == {k: to_original({k: None}, ref.config).popitem()[0] for k in sd}
    if name == "sd15":  # keys and shapes as a dump of control_v11p_sd15_canny.pth lists them
        shapes = {k: tuple(v.shape) for k, v in orig.items()}
        assert {k: shapes[P + k] for k in REAL_SD15} == REAL_SD15
        assert set(names.values()) == set(orig)


REAL_SD15 = {
    "input_hint_block.0.weight": (16, 3, 3, 3), "input_hint_block.4.weight": (32, 16, 3, 3),
    "input_hint_block.12.weight": (256, 96, 3, 3), "input_hint_block.14.weight": (320, 256, 3, 3),
    "zero_convs.3.0.weight": (320, 320, 1, 1), "zero_convs.6.0.weight": (640, 640, 1, 1),
    "zero_convs.11.0.bias": (1280,), "middle_block_out.0.weight": (1280, 1280, 1, 1),
    "input_blocks.7.0.skip_connection.weight": (1280, 640, 1, 1),
    "input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
    "input_blocks.11.0.emb_layers.1.bias": (1280,),
    "middle_block.1.proj_in.weight": (1280, 1280, 1, 1), "time_embed.0.weight": (1280, 320),
    "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight": (5120, 640),
}  # fmt: skip


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name, prefix", [("sd1", P), ("sd2", "")])
def test_single_file_matches_diffusers(refs, tmp_path, name, prefix, dtype):
    ref = refs(name)
    ours = ControlNetModel.from_pretrained(_file(ref, tmp_path, prefix), dtype=dtype)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    x, ctx, img, _ = make_inputs(ours.config, 2, 8, 8, dtype)
    errs, (downs, mid) = compare_controlnet(ours, ref, x, 500, ctx, img, None, dtype)
    assert len(errs) > 40 and max(errs.values()) <= TOL[dtype]
    assert ours.dtype == np.dtype(dtype) and len(downs) == len(ours.config.skip_channels())


def test_float16_file_and_weight_modes(refs, tmp_path):
    """A float16 file ("control_..._fp16.safetensors"): float32 results equal diffusers' with the
    same float16-rounded weights; lazy / stream keep float16 pages and give the eager result."""
    torch = need("torch")
    ref = copy.deepcopy(refs("sd1")).half()
    path = _file(ref, tmp_path, name="control_tiny_fp16.safetensors")
    _, flat = load_single_file_controlnet(path)
    assert all(a.dtype == np.float16 for a in flat.values())
    ours = ControlNetModel.from_pretrained(path)  # dtype None: float32 on the CPU
    assert ours.dtype == np.float32
    x, ctx, img, _ = make_inputs(ours.config, 1, 8, 8, "float32")
    downs, mid = ours(x, 300, ctx, img)
    with torch.no_grad():
        args = [torch.from_numpy(a) for a in (x, np.array([300]), ctx, img)]
        rd, rm = ref.float()(*args, return_dict=False)
    assert_rel(mid, to_np(rm), TOL["float32"], "mid")
    for k, (d, r) in enumerate(zip(downs, rd)):
        assert_rel(d, to_np(r), TOL["float32"], f"down {k}")
    for mode in ("lazy", "stream"):
        lazy = ControlNetModel.from_pretrained(path, dtype="float32", weights=mode)
        ld, lm = lazy(x, 300, ctx, img)
        assert np.array_equal(lm, mid) and all(np.array_equal(a, b) for a, b in zip(ld, downs))


def test_array_backend_and_stream_mode(refs, tmp_path, xp):
    """A single-file ControlNet on each array backend (CuPy where a GPU exists), weights kept
    as stored and cast on read, float32 against diffusers."""
    torch = need("torch")
    from minisd.backend import to_numpy

    ref = refs("sd2")
    device = "cpu" if xp is np else "cuda"
    cn = ControlNetModel.from_pretrained(
        _file(ref, tmp_path, ""), dtype="float32", device=device, weights="stream"
    )
    x, ctx, img, _ = make_inputs(cn.config, 2, 6, 10, "float32")
    downs, mid = cn(xp.asarray(x), 77, xp.asarray(ctx), xp.asarray(img))
    assert isinstance(mid, xp.ndarray)
    with torch.no_grad():
        args = [torch.from_numpy(a) for a in (x, np.array([77, 77]), ctx, img)]
        rd, rm = ref(*args, return_dict=False)
    assert_rel(to_numpy(mid), to_np(rm), TOL["float32"], "mid")
    for k, (d, r) in enumerate(zip(downs, rd)):
        assert_rel(to_numpy(d), to_np(r), TOL["float32"], f"down {k}")


def test_bundled_stable_diffusion_keys_are_ignored(refs, tmp_path):
    """ControlNet 1.0's full checkpoints also hold the SD model they were trained with."""
    ref = refs("sd1")
    orig = to_original(ref.state_dict(), ref.config)
    plain = ControlNetModel.from_pretrained(write(orig, tmp_path / "plain.safetensors"))
    extra = {"model.diffusion_model.input_blocks.0.0.weight": orig[P + "input_blocks.0.0.weight"],
             "first_stage_model.encoder.conv_in.bias": orig[P + "input_blocks.0.0.bias"],
             "betas": orig[P + "time_embed.0.bias"]}  # fmt: skip
    with pytest.warns(UserWarning, match="3 keys of a bundled Stable Diffusion model ignored"):
        full = ControlNetModel.from_pretrained(
            write({**orig, **extra}, tmp_path / "full.safetensors")
        )
    x, ctx, img, _ = make_inputs(plain.config, 1, 4, 4, "float32")
    (d1, m1), (d2, m2) = plain(x, 9, ctx, img), full(x, 9, ctx, img)
    assert np.array_equal(m1, m2) and all(np.array_equal(a, b) for a, b in zip(d1, d2))


def test_config_overrides(refs, tmp_path):
    """global_pool_conditions (the shuffle ControlNet), config= for unseen fields, hints in the
    metadata; a config that contradicts the tensors is refused naming the field."""
    ref = refs("sd1")
    path = _file(ref, tmp_path, name="control_v11e_sd15_shuffle.safetensors")
    with pytest.warns(UserWarning, match="global_pool_conditions=True"):
        assert not ControlNetModel.from_pretrained(path).config.global_pool_conditions
    pooled = ControlNetModel.from_pretrained(path, global_pool_conditions=True)
    x, ctx, img, _ = make_inputs(pooled.config, 1, 4, 4, "float32")
    assert pooled(x, 9, ctx, img)[1].shape == (1, 64, 1, 1)
    cn = ControlNetModel.from_pretrained(path, config={"attention_head_dim": 4})
    assert cn.config.heads == (4, 4, 4)
    hinted = _file(ref, tmp_path, metadata={"minisd_configs": '{"controlnet": {"norm_eps": 0.5}}'})
    assert ControlNetModel.from_pretrained(hinted).config.norm_eps == 0.5
    with pytest.raises(ConfigError, match=r"block_out_channels=\[32, 64\] does not fit"):
        ControlNetModel.from_pretrained(path, config={"block_out_channels": [32, 64]})
    with pytest.raises(InputError, match="single-file"):
        ControlNetModel.from_pretrained(tmp_path, global_pool_conditions=True)


# --------------------------------------------------------------------------- errors


def _change(orig, op, key, like):
    """drop ``key``; drop its module (weight and bias); add ``key`` as a copy of ``like``; cut
    the last column of ``key``."""
    if op == "drop":
        orig.pop(key)
    elif op == "drop_module":
        for k in [k for k in orig if k.startswith(key.rsplit(".", 1)[0] + ".")]:
            orig.pop(k)
    elif op == "add":
        orig[key] = orig[like].clone()
    else:
        orig[key] = orig[key][..., :-1].clone()


Z, H = P + "zero_convs.0.0.weight", P + "input_hint_block."
ERRORS = {  # name: (prefix, operation, the key named in the message, copied key, words)
    "missing_zero_conv": (P, "drop", P + "zero_convs.3.0.weight", None, "missing"),
    "missing_no_prefix": ("", "drop", "middle_block.2.out_layers.3.bias", None, "missing"),
    "missing_conv_out": (P, "drop_module", H + "14.weight", None, "missing"),
    "hint_gap": (P, "drop_module", H + "4.weight", None, "missing"),
    "extra_zero_conv": (P, "add", P + "zero_convs.99.0.weight", Z, "unexpected"),
    "extra_unknown": (P, "add", P + "input_blocks.1.1.foo.weight", Z, "unexpected"),
    "extra_top_level": (P, "add", "lora_unet_x.alpha", Z, "unexpected"),
    "extra_odd_hint": (P, "add", H + "3.weight", H + "2.weight", "unexpected"),
    "misshapen": (P, "cut", P + "input_blocks.1.1.proj_out.weight", None, "shape"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_files_name_file_and_key(refs, tmp_path, case):
    prefix, op, key, like, words = ERRORS[case]
    ref = refs("sd1")
    orig = to_original(ref.state_dict(), ref.config, prefix)
    _change(orig, op, key, like)
    path = write(orig, tmp_path / "control_bad.safetensors")
    with pytest.raises(WeightsError) as e:
        ControlNetModel.from_pretrained(path)
    msg = str(e.value)
    assert str(path) in msg and repr(key) in msg and words in msg, msg


def test_other_files_are_refused(refs, tmp_path, tiny_sd1_files):
    """A Stable Diffusion checkpoint, a Control-LoRA, a ControlNet-LLLite, a pickle, a
    non-safetensors file."""
    _, sd_file = tiny_sd1_files
    with pytest.raises(WeightsError, match="not a ControlNet") as e:
        ControlNetModel.from_pretrained(sd_file)
    assert str(sd_file) in str(e.value) and f"'{P}input_hint_block.0.weight'" in str(e.value)
    assert "model.diffusion_model" in str(e.value)
    orig = {
        k: to_np(v) for k, v in to_original(refs("sd1").state_dict(), refs("sd1").config).items()
    }
    lora = {"lora_controlnet": np.zeros(1, np.float32), **orig}  # Stability's marker key
    save_file(lora, tmp_path / "control-lora-canny-rank128.safetensors")
    with pytest.raises(WeightsError, match="Control-LoRA .*'lora_controlnet'") as e:
        ControlNetModel.from_pretrained(tmp_path / "control-lora-canny-rank128.safetensors")
    assert "control-lora-canny-rank128.safetensors" in str(e.value)
    key = "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.down.0.weight"
    save_file({key: orig[Z]}, tmp_path / "lllite.safetensors")
    with pytest.raises(WeightsError, match="ControlNet-LLLite .*lllite_unet_input_blocks_4"):
        ControlNetModel.from_pretrained(tmp_path / "lllite.safetensors")
    with pytest.raises(WeightsError, match="pickle"):
        ControlNetModel.from_pretrained(tmp_path / "control_sd15_canny.pth")
    (tmp_path / "control.bin.txt").write_text("x")
    with pytest.raises(WeightsError, match=r"folder or a \.safetensors file"):
        ControlNetModel.from_pretrained(tmp_path / "control.bin.txt")


# --------------------------------------------------------------------------- in the pipeline


def test_pipeline_loads_single_file_controlnet(tmp_path):
    """StableDiffusion.from_pretrained(folder, controlnet=file) gives the images of the same
    ControlNet loaded from its diffusers folder. The ControlNet is ControlNetModel.from_unet of
    the tiny SD1 pipeline's UNet (4 norm groups, 2 heads: carried in the file's metadata)."""
    torch, diffusers = need("torch", "diffusers")
    folder = tmp_path / "sd1"
    pipe = build("sd1", folder)
    cn = randomize_(diffusers.ControlNetModel.from_unet(pipe.unet), seed=7).eval()
    with torch.no_grad():  # keep sampling well-conditioned, as test_pipeline_controlnet does
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            conv.weight.mul_(0.1)
    hints = {"controlnet": {"norm_num_groups": 4, "attention_head_dim": 2}}
    path = _file(cn, tmp_path, metadata={"minisd_configs": json.dumps(hints)})
    cn_folder = save_pretrained(cn, tmp_path / "controlnet")
    control = np.random.default_rng(1).uniform(size=(64, 64, 3))
    args = dict(prompt="a cat", num_inference_steps=2, height=64, width=64, seed=0,
                output_type="np", progress=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the hints fit the tensors: no warning
        a = minisd.StableDiffusion.from_pretrained(folder, controlnet=path)
    b = minisd.StableDiffusion.from_pretrained(folder, controlnet=cn_folder)
    assert a.controlnet.config == b.controlnet.config
    img = a(**args, control_image=control)
    assert np.array_equal(img, b(**args, control_image=control))
    assert np.abs(img - a(**args)).max() > 1e-3  # the ControlNet was used
