"""LoRA merging (minisd/lora.py, minisd/lora_formats.py) against diffusers' load_lora_weights
+ fuse_lora (peft) on a tiny SD1 pipeline written by diffusers.

Random LoRAs (rank 2-4, nonzero up factors) target every Linear / Conv2d weight of the UNet
(attention projections, ff, proj_in / proj_out 1x1 convs, resnet 3x3 convs as LoCon,
time_emb_proj, conv_shortcut, samplers, conv_in / conv_out, time embedding) and the text
encoder's q/k/v/out_proj/fc1/fc2. Each format is saved as a .safetensors file that both load;
merged weights, UNet outputs and text-encoder outputs must agree (float64 <= 1e-10, float32
<= 1e-4, relative). diffusers gives attention projections and text-encoder layers one shared
alpha when alphas differ per module (minisd/lora.py), so those comparisons use one alpha and
test_per_module_alphas checks the rest against the formula itself.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from pipelines import build
from refharness import TOL, assert_rel, need, rand, rel_err, to_np, torch_dtype

import minisd
from minisd.backend import to_numpy
from minisd.errors import InputError
from minisd.lora import apply_lora, remove_lora
from minisd.weights import CastOnRead, flatten, save_file

ATTENTION = (".to_q", ".to_k", ".to_v", ".to_out.0")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TE_PROJ = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny SD1 pipeline folder written by diffusers (random weights)."""
    need("torch", "diffusers", "transformers", "peft")
    path = tmp_path_factory.mktemp("lora") / "sd1"
    build("sd1", path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_sd1_files):
    """A weights_tools.make_tiny SD1 folder: the checks that need no reference run anywhere."""
    return tiny_sd1_files[0]


def ours(folder, dtype="float32", **kw):
    return minisd.StableDiffusion.from_pretrained(folder, dtype=dtype, **kw)


def reference(folder, dtype):
    torch, diffusers = need("torch", "diffusers")
    need("peft")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, local_files_only=True
    )
    ref.set_progress_bar_config(disable=True)
    return ref.to(torch_dtype(dtype))


# --------------------------------------------------------------------------- random LoRAs


def components(pipe):
    """The LoRA targets a pipeline (minisd's or diffusers') has: SDXL's refiner lacks
    text_encoder, SD1.x / SD2.x lack text_encoder_2."""
    return [c for c in COMPONENTS if getattr(pipe, c, None) is not None]


def targets(pipe):
    """[(component, module, shape)] of every Linear / Conv2d weight of a minisd pipeline."""
    out = []
    for comp in components(pipe):
        for key, v in flatten(getattr(pipe, comp).params).items():
            if key.endswith(".weight") and v.ndim >= 2 and not key.startswith("embeddings."):
                out.append((comp, key[: -len(".weight")], v.shape))
    return out


def random_lora(pipe, seed=0, alphas="uniform", only=None):
    """{(component, module): (up, down, alpha or None)}, float32 factors: down ~ N(0, 1/fan_in),
    up ~ N(0, 1/r), so a delta is as large as the weight. alphas: one for all ("uniform"),
    "per_module" or None ("none")."""
    rng = np.random.default_rng(seed)
    common = float(rng.integers(1, 12)) / 2
    lora = {}
    for comp, module, shape in targets(pipe):
        if only is not None and not only(comp, module):
            continue
        r, kernel = int(rng.integers(2, 5)), tuple(shape[2:])
        down = rng.standard_normal((r, shape[1], *kernel)) / np.sqrt(np.prod(shape[1:]))
        up = rng.standard_normal((shape[0], r, *((1, 1) if kernel else ()))) / np.sqrt(r)
        alpha = {"uniform": common, "per_module": float(rng.integers(1, 17)) / 2}.get(alphas)
        lora[(comp, module)] = (up.astype(np.float32), down.astype(np.float32), alpha)
    return lora


def kohya(lora):
    out = {}
    for (comp, module), (up, down, alpha) in lora.items():
        prefix = "lora_unet_" if comp == "unet" else "lora_te_text_model_"
        name = prefix + module.replace(".", "_")
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            out[f"{name}.alpha"] = np.array(alpha, np.float32)
    return out


def peft(lora):
    out = {}
    for (comp, module), (up, down, alpha) in lora.items():
        out[f"{comp}.{module}.lora_A.weight"], out[f"{comp}.{module}.lora_B.weight"] = down, up
        if alpha is not None:
            out[f"{comp}.{module}.alpha"] = np.array(alpha, np.float32)
    return out


def legacy(lora):
    """The older diffusers spellings: attention processors (``to_q_lora``), ``.lora.down``,
    the text encoder's ``lora_linear_layer``, with the ``text_model.`` prefix."""
    out = {}
    for (comp, module), (up, down, _) in lora.items():
        base, _, last = module.rpartition(".")
        if comp == "unet" and module.endswith(ATTENTION):
            attn = module.removesuffix(".0").rpartition(".")[0]
            name = f"unet.{attn}.processor.{module[len(attn) + 1 :].removesuffix('.0')}_lora"
        elif comp == "unet":
            name = f"unet.{module}.lora"
        elif last in TE_PROJ:
            name = f"text_encoder.text_model.{base}.{TE_PROJ[last]}_lora"
        else:
            name = f"text_encoder.text_model.{module}.lora_linear_layer"
        out[f"{name}.down.weight"], out[f"{name}.up.weight"] = down, up
    return out


def metadata_for(lora):
    """diffusers' lora_adapter_metadata (peft LoraConfig per component) matching ``lora``'s
    ranks, with alphas from lora_alpha and alpha_pattern."""
    meta = {}
    for comp, alpha, pattern in (("unet", 6.0, {"proj_out": 1.5, "to_k": 9.0}),
                                 ("text_encoder", 2.0, {"fc1": 4.0}),
                                 ("text_encoder_2", 3.0, {"v_proj": 5.0})):  # fmt: skip
        ranks = {m: down.shape[0] for (c, m), (_, down, _) in lora.items() if c == comp}
        if not ranks:
            continue
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        meta.update({f"{comp}.r": r, f"{comp}.lora_alpha": alpha, f"{comp}.alpha_pattern": pattern,
                     f"{comp}.rank_pattern": {f"^{m}": k for m, k in ranks.items() if k != r},
                     f"{comp}.target_modules": sorted(ranks)})  # fmt: skip
    return {"lora_adapter_metadata": json.dumps(meta)}


def weights_of(pipe, lora):
    """{(component, param key): host copy} of the weights ``lora`` targets."""
    flat = {c: flatten(getattr(pipe, c).params) for c in components(pipe)}
    return {(c, m + ".weight"): to_numpy(flat[c][m + ".weight"]).copy() for c, m in lora}


def expected(pipe, lora, scale, alpha_over_rank):
    """{(component, param key): W + scale * alpha_over_rank(...) * up @ down} in float64."""
    out = {}
    for (comp, module), (up, down, alpha) in lora.items():
        w = to_numpy(flatten(getattr(pipe, comp).params)[module + ".weight"]).astype(np.float64)
        delta = up.reshape(up.shape[0], -1).astype(np.float64) @ down.reshape(down.shape[0], -1)
        aor = alpha_over_rank(comp, module, alpha, down.shape[0])
        out[(comp, module + ".weight")] = w + scale * aor * delta.reshape(w.shape)
    return out


# --------------------------------------------------------------------------- reference runs


def ref_weights(ref):
    """{(component, param key): array} of the reference's (fused) Linear / Conv2d weights, by
    minisd's names (no ``text_model.``: CLIPTextModelWithProjection still has it)."""
    out = {}
    for comp in components(ref):
        for name, m in getattr(ref, comp).named_modules():
            w = getattr(getattr(m, "base_layer", m), "weight", None)
            if name.endswith("base_layer") or w is None or w.ndim < 2:
                continue
            out[(comp, name.removeprefix("text_model.") + ".weight")] = to_np(w)
    return out


def unet_and_text(pipe, ref, dtype):
    """(ours, reference) UNet outputs and text-encoder outputs. The reference continues from
    minisd's float32 time_proj (a precision island, tests/test_unet.py)."""
    torch = need("torch")
    x, ctx = rand(2, 4, 8, 8).astype(dtype), rand(2, 7, 16, seed=1).astype(dtype)
    ids = np.random.default_rng(2).integers(0, 49408, (2, 77))
    with minisd.trace() as acts:
        eps = pipe.unet(x, 500, ctx)
    tp = torch.from_numpy(acts["time_proj"])
    hook = ref.unet.time_proj.register_forward_hook(lambda m, i, o: tp)
    try:
        with torch.no_grad():
            r = ref.unet(torch.from_numpy(x), 500, torch.from_numpy(ctx)).sample
            h = ref.text_encoder(torch.from_numpy(ids)).last_hidden_state
    finally:
        hook.remove()
    return (eps, to_np(r)), (pipe.text_encoder(ids), to_np(h))


def compare(pipe, ref, dtype, before, what):
    """Merged weights (each changed from ``before``) and outputs of ``pipe`` and ``ref``;
    returns the errors measured."""
    tol, theirs = TOL[dtype], ref_weights(ref)
    errs = {"weights": 0.0}
    for (comp, key), w0 in before.items():
        w = flatten(getattr(pipe, comp).params)[key]
        assert rel_err(w, w0) > 1e-3, f"{what}: {comp} {key} was not changed"
        err = assert_rel(w, theirs[(comp, key)], tol, f"{what}: {comp} {key}")
        errs["weights"] = max(errs["weights"], err)
    (eps, r), (h, rh) = unet_and_text(pipe, ref, dtype)
    errs["unet"] = assert_rel(eps, r, tol, f"{what}: UNet output")
    errs["text"] = assert_rel(h, rh, tol, f"{what}: text encoder output")
    return errs


CASES = {  # name: (writer, alphas, metadata, scale)
    "kohya": (kohya, "uniform", False, 1.0),
    "kohya_no_alpha_scale_0.5": (kohya, "none", False, 0.5),
    "peft": (peft, "none", False, 1.0),
    "peft_metadata_alphas": (peft, "none", True, 0.7),
    "legacy_diffusers": (legacy, "none", False, 1.0),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_formats_match_diffusers(folder, tmp_path, case, dtype):
    writer, alphas, with_meta, scale = CASES[case]
    pipe = ours(folder, dtype)
    lora = random_lora(pipe, seed=len(case), alphas=alphas)
    path = tmp_path / "lora.safetensors"
    save_file(writer(lora), path, metadata_for(lora) if with_meta else None)
    ref = reference(folder, dtype)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=scale)
    before = weights_of(pipe, lora)
    apply_lora(pipe, path, scale=scale)
    errs = compare(pipe, ref, dtype, before, case)
    print(f"{case} {dtype}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))


@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match")
def test_per_module_alphas(folder, tmp_path):
    """kohya alphas per module: each module's own alpha / r (float64, against the formula);
    diffusers agrees on every module but attention projections and text-encoder layers."""
    pipe = ours(folder, "float64")
    lora = random_lora(pipe, seed=7, alphas="per_module")
    save_file(kohya(lora), tmp_path / "a.safetensors")
    want = expected(pipe, lora, 0.8, lambda c, m, alpha, r: alpha / r)
    apply_lora(pipe, tmp_path / "a.safetensors", scale=0.8)
    for comp, key in want:
        assert_rel(flatten(getattr(pipe, comp).params)[key], want[(comp, key)], 1e-12, key)
    ref = reference(folder, "float64")
    ref.load_lora_weights(str(tmp_path / "a.safetensors"))
    ref.fuse_lora(lora_scale=0.8)
    theirs = ref_weights(ref)
    attention = tuple(a + ".weight" for a in ATTENTION)
    same = [k for k in want if k[0] == "unet" and not k[1].endswith(attention)]
    assert len(same) > 40
    for comp, key in same:
        assert_rel(flatten(pipe.unet.params)[key], theirs[(comp, key)], 1e-10, key)


def test_pipeline_latents_match(folder):
    """A whole txt2img run with a LoRA, fixed latents, float32: diffusers' unfused runtime
    scale (cross_attention_kwargs={"scale": s}) equals minisd's merge with scale s."""
    torch = need("torch")
    pipe = ours(folder)
    path = folder.parent / "pipe_lora.safetensors"
    save_file(kohya(random_lora(pipe, seed=3)), path)
    ref = reference(folder, "float32")
    ref.load_lora_weights(str(path))
    apply_lora(pipe, path, scale=0.7)
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    kw = dict(prompt=["a lighthouse", "a cat"], negative_prompt=["blurry", ""], height=64,
              width=64, num_inference_steps=4, guidance_scale=6.0,
              output_type="latent")  # fmt: skip
    with torch.no_grad():
        want = ref(**kw, latents=torch.from_numpy(latents), cross_attention_kwargs={"scale": 0.7})
    got = pipe(**kw, latents=latents, scheduler="pndm", progress=False)
    err = assert_rel(got, want.images.numpy(), TOL["float32"], "latents")
    remove_lora(pipe)
    plain = pipe(**kw, latents=latents, scheduler="pndm", progress=False)
    assert rel_err(got, plain) > 1e-2  # the LoRA mattered
    print(f"pipeline latents: {err:.1e}")


# --------------------------------------------------------------------------- no reference needed


def bits(pipe):
    """Every stored UNet / text-encoder array as host bytes (bit-exact comparisons)."""
    return {
        (c, k): (str(v.dtype), to_numpy(v).tobytes())
        for c in components(pipe)
        for k, v in flatten(getattr(pipe, c).params).items()
    }


def test_scale_zero_and_remove_are_bit_identical(tiny):
    pipe = ours(tiny)
    original = bits(pipe)
    a, b = kohya(random_lora(pipe, seed=1)), peft(random_lora(pipe, seed=2))
    h = apply_lora(pipe, a, scale=0.0)
    assert bits(pipe) == original and pipe.loras == [h]
    remove_lora(pipe, h)
    h1 = apply_lora(pipe, a)
    one = bits(pipe)
    h2 = apply_lora(pipe, b, scale=0.5)
    both = bits(pipe)
    assert len({str(s) for s in (original, one, both)}) == 3 and pipe.loras == [h1, h2]
    with pytest.raises(InputError, match="remove the later LoRAs first"):
        remove_lora(pipe, h1)  # b changed the same weights again
    assert bits(pipe) == both
    remove_lora(pipe, h2)
    assert bits(pipe) == one
    remove_lora(pipe, h1)
    assert bits(pipe) == original and pipe.loras == []
    with pytest.raises(InputError, match="not applied"):
        remove_lora(pipe, h1)
    apply_lora(pipe, a), apply_lora(pipe, b)
    remove_lora(pipe)  # all, last first
    assert bits(pipe) == original and pipe.loras == []


def test_disjoint_loras_remove_in_any_order(tiny):
    pipe, only_text = ours(tiny), ours(tiny)
    original = bits(pipe)
    lora = random_lora(pipe, seed=3)
    unet = kohya({k: v for k, v in lora.items() if k[0] == "unet"})
    text = legacy({k: v for k, v in lora.items() if k[0] == "text_encoder"})
    apply_lora(only_text, text)
    hu, ht = apply_lora(pipe, unet), apply_lora(pipe, text)
    remove_lora(pipe, hu)  # the first applied first: the two share no weight
    assert bits(pipe) == bits(only_text) != original and pipe.loras == [ht]
    remove_lora(pipe, ht)
    assert bits(pipe) == original


@pytest.mark.parametrize("mode", ["lazy", "stream"])
def test_lazy_and_stream_match_eager(tiny, tmp_path, mode):
    """float16 files, float32 compute: the memory-mapped float16 entry is replaced by the merged
    float32 array, results equal "eager" bit for bit, and remove puts the memmap back."""
    import weights_tools

    weights_tools.cast(tiny, tmp_path / "fp16", "float16")
    eager = ours(tmp_path / "fp16")
    lora = kohya(random_lora(eager, seed=4))
    apply_lora(eager, lora, scale=0.9)
    pipe = ours(tmp_path / "fp16", weights=mode)
    assert isinstance(pipe.unet.params, CastOnRead)
    key = "down_blocks.0.resnets.0.conv1.weight"
    stored = pipe.unet.params.raw()[key]
    assert stored.dtype == np.float16 and isinstance(stored, np.memmap)
    h = apply_lora(pipe, lora, scale=0.9)
    merged = pipe.unet.params.raw()[key]
    assert merged.dtype == np.float32 and not isinstance(merged, np.memmap)
    x, ctx, ids = rand(1, 4, 8, 8).astype(np.float32), rand(1, 5, 32).astype(np.float32), [[1, 2]]
    assert np.array_equal(pipe.unet(x, 10, ctx), eager.unet(x, 10, ctx))
    assert np.array_equal(pipe.text_encoder(ids), eager.text_encoder(ids))
    remove_lora(pipe, h)
    assert pipe.unet.params.raw()[key] is stored


def test_backends(tiny, xp):
    """On the device (fake_cupy on the CPU, CuPy on a GPU) the merge stays there and equals the
    host's."""
    device = "cpu" if xp is np else "cuda"
    host, dev = ours(tiny), ours(tiny, device=device)
    lora = kohya(random_lora(host, seed=5))
    original = bits(dev)
    apply_lora(host, lora, scale=0.9)
    h = apply_lora(dev, lora, scale=0.9)
    want = flatten(host.unet.params)
    for key, value in flatten(dev.unet.params).items():
        assert isinstance(value, xp.ndarray), key
        assert_rel(value, want[key], 1e-6, key)
    x, ctx = rand(1, 4, 8, 8).astype(np.float32), rand(1, 5, 32).astype(np.float32)
    eps = dev.unet(xp.asarray(x), 10, xp.asarray(ctx))
    assert_rel(eps, host.unet(x, 10, ctx), TOL["float32"], "UNet output")
    remove_lora(dev, h)
    assert bits(dev) == original
