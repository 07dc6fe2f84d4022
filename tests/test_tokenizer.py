"""minisd.CLIPTokenizer against transformers' CLIPTokenizer built offline from the same files.

transformers 5's CLIPTokenizer is the `tokenizers`-backed one only: it applies neither ftfy nor
html.unescape (the removed "slow" tokenizer did), so HTML entities and mojibake in the corpus are
tokenized literally on both sides; ``test_no_ftfy_in_reference`` pins that down.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from refharness import need

from minisd import CLIPTokenizer, InputError
from minisd.errors import ConfigError
from minisd.tokenizer import bundled_vocab, write_vocab_files

CORPUS = json.loads((Path(__file__).parent / "data" / "clip_prompts.json").read_text("utf-8"))
PADS = {"sd1": "<|endoftext|>", "sd2": "!"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {name: write_vocab_files(root / name, pad_token=pad) for name, pad in PADS.items()}


@pytest.fixture(scope="module")
def bundled():
    return CLIPTokenizer.from_pretrained(None)


def reference(folder):
    transformers = need("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


def ref_ids(ref, prompts):
    out = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    return out.input_ids.astype(np.int64)


def test_corpus_covers_what_it_should():
    assert len(CORPUS) >= 200
    lengths = {len(ids) for ids in CLIPTokenizer.from_pretrained(None).tokenize(CORPUS)}
    # content lengths 74..78 and 300 are windows of 76, 77, 78, 79, 80 and 302 tokens
    assert {0, 74, 75, 76, 77, 78, 300} <= lengths
    for needle in ("", "&amp;", "(word:1.2)", "café", "日本語のテキスト", "🐱", "it's", "3.14159"):
        assert needle in CORPUS


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_ids_equal_transformers_on_corpus(folders, family):
    ref = reference(folders[family])
    ours = CLIPTokenizer.from_pretrained(folders[family])
    with pytest.warns(UserWarning):  # the corpus has over-long prompts
        got = ours(CORPUS)
    want = ref_ids(ref, CORPUS)
    assert got.dtype == np.int64 and got.shape == (len(CORPUS), 77)
    bad = [p for p, a, b in zip(CORPUS, got, want) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} prompts differ, first: {bad[0]!r}"
    assert ours.pad_token_id == ref.pad_token_id == (49407 if family == "sd1" else 0)


def test_bundled_equals_sd1_folder(folders, bundled):
    with pytest.warns(UserWarning):
        a = bundled(CORPUS)
    with pytest.warns(UserWarning):
        b = CLIPTokenizer.from_pretrained(folders["sd1"])(CORPUS)
    np.testing.assert_array_equal(a, b)


def test_bundled_vocabulary_is_openai_clip(bundled):
    vocab, merges = bundled_vocab()
    assert len(vocab) == bundled.vocab_size == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    # the ids every CLIP example shows for this sentence
    want = [49406, 320, 1125, 539, 320, 2368, 49407]
    assert bundled("a photo of a cat")[0, :7].tolist() == want
    assert bundled("a photo of a cat")[0, 7:].tolist() == [49407] * 70


def test_padding_and_layout(folders):
    sd2 = CLIPTokenizer.from_pretrained(folders["sd2"])
    ids = sd2(["", "a cat"])
    assert ids[0, :2].tolist() == [49406, 49407] and (ids[0, 2:] == 0).all()
    assert ids[1, :4].tolist() == [49406, 320, 2368, 49407] and (ids[1, 4:] == 0).all()
    assert sd2("a cat").shape == (1, 77)


def test_truncation_warns_with_dropped_text(bundled):
    prompt = " ".join(["cat"] * 75 + ["purple", "elephant"])
    with pytest.warns(UserWarning, match="purple elephant"):
        ids = bundled(prompt)
    assert ids[0, 75] == 2368 and ids[0, 76] == 49407  # 75 content tokens kept, then EOS
    ok = " ".join(["cat"] * 75)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bundled(ok)[0, 76] == 49407


def test_truncated_text_matches_diffusers_report(folders, bundled):
    """diffusers decodes untruncated_ids[:, 76:-1] for its warning; we show the same text."""
    ref = reference(folders["sd1"])
    prompt = CORPUS[-31]  # all captions joined: far beyond 77 tokens
    full = ref(prompt, padding="longest", return_tensors="np").input_ids
    removed = ref.batch_decode(full[:, 76:-1])[0]
    with pytest.warns(UserWarning) as rec:
        bundled(prompt)
    assert removed and repr(removed) in str(rec[0].message)


@pytest.mark.parametrize("bad", [[], ["ok", 3], None, 5, ["ok", "lone \ud800 surrogate"]])
def test_bad_prompts_raise(bundled, bad):
    with pytest.raises(InputError, match="prompts"):
        bundled(bad)


def test_chunked(bundled):
    long = " ".join(["cat", "dog", "red"] * 60)  # 180 tokens -> 3 windows
    ids = bundled.chunked([long, "a cat"])
    assert ids.shape == (2, 3, 77) and ids.dtype == np.int64
    assert (ids[:, :, 0] == 49406).all()
    content = np.concatenate([row[1:76] for row in ids[0]])
    assert content[:180].tolist() == bundled.tokenize(long)[0]
    assert ids[0, 2, 31] == 49407 and (ids[0, 2, 32:] == 49407).all()  # 30 tokens in window 3
    np.testing.assert_array_equal(ids[1, 0], bundled("a cat")[0])
    np.testing.assert_array_equal(ids[1, 1], bundled("")[0])  # padding windows: empty prompt
    short = bundled.chunked("a cat")
    assert short.shape == (1, 1, 77)
    np.testing.assert_array_equal(short[0], bundled("a cat"))
    assert bundled.chunked("a cat", min_chunks=2).shape == (1, 2, 77)


def test_chunk_boundaries(bundled):
    """75 tokens fit one window exactly; 76 need two."""
    assert bundled.chunked(" ".join(["cat"] * 75)).shape == (1, 1, 77)
    two = bundled.chunked(" ".join(["cat"] * 76))
    assert two.shape == (1, 2, 77) and two[0, 1, :3].tolist() == [49406, 2368, 49407]


def test_chunked_pair(bundled):
    pos, neg = bundled.chunked_pair([" ".join(["cat"] * 100)], [""])
    assert pos.shape == neg.shape == (1, 2, 77)
    pos, neg = bundled.chunked_pair(["a"], ["blurry " * 160])
    assert pos.shape == neg.shape == (1, 3, 77)


def test_write_vocab_files(tmp_path):
    folder = write_vocab_files(tmp_path / "tok", pad_token="!")
    names = {"vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"}
    assert set(os.listdir(folder)) == names
    assert json.loads((folder / "special_tokens_map.json").read_text())["pad_token"] == "!"
    lines = (folder / "merges.txt").read_text("utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and lines[1] == "i n" and len(lines) == 48895
    with pytest.raises(InputError, match="pad_token"):
        write_vocab_files(tmp_path / "bad", pad_token="<pad>")


def test_transformers5_saved_folder(folders, tmp_path):
    """transformers 5 save_pretrained writes only tokenizer.json + tokenizer_config.json."""
    ref = reference(folders["sd2"])
    ref.save_pretrained(str(tmp_path))
    assert not (tmp_path / "vocab.json").exists()
    ours = CLIPTokenizer.from_pretrained(tmp_path)
    prompts = CORPUS[:120]
    np.testing.assert_array_equal(ours(prompts), ref_ids(reference(tmp_path), prompts))


def test_config_precedence(folders, tmp_path):
    """special_tokens_map.json wins over tokenizer_config.json, unless the config has an
    added_tokens_decoder; case of special tokens in text follows the "normalized" flags."""
    folder = write_vocab_files(tmp_path / "tok", pad_token="!")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    eot = "<|endoftext|>"
    cfg.update(bos_token="<|startoftext|>", eos_token=eot, unk_token=eot, pad_token=eot)
    entry = {"lstrip": False, "rstrip": False, "single_word": False, "special": True}
    cfg["added_tokens_decoder"] = {
        "49406": {"content": "<|startoftext|>", "normalized": True, **entry},
        "49407": {"content": "<|endoftext|>", "normalized": False, **entry},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    prompts = ["<|ENDOFTEXT|> <|StartOfText|> hi!", "a<|endoftext|>b", "x ! y"]
    ours = CLIPTokenizer.from_pretrained(folder)
    assert ours.pad_token_id == 49407
    np.testing.assert_array_equal(ours(prompts), ref_ids(reference(folder), prompts))


def test_no_ftfy_in_reference(folders, bundled):
    """The reference applies no html.unescape: '&amp;' stays 3 tokens, not '&'."""
    ref = reference(folders["sd1"])
    assert ref_ids(ref, ["&amp;"])[0, 2] != 49407
    np.testing.assert_array_equal(bundled("&amp;"), ref_ids(ref, ["&amp;"]))


def test_decode(bundled):
    ids = bundled("A photo of a Cat, 3.5 stars!")
    assert bundled.decode(ids[0]) == "a photo of a cat , 3 . 5 stars !"


def test_missing_files_raise(tmp_path):
    with pytest.raises(ConfigError, match="no such tokenizer folder"):
        CLIPTokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(ConfigError, match="vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "file, content, message",
    [
        ("tokenizer_config.json", [1], "expected a JSON object"),
        ("special_tokens_map.json", None, "expected a JSON object"),
        ("special_tokens_map.json", {"pad_token": {"x": 1}}, "no string 'content'"),
        ("tokenizer_config.json", {"model_max_length": 2}, "model_max_length=2"),
        ("special_tokens_map.json", {"pad_token": "<nope>"}, "pad_token '<nope>' is not in"),
    ],
)
def test_bad_tokenizer_files_raise_naming_the_folder(tmp_path, file, content, message):
    folder = write_vocab_files(tmp_path / "tok")
    (folder / file).write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as info:
        CLIPTokenizer.from_pretrained(folder)
    assert str(folder) in str(info.value)


def test_sd_style_config_without_special_map(folders, tmp_path):
    """Only tokenizer_config.json with "__type": "AddedToken" dicts (SD's own format)."""
    folder = write_vocab_files(tmp_path / "tok", pad_token="!")
    (folder / "special_tokens_map.json").unlink()
    prompts = ["<|ENDOFTEXT|> <|StartOfText|> hi!", "a<|endoftext|>b", "x ! y", ""]
    ours = CLIPTokenizer.from_pretrained(folder)
    assert ours.pad_token_id == 0
    np.testing.assert_array_equal(ours(prompts), ref_ids(reference(folder), prompts))
