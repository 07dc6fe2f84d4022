"""CLIPTextModelWithProjection (SDXL's second text encoder) against transformers: every layer,
the hidden states SDXL takes (``hidden_states[-(k + 2)]``), the projected pooled output, float64
and float32, every parameter randomized; and CLIPTextModel.hidden_state for SDXL's first
encoder."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from refharness import TOL, assert_rel, compare_traces, need, randomize_, to_np
from test_clip import check_all, tiny_ids

import minisd
from minisd.clip_projection import CLIPTextModelWithProjection
from minisd.errors import InputError, WeightsError
from minisd.weights import load_file, save_file

CONFIGS = {
    # bigG-like: gelu, EOS pooling by id (49407 in SDXL's configs, 999 here)
    "tiny": dict(
        vocab_size=1000, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=3, hidden_act="gelu", bos_token_id=998, eos_token_id=999,
        projection_dim=40,
    ),
    # OpenCLIP ViT-bigG/14's widths (1280 x 5120, 20 heads, projection 1280), 2 of its 32 layers
    "bigG-width": dict(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=2,
        num_attention_heads=20, hidden_act="gelu", eos_token_id=2, projection_dim=1280,
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def ref(request, ref_cache):
    """(name, float64 transformers model, its float32 save_pretrained folder)."""
    torch, transformers = need("torch", "transformers")
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(**CONFIGS[request.param])
    model = randomize_(transformers.CLIPTextModelWithProjection(cfg).eval(), seed=3)
    folder = ref_cache / f"clip_projection_{request.param}"
    model.save_pretrained(str(folder), safe_serialization=True)
    return request.param, model.double(), folder


def _ids(name):
    ids = tiny_ids(CONFIGS["tiny"], n=3)
    if name != "tiny":  # argmax pooling (eos_token_id == 2): the EOS must be the largest id
        ids = np.where(ids == 999, 49407, ids)
    return ids


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_every_layer_and_text_embeds(ref, dtype):
    torch = need("torch")
    name, model, folder = ref
    ours = CLIPTextModelWithProjection.from_pretrained(folder, dtype=dtype)
    ids, tol = _ids(name), TOL[dtype]
    ref_model = copy.deepcopy(model).to(getattr(torch, dtype))
    _, _, errs = check_all(ref_model.text_model, ours, ids, dtype)
    with torch.no_grad():
        out = ref_model(torch.from_numpy(ids), output_hidden_states=True)
    with minisd.trace() as acts:
        embeds = ours.text_embeds(ids)
    errs["text_embeds"] = assert_rel(embeds, to_np(out.text_embeds), tol, "text_embeds")
    compare_traces(acts, {"text_projection": to_np(out.text_embeds)}, tol, ["text_projection"])
    for k in (0, 1):
        hidden, pooled = ours.encode_xl(ids, clip_skip=k or None)
        want = to_np(out.hidden_states[-(k + 2)])
        errs[f"skip {k}"] = assert_rel(hidden, want, tol, f"hidden_states[-{k + 2}]")
        assert_rel(ours.hidden_state(ids, k), want, tol, "hidden_state")
        assert_rel(pooled, to_np(out.text_embeds), tol, "encode_xl text_embeds")
    assert embeds.dtype == np.dtype(dtype) and len(errs) > 20
    print(f"{name} {dtype}: max rel. error {max(errs.values()):.2e}")


@pytest.mark.parametrize("ref", ["tiny"], indirect=True)
def test_checkpoint_errors(ref, tmp_path):
    name, _, folder = ref
    flat = load_file(folder / "model.safetensors")
    cfg = CONFIGS["tiny"]
    with pytest.raises(WeightsError, match="src.*missing key 'text_projection.weight'"):
        CLIPTextModelWithProjection.from_state_dict(
            {k: v for k, v in flat.items() if k != "text_projection.weight"}, cfg, "src"
        )
    bad = {**flat, "text_projection.weight": np.zeros((40, 47), np.float32)}
    with pytest.raises(WeightsError, match=r"text_projection.weight has shape \(40, 47\)"):
        CLIPTextModelWithProjection.from_state_dict(bad, cfg, "src")
    save_file({k: v for k, v in flat.items() if k != "text_projection.weight"},
              tmp_path / "model.safetensors")  # fmt: skip
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightsError, match="model.safetensors.*text_projection"):
        CLIPTextModelWithProjection.from_pretrained(tmp_path)
    ours = CLIPTextModelWithProjection.from_pretrained(folder)
    with pytest.raises(InputError, match="clip_skip=4"):
        ours.encode_xl(_ids(name), clip_skip=4)
    with pytest.raises(InputError, match="clip_skip=4"):
        ours.hidden_state(_ids(name), clip_skip=4)


def test_lazy_weights_keep_the_projection_in_the_model_dtype(ref):
    name, _, folder = ref
    eager = CLIPTextModelWithProjection.from_pretrained(folder)
    lazy = CLIPTextModelWithProjection.from_pretrained(folder, weights="lazy")
    ids = _ids(name)
    np.testing.assert_array_equal(lazy.text_embeds(ids), eager.text_embeds(ids))
    assert lazy.text_projection["weight"].dtype == np.float32
