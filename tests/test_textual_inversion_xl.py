"""SDXL textual inversion (minisd/textual_inversion_xl.py, StableDiffusionXL.
load_textual_inversion) against diffusers' StableDiffusionXL pipelines given one
load_textual_inversion call per text encoder, as diffusers loads kohya / civitai files, on the
tiny base (text encoders 8 and 16 wide) and refiner (16) that diffusers writes
(tests/pipelines_xl.py, every parameter random).

Random SDXL embeddings {"clip_l": (n, 8), "clip_g": (n, 16)}, n = 3, 2 and 1 (as (D,)): token ids
of both tokenizers equal transformers', appended rows are bit-identical, prompt and pooled
embeddings (float32 rel. error <= 1e-4, float64 <= 1e-10) and whole-pipeline latents agree;
unloading matches diffusers' and at last restores both tokenizers and tables bit for bit. The
error cases need no reference: weights_tools.make_tiny's SDXL (both encoders 32 wide).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from pipelines_xl import build
from refharness import TOL, assert_rel, need, torch_dtype

from minisd.backend import to_numpy
from minisd.errors import InputError, WeightsError
from minisd.pipeline_xl import StableDiffusionXL
from minisd.textual_inversion import loaded_embeddings
from minisd.textual_inversion_xl import embedding_tokens
from minisd.weights import save_file

WIDTH = {"clip_l": 8, "clip_g": 16}  # the tiny encoders' hidden sizes
PAIRS = (("clip_l", "tokenizer", "text_encoder"), ("clip_g", "tokenizer_2", "text_encoder_2"))
PROMPTS = ["a zqstyle cat", "<one> and zqstyle, ZQSTYLE", "zqstyle " * 36 + "<pair>", "plain"]
PROMPTS_2 = ["zqstyle", "a <pair><one>", "", "<one> zqstyle <pair>"]
NEGATIVE = ["<pair>", "zqstyle", "", "blurry zqstyle"]
N_ADDED = 3 + 2 + 1


def vectors(n, d, seed):
    """Random (n, d) float32, about as large as the tables' rows."""
    return (0.5 * np.random.default_rng(seed).standard_normal((n, d))).astype(np.float32)


def sdxl_embedding(n, seed, widths=WIDTH):
    return {k: vectors(n, d, seed + i) for i, (k, d) in enumerate(widths.items())}


def embeddings():
    """{token: SDXL state dict}: multi-vector, one vector stored as (D,), two vectors."""
    one = {k: v[0] for k, v in sdxl_embedding(1, 20).items()}
    return {"zqstyle": sdxl_embedding(3, 10), "<one>": one, "<pair>": sdxl_embedding(2, 30)}


def ref_load(ref, token, sd):
    """diffusers' way: one load_textual_inversion per text encoder (the refiner: clip_g)."""
    torch = need("torch")
    for key, tok, te in PAIRS:
        if getattr(ref, te) is not None:
            ref.load_textual_inversion(
                torch.from_numpy(sd[key]), token=token, tokenizer=getattr(ref, tok),
                text_encoder=getattr(ref, te),
            )  # fmt: skip


def load_both(ref, ours, root):
    """The same three embeddings into both pipelines; ours from a file named by its stem, a
    state dict and a file renamed by token=."""
    emb = embeddings()
    save_file(emb["zqstyle"], root / "zqstyle.safetensors")
    save_file(emb["<pair>"], root / "kohya-out.safetensors")
    names = ours.load_textual_inversion(root / "zqstyle.safetensors")
    assert names == ["zqstyle", "zqstyle_1", "zqstyle_2"]
    assert ours.load_textual_inversion(emb["<one>"], token="<one>") == ["<one>"]
    assert ours.load_textual_inversion(str(root / "kohya-out.safetensors"), "<pair>") == [
        "<pair>", "<pair>_1"
    ]  # fmt: skip
    for token, sd in emb.items():
        ref_load(ref, token, sd)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    need("torch", "diffusers", "transformers")
    root = tmp_path_factory.mktemp("ti_xl")
    for kind in ("base", "refiner"):
        build(kind, root / kind)
    return root


def fresh(folders, kind="base", dtype="float32"):
    """(diffusers, minisd) pipelines over one folder, nothing loaded."""
    diffusers = need("diffusers")
    cls = diffusers.StableDiffusionXLPipeline
    if kind == "refiner":
        cls = diffusers.StableDiffusionXLImg2ImgPipeline
    ref = cls.from_pretrained(str(folders / kind), local_files_only=True, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ours = StableDiffusionXL.from_pretrained(folders / kind, dtype=dtype)
    return ref.to(torch_dtype(dtype)), ours


def ref_ids(ref, tok, prompts):
    tok = getattr(ref, tok)
    conv = ref.maybe_convert_prompt(prompts, tok)
    return np.array(tok(conv, padding="max_length", max_length=77, truncation=True).input_ids)


def our_ids(ours, tok, prompts):
    with warnings.catch_warnings():  # over-long prompts
        warnings.simplefilter("ignore")
        return getattr(ours, tok)(prompts)


def ref_encode(ref, **kw):
    """diffusers' encode_prompt as [negative; positive] rows: (context, pooled)."""
    torch = need("torch")
    with torch.no_grad():
        pos, neg, pooled, npooled = ref.encode_prompt(device="cpu", **kw)
    return torch.cat([neg, pos]).numpy(), torch.cat([npooled, pooled]).numpy()


def our_encode(ours, prompt, prompt_2=None, negative_prompt=None, negative_prompt_2=None):
    extra = SimpleNamespace(prompt_2=prompt_2 or prompt, negative_prompt_2=negative_prompt_2,
                            time_ids=((64, 64, 0, 0, 64, 64),) * 2)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context, added = ours.text_conditioning(prompt, negative_prompt, 1, True, None, extra)
    return to_numpy(context), to_numpy(added["text_embeds"])


def tables(pipe):
    """Both tokenizers' sizes and tables' bytes (None for the refiner's missing pair)."""
    out = []
    for _, tok, te in PAIRS:
        if getattr(pipe, te) is not None:
            t = getattr(pipe, te).token_embedding
            out.append((len(getattr(pipe, tok)), t.shape, str(t.dtype), to_numpy(t).tobytes()))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_ids_rows_and_embeddings_match_diffusers(folders, tmp_path, kind, dtype):
    ref, ours = fresh(folders, kind, dtype)
    load_both(ref, ours, tmp_path)
    for key, tok, te in PAIRS[1:] if kind == "refiner" else PAIRS:
        assert len(getattr(ours, tok)) == len(getattr(ref, tok)) == 49408 + N_ADDED
        texts = PROMPTS + PROMPTS_2 + NEGATIVE
        got, want = our_ids(ours, tok, texts), ref_ids(ref, tok, texts)
        assert np.array_equal(got, want), tok
        assert list(got[0, 1:6]) == [320, 49408, 49409, 49410, 2368]  # a zqstyle(3) cat
        rows = getattr(ref, te).get_input_embeddings().weight.detach().numpy()
        table = getattr(ours, te).token_embedding
        assert table.dtype == rows.dtype == np.dtype(dtype) and table.shape == (49414, WIDTH[key])
        assert np.array_equal(table, rows)  # order and values, bit for bit
    if kind == "refiner":
        assert ours.tokenizer is None and loaded_embeddings(ours) == {"zqstyle": 3, "<one>": 1,
                                                                      "<pair>": 2}  # fmt: skip
    kw = dict(prompt=PROMPTS, negative_prompt=NEGATIVE)
    if kind == "base":  # the refiner reads prompt, not prompt_2, as diffusers
        kw.update(prompt_2=PROMPTS_2, negative_prompt_2=NEGATIVE[::-1])
    want, got = ref_encode(ref, **kw), our_encode(ours, **kw)
    assert_rel(got[0], want[0], TOL[dtype], "prompt embeddings")
    assert_rel(got[1], want[1], TOL[dtype], "pooled embeddings")
    plain, _ = our_encode(StableDiffusionXL.from_pretrained(folders / kind, dtype=dtype), **kw)
    assert np.abs(plain - got[0]).max() > 0.1  # the embeddings changed the result


def test_pipeline_latents_match_diffusers(folders, tmp_path):
    torch = need("torch")
    ref, ours = fresh(folders)
    load_both(ref, ours, tmp_path)
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    kw = dict(prompt=["a zqstyle house", "<one>, <pair>"], prompt_2=["<pair> zqstyle", ""],
              negative_prompt=["<one>", "zqstyle"], num_inference_steps=3, guidance_scale=6.0,
              height=64, width=64, output_type="latent")  # fmt: skip
    with torch.no_grad():
        want = ref(**kw, latents=torch.from_numpy(latents)).images.numpy()
    got = ours(**kw, latents=latents, progress=False)
    assert_rel(got, want, TOL["float32"], "latents")


def test_unload_matches_diffusers_and_restores_bits(folders, tmp_path):
    ref, ours = fresh(folders)
    originals = [ours.text_encoder.token_embedding, ours.text_encoder_2.token_embedding]
    before, texts = tables(ours), PROMPTS + PROMPTS_2
    ids_before = [our_ids(ours, tok, texts) for _, tok, _ in PAIRS]
    load_both(ref, ours, tmp_path)
    ours.unload_textual_inversion("zqstyle")
    for _, tok, te in PAIRS:  # diffusers: per encoder, each vector's token by name
        names = ["zqstyle", "zqstyle_1", "zqstyle_2"]
        ref.unload_textual_inversion(
            names, tokenizer=getattr(ref, tok), text_encoder=getattr(ref, te)
        )
    assert loaded_embeddings(ours) == {"<one>": 1, "<pair>": 2}
    for _, tok, te in PAIRS:
        assert np.array_equal(our_ids(ours, tok, texts), ref_ids(ref, tok, texts)), tok
        rows = getattr(ref, te).get_input_embeddings().weight.detach().numpy()
        assert np.array_equal(getattr(ours, te).token_embedding, rows), te
    kw = dict(prompt=PROMPTS, prompt_2=PROMPTS_2, negative_prompt=NEGATIVE)
    want, got = ref_encode(ref, **kw), our_encode(ours, **kw)
    assert_rel(got[0], want[0], TOL["float32"], "prompt embeddings after unloading one")
    with pytest.raises(InputError, match="'zqstyle_1' is not a loaded embedding"):
        ours.unload_textual_inversion(["<one>", "zqstyle_1"])
    assert loaded_embeddings(ours) == {"<one>": 1, "<pair>": 2}  # nothing was removed
    ours.unload_textual_inversion()
    assert tables(ours) == before and ours.tokenizer.added_tokens == ours.tokenizer_2.added_tokens
    assert [ours.text_encoder.token_embedding, ours.text_encoder_2.token_embedding] == originals
    assert all(
        np.array_equal(our_ids(ours, t, texts), b) for (_, t, _), b in zip(PAIRS, ids_before)
    )
    assert ours.tokenizer_2.added_tokens == [] and loaded_embeddings(ours) == {}
    ours.unload_textual_inversion()  # nothing loaded: nothing to do


def test_one_encoder_loading_as_diffusers(folders, tmp_path):
    """text_encoder= (and tokenizer=) load into one encoder, as diffusers' per-encoder call;
    diffusers-style code (two calls, the same token) equals one call with the SDXL file."""
    torch = need("torch")
    ref, ours = fresh(folders)
    emb = sdxl_embedding(2, 40)
    for key, tok, te in PAIRS:
        assert ours.load_textual_inversion(
            emb[key], token="<s>", text_encoder=getattr(ours, te), tokenizer=getattr(ours, tok)
        ) == ["<s>", "<s>_1"]  # fmt: skip
    _, whole = fresh(folders)
    whole.load_textual_inversion(emb, token="<s>")
    assert tables(ours) == tables(whole)
    g, l1 = vectors(3, 16, 41), vectors(1, 8, 42)
    save_file({"<g>": g}, tmp_path / "g.safetensors")
    assert ours.load_textual_inversion(tmp_path / "g.safetensors", text_encoder=ours.text_encoder_2)
    assert ours.load_textual_inversion(l1, "<l>", tokenizer=ours.tokenizer) == ["<l>"]
    assert ours.tokenizer.added_tokens == ["<s>", "<s>_1", "<l>"]
    assert ours.tokenizer_2.added_tokens == ["<s>", "<s>_1", "<g>", "<g>_1", "<g>_2"]
    ref_load(ref, "<s>", emb)
    ref.load_textual_inversion(str(tmp_path / "g.safetensors"), tokenizer=ref.tokenizer_2,
                               text_encoder=ref.text_encoder_2)  # fmt: skip
    ref.load_textual_inversion(torch.from_numpy(l1), token="<l>", tokenizer=ref.tokenizer,
                               text_encoder=ref.text_encoder)  # fmt: skip
    kw = dict(prompt=["<g> and <l>", "<s> <l>"], prompt_2=["<g>, <s>", "<l> <g>"],
              negative_prompt=["<s>", "<g>"])  # fmt: skip
    want, got = ref_encode(ref, **kw), our_encode(ours, **kw)
    assert_rel(got[0], want[0], TOL["float32"], "prompt embeddings")
    assert_rel(got[1], want[1], TOL["float32"], "pooled embeddings")
    ours.unload_textual_inversion(["<g>", "<s>"])
    assert ours.tokenizer.added_tokens == ["<l>"] and ours.tokenizer_2.added_tokens == []
    assert ours.text_encoder_2.token_embedding.shape == (49408, 16)


# --------------------------------------------------------------------------- no reference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """weights_tools.make_tiny's SDXL base and refiner folders (both encoders 32 wide)."""
    import weights_tools as wt

    root = tmp_path_factory.mktemp("tiny_xl_ti")
    for family in ("sdxl", "sdxl-refiner"):
        wt.make_tiny(root / family, family=family, seed=0)
    return root


def _error_cases(pipe, tmp_path):
    v = vectors(2, 32, 0)
    save_file({"clip_l": v, "clip_g": v, "clip_h": v}, tmp_path / "three.safetensors")
    save_file({"clip_g": v}, tmp_path / "g_only.safetensors")
    return [
        ({"clip_l": v}, "<t>", {}, WeightsError, "without 'clip_g', the \\(n, 32\\) vectors fo"),
        (tmp_path / "g_only.safetensors", None, {}, WeightsError, "g_only.safetensors: an SDXL "
         "embedding without 'clip_l', the \\(n, 32\\) vectors for text_encoder$"),
        ({"clip_l": v[:, :16], "clip_g": v}, "<t>", {}, WeightsError,
         "'clip_l' has vectors of size 16; text_encoder takes 32 \\(SDXL: clip_l 768, clip_g 12"),
        ({"clip_l": v, "clip_g": vectors(2, 20, 1)}, "<t>", {}, WeightsError,
         "'clip_g' has vectors of size 20; text_encoder_2 takes 32"),
        ({"clip_l": v, "clip_g": vectors(3, 32, 1)}, "<t>", {}, WeightsError,
         "'clip_l' has 2 vectors, 'clip_g' 3"),
        (tmp_path / "three.safetensors", None, {}, WeightsError, "it also has 'clip_h'"),
        ({"clip_l": v, "clip_g": v}, None, {}, InputError, "SDXL embedding .*give token="),
        ({"clip_l": v, "clip_g": v.astype(np.int32)}, "<t>", {}, WeightsError, "'clip_g' is int"),
        ({"clip_l": v, "clip_g": v * np.nan}, "<t>", {}, WeightsError, "'clip_g' holds NaN"),
        ({"<x>": v}, None, {}, WeightsError, "'<x>' is a one-encoder embedding \\(vectors of size "
         "32.*'clip_l' \\(32\\) for text_encoder, 'clip_g' \\(32\\) for text_encoder_2.*give "
         "text_encoder=pipe.text_encoder or"),
        ({"<x>": vectors(2, 20, 0)}, None, {"text_encoder": pipe.text_encoder_2}, WeightsError,
         "'<x>' has vectors of size 20, text_encoder_2's hidden size is 32 \\(SDXL's clip_g: 1280"),
        ({"<x>": v}, None, {"text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer_2},
         InputError, "expected this pipeline's pipe.text_encoder with pipe.tokenizer or pipe.te"),
        ({"<x>": v}, None, {"text_encoder": object()}, InputError, "text_encoder= / tokenizer="),
        ({"clip_l": v, "clip_g": v}, "<in-g>", {}, InputError,
         "\\(tokenizer_2\\): token '<in-g>' is already in the tokenizer"),
        ({"clip_l": v, "clip_g": v}, "!", {}, InputError, "\\(tokenizer\\): token '!' is already"),
        (v, None, {}, InputError, "array: give its token"),
        (tmp_path / "emb.pt", None, {}, WeightsError, "emb.pt: pickle files"),
    ]  # fmt: skip


def test_errors_name_the_key_and_width_and_change_nothing(tiny, tmp_path):
    pipe = StableDiffusionXL.from_pretrained(tiny / "sdxl")
    pipe.load_textual_inversion({"<in-g>": vectors(1, 32, 5)}, text_encoder=pipe.text_encoder_2)
    original = tables(pipe)
    for source, token, kw, error, message in _error_cases(pipe, tmp_path):
        with pytest.raises(error, match=message):
            pipe.load_textual_inversion(source, token, **kw)
        assert tables(pipe) == original, message
    assert pipe.tokenizer.added_tokens == [] and pipe.tokenizer_2.added_tokens == ["<in-g>"]
    with pytest.raises(InputError, match="'<no>' is not a loaded embedding.*'<in-g>'"):
        pipe.unload_textual_inversion("<no>")
    z = {"clip_l": vectors(1, 32, 6), "clip_g": vectors(1, 32, 7)}
    pipe.text_encoder_2.set_token_embedding = _out_of_memory  # fails after the first encoder
    with pytest.raises(MemoryError):
        pipe.load_textual_inversion(z, "<z>")
    del pipe.text_encoder_2.set_token_embedding
    assert tables(pipe) == original and pipe.tokenizer.added_tokens == []  # the first undone
    assert pipe.load_textual_inversion(z, "<z>") == ["<z>"]
    assert pipe.tokenizer.added_tokens == ["<z>"]
    assert pipe.tokenizer_2.added_tokens == ["<in-g>", "<z>"]
    pipe.tokenizer_2.add_tokens(["<outside>"])
    with pytest.raises(InputError, match="text_encoder_2's token embedding or tokenizer_2's"):
        pipe.load_textual_inversion(z, "<y>")
    assert pipe.tokenizer.added_tokens == ["<z>"]


def _out_of_memory(table):
    raise MemoryError("out of memory (test)")


def test_refiner_takes_clip_g(tiny, tmp_path):
    """No first encoder: an SDXL file's clip_g (clip_l may be missing or of any width), or a
    one-encoder embedding of the second's width."""
    pipe = StableDiffusionXL.from_pretrained(tiny / "sdxl-refiner")
    assert pipe.text_encoder is None
    before, table = tables(pipe), pipe.text_encoder_2.token_embedding
    g = vectors(2, 32, 8)
    save_file({"clip_l": vectors(2, 768, 9), "clip_g": g}, tmp_path / "zqstyle.safetensors")
    assert pipe.load_textual_inversion(tmp_path / "zqstyle.safetensors") == ["zqstyle", "zqstyle_1"]
    assert pipe.load_textual_inversion({"clip_g": g[:1]}, "<g>") == ["<g>"]
    assert pipe.load_textual_inversion({"<one>": g}) == ["<one>", "<one>_1"]
    assert np.array_equal(
        pipe.text_encoder_2.token_embedding[49408:], np.concatenate([g, g[:1], g])
    )
    assert list(pipe.tokenizer_2(["zqstyle <g> <one>"])[0, :7]) == [
        49406,
        *range(49408, 49413),
        49407,
    ]
    with pytest.raises(WeightsError, match="without 'clip_g', the \\(n, 32\\) vectors for text_e"):
        pipe.load_textual_inversion({"clip_l": g}, "<l>")
    with pytest.raises(InputError, match="expected this pipeline's pipe.text_encoder_2 with"):
        pipe.load_textual_inversion({"<x>": g}, text_encoder=pipe.text_encoder_2, tokenizer=False)
    pipe.unload_textual_inversion()
    assert tables(pipe) == before and pipe.text_encoder_2.token_embedding is table


def test_embedding_tokens_reads_both_formats(tmp_path):
    """The command line's early check: SD1.x / SD2.x and SDXL files, named as loading would."""
    save_file(sdxl_embedding(3, 0), tmp_path / "zqstyle.safetensors")
    save_file({"emb_params": vectors(2, 8, 1)}, tmp_path / "a1111.safetensors")
    assert embedding_tokens(tmp_path / "zqstyle.safetensors") == [
        "zqstyle",
        "zqstyle_1",
        "zqstyle_2",
    ]
    assert embedding_tokens(tmp_path / "zqstyle.safetensors", "<z>") == ["<z>", "<z>_1", "<z>_2"]
    assert embedding_tokens(tmp_path / "a1111.safetensors") == ["a1111", "a1111_1"]
    with pytest.raises(WeightsError, match="'clip_l' has 3 vectors, 'clip_g' 1"):
        embedding_tokens({"clip_l": vectors(3, 8, 0), "clip_g": vectors(1, 16, 0)}, "<t>")


def test_backends(tiny, xp):
    """On the device (fake_cupy on the CPU, CuPy on a GPU) both tables stay there."""
    device = "cpu" if xp is np else "cuda"
    host = StableDiffusionXL.from_pretrained(tiny / "sdxl")
    dev = StableDiffusionXL.from_pretrained(tiny / "sdxl", device=device, dtype="float32")
    original = tables(dev)
    emb = sdxl_embedding(2, 3, {"clip_l": 32, "clip_g": 32})
    for p in (host, dev):
        p.load_textual_inversion(emb, "<v>")
    assert isinstance(dev.text_encoder_2.token_embedding, xp.ndarray)
    kw = dict(prompt=["a <v> b"], prompt_2=["<v>"], negative_prompt=["<v> c"])
    assert_rel(our_encode(dev, **kw)[0], our_encode(host, **kw)[0], 1e-6, "device embeddings")
    dev.unload_textual_inversion()
    assert tables(dev) == original
