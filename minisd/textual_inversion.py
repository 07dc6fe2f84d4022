"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word", arXiv:2208.01618): learned
vectors in the text encoder's token embedding space, named by a new token, loaded into a
StableDiffusion pipeline as diffusers' ``load_textual_inversion`` does for SD1.x / SD2.x.

An embedding of n vectors v_0 .. v_{n-1} (each of the text encoder's hidden size D: 768 for
SD1.x, 1024 for SD2.x) named "<tok>":

1. adds the tokens "<tok>", "<tok>_1", ..., "<tok>_{n-1}" to the tokenizer as added tokens
   (BPE never splits them; matched in the normalized, lower-cased text, inside words too);
2. appends v_0 .. v_{n-1}, cast to the model's dtype, to the token embedding table E as the
   rows of those tokens' ids (49408, 49409, ...), so that x_0 = E[ids] + P picks them up;
3. has the tokenizer rewrite "<tok>" in prompts as "<tok> <tok>_1 ... <tok>_{n-1}" before
   tokenizing (diffusers' ``maybe_convert_prompt``; ``CLIPTokenizer.expand_prompt``).

    tokens = load_textual_inversion(pipe, "cat-toy/learned_embeds.safetensors")  # ["<cat-toy>"]
    pipe("a <cat-toy> on a beach")
    unload_textual_inversion(pipe)        # tokenizer and embedding table as before, bit for bit

Formats (safetensors only; pickle files .pt / .bin / .ckpt are refused with a conversion hint):
- diffusers ``learned_embeds.safetensors``: {token: (D,) or (n, D)}; the key names the token.
  Several keys load as several tokens (diffusers refuses such files).
- A1111 / civitai ``.safetensors``: {"emb_params": (n, D)}; the token is the file's stem, as A1111
  names it (diffusers would name it "emb_params").
- a state dict {token: array} or A1111's {"string_to_param": {"*": array}, "name": ...}
  (what ``torch.load`` of a .pt gives), or an array (n, D) with ``token=``.
- a folder holding ``learned_embeds.safetensors`` or a single .safetensors file.
``token=`` renames the embedding of a one-embedding file. SDXL embeddings (clip_l + clip_g) load
into SDXL pipelines only (minisd/textual_inversion_xl.py). Unlike diffusers, a token whose
normalized form is taken ("<A>" after "<a>") is refused, and unloading "<tok>" removes all of
its vectors (diffusers leaves "<tok>_1", ...).

With weights="lazy" / "stream" the stored table (file dtype, memory-mapped) is replaced by one in
the compute dtype while embeddings are loaded, so results equal "eager" bit for bit; unloading
the last one puts the stored table back.

The pipeline's tokenizer / text encoder pairs are its ``slots``: SD's one, SDXL's two (the
refiner: the second only); each has its own loaded embeddings (``_State``), and unloading a token
removes it from every pair that has it.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np

from .backend import array_module, to_numpy
from .config import path_arg
from .errors import InputError, WeightsError
from .weights import PICKLE_SUFFIXES, load_file, release_pages

DIFFUSERS_FILE = "learned_embeds.safetensors"
A1111_KEY = "emb_params"
CONVERT = (
    'python -c "import sys, torch, safetensors.torch as st; d = torch.load(sys.argv[1], '
    "weights_only=True); d = {'emb_params': d['string_to_param']['*']} if 'string_to_param' in "
    'd else d; st.save_file({k: v.detach().contiguous() for k, v in d.items()}, sys.argv[2])"'
)


@dataclasses.dataclass(eq=False)
class Embedding:
    """One textual inversion: its token and vectors (n, D) as read (host array, file dtype)."""

    token: str
    vectors: np.ndarray
    source: str

    @property
    def names(self):
        """The tokens it adds: "<tok>", "<tok>_1", ..., one per vector."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, len(self.vectors))]


@dataclasses.dataclass(frozen=True)
class Slot:
    """A tokenizer / text encoder pair of a pipeline, by attribute name, and the pipeline
    attribute that holds its _State."""

    tokenizer: str
    text_encoder: str
    state: str


SLOTS = (
    Slot("tokenizer", "text_encoder", "_textual_inversion"),
    Slot("tokenizer_2", "text_encoder_2", "_textual_inversion_2"),  # SDXL's OpenCLIP bigG
)


def slots(pipe) -> list[Slot]:
    """The pairs ``pipe`` has: SD's one, SDXL base's two, the SDXL refiner's second."""
    return [s for s in SLOTS if getattr(pipe, s.text_encoder, None) is not None]


@dataclasses.dataclass
class _State:
    """A pipeline's loaded embeddings; ``base`` is the stored table before the first one,
    ``current`` the table set last (to notice a table replaced from outside)."""

    base: object
    current: object
    embeddings: list


# --------------------------------------------------------------------------- reading


def read_embeddings(source, token=None) -> list[Embedding]:
    """The embeddings of a file, folder, state dict or array (module doc), checked."""
    return embeddings_of(*read_source(source, token), token)


def read_source(source, token=None):
    """(where, file stem or None, state dict) of a file, folder, state dict or array."""
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise InputError(f"token={token!r}: expected a non-empty string or None")
    if isinstance(source, dict):
        where, stem, sd = "textual inversion state dict", None, source
    elif hasattr(source, "shape"):
        if token is None:
            raise InputError("textual inversion array: give its token, token='<name>'")
        where, stem, sd = "textual inversion array", None, {token: source}
    else:
        path = embedding_file(path_arg(source, "textual inversion"))
        where, stem, sd = str(path), path.stem, load_file(path)
    return where, stem, sd


def embeddings_of(where, stem, sd, token=None) -> list[Embedding]:
    """The embeddings of a one-encoder state dict (module doc), checked."""
    pairs = _named(sd, token, where, stem)
    return [Embedding(n, check_vectors(a, n, where), where) for n, a in pairs]


def embedding_file(path: Path) -> Path:
    """The .safetensors file of a path or folder; pickle files are refused with a hint."""
    if str(path).endswith(PICKLE_SUFFIXES):
        raise WeightsError(
            f"{path}: pickle files (.pt / .bin / .ckpt) are never loaded, since unpickling can "
            "run arbitrary code. Convert the embedding to safetensors once, where you trust the "
            f"file: `{CONVERT} '{path}' '{path.with_suffix('.safetensors')}'` (an A1111 "
            "embedding then takes the file's name as its token)"
        )
    if path.is_dir():
        if (path / DIFFUSERS_FILE).is_file():
            return path / DIFFUSERS_FILE
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        pickles = sorted(p for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if not files and pickles:
            return embedding_file(pickles[0])
        raise WeightsError(
            f"{path}: expected {DIFFUSERS_FILE} or a single .safetensors file in the folder, "
            f"found {len(files)}"
        )
    if not path.is_file():
        raise WeightsError(f"{path}: no such textual inversion file")
    return path


def _named(sd, token, where, stem):
    """[(token, array)] of a state dict, in its order."""
    keys = list(sd)
    if not keys:
        raise WeightsError(f"{where}: holds no embedding (expected {{token: (n, D)}})")
    if {"clip_l", "clip_g"} & set(keys):
        raise WeightsError(
            f"{where}: an SDXL embedding (clip_l / clip_g); SD1.x / SD2.x take one vector set "
            "(load it into a minisd.StableDiffusionXL pipeline)"
        )
    if isinstance(sd.get("string_to_param"), dict):  # A1111 .pt contents (torch.load)
        params = sd["string_to_param"]
        if len(params) != 1:
            raise WeightsError(f"{where}: string_to_param holds {len(params)} embeddings")
        return [(token or str(sd.get("name") or ""), next(iter(params.values())))]
    if len(keys) > 1:
        if token is not None:
            raise WeightsError(
                f"{where}: holds {len(keys)} embeddings ({', '.join(map(repr, keys[:4]))}); "
                f"token={token!r} renames a file with one"
            )
        return [(str(k), sd[k]) for k in keys]
    name = token or keys[0]
    if token is None and keys[0] == A1111_KEY:
        if stem is None:
            raise InputError(f"{where}: an A1111 embedding ({A1111_KEY!r}); give token='<name>'")
        name = stem
    return [(name, sd[keys[0]])]


def check_vectors(array, token, where):
    """(n, D) host array of one embedding; (D,) is one vector."""
    a = np.asarray(to_numpy(array))
    if a.dtype.kind != "f":
        raise WeightsError(f"{where}: embedding {token!r} is {a.dtype}; expected floating point")
    if a.ndim == 1:
        a = a[None]  # (1, D)
    if a.ndim != 2 or 0 in a.shape:
        raise WeightsError(
            f"{where}: embedding {token!r} has shape {a.shape}; expected (D,) or (n, D)"
        )
    if not np.isfinite(a).all():
        raise WeightsError(f"{where}: embedding {token!r} holds NaN or infinite values")
    return a


# --------------------------------------------------------------------------- the pipeline


def _state(pipe, slot):
    """The slot's _State (None before the first embedding), after checking that nothing
    changed the tokenizer or the table behind its back."""
    state = getattr(pipe, slot.state, None)
    tok, te = getattr(pipe, slot.tokenizer), getattr(pipe, slot.text_encoder)
    if state is None:
        if len(tok) != te.config.vocab_size:
            raise InputError(
                f"textual inversion: {slot.tokenizer} has {len(tok)} tokens, {slot.text_encoder}"
                f"'s token embedding {te.config.vocab_size} rows; they must agree"
            )
        return None
    names = [n for e in state.embeddings for n in e.names]
    if te.token_embedding is not state.current or tok.added_tokens != names:
        raise InputError(
            f"textual inversion: {slot.text_encoder}'s token embedding or {slot.tokenizer}'s "
            "added tokens were changed after embeddings were loaded"
        )
    return state


def _set_table(te, state):
    """Store base + the rows of the loaded embeddings (in the compute dtype) as the table."""
    if not state.embeddings:
        table = state.base  # the original object: memory-mapped again under lazy / stream
    else:
        xp, dtype = array_module(state.base), te.dtype
        rows = np.concatenate([e.vectors.astype(dtype) for e in state.embeddings])  # (m, D)
        table = xp.concatenate([state.base.astype(dtype, copy=False), xp.asarray(rows)])
        release_pages(state.base)  # read once; a file memory map gives its pages back
    te.set_token_embedding(table)  # (V + m, D)
    state.current = table


def check_fit(embeddings, te, source, name="the text encoder", hint="768: SD1.x, 1024: SD2.x"):
    """WeightsError unless every embedding's width is the text encoder's hidden size."""
    d = te.config.hidden_size
    for e in embeddings:
        if e.vectors.shape[1] != d:
            raise WeightsError(
                f"{source}: embedding {e.token!r} has vectors of size {e.vectors.shape[1]}, "
                f"{name}'s hidden size is {d} ({hint}); it was trained for another model"
            )


def load_textual_inversion(pipe, source, token=None) -> list[str]:
    """Add the embeddings of ``source`` (module doc) to ``pipe.tokenizer`` and
    ``pipe.text_encoder``; returns the added tokens ("<tok>", "<tok>_1", ...)."""
    embeddings = read_embeddings(source, token)
    check_fit(embeddings, pipe.text_encoder, embeddings[0].source)
    return add_embeddings(pipe, [(SLOTS[0], embeddings)], embeddings[0].source)


def add_embeddings(pipe, plan, where) -> list[str]:
    """Add each (slot, embeddings) of ``plan`` (widths checked) to the slot's tokenizer and
    table, all or nothing; returns the added tokens, each once, in order."""
    staged = []
    for slot, embeddings in plan:
        te = getattr(pipe, slot.text_encoder)
        state = _state(pipe, slot) or _State(te.token_embedding, te.token_embedding, [])
        names = [n for e in embeddings for n in e.names]
        try:
            getattr(pipe, slot.tokenizer).check_new_tokens(names)
        except InputError as e:
            which = f" ({slot.tokenizer})" if len(slots(pipe)) > 1 else ""
            raise InputError(f"{where}{which}: {e}") from None
        staged.append((slot, state, embeddings, names))
    for slot, _, embeddings, _ in staged:
        for e in embeddings:
            _warn_unexpandable(getattr(pipe, slot.tokenizer), e)
    done = []
    try:
        for slot, state, embeddings, names in staged:
            _add(pipe, slot, state, embeddings, names)
            done.append((slot, state, embeddings))
    except BaseException:  # e.g. out of GPU memory in the second slot: undo the first
        for slot, state, embeddings in reversed(done):
            _drop(pipe, slot, state, embeddings)
        raise
    return list(dict.fromkeys(n for *_, names in staged for n in names))


def _add(pipe, slot, state, embeddings, names):
    """Append one slot's embeddings: tokens (ids len(tok), len(tok) + 1, ...) and rows."""
    tok = getattr(pipe, slot.tokenizer)
    before = state.embeddings
    tok.add_tokens(names)
    try:
        state.embeddings = before + embeddings
        _set_table(getattr(pipe, slot.text_encoder), state)
    except BaseException:  # leave both as they were
        state.embeddings = before
        tok.remove_tokens(names)
        raise
    setattr(pipe, slot.state, state)


def _drop(pipe, slot, state, drop):
    """Remove some of one slot's embeddings, tokens and rows; the originals with none left."""
    getattr(pipe, slot.tokenizer).remove_tokens([n for e in drop for n in e.names])
    state.embeddings = [e for e in state.embeddings if e not in drop]
    _set_table(getattr(pipe, slot.text_encoder), state)
    if not state.embeddings:
        setattr(pipe, slot.state, None)


def _warn_unexpandable(tok, e):
    norm = tok.normalize(e.token)
    if len(e.vectors) > 1 and norm != e.token:
        warnings.warn(
            f"{e.source}: token {e.token!r} has {len(e.vectors)} vectors but is not in "
            f"normalized form ({norm!r}); as in diffusers, prompts get its first vector only. "
            f"Load it with token={norm!r} to use all of them.",
            stacklevel=4,
        )


def _loaded(pipe):
    """{slot: _State} of the slots holding embeddings."""
    out = {}
    for slot in slots(pipe):
        if getattr(pipe, slot.state, None) is not None:
            out[slot] = _state(pipe, slot)
    return out


def unload_textual_inversion(pipe, tokens=None) -> None:
    """Remove loaded embeddings, each with all of its vectors and from every tokenizer / text
    encoder pair that has it; ``tokens``: a token or a list of them as loaded ("<tok>"), None
    for all. The tokens left take consecutive ids again, as in diffusers; with none left,
    tokenizers and tables are the originals, bit for bit."""
    loaded = _loaded(pipe)
    if tokens is None:
        wanted = None
    else:
        wanted = [tokens] if isinstance(tokens, str) else list(tokens)
        known = {e.token for state in loaded.values() for e in state.embeddings}
        for t in wanted:
            if t not in known:
                raise InputError(
                    f"unload_textual_inversion: {t!r} is not a loaded embedding (loaded: "
                    f"{sorted(known) or 'none'}; unload a multi-vector one by its first token)"
                )
    for slot, state in loaded.items():
        drop = [e for e in state.embeddings if wanted is None or e.token in wanted]
        if drop:
            _drop(pipe, slot, state, drop)


def loaded_embeddings(pipe) -> dict:
    """{token: number of vectors} of the embeddings loaded into ``pipe``, in load order (SDXL:
    of every encoder; a token in both counts the first encoder's vectors)."""
    out = {}
    for slot in slots(pipe):
        for e in getattr(getattr(pipe, slot.state, None), "embeddings", ()):
            out.setdefault(e.token, len(e.vectors))
    return out


def expand_prompt(tokenizer, prompt: str) -> str:
    """diffusers' ``maybe_convert_prompt`` (see ``CLIPTokenizer.expand_prompt``). minisd's
    tokenizer applies it to every prompt it tokenizes: do not call it before tokenizing."""
    return tokenizer.expand_prompt(prompt)
