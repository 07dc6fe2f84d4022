"""LoRAs on SDXL (minisd/lora.py) against diffusers' StableDiffusionXLPipeline.load_lora_weights +
fuse_lora, on tiny base / refiner folders written by diffusers (tests/pipelines_xl.py).

Random LoRAs (tests/test_lora.py: rank 2-4, nonzero up factors, alpha != rank) target every
Linear / Conv2d weight of the UNet (attention projections, ff, proj_in / proj_out, resnet 3x3
convs as LoCon, time_emb_proj, conv_shortcut, samplers, conv_in / conv_out, the time and
micro-conditioning embeddings) and of both text encoders. Two formats: diffusers / peft
(``unet.``, ``text_encoder.``, ``text_encoder_2.``) and sd-scripts' SDXL kohya files, whose
``lora_unet_`` names are the original SGM module paths (``input_blocks_4_1_...``): this file
writes them from weights_tools' key map, and diffusers' own converter is the judge that they are
what it reads (test_sgm_names_are_diffusers_for_sdxl_base checks every module of the full-size
SDXL base UNet). Merged weights must equal diffusers' fused ones (float64 <= 1e-10, float32
<= 1e-4, relative), and float32 pipeline latents must agree (<= 1e-4).
"""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest
from pipelines_xl import build
from refharness import TOL, assert_rel, need, rel_err, torch_dtype
from test_lora import (
    bits,
    components,
    kohya,
    metadata_for,
    peft,
    random_lora,
    ref_weights,
    weights_of,
)

import minisd
from minisd.errors import WeightsError
from minisd.lora import apply_lora, original_unet_modules, remove_lora
from minisd.unet_config import UNetConfig, param_shapes
from minisd.weights import flatten, save_file
from weights_tools import make_tiny
from weights_tools.configs import unet_arch_diffusers
from weights_tools.keymaps import rename, unet_modules
from weights_tools.make_tiny import full_size_configs

KOHYA_TE = {"text_encoder": "lora_te1_text_model_", "text_encoder_2": "lora_te2_text_model_"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{kind: folder} of tiny SDXL base and refiner pipelines written by diffusers."""
    need("torch", "diffusers", "transformers", "peft")
    root = tmp_path_factory.mktemp("lora_xl")
    for kind in ("base", "refiner"):
        build(kind, root / kind)
    return {kind: root / kind for kind in ("base", "refiner")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{family: folder} of weights_tools.make_tiny SDXL folders (no reference needed)."""
    root = tmp_path_factory.mktemp("lora_xl_tiny")
    for family in ("sdxl", "sdxl-refiner"):
        make_tiny(root / family, family=family, seed=0)
    return {f: root / f for f in ("sdxl", "sdxl-refiner")}


def reference(folder, dtype, refiner=False):
    torch, diffusers = need("torch", "diffusers")
    need("peft")
    cls = (
        diffusers.StableDiffusionXLImg2ImgPipeline
        if refiner
        else diffusers.StableDiffusionXLPipeline
    )
    ref = cls.from_pretrained(str(folder), local_files_only=True, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    return ref.to(torch_dtype(dtype))


def sgm_names(pipe):
    """{diffusers UNet module: original SGM module} from weights_tools' single-file key map."""
    flat = flatten(pipe.unet.params)
    table = unet_modules(unet_arch_diffusers(flat))
    names = {k[: -len(".weight")]: rename(k, table) for k in flat if k.endswith(".weight")}
    return {m: o[: -len(".weight")] for m, o in names.items() if o is not None}


def kohya_sgm(lora, pipe):
    """sd-scripts' SDXL layout: lora_unet_ + the SGM module path, lora_te1_ / lora_te2_ +
    text_model_ + the transformers path, '.' -> '_'; alphas as ``.alpha`` keys."""
    sgm, out = sgm_names(pipe), {}
    for (comp, module), (up, down, alpha) in lora.items():
        path = "lora_unet_" + sgm[module] if comp == "unet" else KOHYA_TE[comp] + module
        name = path.replace(".", "_")
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            out[f"{name}.alpha"] = np.array(alpha, np.float32)
    return out


def kohya_diffusers_names(lora, pipe):
    """The same LoRA with the UNet's diffusers module paths (sd-scripts' SD1.x spelling)."""
    sgm = {"lora_unet_" + o.replace(".", "_"): m for m, o in sgm_names(pipe).items()}
    out = {}
    for key, value in kohya_sgm(lora, pipe).items():
        name, _, role = key.partition(".")
        name = "lora_unet_" + sgm[name].replace(".", "_") if name in sgm else name
        out[f"{name}.{role}"] = value
    return out


def hf_names(lora):
    """``lora`` by the module names of diffusers' models: CLIPTextModelWithProjection (SDXL's
    text_encoder_2) keeps transformers' ``text_model.``, which CLIPTextModel lost in
    transformers 5 (diffusers' loader strips it from keys, not from metadata patterns)."""
    return {(c, "text_model." + m if c == "text_encoder_2" else m): v for (c, m), v in lora.items()}


def peft_xl(lora, pipe=None):
    """diffusers' own layout, as ``save_lora_weights`` writes it."""
    return peft(hf_names(lora))


def check_merged(pipe, ref, before, tol, what):
    """Every weight the LoRA targets changed and equals diffusers' fused one, and no other
    weight changed on either side; returns the worst error."""
    theirs, worst = ref_weights(ref), 0.0
    for comp in components(pipe):
        for key, w in flatten(getattr(pipe, comp).params).items():
            if (comp, key) in before:
                assert rel_err(w, before[(comp, key)]) > 1e-3, f"{what}: {comp} {key} unchanged"
                err = assert_rel(w, theirs[(comp, key)], tol, f"{what}: {comp} {key}")
                worst = max(worst, err)
            elif w.ndim >= 2:
                assert_rel(w, theirs[(comp, key)], tol, f"{what}: untouched {comp} {key}")
    return worst


def check_latents(pipe, ref, what):
    """float32 txt2img latents, minisd's merged LoRA vs diffusers' fused one."""
    torch = need("torch")
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    kw = dict(prompt=["a lighthouse", "a cat"], prompt_2=["an oil painting", "a sketch"],
              negative_prompt=["blurry", ""], height=64, width=64, num_inference_steps=2,
              guidance_scale=6.0, output_type="latent")  # fmt: skip
    with torch.no_grad():
        want = ref(**kw, latents=torch.from_numpy(latents)).images.numpy()
    got = pipe(**kw, latents=latents, progress=False)
    return assert_rel(got, want, TOL["float32"], f"{what}: latents")


CASES = {  # name: (writer, alphas, metadata, scale)
    "peft": (peft_xl, "none", False, 1.0),
    "peft_metadata_alphas": (peft_xl, "none", True, 0.7),
    "kohya_sgm": (kohya_sgm, "uniform", False, 0.8),
    "kohya_sgm_no_alpha": (kohya_sgm, "none", False, 1.0),
}


RUNS = [(case, "float64") for case in CASES] + [  # float32 also runs the pipeline
    ("peft_metadata_alphas", "float32"),
    ("kohya_sgm", "float32"),
]


@pytest.mark.parametrize(("case", "dtype"), RUNS)
def test_formats_match_diffusers(folders, tmp_path, case, dtype):
    writer, alphas, with_meta, scale = CASES[case]
    pipe = minisd.StableDiffusion.from_pretrained(folders["base"], dtype=dtype)
    lora = random_lora(pipe, seed=len(case), alphas=alphas)
    assert {c for c, _ in lora} == {"unet", "text_encoder", "text_encoder_2"}
    path = tmp_path / "lora.safetensors"
    save_file(writer(lora, pipe), path, metadata_for(hf_names(lora)) if with_meta else None)
    ref = reference(folders["base"], dtype)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=scale)
    before = weights_of(pipe, lora)
    handle = pipe.load_lora(path, scale)
    assert pipe.loras == [handle] and len(handle.changes) == len(lora)
    errs = {"weights": check_merged(pipe, ref, before, TOL[dtype], case)}
    if dtype == "float32":
        errs["latents"] = check_latents(pipe, ref, case)
    print(f"{case} {dtype}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))


def test_refiner(folders, tmp_path):
    """The refiner (no first text encoder): a kohya SGM LoRA of its UNet and text_encoder_2
    merges as diffusers' does (float64); first-text-encoder keys are refused naming the key,
    before anything changes (diffusers fails on them with an AttributeError on None)."""
    pipe = minisd.StableDiffusion.from_pretrained(folders["refiner"], dtype="float64")
    lora = random_lora(pipe, seed=11)
    assert {c for c, _ in lora} == {"unet", "text_encoder_2"}
    flat = kohya_sgm(lora, pipe)
    original = bits(pipe)
    fc1 = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    te1 = {f"{fc1}.lora_down.weight": np.ones((2, 16)), f"{fc1}.lora_up.weight": np.ones((24, 2))}
    with pytest.raises(WeightsError, match=f"key '{fc1}.lora_down.weight' is for a text_encoder"):
        pipe.load_lora({**flat, **te1})
    te1_fc1 = "text_encoder.encoder.layers.0.mlp.fc1"
    peft_te1 = {f"{te1_fc1}.lora_A.weight": te1[f"{fc1}.lora_down.weight"],
                f"{te1_fc1}.lora_B.weight": te1[f"{fc1}.lora_up.weight"]}  # fmt: skip
    with pytest.raises(WeightsError, match="fc1.lora_A.weight' is for a text_encoder; the model"):
        pipe.load_lora({**peft(lora), **peft_te1})
    assert bits(pipe) == original and pipe.loras == []
    save_file(flat, tmp_path / "refiner.safetensors")
    ref = reference(folders["refiner"], "float64", refiner=True)
    ref.load_lora_weights(str(tmp_path / "refiner.safetensors"))
    ref.fuse_lora(lora_scale=0.6, components=["unet", "text_encoder_2"])
    before = weights_of(pipe, lora)
    pipe.load_lora(tmp_path / "refiner.safetensors", 0.6)
    err = check_merged(pipe, ref, before, TOL["float64"], "refiner")
    print(f"refiner float64: weights {err:.1e}")


def test_sgm_names_are_diffusers_for_sdxl_base():
    """Every Linear / Conv2d module of the full-size SDXL base UNet (794, no arrays built): its
    kohya SGM name goes through diffusers' own converter (lora_state_dict with the UNet's
    layers_per_block, then its peft renaming) to the module minisd merges it into."""
    torch, diffusers = need("torch", "diffusers")
    from diffusers.utils import convert_unet_state_dict_to_peft

    cfg = full_size_configs("sdxl")["unet"]
    shapes = param_shapes(UNetConfig.from_dict(cfg))
    modules = [k[: -len(".weight")] for k, s in shapes.items() if k.endswith(".weight")]
    modules = [m for m in modules if len(shapes[m + ".weight"]) >= 2]
    ours = original_unet_modules(shapes, modules)
    assert len(modules) == 794 and sorted(ours) == sorted(modules)
    examples = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "up_blocks.2.resnets.2.time_emb_proj": "output_blocks.8.0.emb_layers.1",
        "conv_in": "input_blocks.0.0", "conv_out": "out.2",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
    }  # fmt: skip
    assert {m: ours[m] for m in examples} == examples
    sd = {}
    for original in ours.values():
        name = "lora_unet_" + original.replace(".", "_")
        sd[f"{name}.lora_down.weight"] = sd[f"{name}.lora_up.weight"] = torch.zeros(1)
        sd[f"{name}.alpha"] = torch.tensor(1.0)
    unet_config = types.SimpleNamespace(layers_per_block=cfg["layers_per_block"])
    converted, _ = diffusers.StableDiffusionXLPipeline.lora_state_dict(sd, unet_config=unet_config)
    unet = {k.removeprefix("unet."): v for k, v in converted.items()}
    theirs = {k.rsplit(".lora_", 1)[0] for k in convert_unet_state_dict_to_peft(unet)}
    assert len(converted) == 2 * len(modules) and theirs == set(modules)


def test_sgm_names_of_the_refiner():
    """The full-size refiner (four down blocks: input_blocks up to 11). diffusers cannot read
    these: its converter collects input_blocks_1's keys by substring and so takes 10 and 11's,
    then fails (KeyError); minisd's map gives each its own module."""
    shapes = param_shapes(UNetConfig.from_dict(full_size_configs("sdxl-refiner")["unet"]))
    modules = [k[: -len(".weight")] for k, s in shapes.items() if k.endswith(".weight")]
    ours = original_unet_modules(shapes, [m for m in modules if len(shapes[m + ".weight"]) >= 2])
    assert ours["down_blocks.3.resnets.0.conv1"] == "input_blocks.10.0.in_layers.2"
    assert ours["down_blocks.3.resnets.1.conv2"] == "input_blocks.11.0.out_layers.3"
    assert ours["down_blocks.1.resnets.0.conv1"] == "input_blocks.4.0.in_layers.2"
    assert ours["up_blocks.3.resnets.2.conv1"] == "output_blocks.11.0.in_layers.2"
    assert ours["up_blocks.2.upsamplers.0.conv"] == "output_blocks.8.2.conv"
    assert len(set(ours.values())) == len(ours)  # one original name per module


# --------------------------------------------------------------------------- no reference needed


def test_load_unload_and_spellings_are_bit_identical(tiny):
    """pipe.load_lora / unload_lora on SDXL: scale 0 and unload leave every weight bit for bit;
    the SGM kohya names, the diffusers-path kohya names and peft keys merge the same bits."""
    pipe = minisd.StableDiffusion.from_pretrained(tiny["sdxl"])
    assert type(pipe).__name__ == "StableDiffusionXL"
    original = bits(pipe)
    lora = random_lora(pipe, seed=5, alphas="uniform")
    sgm = kohya_sgm(lora, pipe)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.alpha" in sgm  # L = 1
    assert any(k.startswith("lora_te2_text_model_encoder_layers_2_mlp_fc2") for k in sgm)
    h = pipe.load_lora(sgm, scale=0.0)
    assert bits(pipe) == original and pipe.loras == [h]
    pipe.unload_lora()
    pipe.load_lora(sgm, scale=0.5)
    merged = bits(pipe)
    changed = {k for k in merged if merged[k] != original[k]}
    assert {c for c, _ in changed} == {"unet", "text_encoder", "text_encoder_2"}
    assert len(changed) == len(lora)
    pipe.unload_lora()
    assert bits(pipe) == original and pipe.loras == []
    pipe.load_lora(kohya_diffusers_names(lora, pipe), scale=0.5)
    assert bits(pipe) == merged
    pipe.unload_lora()
    aor = {k: a / down.shape[0] for k, (_, down, a) in lora.items()}  # kohya alpha as peft's
    scaled = {k: (up * np.float32(aor[k]), down, None) for k, (up, down, _) in lora.items()}
    pipe.load_lora(peft(scaled), scale=0.5)
    for key, value in bits(pipe).items():
        if key in changed:  # (alpha / r) * up rounds differently: values, not bits
            got, want = (np.frombuffer(v[1], np.float32) for v in (value, merged[key]))
            assert_rel(got, want, 1e-6, str(key))
        else:
            assert value == original[key]


def test_sd1_reads_sgm_names_too(tiny_sd1_files):
    """kohya files of SD1.x with original (SGM) UNet names merge as the diffusers-named ones
    (diffusers' SD1 loader does not remap them)."""
    pipe = minisd.StableDiffusion.from_pretrained(tiny_sd1_files[0])
    lora = random_lora(pipe, seed=6, alphas="per_module", only=lambda c, m: c == "unet")
    apply_lora(pipe, kohya_diffusers_names(lora, pipe))
    want = bits(pipe)
    remove_lora(pipe)
    sgm = kohya_sgm(lora, pipe)
    assert any(k.startswith("lora_unet_middle_block_1_proj_in") for k in sgm)
    apply_lora(pipe, sgm)
    assert bits(pipe) == want


def test_errors_name_the_key(tiny, tiny_sd1_files, caplog):
    """Unknown SGM / text_encoder_2 modules, SDXL's text_projection, wrong shapes, an SD1 LoRA
    on SDXL and the reverse: each error names the key and nothing changes. SD1 ignores
    text_encoder_2 keys with a warning, as diffusers does."""
    pipe = minisd.StableDiffusion.from_pretrained(tiny["sdxl"])
    original = bits(pipe)
    lora = random_lora(pipe, seed=7, only=lambda c, m: m.endswith(("attn2.to_k", "mlp.fc1")))
    flat = kohya_sgm(lora, pipe)
    fc1 = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    cases = {
        "lora_unet_input_blocks_99_1_proj_in": "'lora_unet_input_blocks_99_1_proj_in.lora_down",
        "lora_te2_text_model_encoder_layers_9_mlp_fc1": "layers_9_mlp_fc1.*names no Linear",
        "lora_te2_text_projection": "'lora_te2_text_projection.lora_down.weight' names no",
    }
    for name, match in cases.items():
        bad = {**flat, f"{name}.lora_down.weight": flat[f"{fc1}.lora_down.weight"],
               f"{name}.lora_up.weight": flat[f"{fc1}.lora_up.weight"]}  # fmt: skip
        with pytest.raises(WeightsError, match=match):
            pipe.load_lora(bad)
    wrong = {k.replace("layers_0_mlp", "layers_1_mlp"): v[:, :-1] if "down" in k else v
             for k, v in flat.items() if k.startswith(fc1)}  # fmt: skip
    with pytest.raises(WeightsError, match="layers_1_mlp_fc1.lora_down.weight'.*has shape"):
        pipe.load_lora(wrong)
    sd1 = minisd.StableDiffusion.from_pretrained(tiny_sd1_files[0])
    sd1_original = bits(sd1)
    sd1_lora = kohya(random_lora(sd1, seed=8, only=lambda c, m: m.endswith("attn2.to_k")))
    with pytest.raises(
        WeightsError, match=r"key 'lora_unet_\w+.lora_down.weight'.*(names no|shape)"
    ):
        pipe.load_lora(sd1_lora)
    assert bits(pipe) == original and pipe.loras == []
    with pytest.raises(
        WeightsError, match=r"key 'lora_unet_\w+.lora_down.weight'.*(names no|shape)"
    ):
        sd1.load_lora(flat)
    assert bits(sd1) == sd1_original
    te2 = {k: v for k, v in flat.items() if k.startswith("lora_te2_")}
    with caplog.at_level(logging.WARNING, logger="minisd"):
        handle = sd1.load_lora({**sd1_lora, **te2})
    assert f"ignored: this model has none, and diffusers ignores them too (first key: {fc1}" in (
        caplog.text
    )
    assert {c for c, _, _, _ in handle.changes} == {"unet"} and bits(sd1) != sd1_original


def test_cli_lora_on_sdxl(tiny, tmp_path):
    """``minisd generate --model SDXL --lora PATH:SCALE`` is load_lora's result."""
    from PIL import Image

    from minisd.cli import main

    pipe = minisd.StableDiffusion.from_pretrained(tiny["sdxl"])
    path = tmp_path / "xl.safetensors"
    save_file(kohya_sgm(random_lora(pipe, seed=9, alphas="uniform"), pipe), path)
    kw = dict(num_inference_steps=2, height=64, width=64, seed=0, output_type="np")
    plain = pipe("a cat", **kw, progress=False)
    pipe.load_lora(path, 0.5)
    expect = pipe("a cat", **kw, progress=False)
    out = tmp_path / "xl.png"
    args = ["generate", "a cat", "--model", str(tiny["sdxl"]), "--steps", "2", "--size", "64x64"]
    assert main([*args, "--seed", "0", "--lora", f"{path}:0.5", "--out", str(out)]) == 0
    got = np.asarray(Image.open(out)).astype(np.float64) / 255
    assert np.abs(got - expect[0]).max() <= 1 / 255 + 1e-6  # the same image, up to 8 bits
    assert np.abs(expect - plain).max() > 0.05  # and the LoRA changed it
