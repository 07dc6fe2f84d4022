"""weights_tools conversions judged by diffusers: tiny SD1.5- and SD2-topology pipelines.

diffusers has no converter from its folders to the original single-file layout, so its own
single-file loader (``from_single_file``) is the judge of ``to_original``: every tensor must
come back bit-identical. ``to_diffusers`` must reproduce the folder's tensors bit for bit.
"""

import json
import warnings

import numpy as np
import pytest
from refharness import need, randomize_

import weights_tools as wt
from minisd.weights import load_file, read_header
from weights_tools import configs as C
from weights_tools.make_tiny import full_size_configs, original_shapes

PARTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}
# Tiny models with the real topologies: 4 UNet levels (3 with cross-attention), 4 VAE levels.
TINY = {
    "sd1": dict(linear=False, heads=2, act="quick_gelu", layers=2, pred="epsilon", pad=None),
    "sd2": dict(
        linear=True, heads=[1, 2, 2, 2], act="gelu", layers=3, pred="v_prediction", pad="!"
    ),
}


def _tokenizer(folder, pad):
    """A byte-level CLIP tokenizer (no merges): 514 tokens, enough for a pipeline to run."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    kw = {"pad_token": pad} if pad else {}
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), **kw)
    return tok, len(vocab)


def _build(kind, folder):
    torch, diffusers, transformers = need("torch", "diffusers", "transformers")
    t = TINY[kind]
    blocks = (8, 16, 16, 16)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=blocks,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16,
        attention_head_dim=t["heads"],
        use_linear_projection=t["linear"],
        norm_num_groups=4,
        sample_size=8,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=32,
    )
    tok, vocab = _tokenizer(folder.parent / f"{kind}_vocab", t["pad"])
    text_cfg = transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=t["layers"],
        num_attention_heads=2, hidden_act=t["act"], bos_token_id=vocab - 2, eos_token_id=vocab - 1,
    )  # fmt: skip
    text = transformers.CLIPTextModel(text_cfg)
    for i, module in enumerate((unet, vae, text)):
        randomize_(module, seed=i)
    sched_kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    prediction_type=t["pred"], steps_offset=1)  # fmt: skip
    if kind == "sd2":
        sched = diffusers.DDIMScheduler(**sched_kw, clip_sample=False)
    else:
        sched = diffusers.PNDMScheduler(**sched_kw, skip_prk_steps=True)
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="session", params=["sd1", "sd2"])
def ref(request, ref_cache):
    """(kind, diffusers folder, original file written by to_original)."""
    return _ref(request.param, ref_cache)


def _ref(kind, ref_cache):
    folder = ref_cache / f"wt_{kind}"
    if not folder.exists():
        _build(kind, folder)
    single = ref_cache / f"wt_{kind}.safetensors"
    if not single.exists():
        wt.to_original(folder, single)
    return kind, folder, single


def _assert_same_tensors(folder, other, prefix=""):
    for part, rel in PARTS.items():
        a = load_file(folder / rel)
        b = load_file(other / rel) if not isinstance(other, dict) else other[part]
        b = {k.removeprefix(prefix): v for k, v in b.items()}
        assert set(a) == set(b), f"{part}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{part}/{k}"
            assert np.array_equal(a[k], b[k]), f"{part}/{k}: values differ"


def _judge_load(single, folder, **kw):
    """diffusers' own single-file loader, offline, configured by the folder."""
    diffusers = need("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers.StableDiffusionPipeline.from_single_file(
            str(single), config=str(folder), local_files_only=True, **kw
        )


def test_to_original_is_loaded_bit_identically_by_diffusers(ref):
    kind, folder, single = ref
    keys = read_header(single)[0]
    text_key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    assert (text_key in keys) == (kind == "sd2"), "SD2 text encoders use the fused OpenCLIP layout"
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    pipe = _judge_load(single, folder)
    loaded = {
        part: {k: v.numpy() for k, v in getattr(pipe, part).state_dict().items()} for part in PARTS
    }
    loaded["text_encoder"].pop("embeddings.position_ids", None)  # a buffer, not in files
    _assert_same_tensors(folder, loaded)


@pytest.mark.parametrize("kind, dtype", [("sd1", "fp16"), ("sd1", "bf16"), ("sd2", "bf16")])
def test_to_original_cast_matches_torch_rounding(kind, dtype, ref_cache, tmp_path):
    torch = need("torch")
    kind, folder, _ = _ref(kind, ref_cache)
    single = wt.to_original(folder, tmp_path / "m.safetensors", dtype=dtype)
    tags = {t[0] for t in read_header(single)[0].values()}
    assert tags == {"F16" if dtype == "fp16" else "BF16"}
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    pipe = _judge_load(single, folder, torch_dtype=tdt)
    for part, rel in PARTS.items():
        state = getattr(pipe, part).state_dict()
        for k, v in load_file(folder / rel).items():
            want = torch.from_numpy(np.array(v)).to(tdt)
            assert state[k].dtype == tdt and torch.equal(state[k], want), f"{part}/{k}"


def test_to_diffusers_reproduces_the_folder(ref, tmp_path):
    kind, folder, single = ref
    cfg = wt.to_diffusers(single, tmp_path / "out")
    assert cfg["source"] == "hints"  # the configs stored by to_original
    _assert_same_tensors(folder, tmp_path / "out")
    for part in ("unet", "vae", "text_encoder"):
        got = json.loads((tmp_path / "out" / PARTS[part]).with_name("config.json").read_text())
        want = json.loads((folder / PARTS[part]).with_name("config.json").read_text())
        assert got == want, part
    # Round trip: folder -> file -> folder -> file gives the same bytes.
    again = wt.to_original(tmp_path / "out", tmp_path / "again.safetensors")
    assert again.read_bytes() == single.read_bytes()


def test_to_diffusers_with_config_folder(ref, tmp_path):
    kind, folder, single = ref
    cfg = wt.to_diffusers(single, tmp_path / "out", config=folder)
    assert cfg["source"] == "config" and cfg["family"] == ("sd2-v" if kind == "sd2" else "sd1")
    _assert_same_tensors(folder, tmp_path / "out")
    for f in (folder / "tokenizer").iterdir():  # the config folder's tokenizer is copied
        assert (tmp_path / "out" / "tokenizer" / f.name).read_bytes() == f.read_bytes()


def _strip_metadata(single, out):
    """The same tensors without the minisd_configs hints: only shapes are left to infer from."""
    flat = load_file(single)
    from weights_tools.stream import write_tensors

    items = [(k, "F32", v.shape, v) for k, v in sorted(flat.items())]
    write_tensors(out, items)
    return out


def test_to_diffusers_infers_the_architecture_from_shapes(ref, tmp_path):
    kind, folder, single = ref
    bare = _strip_metadata(single, tmp_path / "bare.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = wt.to_diffusers(bare, tmp_path / "out")
    v_warnings = [w for w in caught if "v-prediction" in str(w.message)]
    assert bool(v_warnings) == (kind == "sd2"), "SD2 must warn that v-prediction is assumed"
    assert cfg["source"] == "inferred"
    _assert_same_tensors(folder, tmp_path / "out")
    for part, fields in C.STRUCTURE.items():
        want = json.loads((folder / PARTS[part]).with_name("config.json").read_text())
        for f in fields:
            w = list(want[f]) if isinstance(want[f], (list, tuple)) else want[f]
            assert cfg[part][f] == w, f"{part}.{f}"
    assert cfg["scheduler"]["prediction_type"] == TINY[kind]["pred"]
    assert cfg["tokenizer"]["pad_token"] == ("!" if kind == "sd2" else "<|endoftext|>")
    if kind == "sd2":
        eps = wt.to_diffusers(bare, tmp_path / "eps", prediction_type="epsilon")
        assert eps["family"] == "sd2" and eps["scheduler"]["_class_name"] == "PNDMScheduler"


def test_config_folder_that_does_not_fit_is_refused(ref, tmp_path):
    import shutil

    from minisd.errors import ConfigError

    kind, folder, single = ref
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg_path = bad / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["layers_per_block"] = 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="layers_per_block"):
        wt.to_diffusers(single, tmp_path / "out", config=bad)


def _with_extras(single, out, extra):
    flat = dict(load_file(single))
    flat.update(extra(flat))
    from weights_tools.stream import tag_of, write_tensors

    write_tensors(out, [(k, tag_of(v), v.shape, v) for k, v in sorted(flat.items())])
    return out


def test_real_checkpoint_extras_are_recognised(ref, tmp_path):
    """Real files carry buffers, an unused last OpenCLIP block and its projection: they are
    listed by inspect and left out by to_diffusers."""
    kind, folder, single = ref
    p = "cond_stage_model.model."

    def extra(flat):
        e = {"alphas_cumprod": np.linspace(1, 0, 1000, dtype=np.float32)}
        if kind == "sd2":
            n = len(C.indices(flat, p + "transformer.resblocks."))
            e.update({k.replace(".resblocks.0.", f".resblocks.{n}."): v + 1
                      for k, v in flat.items() if ".resblocks.0." in k})  # fmt: skip
            e[p + "text_projection"] = np.eye(16, dtype=np.float32)
        else:
            ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
            e[ids] = np.arange(77, dtype=np.int64)[None]
        return e

    full = _with_extras(single, tmp_path / "full.safetensors", extra)
    report = wt.inspect(full)  # (the extras drop the stored configs: SD2 warns, in the report)
    assert "alphas_cumprod" in report["unused_keys"] and not report["unknown_keys"]
    if kind == "sd2":
        assert p + "text_projection" in report["unused_keys"]
        assert report["text_encoder_layers"] == TINY["sd2"]["layers"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SD2: v-prediction assumed
        wt.to_diffusers(full, tmp_path / "out")
    _assert_same_tensors(folder, tmp_path / "out")


def test_early_sd1_text_encoder_prefix(ref_cache, tmp_path):
    """Some early SD1 files name the text encoder cond_stage_model.transformer.* (no
    text_model. level), as diffusers accepts."""
    _, folder, single = _ref("sd1", ref_cache)
    old, new = "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."
    flat = {k.replace(old, new): v for k, v in load_file(single).items()}
    flat[new + "embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    from weights_tools.stream import tag_of, write_tensors

    path = tmp_path / "early.safetensors"
    write_tensors(path, [(k, tag_of(v), v.shape, v) for k, v in sorted(flat.items())])
    assert wt.inspect(path)["family"] == "sd1"
    wt.to_diffusers(path, tmp_path / "out")
    _assert_same_tensors(folder, tmp_path / "out")


def test_ema_weights(ref_cache, tmp_path):
    _, folder, single = _ref("sd1", ref_cache)
    unet = "model.diffusion_model."

    def extra(flat):
        ema = {"model_ema." + "".join(k.split(".")[1:]): v * 2
               for k, v in flat.items() if k.startswith(unet)}  # fmt: skip
        return {**ema, "model_ema.decay": np.array(0.9999, dtype=np.float32)}

    full = _with_extras(single, tmp_path / "full.safetensors", extra)
    report = wt.inspect(full)
    assert report["ema"]["ema_keys"] == report["ema"]["non_ema_unet_keys"] > 100
    assert any("EMA" in n for n in report["notes"])
    wt.to_diffusers(full, tmp_path / "plain")
    _assert_same_tensors(folder, tmp_path / "plain")
    wt.to_diffusers(full, tmp_path / "ema", extract_ema=True)
    a = load_file(folder / PARTS["unet"])
    b = load_file(tmp_path / "ema" / PARTS["unet"])
    assert all(np.array_equal(b[k], a[k] * 2) for k in a)


def test_in_memory_conversion_for_the_pipeline(ref):
    kind, folder, single = ref
    parts = wt.load_single_file(single)
    assert parts["family"] == ("sd2-v" if kind == "sd2" else "sd1")
    assert parts["pad_token"] == ("!" if kind == "sd2" else "<|endoftext|>")
    assert parts["scheduler"]["prediction_type"] == TINY[kind]["pred"]
    _assert_same_tensors(folder, {p: parts[p][1] for p in PARTS})
    for part in PARTS:
        want = json.loads((folder / PARTS[part]).with_name("config.json").read_text())
        assert parts[part][0][
            "block_out_channels" if part != "text_encoder" else "hidden_size"
        ] == (list(want["block_out_channels"]) if part != "text_encoder" else want["hidden_size"])
    flat = load_file(single)
    _assert_same_tensors(folder, wt.original_to_diffusers(flat, folder))  # config= a folder
    conv = wt.original_to_diffusers(flat, wt.infer_configs(flat, hints=read_header(single)[1]))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert np.shares_memory(conv["unet"]["conv_in.weight"], flat[key]), "renames copy nothing"


# ------------------------------------------------------------------------- full-size families


def _sparse_file(path, shapes, tag="F16"):
    """A safetensors file of the right size whose data is a hole (costs no disk, no time)."""
    header, off = {}, 0
    for k in sorted(shapes):
        n = int(np.prod(shapes[k], dtype=np.int64)) * {"F16": 2, "F32": 4}[tag]
        header[k] = {"dtype": tag, "shape": list(shapes[k]), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + off)
    return path


@pytest.mark.parametrize(
    "family, params",
    [
        ("sd1", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
        ("sd2-v", {"unet": 865_910_724, "vae": 83_653_863}),
        ("inpaint", {"unet": 859_535_364}),
        ("sd2-inpaint", {"unet": 865_925_124}),
        ("sd2-depth", {"unet": 865_913_604}),
        ("instruct-pix2pix", {"unet": 859_532_484}),
    ],
)
def test_inspect_identifies_full_size_families(family, params, tmp_path):
    shapes = original_shapes(full_size_configs(family))
    if family == "sd2-depth":  # 512-depth-ema.safetensors carries the MiDaS estimator too
        shapes["depth_model.model.pretrained.model.cls_token"] = (1, 1, 768)
    path = _sparse_file(tmp_path / f"{family}.safetensors", shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = wt.inspect(path)
    assert report["family"] == family and report["layout"] == "original"
    for part, n in params.items():
        assert report["components"][part]["parameters"] == n, part
    if family == "sd2-depth":
        assert "depth_model.model.pretrained.model.cls_token" in report["unused_keys"]
    if family == "sd2-v":
        assert report["prediction_type_assumed"] and report["text_encoder_layers"] == 23
        assert "cond_stage_model.model.text_projection" in report["unused_keys"]
    assert not report["unknown_keys"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = C.infer_configs(shapes)
    want = full_size_configs(family)
    for part, fields in C.STRUCTURE.items():
        assert {f: cfg[part][f] for f in fields} == {f: want[part][f] for f in fields}, part
    pipeline = {"inpaint": "StableDiffusionInpaintPipeline",
                "instruct-pix2pix": "StableDiffusionInstructPix2PixPipeline",
                "sd2-depth": "StableDiffusionDepth2ImgPipeline"}  # fmt: skip
    pipeline["sd2-inpaint"] = pipeline["inpaint"]
    assert cfg["model_index"]["_class_name"] == pipeline.get(family, "StableDiffusionPipeline")


# ------------------------------------------------------------------------- make_tiny


@pytest.mark.parametrize("family", ["sd1", "sd2", "inpaint", "instruct-pix2pix", "sd2-depth"])
def test_make_tiny_loads_and_runs_in_diffusers(family, tmp_path):
    torch, diffusers = need("torch", "diffusers")
    configs = wt.make_tiny(tmp_path / "m", family=family, seed=3)
    cls = getattr(diffusers, configs["model_index"]["_class_name"])
    # diffusers wants the depth estimator slot named even when it stays empty
    none = dict.fromkeys(("depth_estimator", "feature_extractor")) if family == "sd2-depth" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls.from_pretrained(str(tmp_path / "m"), local_files_only=True, **none)
    for part, rel in PARTS.items():  # every file tensor is a model parameter and vice versa
        state = getattr(pipe, part).state_dict()
        state.pop("embeddings.position_ids", None)
        assert set(state) == set(load_file(tmp_path / "m" / rel)), part
    assert pipe.tokenizer.pad_token == configs["tokenizer"]["pad_token"]
    assert len(pipe.tokenizer) == 49408
    assert pipe.scheduler.config.prediction_type == configs["scheduler"]["prediction_type"]
    kw = {}
    if family == "inpaint":
        kw = {"image": torch.rand(1, 3, 64, 64), "mask_image": torch.rand(1, 1, 64, 64)}
    if family == "instruct-pix2pix":
        kw = {"image": torch.rand(1, 3, 64, 64)}
    if family == "sd2-depth":
        kw = {
            "image": torch.rand(1, 3, 64, 64),
            "depth_map": torch.rand(1, 32, 32),
            "strength": 1.0,
        }
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        images = pipe("a red cube", num_inference_steps=1, output_type="np", generator=g, **kw)
        ids = pipe.tokenizer(["a red cube"], padding="max_length", return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids).last_hidden_state
        eps = pipe.unet(torch.randn(1, pipe.unet.config.in_channels, 8, 8), 500, hidden).sample
    assert images.images.shape == (1, 64, 64, 3) and np.isfinite(images.images).all()
    assert 0.1 < float(eps.std()) < 10 and 0.1 < float(hidden.std()) < 10, "activations sane"
    assert wt.inspect(tmp_path / "m")["family"] == configs["family"]


def test_make_tiny_is_deterministic(tmp_path):
    wt.make_tiny(tmp_path / "a", seed=1)
    wt.make_tiny(tmp_path / "b", seed=1)
    wt.make_tiny(tmp_path / "c", seed=2)
    for rel in PARTS.values():
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
        assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()
    assert wt.verify(tmp_path / "a", tmp_path / "b")["same"]
