"""LoRA files minisd refuses or reads in a second way (minisd/lora.py, minisd/lora_formats.py):
every error names the file's key, and a refused LoRA changes nothing. No reference needed."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from test_lora import bits, kohya, ours, peft, random_lora

from minisd.errors import InputError, WeightsError
from minisd.lora import apply_lora, parse_lora_arg, read_lora, remove_lora, resolve_lora
from minisd.weights import save_file

MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
NAME = "lora_unet_" + MODULE.replace(".", "_")


@pytest.fixture(scope="module")
def tiny(tiny_sd1_files):
    return tiny_sd1_files[0]


def one_module(pipe, rank=2):
    """(kohya keys, peft keys) of a LoRA for one attention projection."""
    lora = random_lora(pipe, alphas="none", only=lambda c, m: m == MODULE)
    up, down, _ = lora[("unet", MODULE)]
    assert down.shape[0] >= 2
    return kohya({("unet", MODULE): (up[:, :rank], down[:rank], None)}), peft(lora)


def bad_cases(flat, peft_keys):
    """name -> (a broken LoRA, what the error says)."""
    up, down = flat[f"{NAME}.lora_up.weight"], flat[f"{NAME}.lora_down.weight"]
    return {
        "unknown layout": ({**flat, "foo.bar.weight": up}, "'foo.bar.weight'.*known layout"),
        "kohya tensor": ({**flat, f"{NAME}.scale": up}, "scale'.*unknown LoRA tensor"),
        "kohya prefix": ({"lora_prior_unet_x.lora_up.weight": up}, "lora_prior_unet_x.*prefix"),
        "LoHa": ({f"{NAME}.hada_w1_a": up}, "hada_w1_a'.*LoHa"),
        "LoKr": ({f"{NAME}.lokr_w1": up}, "lokr_w1'.*LoKr"),
        "DoRA": ({**flat, f"{NAME}.dora_scale": up}, "dora_scale'.*DoRA"),
        "DoRA peft": ({**peft_keys, "unet.x.lora_magnitude_vector": up}, "DoRA"),
        "Tucker": ({**flat, f"{NAME}.lora_mid.weight": up}, "lora_mid"),
        "bias": ({**peft_keys, f"unet.{MODULE}.lora_B.bias": up[:, 0]}, "with a bias"),
        "ranks": ({**flat, f"{NAME}.lora_up.weight": up[:, :1]}, f"{NAME}.*ranks disagree"),
        "shape": ({**flat, f"{NAME}.lora_up.weight": up[:-1]}, f"{NAME}.*has shape"),
        "3x3 up": (
            {**flat, f"{NAME}.lora_up.weight": up[..., None, None].repeat(3, 2)},
            "1x1 kernel",
        ),  # fmt: skip
        "1-D": ({**flat, f"{NAME}.lora_up.weight": up[:, 0]}, "2-D .linear. or 4-D"),
        "int": ({**flat, f"{NAME}.lora_down.weight": down.astype(np.int32)}, "int32.*floating"),
        "no up": ({f"{NAME}.lora_down.weight": down}, "no matching LoRA up"),
        "no weight": (
            {k.replace("blocks_0_at", "blocks_7_at"): v for k, v in flat.items()},
            "blocks_7_attentions.*names no Linear / Conv2d weight",
        ),  # fmt: skip
        "no module": (
            {k.replace(".to_q.", ".to_z."): v for k, v in peft_keys.items()},
            "to_z.lora_A.weight'.*names no",
        ),  # fmt: skip
        "unprefixed": ({k[5:]: v for k, v in peft_keys.items()}, "known layout"),
        "alpha": ({**flat, f"{NAME}.alpha": np.ones(2, np.float32)}, "alpha must be one"),
        "twice": ({**flat, **peft_keys}, "given twice"),
        "empty": ({}, "no LoRA weights"),
        "only te2": (
            {"lora_te2_x.lora_up.weight": up, "lora_te2_x.lora_down.weight": down},
            "no LoRA weights for a UNet or a text encoder this model has",
        ),  # fmt: skip
    }


CASES = ["unknown layout", "kohya tensor", "kohya prefix", "LoHa", "LoKr", "DoRA", "DoRA peft",
         "Tucker", "bias", "ranks", "shape", "3x3 up", "1-D", "int", "no up", "no weight",
         "no module", "unprefixed", "alpha", "twice", "empty", "only te2"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_errors_name_the_key_and_change_nothing(tiny, case):
    pipe = ours(tiny)
    original = bits(pipe)
    flat, match = bad_cases(*one_module(pipe))[case]
    with pytest.raises(WeightsError, match=match):
        apply_lora(pipe, flat)
    assert bits(pipe) == original and not getattr(pipe, "loras", None)


def test_metadata_errors_and_bad_scales(tiny, tmp_path):
    pipe = ours(tiny)
    flat, peft_keys = one_module(pipe)
    rank = peft_keys[f"unet.{MODULE}.lora_A.weight"].shape[0]
    cases = [
        ({"unet.r": 9}, f"rank {rank}, but the 'lora_adapter_metadata' metadata gives r=9"),
        ({"unet.r": rank, "unet.use_dora": True}, "use_dora"),
        ("{not json", "not valid JSON"),
    ]
    for meta, match in cases:
        raw = meta if isinstance(meta, str) else json.dumps(meta)
        save_file(peft_keys, tmp_path / "m.safetensors", {"lora_adapter_metadata": raw})
        with pytest.raises(WeightsError, match=match):
            apply_lora(pipe, tmp_path / "m.safetensors")
    alpha = {f"unet.{MODULE}.alpha": np.array(2.0)}
    save_file({**peft_keys, **alpha}, tmp_path / "m.safetensors",
              {"lora_adapter_metadata": json.dumps({"unet.r": rank})})  # fmt: skip
    with pytest.raises(WeightsError, match="both as keys and in"):
        read_lora(tmp_path / "m.safetensors")
    for scale in (float("nan"), "1", True, None):
        with pytest.raises(InputError, match="scale"):
            apply_lora(pipe, flat, scale=scale)


def test_conv_1x1_and_linear_factors_interchange(tiny):
    """SD1's proj_in / proj_out are 1x1 convs: 2-D (linear) factors merge into them as the 4-D
    ones do, and 4-D 1x1 factors into a Linear weight; a 3x3 conv refuses 2-D factors."""
    pipe = ours(tiny)
    lora = random_lora(pipe, seed=6, only=lambda c, m: m.endswith(("proj_in", "proj_out", "to_q")))
    assert {down.ndim for (_, m), (_, down, _) in lora.items() if m.endswith("proj_in")} == {4}
    apply_lora(pipe, kohya(lora))
    want = bits(pipe)
    remove_lora(pipe)
    swapped = {
        k: (up[:, :, 0, 0], down[:, :, 0, 0], a) if down.ndim == 4 else
           (up[..., None, None], down[..., None, None], a)
        for k, (up, down, a) in lora.items()
    }  # fmt: skip
    apply_lora(pipe, peft(swapped))
    assert bits(pipe) == want
    conv = random_lora(pipe, seed=6, only=lambda c, m: m.endswith("resnets.0.conv1"))
    flat = {
        k: v[:, :, v.shape[2] // 2, v.shape[3] // 2] if v.ndim == 4 else v
        for k, v in kohya(conv).items()
    }
    with pytest.raises(WeightsError, match=r"resnets_0_conv1.*\(\d+, \d+\).*\(\d+, \d+, 3, 3\)"):
        apply_lora(pipe, flat)


def test_peft_alpha_keys_second_text_encoder_and_sources(tiny, tmp_path, caplog):
    """``.alpha`` next to lora_A / lora_B reads as kohya's alpha; SDXL's second text encoder is
    ignored with a warning; files, folders and dicts read alike."""
    pipe = ours(tiny)
    lora = random_lora(pipe, seed=8, alphas="per_module")
    want = resolve_lora(kohya(lora), pipe)
    fc1 = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    te2 = {f"{fc1}.lora_down.weight": np.ones((2, 3)), f"{fc1}.lora_up.weight": np.ones((4, 2))}
    with caplog.at_level(logging.WARNING, logger="minisd"):
        got = resolve_lora({**peft(lora), **te2}, pipe)
    assert "second text encoder" in caplog.text and "lora_te2_" in caplog.text
    assert got.keys() == want.keys()
    for key, (up, _, aor) in got.items():
        assert aor == want[key][2] and np.array_equal(up, want[key][0])
    (comp, module), (up, down, alpha) = next(iter(lora.items()))
    assert got[(comp, module + ".weight")][2] == alpha / down.shape[0]
    save_file(kohya(lora), tmp_path / "pytorch_lora_weights.safetensors")
    (tmp_path / "one").mkdir()
    save_file(peft(lora), tmp_path / "one" / "style.safetensors")
    for source in (tmp_path, tmp_path / "one", tmp_path / "one" / "style.safetensors"):
        assert resolve_lora(source, pipe).keys() == want.keys()
    save_file(peft(lora), tmp_path / "one" / "other.safetensors")
    with pytest.raises(WeightsError, match="found 2"):
        read_lora(tmp_path / "one")
    for bad, match in [
        (tmp_path / "style.ckpt", "never loaded.*to safetensors"),
        (tmp_path / "x", "no such"),
    ]:
        with pytest.raises(WeightsError, match=match):
            read_lora(bad)


def test_parse_lora_arg():
    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg("dir:x/a.safetensors:0.5") == ("dir:x/a.safetensors", 0.5)
    assert parse_lora_arg("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", 1.0)
    with pytest.raises(InputError, match="finite"):
        parse_lora_arg("a.safetensors:nan")
