"""minisd.CLIPTextModel against transformers' CLIPTextModel, every layer, float64 and float32.

Tiny configs go through save_pretrained -> from_pretrained; the full-size ViT-L/14 (SD1) and
OpenCLIP ViT-H/14 (SD2) towers are built from the reference's in-memory state dict.
Run the slow ones under ``flock /tmp/bigmodel.lock python -m pytest -m slow tests/test_clip.py``.
"""

import copy
import json

import numpy as np
import pytest
from refharness import (
    TOL,
    assert_rel,
    collect_outputs,
    compare_traces,
    need,
    randomize_,
    text_model_names,
    to_np,
)

import minisd
from minisd import CLIPTextModel, CLIPTokenizer
from minisd.clip import encode_long
from minisd.errors import ConfigError, InputError, WeightsError
from minisd.tokenizer import write_vocab_files
from minisd.weights import RecordingDict, flatten, load_file, save_file

TINY = {
    # SD1-like: quick_gelu, EOS pooling by id, batch of 3
    "sd1": dict(
        vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, hidden_act="quick_gelu", bos_token_id=998, eos_token_id=999,
    ),
    # SD2-like: gelu, 3 heads of 16, legacy eos_token_id=2 (argmax pooling), as SD's configs
    "sd2": dict(
        vocab_size=1000, hidden_size=48, intermediate_size=160, num_hidden_layers=4,
        num_attention_heads=3, hidden_act="gelu", bos_token_id=998, eos_token_id=2,
    ),
}  # fmt: skip
FULL = {
    "vit-l-14": dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, hidden_act="quick_gelu", eos_token_id=2, projection_dim=768,
    ),
    "openclip-h-14": dict(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, hidden_act="gelu", eos_token_id=2, projection_dim=512,
    ),
}  # fmt: skip


def build_reference(cfg, seed):
    torch, transformers = need("torch", "transformers")
    from transformers.initialization import no_init_weights

    torch.manual_seed(seed)
    with no_init_weights():  # randomize_ sets every parameter anyway
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()
    return randomize_(model.double(), seed)


def tiny_ids(cfg, n=3, seed=0):
    """Tokenizer-like rows: BOS, random tokens, EOS (id 999), padding (EOS or 0)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, 77), dtype=np.int64)
    for i, length in enumerate(rng.integers(0, 75, n)):
        body = rng.integers(3, 990, length)
        row = [998, *body, 999]
        pad = 999 if i % 2 else 0
        ids[i] = row + [pad] * (77 - len(row))
    return ids


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, ref_cache):
    cfg = TINY[request.param]
    model = build_reference(cfg, seed=1).float().double()  # weights exactly as saved (float32)
    folder = ref_cache / f"clip_{request.param}"
    copy.deepcopy(model).float().save_pretrained(str(folder), safe_serialization=True)
    return request.param, model, folder


def run_both(model, ours, ids, dtype):
    torch = need("torch")
    want = getattr(torch, dtype)
    ref = model if model.dtype == want else copy.deepcopy(model).to(want)
    with torch.no_grad(), collect_outputs(ref) as ref_acts:
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
    with minisd.trace() as acts:
        last, states = ours(ids, output_hidden_states=True)
    return ref, out, text_model_names(ref_acts), last, states, acts


def check_all(model, ours, ids, dtype):
    """Every named module, last_hidden_state, every hidden state, pooled output."""
    tol = TOL[dtype]
    ref, out, ref_acts, last, states, acts = run_both(model, ours, ids, dtype)
    assert {"text_model.embeddings", "text_model.encoder.layers.0.self_attn"} <= set(ref_acts)
    errs = compare_traces(acts, ref_acts, tol)
    assert last.dtype == np.dtype(dtype)
    errs["last_hidden_state"] = assert_rel(last, to_np(out.last_hidden_state), tol, "last")
    assert len(states) == len(out.hidden_states) == ours.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(states, out.hidden_states)):
        errs[f"hidden_states[{i}]"] = assert_rel(a, to_np(b), tol, f"hidden_states[{i}]")
    pooled = ours.pooled_output(ids, last)
    errs["pooled"] = assert_rel(pooled, to_np(out.pooler_output), tol, "pooler_output")
    return ref, out, errs


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_tiny_every_layer(tiny, dtype):
    _, model, folder = tiny
    ours = CLIPTextModel.from_pretrained(folder, dtype=dtype)
    ids = tiny_ids(ours.config)
    _, _, errs = check_all(model, ours, ids, dtype)
    assert len(errs) > 30
    print(f"{folder.name} {dtype}: max rel. error {max(errs.values()):.2e}")


def test_tiny_clip_skip(tiny):
    torch = need("torch")
    _, model, folder = tiny
    ours = CLIPTextModel.from_pretrained(folder, dtype="float64")
    ids = tiny_ids(ours.config)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
        for k in range(1, ours.config.num_hidden_layers + 1):
            # diffusers' encode_prompt: hidden_states[-(clip_skip + 1)] -> final_layer_norm
            want = to_np(model.final_layer_norm(out.hidden_states[-(k + 1)]))
            assert_rel(ours.encode(ids, clip_skip=k), want, TOL["float64"], f"clip_skip={k}")
    np.testing.assert_array_equal(ours.encode(ids), ours(ids))
    np.testing.assert_array_equal(ours.encode(ids, clip_skip=0), ours(ids))
    for bad in (-1, ours.config.num_hidden_layers + 1):
        with pytest.raises(InputError, match="clip_skip"):
            ours.encode(ids, clip_skip=bad)


def test_every_key_is_read(tiny):
    _, _, folder = tiny
    te = CLIPTextModel.from_pretrained(folder, dtype="float64")
    keys = set(flatten(te.params))
    te.params = RecordingDict(te.params)
    te(tiny_ids(te.config))
    assert te.params.reads == keys


def test_sd_layout_with_prefix_and_position_ids(tiny, tmp_path):
    """SD checkpoints (transformers 4) prefix `text_model.` and may keep `position_ids`."""
    _, _, folder = tiny
    flat = load_file(folder / "model.safetensors")
    sd = {f"text_model.{k}": np.array(v) for k, v in flat.items()}
    sd["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    te = CLIPTextModel.from_pretrained(tmp_path, dtype="float64")
    plain = CLIPTextModel.from_pretrained(folder, dtype="float64")
    ids = tiny_ids(te.config)
    np.testing.assert_array_equal(te(ids), plain(ids))
    te.params = RecordingDict(te.params)
    te(ids)
    assert "embeddings.position_ids" in te.params.reads
    assert te.params.reads == set(flatten(te.params))


def _write(tmp_path, folder, flat):
    save_file(flat, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    return tmp_path


def test_bad_checkpoints(tiny, tmp_path):
    _, _, folder = tiny
    flat = {k: np.array(v) for k, v in load_file(folder / "model.safetensors").items()}
    key = "encoder.layers.1.mlp.fc1.bias"
    cases = {
        "missing key": ({k: v for k, v in flat.items() if k != key}, key),
        "unexpected key": ({**flat, "text_projection.weight": flat[key]}, "text_projection"),
        "wrong shape": ({**flat, key: flat[key][:-1]}, key),
        "mixed prefixes": ({**flat, "text_model.x": flat[key]}, "text_model"),
    }
    for i, (name, (bad, needle)) in enumerate(cases.items()):
        sub = tmp_path / str(i)
        sub.mkdir()
        with pytest.raises(WeightsError, match=needle.replace(".", r"\.")):
            CLIPTextModel.from_pretrained(_write(sub, folder, bad))
        print(name, "ok")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightsError, match="no weights file"):
        CLIPTextModel.from_pretrained(tmp_path)


def test_bad_config_and_inputs(tiny, tmp_path):
    _, _, folder = tiny
    cfg = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPTextModel.from_pretrained(tmp_path)
    for field, value in (
        ("num_attention_heads", 0),
        ("num_attention_heads", 7),  # does not divide hidden_size
        ("hidden_size", "32"),
        ("layer_norm_eps", "x"),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(ConfigError, match=f"config.json: {field}={value!r}"):
            CLIPTextModel.from_pretrained(tmp_path)
    te = CLIPTextModel.from_pretrained(folder)
    ids = tiny_ids(te.config)
    for bad, what in ((ids[0], "input_ids"), (ids + 2000, "ids must"), (ids[:, :0], "length")):
        with pytest.raises(InputError, match=what):
            te(bad)
    with pytest.raises(InputError, match="length 78"):
        te(np.zeros((1, 78), dtype=np.int64))


def test_short_sequences_and_lists(tiny):
    """Shorter inputs (L < 77) work as in transformers (positions 0..L-1); lists are accepted."""
    torch = need("torch")
    _, model, folder = tiny
    te = CLIPTextModel.from_pretrained(folder, dtype="float64")
    ids = tiny_ids(te.config)[:, :20]
    with torch.no_grad():
        want = to_np(model(torch.from_numpy(ids)).last_hidden_state)
    assert_rel(te(ids.tolist()), want, TOL["float64"], "L=20")


def test_encode_long(tiny):
    _, _, folder = tiny
    te = CLIPTextModel.from_pretrained(folder, dtype="float64")
    chunks = np.stack([tiny_ids(te.config, n=3, seed=s) for s in (1, 2)])  # (2, 3, 77)
    for skip in (None, 1):
        out = encode_long(te, chunks, clip_skip=skip)
        assert out.shape == (2, 3 * 77, te.config.hidden_size)
        for i in range(2):
            want = np.concatenate(list(te.encode(chunks[i], clip_skip=skip)), axis=0)
            np.testing.assert_allclose(out[i], want, rtol=0, atol=1e-12)
    with pytest.raises(InputError, match="chunks"):
        encode_long(te, chunks[0])


def test_constructor_from_config_and_params(tiny):
    _, _, folder = tiny
    te = CLIPTextModel.from_pretrained(folder, dtype="float64")
    cfg = json.loads((folder / "config.json").read_text())
    again = CLIPTextModel(cfg, te.params)
    ids = tiny_ids(te.config)
    np.testing.assert_array_equal(again(ids), te(ids))
    assert again.config == te.config


# --------------------------------------------------------------------------- full size


@pytest.fixture(scope="module", params=sorted(FULL))
def full(request, tmp_path_factory):
    model = build_reference(FULL[request.param], seed=2)
    pad = "<|endoftext|>" if request.param.startswith("vit") else "!"
    folder = write_vocab_files(tmp_path_factory.mktemp("tok"), pad_token=pad)
    # one 77-token prompt keeps the float64 runs of 23 x 1024 layers short on 2 cores
    ids = CLIPTokenizer.from_pretrained(folder)(
        "(masterpiece:1.2), an astronaut on a horse, café 🐱"
    )
    return request.param, model, ids


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_full_size_every_layer(full, dtype):
    name, model, ids = full
    torch = need("torch")
    ref = copy.deepcopy(model).to(getattr(torch, dtype)) if dtype == "float32" else model
    sd = {k: to_np(v) for k, v in ref.state_dict().items()}
    if name.startswith("vit"):  # exercise the SD (text_model.) layout too
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    ours = CLIPTextModel.from_state_dict(sd, FULL[name])
    assert ours.dtype == np.dtype(dtype)
    _, out, errs = check_all(ref, ours, ids, dtype)
    with torch.no_grad():
        want = to_np(ref.final_layer_norm(out.hidden_states[-2]))
    errs["clip_skip=1"] = assert_rel(ours.encode(ids, clip_skip=1), want, TOL[dtype], "skip")
    print(f"{name} {dtype}: max rel. error {max(errs.values()):.2e} over {len(errs)} outputs")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_backends(tiny, xp, dtype):
    """The same forward on each array backend (CuPy only where a GPU exists)."""
    torch = need("torch")
    from minisd.backend import to_numpy

    _, model, folder = tiny
    te = CLIPTextModel.from_pretrained(folder, dtype=dtype, device="cpu" if xp is np else "cuda")
    ids = tiny_ids(te.config)
    last, states = te(ids, output_hidden_states=True)
    assert type(last) is xp.ndarray and len(states) == te.config.num_hidden_layers + 1
    ref = copy.deepcopy(model).to(getattr(torch, dtype))
    with torch.no_grad():
        out = ref(torch.from_numpy(ids))
    assert_rel(to_numpy(last), to_np(out.last_hidden_state), TOL[dtype], xp.__name__)
    pooled = to_numpy(te.pooled_output(ids, last))
    assert_rel(pooled, to_np(out.pooler_output), TOL[dtype], "pooled")
    emb = encode_long(te, ids[None], clip_skip=1)  # (1, 3*77, D) on the device
    assert type(emb) is xp.ndarray and emb.shape == (1, 3 * 77, te.config.hidden_size)
