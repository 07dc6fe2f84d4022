"""minisd.clip_vision against transformers: CLIPVisionModelWithProjection (every layer, every
hidden state, image_embeds; float64 and float32) and CLIPImageProcessor (bit for bit).

Tiny configs go through save_pretrained -> from_pretrained, with every parameter randomized
(class embedding, norms and biases too). The processor reference is transformers' PIL backend,
the one CLIPImageProcessor falls back to without torchvision (as here)."""

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
    rel_err,
    to_np,
)

import minisd
from minisd.clip_vision import CLIPVisionModelWithProjection, preprocess
from minisd.errors import ConfigError, InputError, WeightsError
from minisd.weights import RecordingDict, flatten, load_file, save_file

TINY = {
    # ViT-H-like (h94's image encoder): gelu; 5x5 patches of 6 pixels
    "gelu": dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
        image_size=30, patch_size=6, projection_dim=40, hidden_act="gelu",
    ),
    # OpenAI-CLIP-like: quick_gelu, 4x4 patches of 8 pixels, a projection wider than the tower
    "quick_gelu": dict(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=48, hidden_act="quick_gelu",
    ),
}  # fmt: skip
# h94's ViT-H/14 image encoder at full width (1280, 16 heads of 80, 16x16 patches of 14 pixels at
# 224, projection 1024) with 2 of its 32 layers
VIT_H_WIDTH = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=2, num_attention_heads=16,
    image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu",
)  # fmt: skip


def build_reference(cfg, seed):
    torch, transformers = need("torch", "transformers")
    from transformers.initialization import no_init_weights

    torch.manual_seed(seed)
    with no_init_weights():  # randomize_ sets every parameter anyway
        model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**cfg))
    return randomize_(model.eval().double(), seed)


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, ref_cache):
    model = build_reference(TINY[request.param], seed=3).float().double()  # weights as saved
    folder = ref_cache / f"clip_vision_{request.param}"
    copy.deepcopy(model).float().save_pretrained(str(folder), safe_serialization=True)
    return request.param, model, folder


def pixels(cfg, n=3, seed=0):
    return np.random.RandomState(seed).standard_normal((n, 3, cfg.image_size, cfg.image_size))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_every_layer_matches_transformers(tiny, dtype):
    torch = need("torch")
    _, model, folder = tiny
    ours = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=dtype)
    x = pixels(ours.config)
    ref = copy.deepcopy(model).to(getattr(torch, dtype))
    with torch.no_grad(), collect_outputs(ref) as racts:
        out = ref(torch.from_numpy(x).to(getattr(torch, dtype)), output_hidden_states=True)
    with minisd.trace() as acts:
        embeds, states = ours(x, output_hidden_states=True)
    tol = TOL[dtype]
    assert {"vision_model.embeddings.patch_embedding", "visual_projection"} <= set(racts)
    assert not set(acts) - set(racts), f"names no module has: {set(acts) - set(racts)}"
    errs = compare_traces(acts, racts, tol)  # every module transformers' hooks see
    assert embeds.dtype == np.dtype(dtype) and embeds.shape == (3, ours.config.projection_dim)
    errs["image_embeds"] = assert_rel(embeds, to_np(out.image_embeds), tol, "image_embeds")
    assert len(states) == len(out.hidden_states) == ours.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(states, out.hidden_states)):
        errs[f"hidden_states[{i}]"] = assert_rel(a, to_np(b), tol, f"hidden_states[{i}]")
    np.testing.assert_array_equal(ours(x), embeds)  # the same without the states
    print(f"{folder.name} {dtype}: max rel. error {max(errs.values()):.2e} over {len(errs)}")


def test_hidden_state_alone(tiny):
    """``hidden_state(x, i)`` (IP-Adapter Plus takes -2) is ``hidden_states[i]`` of the full
    call, bit for bit, computing only the layers it needs; bad indices are refused."""
    _, _, folder = tiny
    ours = CLIPVisionModelWithProjection.from_pretrained(folder, dtype="float64")
    x = pixels(ours.config, n=2)
    _, states = ours(x, output_hidden_states=True)
    n = ours.config.num_hidden_layers
    for i in (-2, -1, 0, 1, -(n + 1)):
        with minisd.trace() as acts:
            got = ours.hidden_state(x, i)
        np.testing.assert_array_equal(got, states[i])
        last = i % (n + 1) - 1
        assert (
            f"vision_model.encoder.layers.{last + 1}" not in acts
            and "visual_projection" not in acts
        )
        if last >= 0:
            assert f"vision_model.encoder.layers.{last}" in acts
    for bad in (n + 1, -(n + 2), 1.0):
        with pytest.raises(InputError, match="index"):
            ours.hidden_state(x, bad)


def test_every_key_is_read(tiny):
    _, _, folder = tiny
    enc = CLIPVisionModelWithProjection.from_pretrained(folder, dtype="float64")
    keys = set(flatten(enc.params))
    assert len(keys) == len(load_file(folder / "model.safetensors"))
    enc.params = RecordingDict(enc.params)
    enc(pixels(enc.config, n=1))
    assert enc.params.reads == keys


def test_position_ids_buffer_of_older_files(tiny, tmp_path):
    """transformers 4 files may carry ``vision_model.embeddings.position_ids``: it is read."""
    _, _, folder = tiny
    flat = {k: np.array(v) for k, v in load_file(folder / "model.safetensors").items()}
    plain = CLIPVisionModelWithProjection.from_pretrained(folder, dtype="float64")
    n = plain.config.num_positions
    flat["vision_model.embeddings.position_ids"] = np.arange(n, dtype=np.int64)[None]
    enc = CLIPVisionModelWithProjection.from_pretrained(_write(tmp_path, folder, flat), "float64")
    x = pixels(enc.config, n=2)
    np.testing.assert_array_equal(enc(x), plain(x))
    enc.params = RecordingDict(enc.params)
    enc(x)
    assert "vision_model.embeddings.position_ids" in enc.params.reads


def _write(tmp_path, folder, flat):
    save_file(flat, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    return tmp_path


def test_bad_checkpoints_name_file_and_key(tiny, tmp_path):
    _, _, folder = tiny
    flat = {k: np.array(v) for k, v in load_file(folder / "model.safetensors").items()}
    key = "vision_model.encoder.layers.1.mlp.fc1.bias"
    cases = {
        "missing": ({k: v for k, v in flat.items() if k != key}, f"missing key '{key}'"),
        "unexpected": ({**flat, "text_projection.weight": flat[key]}, "text_projection"),
        "misshapen": ({**flat, key: flat[key][:-1]}, f"key '{key}' has shape"),
        "class token": (
            {**flat, "vision_model.embeddings.class_embedding": flat[key][:3]},
            "class_embedding",
        ),
    }
    for i, (bad, needle) in enumerate(cases.values()):
        sub = tmp_path / str(i)
        sub.mkdir()
        with pytest.raises(
            WeightsError, match="model.safetensors: .*" + needle.replace(".", r"\.")
        ):
            CLIPVisionModelWithProjection.from_pretrained(_write(sub, folder, bad))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightsError, match="no weights file"):
        CLIPVisionModelWithProjection.from_pretrained(tmp_path)
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(WeightsError, match="never loaded"):
        CLIPVisionModelWithProjection.from_pretrained(tmp_path)


def test_bad_config_and_inputs(tiny, tmp_path):
    _, _, folder = tiny
    cfg = json.loads((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    for field, value in (("hidden_act", "relu"), ("patch_size", 9), ("num_attention_heads", 5)):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(ConfigError, match=field):
            CLIPVisionModelWithProjection.from_pretrained(tmp_path)
    enc = CLIPVisionModelWithProjection.from_pretrained(folder)
    s = enc.config.image_size
    for bad in (np.zeros((1, 3, s, s + 1)), np.zeros((3, s, s)), np.zeros((1, 4, s, s))):
        with pytest.raises(InputError, match="pixel_values"):
            enc(bad)


def test_full_clip_config_takes_the_vision_tower(tiny, tmp_path):
    """A CLIPModel config.json ({"vision_config": ..., "projection_dim": ...}) works too."""
    _, _, folder = tiny
    cfg = json.loads((folder / "config.json").read_text())
    full = {"projection_dim": cfg["projection_dim"], "vision_config": cfg, "text_config": {}}
    (tmp_path / "config.json").write_text(json.dumps(full))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    enc = CLIPVisionModelWithProjection.from_pretrained(tmp_path, dtype="float64")
    plain = CLIPVisionModelWithProjection.from_pretrained(folder, dtype="float64")
    assert enc.config == plain.config
    x = pixels(enc.config, n=1)
    np.testing.assert_array_equal(enc(x), plain(x))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_backends(tiny, xp, dtype):
    """The same forward on each array backend (fake_cupy: the device code path on the CPU)."""
    torch = need("torch")
    from minisd.backend import to_numpy

    _, model, folder = tiny
    device = "cpu" if xp is np else "cuda"
    enc = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=dtype, device=device)
    x = pixels(enc.config, n=2, seed=1)
    embeds, states = enc(xp.asarray(x), output_hidden_states=True)
    assert type(embeds) is xp.ndarray and type(states[-1]) is xp.ndarray
    ref = copy.deepcopy(model).to(getattr(torch, dtype))
    with torch.no_grad():
        out = ref(torch.from_numpy(x).to(getattr(torch, dtype)), output_hidden_states=True)
    assert_rel(to_numpy(embeds), to_np(out.image_embeds), TOL[dtype], "image_embeds")
    assert_rel(to_numpy(states[-1]), to_np(out.hidden_states[-1]), TOL[dtype], "last state")


# --------------------------------------------------------------------------- preprocessing


def odd_images():
    """PIL images of odd sizes and modes: landscape, portrait, 1 px off square, smaller than
    the crop, RGBA (composited on white), grayscale, palette with transparency."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def noise(h, w, c=3):
        return rng.integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)

    ims = [Image.fromarray(noise(h, w)) for h, w in ((300, 451), (225, 224), (97, 513))]
    ims += [Image.fromarray(noise(640, 333)), Image.fromarray(noise(50, 70))]
    ims.append(Image.fromarray(noise(131, 99, 4), "RGBA"))
    ims.append(Image.fromarray(noise(131, 99, 0), "L"))
    pal = Image.fromarray(noise(64, 80)).convert("P")
    pal.info["transparency"] = 3
    ims.append(pal)
    return ims


@pytest.mark.parametrize("size", [224, 32, 30])
def test_preprocess_matches_clip_image_processor(size):
    transformers = need("transformers")
    proc = transformers.CLIPImageProcessor(size=size, crop_size=size)  # diffusers' defaults
    ims = odd_images()
    want = proc(ims, return_tensors="np").pixel_values
    got = preprocess(ims, size=size)
    assert got.dtype == np.float32 and got.shape == (len(ims), 3, size, size)
    np.testing.assert_array_equal(got, want)
    one = preprocess(ims[0], size=size)  # a single image
    np.testing.assert_array_equal(one, want[:1])
    arr = preprocess(np.asarray(ims[1]), size=size)  # a uint8 (H, W, 3) array
    np.testing.assert_array_equal(arr, want[1:2])
    assert rel_err(got, want) == 0.0


def test_preprocess_input_errors():
    for bad, what in (
        ([], "at least one"),
        (np.zeros((8, 8, 3), dtype=np.float32), "uint8"),
        ([np.zeros((8, 8), dtype=np.uint8)], "uint8"),
        ("image.png", "PIL image"),
    ):
        with pytest.raises(InputError, match=what):
            preprocess(bad)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_vit_h_width_matches_transformers(ref_cache, dtype):
    """The real image encoder's widths and patching (2 layers): embeddings and last hidden
    state within 1e-10 (float64) / 1e-4 (float32)."""
    torch = need("torch")
    folder = ref_cache / "clip_vision_vit_h_width"
    model = build_reference(VIT_H_WIDTH, seed=4)
    if not folder.exists():
        copy.deepcopy(model).float().save_pretrained(str(folder), safe_serialization=True)
    ref = model.float().to(getattr(torch, dtype))  # the saved (float32) weights
    ours = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=dtype)
    x = pixels(ours.config, n=1)
    with torch.no_grad():
        out = ref(torch.from_numpy(x).to(getattr(torch, dtype)), output_hidden_states=True)
    embeds, states = ours(x, output_hidden_states=True)
    e = assert_rel(embeds, to_np(out.image_embeds), TOL[dtype], "image_embeds")
    h = assert_rel(states[-1], to_np(out.hidden_states[-1]), TOL[dtype], "last hidden state")
    print(f"\nViT-H width {dtype}: image_embeds {e:.2e}, last hidden state {h:.2e}")
    assert embeds.shape == (1, 1024) and states[-1].shape == (1, 257, 1280)
