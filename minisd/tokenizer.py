"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), built on the `tokenizers` library.

The pipeline is exactly the one transformers' (fast) ``CLIPTokenizer`` configures:

1. normalize: Unicode NFC, every whitespace run -> one space, lowercase;
2. pre-tokenize: split into the pieces matched by CLIP's regex (special tokens, English
   contractions, letter runs, single digits, runs of other non-space characters; whitespace is
   dropped), then map each piece's UTF-8 bytes to printable symbols (GPT-2's ByteLevel);
3. BPE with the end-of-word suffix ``</w>``;
4. wrap as ``<|startoftext|> tokens <|endoftext|>`` and pad to 77 with the pad token.

Added tokens (``add_tokens``, for textual inversion) are transformers' ``add_tokens``: never split
by BPE, matched in the normalized text ("<Cat-Toy>" matches "<CAT-TOY>"), inside words too, the
longest first; ids 49408, .... Prompts naming a multi-vector token are rewritten first, as
diffusers' ``maybe_convert_prompt`` (:meth:`CLIPTokenizer.expand_prompt`).

transformers 5 has no "slow" CLIP tokenizer any more, so neither ftfy nor html.unescape is
applied: "&amp;" is tokenized literally, as diffusers' pipelines see it.

``CLIPTokenizer.from_pretrained(None)`` uses the vocabulary bundled in ``minisd/data`` (see
the README there for its origin and license).
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import warnings
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .backend import to_numpy
from .config import is_int
from .errors import ConfigError, InputError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BUNDLED = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # merges CLIP uses: vocab 49408 = 2*256 symbols + merges + 2 specials
MAX_LENGTH = 77
# transformers' CLIPTokenizer pre-tokenizer regex (kept pieces; everything else is dropped).
SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable-character map (printable Latin-1 bytes map to
    themselves, the other 68 to U+0100 onwards)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@functools.lru_cache(maxsize=1)
def bundled_vocab():
    """(vocab {token: id}, merges [(a, b)]) derived from the bundled merge file, as open_clip and
    transformers do: byte symbols, byte symbols + "</w>", one token per merge, then BOS, EOS."""
    lines = gzip.decompress(BUNDLED.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]  # line 0 is a header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_vocab_files(folder, pad_token=EOS):
    """Write a Stable Diffusion style ``tokenizer/`` folder from the bundled vocabulary:
    vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json.

    pad_token: "<|endoftext|>" (SD1.x) or "!" (SD2.x, OpenCLIP). Returns the folder path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = bundled_vocab()
    if pad_token not in vocab:
        raise InputError(f"write_vocab_files: pad_token={pad_token!r} is not in the vocabulary")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(text, encoding="utf-8")

    def added(content):
        flags = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        return {"content": content, **flags}

    specials = {"bos_token": added(BOS), "eos_token": added(EOS), "unk_token": added(EOS)}
    specials["pad_token"] = pad_token
    config = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
        # SD's tokenizer_config.json marks AddedToken dicts with "__type", as transformers 4 did
        **{
            k: {"__type": "AddedToken", **v} if isinstance(v, dict) else v
            for k, v in specials.items()
        },
    }
    for name, obj in (("special_tokens_map.json", specials), ("tokenizer_config.json", config)):
        (folder / name).write_text(json.dumps(obj, indent=2), encoding="utf-8")
    return folder


def _token_str(value, default, where):
    """A special token from a config: a string, or a dict with "content" (AddedToken)."""
    if value is None:
        return default
    if isinstance(value, dict):
        if not isinstance(value.get("content"), str):
            raise ConfigError(f"{where}: special token {value!r} has no string 'content'")
        return value["content"]
    return str(value)


def _read_json(path):
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read tokenizer file ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _special_tokens(folder):
    """Special tokens and max length of a tokenizer folder, with transformers 5's precedence:
    tokenizer_config.json, overridden by special_tokens_map.json unless the config carries an
    ``added_tokens_decoder`` (then special_tokens_map.json is ignored)."""
    cfg_path, map_path = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    tokens = {k: cfg.get(k) for k in SPECIAL_KEYS}
    if map_path.is_file() and "added_tokens_decoder" not in cfg:
        smap = _read_json(map_path)
        tokens.update({k: smap[k] for k in SPECIAL_KEYS if smap.get(k) is not None})
    out = {k: _token_str(tokens[k], BOS if k == "bos_token" else EOS, folder) for k in SPECIAL_KEYS}
    out["normalized_specials"] = _normalized_specials(folder, cfg, tokens, out)
    length = cfg.get("model_max_length", MAX_LENGTH)
    if is_int(length) and length < 3:
        raise ConfigError(
            f"{cfg_path}: model_max_length={length}: needs room for BOS, a token and EOS (>= 3)"
        )
    out["model_max_length"] = int(length) if isinstance(length, int) and length < 10**6 else 77
    return out


def _normalized_specials(folder, cfg, tokens, names):
    """Special tokens matched after normalization (so "<|STARTOFTEXT|>" counts), as transformers
    decides: the "normalized" flag a token already has from tokenizer.json's ``added_tokens`` or
    the config's ``added_tokens_decoder``; otherwise that of its last mention in bos, eos, unk,
    pad order (an AddedToken dict's flag; a plain string: False)."""
    known = {}
    if (folder / "tokenizer.json").is_file():
        for t in _read_json(folder / "tokenizer.json").get("added_tokens", []):
            known[t["content"]] = bool(t.get("normalized", False))
    for t in (cfg.get("added_tokens_decoder") or {}).values():
        known[t["content"]] = bool(t.get("normalized", False))
    flags = {}
    for k in SPECIAL_KEYS:
        value = tokens[k]
        if value is not None:
            flags[names[k]] = (
                bool(value.get("normalized", False)) if isinstance(value, dict) else False
            )
    flags.update({t: f for t, f in known.items() if t in flags})
    return tuple(t for t, f in flags.items() if f)


def _read_vocab(folder):
    """(vocab, merges) from vocab.json + merges.txt, or from the model of a tokenizer.json
    (what transformers 5 ``save_pretrained`` writes)."""
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():
        try:
            return BPE.read_file(str(vocab_file), str(merges_file))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ConfigError(f"{folder}: cannot read vocab.json / merges.txt ({e})") from None
    if (folder / "tokenizer.json").is_file():
        model = _read_json(folder / "tokenizer.json").get("model", {})
        if model.get("type") != "BPE" or "vocab" not in model:
            raise ConfigError(f"{folder / 'tokenizer.json'}: not a BPE tokenizer")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return model["vocab"], merges
    raise ConfigError(f"{folder}: no vocab.json + merges.txt (or tokenizer.json) found")


class CLIPTokenizer:
    """Prompts -> int64 token ids (N, 77), as transformers' CLIPTokenizer with
    ``padding="max_length", max_length=77, truncation=True`` (what diffusers calls)."""

    def __init__(self, vocab, merges, *, bos_token=BOS, eos_token=EOS, unk_token=EOS,
                 pad_token=EOS, model_max_length=MAX_LENGTH,
                 normalized_specials=(BOS,)):  # fmt: skip
        for name, tok in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            if tok not in vocab:
                raise ConfigError(f"CLIPTokenizer: {name}_token {tok!r} is not in the vocabulary")
        bpe = BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                  end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk_token)  # fmt: skip
        tk = Tokenizer(bpe)
        tk.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tk.decoder = decoders.ByteLevel()
        # transformers registers its special tokens as added tokens, never split by BPE; each is
        # matched in the raw text, or in the normalized (lowercased) text if listed in
        # normalized_specials. The defaults are what SD1.x's tokenizer files give.
        specials = dict.fromkeys([bos_token, eos_token, unk_token, pad_token])
        norm = set(normalized_specials)
        tk.add_special_tokens([AddedToken(t, special=True, normalized=t in norm) for t in specials])
        self.backend = tk
        self._base = None  # the backend as built (JSON), kept once tokens are added
        self._added = []  # add_tokens' tokens, in id order
        self._expansions = {}  # multi-vector tokens: "<tok>" -> "<tok> <tok>_1 ..."
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id, self.eos_token_id = vocab[bos_token], vocab[eos_token]
        self.pad_token_id = vocab[pad_token]
        self.model_max_length = int(model_max_length)
        self.vocab_size = len(vocab)

    @classmethod
    def from_pretrained(cls, folder=None):
        """A checkpoint's ``tokenizer/`` folder, or None for the bundled CLIP vocabulary with
        SD1.x settings (pad with ``<|endoftext|>``)."""
        if folder is None:
            vocab, merges = bundled_vocab()
            return cls(vocab, merges)
        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"{folder}: no such tokenizer folder")
        vocab, merges = _read_vocab(folder)
        try:
            return cls(vocab, merges, **_special_tokens(folder))
        except ConfigError as e:  # name the folder whose files disagree
            if str(folder) in str(e):
                raise
            raise ConfigError(f"{folder}: {e}") from None

    # ------------------------------------------------------------------ encoding

    @property
    def chunk_length(self):
        """Content tokens per 77-token window (BOS and EOS take two places)."""
        return self.model_max_length - 2

    def tokenize(self, prompts):
        """Content token ids of each prompt (no BOS/EOS, no truncation): a list of lists.
        Multi-vector tokens are expanded first (:meth:`expand_prompt`)."""
        prompts = [self.expand_prompt(p) for p in _as_list(prompts)]
        encs = self.backend.encode_batch(prompts, add_special_tokens=False)
        return [e.ids for e in encs]

    def _window(self, ids):
        """BOS + ids + EOS, padded to model_max_length."""
        row = [self.bos_token_id, *ids, self.eos_token_id]
        return row + [self.pad_token_id] * (self.model_max_length - len(row))

    def __call__(self, prompts):
        """int64 (N, 77): BOS, tokens, EOS, padding. Prompts longer than 75 tokens are cut (as
        diffusers does) with a warning that shows the dropped text."""
        n = self.chunk_length
        rows = []
        for prompt, ids in zip(_as_list(prompts), self.tokenize(prompts)):
            if len(ids) > n:
                dropped = self.decode(ids[n:])
                warnings.warn(
                    f"CLIPTokenizer: prompt {prompt[:40]!r}... has {len(ids)} tokens, CLIP "
                    f"takes {n}; this part was dropped: {dropped!r} (use tok.chunked for long "
                    "prompts)",
                    stacklevel=2,
                )
            rows.append(self._window(ids[:n]))
        return np.array(rows, dtype=np.int64)  # (N, 77)

    def chunked(self, prompts, min_chunks=1):
        """Long-prompt mode (the AUTOMATIC1111 convention): each prompt's tokens are cut into
        windows of 75, each wrapped as BOS + tokens + EOS + padding. Every prompt gets the same
        number of windows, max(min_chunks, the longest prompt's count); missing windows are
        empty prompts. int64 (N, n_chunks, 77); see docs/long_prompts.md."""
        n = self.chunk_length
        all_ids = self.tokenize(prompts)
        n_chunks = max([int(min_chunks)] + [max(1, math.ceil(len(ids) / n)) for ids in all_ids])
        out = [[self._window(ids[c * n : (c + 1) * n]) for c in range(n_chunks)] for ids in all_ids]
        return np.array(out, dtype=np.int64)  # (N, n_chunks, 77)

    def chunked_pair(self, prompts, negative_prompts):
        """``chunked`` for prompts and negative prompts with one common number of windows."""
        pos, neg = self.chunked(prompts), self.chunked(negative_prompts)
        n_chunks = max(pos.shape[1], neg.shape[1])
        if pos.shape[1] < n_chunks:
            pos = self.chunked(prompts, min_chunks=n_chunks)  # (N, n_chunks, 77)
        if neg.shape[1] < n_chunks:
            neg = self.chunked(negative_prompts, min_chunks=n_chunks)  # (M, n_chunks, 77)
        return pos, neg

    # ------------------------------------------------------------------ added tokens

    def __len__(self):
        """Vocabulary size with the added tokens (transformers' ``len(tokenizer)``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def added_tokens(self):
        """The tokens :meth:`add_tokens` added, in id order."""
        return list(self._added)

    def normalize(self, text):
        """``text`` as the normalizer leaves it (NFC, whitespace runs -> " ", lower case)."""
        return self.backend.normalizer.normalize_str(text)

    def check_new_tokens(self, tokens):
        """InputError unless every token is a non-empty string that is in neither the vocabulary
        nor the added tokens, also once normalized (a later "<A>" would shadow "<a>")."""
        taken = {}
        for t in self.backend.get_added_tokens_decoder().values():
            taken[self.normalize(t.content) if t.normalized else t.content] = t.content
        for token in tokens:
            if not isinstance(token, str) or not token.strip():
                raise InputError(f"token {token!r}: expected a non-empty string")
            if self.backend.token_to_id(token) is not None:
                raise InputError(f"token {token!r} is already in the tokenizer's vocabulary")
            norm = self.normalize(token)
            if norm in taken:
                raise InputError(f"token {token!r} matches as {norm!r}, as {taken[norm]!r} does")
            taken[norm] = token

    def add_tokens(self, tokens):
        """Add tokens as transformers' ``tokenizer.add_tokens`` (module doc); returns their ids."""
        tokens = list(tokens)
        self.check_new_tokens(tokens)
        if self._base is None:
            self._base = self.backend.to_str()
        self.backend.add_tokens(tokens)
        self._added += tokens
        self._refresh()
        return [self.backend.token_to_id(t) for t in tokens]

    def remove_tokens(self, tokens):
        """Remove added tokens; the others keep their order and take consecutive ids again (as
        diffusers' ``unload_textual_inversion``). Removing all gives the tokenizer as built."""
        gone = set(tokens)
        unknown = sorted(gone - set(self._added))
        if unknown:
            raise InputError(f"remove_tokens: {unknown[0]!r} is not an added token")
        keep = [t for t in self._added if t not in gone]
        backend = Tokenizer.from_str(self._base)
        backend.add_tokens(keep)
        self.backend, self._added = backend, keep
        self._refresh()

    def _refresh(self):
        """Multi-vector tokens: "<tok>" -> "<tok> <tok>_1 ... <tok>_{n-1}" for each added token
        with a "<tok>_1" sibling (specials included, as diffusers looks them all up)."""
        names = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        self._expansions = {}
        for t in names:
            n = 1
            while f"{t}_{n}" in names:
                n += 1
            if n > 1:
                self._expansions[t] = " ".join([t] + [f"{t}_{i}" for i in range(1, n)])

    def expand_prompt(self, prompt):
        """diffusers' ``maybe_convert_prompt``: each token of the prompt that has an expansion
        (``_refresh``) is replaced by it as a substring of the raw prompt. As there, the tokens
        are the normalized matches, so a prompt spelling "<tok>" in another case, or a token name
        that is not in normalized form, gets the first vector only. Tokens are visited in order
        of appearance (diffusers: set order)."""
        if not self._expansions:
            return prompt
        for token in dict.fromkeys(self.backend.encode(prompt, add_special_tokens=False).tokens):
            if token in self._expansions:
                prompt = prompt.replace(token, self._expansions[token])
        return prompt

    def decode(self, ids):
        """Text of token ids, special tokens skipped (as transformers' decode)."""
        ids = [int(i) for i in to_numpy(ids).reshape(-1)]  # host copy of CuPy ids
        text = self.backend.decode(ids, skip_special_tokens=True)
        return text.replace("</w>", " ").strip()


def _as_list(prompts):
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise InputError(f"prompts: expected a string or a list of strings, got {type(prompts)}")
    if not prompts:
        raise InputError("prompts: empty list; give a string or a non-empty list of strings")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise InputError(f"prompts: expected strings, got a {bad[0]}")
    for p in prompts:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # e.g. a lone surrogate "\ud800"
            raise InputError(
                f"prompts: {p[:40]!r} is not valid Unicode text ({e.reason})"
            ) from None
    return list(prompts)
