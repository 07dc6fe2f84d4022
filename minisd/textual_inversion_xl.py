"""Textual inversion for SDXL (minisd/pipeline_xl.py): one set of vectors per text encoder.

SDXL embeddings (kohya sd-scripts, civitai) are safetensors files with two keys:

    "clip_l": (n, 768)    for text_encoder   / tokenizer   (OpenAI CLIP ViT-L)
    "clip_g": (n, 1280)   for text_encoder_2 / tokenizer_2 (OpenCLIP ViT-bigG)

diffusers loads them with one call per encoder, the same token in both:

    sd = safetensors.torch.load_file("style.safetensors")
    pipe.load_textual_inversion(sd["clip_l"], token="<style>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(sd["clip_g"], token="<style>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)

``pipe.load_textual_inversion("style.safetensors")`` does both: "<style>", "<style>_1", ...
(``token=``, else the file's stem, as A1111 and ComfyUI name it) join both tokenizers, clip_l's
rows text_encoder's token embedding table and clip_g's text_encoder_2's, each pair as
minisd/textual_inversion.py describes for SD1.x; so ``prompt`` and ``prompt_2`` (and the
negative prompts) can all use the token, and each tokenizer expands it to its n vectors.

What loads:
- an SDXL file, folder or state dict {"clip_l": (n, D1), "clip_g": (n, D2)}: the same n in
  both, no other key; D1, D2 the encoders' hidden sizes. The refiner, without the first
  encoder, takes clip_g (clip_l may be missing); the base needs both.
- ``text_encoder=pipe.text_encoder`` or ``pipe.text_encoder_2`` (diffusers' per-encoder call;
  ``tokenizer=`` may be given too and must be that encoder's): that encoder only, from an
  SDXL file its key, or any one-encoder embedding of textual_inversion.py ({token: (n, D)},
  A1111's {"emb_params": ...}, an (n, D) array with ``token=``) of its width.
- Without ``text_encoder=``, the base refuses one-encoder embeddings: an SD1.x embedding (768
  wide) would reach CLIP ViT-L only, while text_encoder_2 read the token as plain text (A1111
  skips SD1.x embeddings on SDXL too). The refiner, which has one encoder, loads them as SD1.x.

``unload_textual_inversion(tokens)`` removes each token from every encoder that has it; with
none left, both tokenizers and tables are the originals, bit for bit.
"""

from __future__ import annotations

from . import textual_inversion as ti
from .errors import InputError, WeightsError

#: an SDXL embedding's key for each text encoder, and its width in SDXL
KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
WIDTHS = {"clip_l": 768, "clip_g": 1280}


def is_sdxl(sd) -> bool:
    """Whether a state dict is an SDXL embedding (has clip_l or clip_g)."""
    return isinstance(sd, dict) and any(k in sd for k in WIDTHS)


def read_sdxl(where, stem, sd, token=None) -> dict[str, ti.Embedding]:
    """{"clip_l": Embedding, "clip_g": Embedding} (those present) of an SDXL state dict, named
    ``token`` or the file's stem; checked as a file (keys, shapes, values, equal counts)."""
    extra = [k for k in sd if k not in WIDTHS]
    if extra:
        raise WeightsError(
            f"{where}: an SDXL embedding holds 'clip_l' and 'clip_g' only; it also has {extra[0]!r}"
        )
    name = token or stem
    if name is None:
        raise InputError(f"{where}: an SDXL embedding (clip_l / clip_g); give token='<name>'")
    out = {k: ti.Embedding(name, ti.check_vectors(sd[k], k, where), where) for k in sd}
    counts = {k: len(e.vectors) for k, e in out.items()}
    if len(set(counts.values())) > 1:
        raise WeightsError(
            f"{where}: 'clip_l' has {counts['clip_l']} vectors, 'clip_g' {counts['clip_g']}; an "
            "SDXL embedding has one per token in each"
        )
    return out


def embedding_tokens(source, token=None) -> list[str]:
    """The tokens a textual inversion file, folder, state dict or array adds ("<tok>",
    "<tok>_1", ...), SD1.x / SD2.x or SDXL alike, checked as a file only (format, shapes,
    values; not yet against a model): for checking command-line arguments early."""
    where, stem, sd = ti.read_source(source, token)
    if is_sdxl(sd):
        return next(iter(read_sdxl(where, stem, sd, token).values())).names
    return [n for e in ti.embeddings_of(where, stem, sd, token) for n in e.names]


def _targets(pipe, text_encoder, tokenizer) -> list[ti.Slot]:
    """The slots to load into: all the pipeline has, or the one ``text_encoder`` /
    ``tokenizer`` name (the pipeline's own modules, as diffusers takes them)."""
    have = ti.slots(pipe)
    if text_encoder is None and tokenizer is None:
        return have
    for s in have:
        te_ok = text_encoder is None or getattr(pipe, s.text_encoder) is text_encoder
        if te_ok and (tokenizer is None or getattr(pipe, s.tokenizer) is tokenizer):
            return [s]
    pairs = " or ".join(f"pipe.{s.text_encoder} with pipe.{s.tokenizer}" for s in have)
    raise InputError(
        f"load_textual_inversion: text_encoder= / tokenizer=: expected this pipeline's {pairs}"
    )


def _sdxl_plan(pipe, embeddings, targets, where):
    """[(slot, [Embedding])]: each target encoder's vectors of an SDXL file, width checked."""
    plan = []
    for slot in targets:
        key, d = KEYS[slot.text_encoder], getattr(pipe, slot.text_encoder).config.hidden_size
        if key not in embeddings:
            raise WeightsError(
                f"{where}: an SDXL embedding without {key!r}, the (n, {d}) vectors for "
                f"{slot.text_encoder}"
            )
        width = embeddings[key].vectors.shape[1]
        if width != d:
            raise WeightsError(
                f"{where}: {key!r} has vectors of size {width}; {slot.text_encoder} takes {d} "
                f"(SDXL: clip_l {WIDTHS['clip_l']}, clip_g {WIDTHS['clip_g']}); it was "
                "trained for another model"
            )
        plan.append((slot, [embeddings[key]]))
    return plan


def _one_plan(pipe, embeddings, targets, where):
    """[(slot, embeddings)] of a one-encoder file: refused where the pipeline has two encoders
    and none was named, else width checked against the one."""
    if len(targets) > 1:
        widths = ", ".join(
            f"{KEYS[s.text_encoder]!r} ({getattr(pipe, s.text_encoder).config.hidden_size}) for "
            f"{s.text_encoder}"
            for s in targets
        )
        raise WeightsError(
            f"{where}: {embeddings[0].token!r} is a one-encoder embedding (vectors of size "
            f"{embeddings[0].vectors.shape[1]}, an SD1.x / SD2.x format); SDXL embeddings hold "
            f"{widths}. To load it into one encoder only, give text_encoder=pipe.text_encoder "
            "or text_encoder=pipe.text_encoder_2"
        )
    slot = targets[0]
    te, key = getattr(pipe, slot.text_encoder), KEYS[slot.text_encoder]
    ti.check_fit(embeddings, te, where, slot.text_encoder, f"SDXL's {key}: {WIDTHS[key]}")
    return [(slot, embeddings)]


def load_textual_inversion_xl(pipe, source, token=None, text_encoder=None, tokenizer=None):
    """Add an embedding to an SDXL pipeline (module doc); returns the added tokens."""
    targets = _targets(pipe, text_encoder, tokenizer)
    where, stem, sd = ti.read_source(source, token)
    if is_sdxl(sd):
        plan = _sdxl_plan(pipe, read_sdxl(where, stem, sd, token), targets, where)
    else:
        plan = _one_plan(pipe, ti.embeddings_of(where, stem, sd, token), targets, where)
    return ti.add_embeddings(pipe, plan, where)
