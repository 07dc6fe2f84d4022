"""Textual inversion (minisd/textual_inversion.py, added tokens of minisd/tokenizer.py) against
diffusers' load_textual_inversion / maybe_convert_prompt / unload_textual_inversion on the tiny
SD1 (quick_gelu, pads with <|endoftext|>) and SD2-like (gelu, pads with "!") pipelines that
diffusers writes (tests/pipelines.py).

Both sides load the same random embedding files (diffusers' {token: (n, D) or (D,)} and A1111's
{"emb_params": (n, D)} safetensors; single- and multi-vector; odd names): token ids equal
transformers' for prompts that put the tokens everywhere, appended rows are bit-identical,
prompt embeddings and whole-pipeline latents agree (float32, rel. error <= 1e-4).
"""

from __future__ import annotations

import re
import subprocess
import warnings

import numpy as np
import pytest
from pipelines import build
from refharness import TOL, assert_rel, need, torch_dtype

import minisd
from minisd import pipeline_steps as steps
from minisd.backend import to_numpy
from minisd.errors import InputError, WeightsError
from minisd.textual_inversion import (
    expand_prompt,
    load_textual_inversion,
    loaded_embeddings,
    unload_textual_inversion,
)
from minisd.weights import CastOnRead, save_file

D = 16  # hidden size of the tiny pipelines' text encoders
PROMPTS = [
    "<cat-toy>", "a <cat-toy> on a table", "a photo of <cat-toy>", "<cat-toy>, <cat-toy>!",
    "(<cat-toy>:1.2) in <my token> style", "<CAT-TOY> and <Cat-Toy>", "x<cat-toy>y", "<cat-toy>s",
    "<my token> <MY   TOKEN> <my\ttoken> <mytoken>", "zqstyle, ZQSTYLE, zqstyles, azqstyle",
    "<Big-Cat> and <big-cat>", "<cat-toy>_1 <cat-toy>_2 <cat-toy>_3 <cat-toy>", "<pair-a><pair-b>",
    "", "café <cat-toy> 日本 🐱", "word " * 72 + "<cat-toy>", "word " * 73 + "<cat-toy>",
    "<cat-toy> " * 30, "zqstyle <pair-a> <cat-toy> <my token>",
]  # fmt: skip


def vectors(n, seed):
    """Random (n, D) float32, about as large as the token embedding's rows."""
    return (0.5 * np.random.default_rng(seed).standard_normal((n, D))).astype(np.float32)


def embedding_files(root):
    """[(path or state dict, token for diffusers)] in both file formats."""
    (root / "cat-toy").mkdir()
    save_file({"<cat-toy>": vectors(3, 1)}, root / "cat-toy" / "learned_embeds.safetensors")
    save_file({"<my token>": vectors(1, 2)[0]}, root / "my.safetensors")  # (D,)
    save_file({"emb_params": vectors(2, 3)}, root / "zqstyle.safetensors")  # A1111: the stem
    return [(root / "cat-toy", None), (root / "my.safetensors", None),
            (root / "zqstyle.safetensors", "zqstyle")]  # fmt: skip


def load_both(ref, ours, root):
    """The same embeddings into diffusers' and minisd's pipelines."""
    torch = need("torch")
    for path, token in embedding_files(root):
        ref.load_textual_inversion(str(path), token=token)
        load_textual_inversion(ours, path)
    big, pair = vectors(2, 4), {"<pair-a>": vectors(2, 5), "<pair-b>": vectors(1, 6)[0]}
    ref.load_textual_inversion({"<Big-Cat>": torch.from_numpy(big)})
    with pytest.warns(UserWarning, match="first vector only"):  # diffusers' quirk, see below
        load_textual_inversion(ours, {"<Big-Cat>": big})
    save_file(pair, root / "pair.safetensors")  # two tokens in one file: diffusers takes a list
    ref.load_textual_inversion([{k: torch.from_numpy(v)} for k, v in pair.items()])
    assert load_textual_inversion(ours, root / "pair.safetensors") == [
        "<pair-a>", "<pair-a>_1", "<pair-b>"
    ]  # fmt: skip


def reference(folder, dtype="float32"):
    diffusers = need("diffusers")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, local_files_only=True
    )
    ref.set_progress_bar_config(disable=True)
    return ref.to(torch_dtype(dtype))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    need("torch", "diffusers", "transformers")
    root = tmp_path_factory.mktemp("ti")
    for kind in ("sd1", "sd2"):
        build(kind, root / kind)
    return root


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def loaded(request, folders, tmp_path_factory):
    """(diffusers pipeline, minisd pipeline) over one folder with the same embeddings loaded."""
    ref = reference(folders / request.param)
    ours = minisd.StableDiffusion.from_pretrained(folders / request.param)
    load_both(ref, ours, tmp_path_factory.mktemp("embeddings"))
    return ref, ours


def ref_ids(ref, prompts):
    """diffusers' encode_prompt tokenization: maybe_convert_prompt, then the tokenizer."""
    conv = ref.maybe_convert_prompt(prompts, ref.tokenizer)
    out = ref.tokenizer(conv, padding="max_length", max_length=77, truncation=True)
    return np.array(out.input_ids, dtype=np.int64)


def our_ids(ours, prompts):
    with warnings.catch_warnings():  # over-long prompts
        warnings.simplefilter("ignore")
        return ours.tokenizer(prompts)


def test_token_ids_match_transformers(loaded):
    ref, ours = loaded
    tok = ours.tokenizer
    assert len(tok) == len(ref.tokenizer) == 49408 + 11
    for name in tok.added_tokens:
        assert tok.backend.token_to_id(name) == ref.tokenizer.convert_tokens_to_ids(name), name
    got, want = our_ids(ours, PROMPTS), ref_ids(ref, PROMPTS)
    bad = [p for p, a, b in zip(PROMPTS, got, want) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} prompts differ, first: {bad[0]!r}"
    for p in PROMPTS:
        assert expand_prompt(tok, p) == ref.maybe_convert_prompt(p, ref.tokenizer), p
    # what the comparisons cover: expansion, a token inside a word, case folding, truncation
    assert list(got[0, :5]) == [49406, 49408, 49409, 49410, 49407]
    assert list(got[6, 1:6]) == [343, 49408, 49409, 49410, 344]  # x <cat-toy> y
    assert 49411 in got[8] and got[5, 1] == got[5, 3] == 49408 and 49409 not in got[5]
    assert list(got[-4, -4:]) == list(got[-2, -4:]) == [49408, 49409, 49410, 49407]
    assert list(got[-3, -3:]) == [49408, 49409, 49407]  # cut inside an expansion


def test_rows_and_prompt_embeddings_match(loaded):
    torch = need("torch")
    ref, ours = loaded
    rows = ref.text_encoder.get_input_embeddings().weight.detach().numpy()
    assert ours.text_encoder.token_embedding.shape == rows.shape == (49408 + 11, D)
    assert np.array_equal(ours.text_encoder.token_embedding, rows)  # order and values, bit for bit
    neg = ["<my token>", "zqstyle"] * (len(PROMPTS) // 2) + [""]
    with torch.no_grad():
        pos, nemb = ref.encode_prompt(PROMPTS, "cpu", 1, True, neg)
    want = torch.cat([nemb, pos]).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = steps.encode_prompt(ours, PROMPTS, neg, 1, True, None)
    assert_rel(got, want, TOL["float32"], "prompt embeddings")


def test_pipeline_latents_match(loaded):
    torch = need("torch")
    ref, ours = loaded
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    kw = dict(prompt=["a <cat-toy> in zqstyle", "<my token>, <pair-a> <pair-b>"],
              negative_prompt=["zqstyle", "<cat-toy>"], num_inference_steps=4,
              guidance_scale=6.0, height=64, width=64, output_type="latent")  # fmt: skip
    with torch.no_grad():
        want = ref(**kw, latents=torch.from_numpy(latents)).images.numpy()
    got = ours(**kw, latents=latents, scheduler=None, progress=False)  # the folder's own
    assert_rel(got, want, TOL["float32"], "latents")


@pytest.mark.parametrize("dtype,file_dtype", [("float64", "float32"), ("float16", "float32"),
                                              ("float32", "float16")])  # fmt: skip
def test_rows_cast_as_torch(folders, tmp_path, dtype, file_dtype):
    """Rows are the file's vectors cast to the model dtype, as torch's copy into the weight."""
    ref, ours = (
        reference(folders / "sd1", dtype),
        minisd.StableDiffusion.from_pretrained(folders / "sd1", dtype=dtype),
    )
    v = vectors(3, 7).astype(file_dtype) * 1.001  # not representable in float16 (float32 file)
    save_file({"<v>": v}, tmp_path / "v.safetensors")
    ref.load_textual_inversion(str(tmp_path / "v.safetensors"))
    load_textual_inversion(ours, tmp_path / "v.safetensors")
    rows = ref.text_encoder.get_input_embeddings().weight.detach().numpy()[49408:]
    got = ours.text_encoder.token_embedding[49408:]
    assert got.dtype == np.dtype(dtype) and np.array_equal(got, rows)


def test_unload_matches_diffusers_and_restores_bits(folders, tmp_path):
    torch = need("torch")
    ref, ours = reference(folders / "sd2"), minisd.StableDiffusion.from_pretrained(folders / "sd2")
    table, prompts = ours.text_encoder.token_embedding, PROMPTS[:6] + PROMPTS[-1:]
    before = our_ids(ours, PROMPTS)
    load_both(ref, ours, tmp_path)
    ref.unload_textual_inversion("<my token>")  # single-vector: diffusers removes it whole
    unload_textual_inversion(ours, "<my token>")
    assert list(loaded_embeddings(ours)) == ["<cat-toy>", "zqstyle", "<Big-Cat>", "<pair-a>",
                                             "<pair-b>"]  # fmt: skip
    assert np.array_equal(our_ids(ours, PROMPTS), ref_ids(ref, PROMPTS))  # ids renumbered
    rows = ref.text_encoder.get_input_embeddings().weight.detach().numpy()
    assert np.array_equal(ours.text_encoder.token_embedding, rows)
    with torch.no_grad():
        want = ref.encode_prompt(prompts, "cpu", 1, False)[0].numpy()
    assert_rel(steps.encode_prompt(ours, prompts, None, 1, False, None), want, TOL["float32"])
    for bad in ("<my token>", "<cat-toy>_1"):
        with pytest.raises(InputError, match=re.escape(repr(bad)) + ".*not a loaded"):
            unload_textual_inversion(ours, bad)
    unload_textual_inversion(ours, ["<cat-toy>", "zqstyle"])
    assert list(loaded_embeddings(ours)) == ["<Big-Cat>", "<pair-a>", "<pair-b>"]
    unload_textual_inversion(ours)
    assert ours.text_encoder.token_embedding is table and len(ours.tokenizer) == 49408
    assert ours.text_encoder.config.vocab_size == 49408 and ours.tokenizer.added_tokens == []
    assert np.array_equal(our_ids(ours, PROMPTS), before) and loaded_embeddings(ours) == {}
    assert load_textual_inversion(ours, {"<my token>": vectors(1, 9)}) == ["<my token>"]


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def tiny(tiny_sd1_files):
    return tiny_sd1_files[0]  # weights_tools.make_tiny: no reference needed, hidden size 32


def bits(pipe):
    te = pipe.text_encoder.token_embedding
    return len(pipe.tokenizer), str(te.dtype), te.shape, to_numpy(te).tobytes()


def test_pickle_refused_with_a_hint_that_works(tiny, tmp_path):
    torch = need("torch")
    pipe = minisd.StableDiffusion.from_pretrained(tiny)
    a1111 = torch.from_numpy(np.ones((2, 32), np.float32) * 0.25)
    torch.save({"string_to_param": {"*": a1111}, "name": "x", "step": 3}, tmp_path / "zqsty.pt")
    torch.save({"<d>": a1111[0]}, tmp_path / "learned_embeds.bin")
    (tmp_path / "sub").mkdir()
    torch.save({"<d>": a1111[0]}, tmp_path / "sub" / "learned_embeds.bin")
    for name, token in (("zqsty.pt", "zqsty"), ("learned_embeds.bin", "<d>"), ("sub", "<d>")):
        with pytest.raises(WeightsError, match="pickle files.*safetensors") as e:
            load_textual_inversion(pipe, tmp_path / name)
        assert str(tmp_path / name) in str(e.value)
        command = re.search(r"`(python -c .*)`", str(e.value)).group(1)
        subprocess.run(command, shell=True, check=True, cwd=tmp_path)
        out = (tmp_path / name).with_suffix(".safetensors")
        if name == "sub":
            out = tmp_path / "sub" / "learned_embeds.safetensors"
        assert load_textual_inversion(pipe, out)[0] == token
        unload_textual_inversion(pipe)
    with pytest.raises(WeightsError, match=r"\.ckpt.*never loaded"):
        load_textual_inversion(pipe, tmp_path / "x.ckpt")


def _error_cases(tmp_path):
    v = vectors(2, 0).repeat(2, axis=1)  # (2, 32)
    save_file({}, tmp_path / "empty.safetensors")
    save_file({"a": v, "b": v}, tmp_path / "two.safetensors")
    save_file({"<i>": np.ones((2, 32), np.int32)}, tmp_path / "int.safetensors")
    (tmp_path / "folder").mkdir()
    return [
        ({"<x>": vectors(2, 0)}, None, WeightsError, r"'<x>' has vectors of size 16.*is 32"),
        ({"cat</w>": v}, None, InputError, r"dict: token 'cat</w>' is already in the tok"),
        ({"<x>": v}, "<|endoftext|>", InputError, "already in the tokenizer"),
        ({"<x>": v}, "!", InputError, "already in the tokenizer"),
        ({"<X>": v, "<x>": v}, None, InputError, r"'<x>' matches as '<x>', as '<X>' does"),
        ({"<a>": v, "<a>_1": v}, None, InputError, r"'<a>_1' matches as"),
        ({"<x>": v}, " ", InputError, "token=' '"),
        (tmp_path / "empty.safetensors", None, WeightsError, "empty.safetensors: holds no emb"),
        (tmp_path / "two.safetensors", "<t>", WeightsError, r"two.safetensors: holds 2 .*'<t>'"),
        (tmp_path / "int.safetensors", None, WeightsError, "int.safetensors: embedding '<i>' i"),
        (tmp_path / "folder", None, WeightsError, "folder: expected learned_embeds"),
        (tmp_path / "nope.safetensors", None, WeightsError, "nope.safetensors: no such"),
        ({"clip_l": v, "clip_g": v}, None, WeightsError, "an SDXL embedding"),
        ({"emb_params": v}, None, InputError, "give token="),
        ({"<x>": np.zeros((2, 2, 32), np.float32)}, None, WeightsError, r"shape \(2, 2, 32\)"),
        ({"<x>": np.full(32, np.nan, np.float32)}, None, WeightsError, "'<x>' holds NaN"),
        (v, None, InputError, "array: give its token"),
    ]


def test_errors_name_the_file_and_token_and_change_nothing(tiny, tmp_path):
    pipe = minisd.StableDiffusion.from_pretrained(tiny)
    load_textual_inversion(pipe, {"<old>": vectors(1, 0).repeat(2, axis=1)})
    original = bits(pipe)
    for source, token, error, message in _error_cases(tmp_path):
        with pytest.raises(error, match=message):
            load_textual_inversion(pipe, source, token=token)
        assert bits(pipe) == original, message
    with pytest.raises(InputError, match="already in the tokenizer"):
        load_textual_inversion(pipe, {"<old>": vectors(1, 1).repeat(2, axis=1)})
    pipe.tokenizer.add_tokens(["<outside>"])
    with pytest.raises(InputError, match="changed after embeddings were loaded"):
        load_textual_inversion(pipe, {"<y>": vectors(1, 1).repeat(2, axis=1)})


def test_token_argument_renames_and_arrays_load(tiny):
    pipe = minisd.StableDiffusion.from_pretrained(tiny)
    v = vectors(3, 2).repeat(2, axis=1)  # (3, 32)
    assert load_textual_inversion(pipe, {"<a>": v}, token="<b>") == ["<b>", "<b>_1", "<b>_2"]
    assert load_textual_inversion(pipe, v[0], token="<c>") == ["<c>"]
    assert load_textual_inversion(pipe, {"emb_params": v[:1]}, token="<e>") == ["<e>"]
    a1111 = {"string_to_param": {"*": v[:2]}, "name": "<n>"}  # what torch.load gives
    assert load_textual_inversion(pipe, a1111) == ["<n>", "<n>_1"]
    table = pipe.text_encoder.token_embedding
    assert np.array_equal(table[49408:], np.concatenate([v, v[:1], v[:1], v[:2]]))
    assert list(pipe.tokenizer(["<n> <B> <c>"])[0, :6]) == [
        49406,
        49413,
        49414,
        49408,
        49411,
        49407,
    ]


@pytest.mark.parametrize("mode", ["lazy", "stream"])
def test_lazy_and_stream_match_eager(tiny, tmp_path, mode):
    """float16 files, float32 compute: the stored float16 memory map is replaced by a float32
    table (rows cast from the vectors, not through float16) and put back by unloading."""
    import weights_tools

    weights_tools.cast(tiny, tmp_path / "fp16", "float16")
    eager = minisd.StableDiffusion.from_pretrained(tmp_path / "fp16")
    pipe = minisd.StableDiffusion.from_pretrained(tmp_path / "fp16", weights=mode)
    stored = pipe.text_encoder.token_embedding
    assert isinstance(pipe.text_encoder.params, CastOnRead) and isinstance(stored, np.memmap)
    v = vectors(2, 3).repeat(2, axis=1) * np.float32(1.001)
    for p in (eager, pipe):
        load_textual_inversion(p, {"<v>": v})
    table = pipe.text_encoder.token_embedding
    assert table.dtype == np.float32 and not isinstance(table, np.memmap)
    assert np.array_equal(table[49408:], v)
    ids = pipe.tokenizer(["a <v> b", "<v>"])
    assert np.array_equal(pipe.text_encoder.encode(ids), eager.text_encoder.encode(ids))
    unload_textual_inversion(pipe)
    assert pipe.text_encoder.token_embedding is stored


def test_backends(tiny, xp):
    """On the device (fake_cupy on the CPU, CuPy on a GPU) the table stays there."""
    device = "cpu" if xp is np else "cuda"
    host = minisd.StableDiffusion.from_pretrained(tiny, dtype="float32")
    dev = minisd.StableDiffusion.from_pretrained(tiny, dtype="float32", device=device)
    original = bits(dev)
    v = vectors(2, 4).repeat(2, axis=1)
    for p in (host, dev):
        load_textual_inversion(p, {"<v>": v})
    assert isinstance(dev.text_encoder.token_embedding, xp.ndarray)
    ids = host.tokenizer(["a <v> b"])
    got = dev.text_encoder.encode(xp.asarray(ids))
    assert_rel(got, host.text_encoder.encode(ids), 1e-6, "device text encoder")
    unload_textual_inversion(dev)
    assert bits(dev) == original
