"""T2IAdapter / MultiAdapter (minisd/t2i_adapter.py) against diffusers' models/adapter.py, and
the pipeline-facing functions of minisd/pipeline_adapter.py (the UNet's
down_intrablock_additional_residuals: tests/test_unet_intrablock.py).

Every parameter of the references is randomized (refharness.randomize_). Adapters are SD1's
two kinds scaled down: full (conv_in, blocks of AdapterResnetBlocks, 1x1 in_conv where the
channels change) and light (LightAdapterBlocks at C/4 channels), RGB and grayscale, odd sizes
(the ceil-mode average pool's cut windows).

Reference precision island: diffusers' MultiAdapter turns adapter_weights into a float32 tensor
(``torch.tensor(list)``) whatever the model dtype; minisd rounds them to float32 too
(t2i_adapter.float32_weight), so float64 parity stays at 1e-10 (a float64 0.7 would be 1.7e-8
off).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
from refharness import (
    TOL,
    assert_rel,
    collect_outputs,
    compare_traces,
    copy_model_folder,
    diffusers_models,
    key_error,
    need,
    rel_err,
    to_np,
    torch_dtype,
)
from test_unet_blocks import traced_names

import minisd
from minisd import pipeline_adapter
from minisd.errors import ConfigError, InputError
from minisd.t2i_adapter import MultiAdapter, T2IAdapter, T2IAdapterConfig, param_shapes
from minisd.weights import RecordingDict, load_file

DTYPES = ["float64", "float32"]

TINY = {  # "full" and "light" fit tests/test_unet.py's tiny UNet (channels 32, 64, 64)
    "full": dict(in_channels=3, channels=(32, 64, 64), num_res_blocks=2, downscale_factor=8),
    "full_gray": dict(
        in_channels=1, channels=(16, 32, 48, 48), num_res_blocks=1, downscale_factor=4
    ),
    "light": dict(in_channels=3, channels=(32, 64), num_res_blocks=2, adapter_type="light_adapter"),
    "light_gray": dict(
        in_channels=1,
        channels=(16, 32, 48),
        num_res_blocks=3,
        downscale_factor=2,
        adapter_type="light_adapter",
    ),  # fmt: skip
    "full_b": dict(in_channels=1, channels=(32, 64, 64), num_res_blocks=1, downscale_factor=8),
}
FULL = {  # the SD checkpoints' architectures (TencentARC t2iadapter_*_sd14v1 / sd15v2)
    "sketch_sd15": dict(in_channels=1, channels=(320, 640, 1280, 1280), num_res_blocks=2),
    "depth_sd15": dict(in_channels=3, channels=(320, 640, 1280, 1280), num_res_blocks=2),
    "color_sd14": dict(channels=(320, 640, 1280), num_res_blocks=4, adapter_type="light_adapter"),
}
# case: (adapter, batch, latent-sized (h, w): the image is downscale_factor times that)
CASES = {
    "full_8x8": ("full", 2, (8, 8)),
    "full_odd_13x7": ("full", 1, (13, 7)),
    "full_gray_batch3": ("full_gray", 3, (6, 10)),
    "light_8x12": ("light", 2, (8, 12)),
    "light_gray_odd": ("light_gray", 2, (11, 5)),
}


@pytest.fixture(scope="module")
def tiny(ref_cache):
    """name -> (randomized float32 diffusers T2IAdapter, its save_pretrained folder)."""
    return diffusers_models(ref_cache, "T2IAdapter", TINY, "t2i_adapter", seed=3)


def image_for(cfg, n, h, w, dtype, seed=2):
    f = cfg.downscale_factor
    shape = (n, cfg.in_channels, f * h, f * w)
    return np.random.RandomState(seed).uniform(size=shape).astype(dtype)


def tensor(a):
    return need("torch").from_numpy(np.ascontiguousarray(a))


def compare_adapter(ours, ref, images, dtype, weights=None):
    """Run both (a T2IAdapter, or a MultiAdapter with ``weights``); compare every traced module
    and every feature. Returns ({name: error}, our features)."""
    torch = need("torch")
    multi = isinstance(ours, MultiAdapter)
    with minisd.trace() as acts:
        feats = ours(images, weights) if multi else ours(images)
    with torch.no_grad(), collect_outputs(ref) as racts:
        args = ([tensor(i) for i in images], weights) if multi else (tensor(images),)
        rf = ref(*args)
    names = traced_names(ref, racts)
    assert not set(acts) - set(racts), f"names no diffusers module has: {set(acts) - set(racts)}"
    errs = compare_traces(acts, racts, TOL[dtype], names)
    assert isinstance(feats, list) and len(feats) == len(rf)
    for k, (a, r) in enumerate(zip(feats, rf)):
        errs[f"<feature {k}>"] = assert_rel(a, to_np(r), TOL[dtype], f"feature {k}")
        assert a.dtype == np.dtype(dtype)
    return errs, feats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_every_layer_matches_diffusers(tiny, case, dtype):
    name, n, (h, w) = CASES[case]
    ref, folder = tiny(name)
    ours = T2IAdapter.from_pretrained(folder, dtype=dtype)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    errs, feats = compare_adapter(ours, ref, image_for(ours.config, n, h, w, dtype), dtype)
    cfg = ours.config
    assert len(errs) >= 4 * len(cfg.body()) * cfg.num_res_blocks  # every conv was compared
    assert "adapter.unshuffle" in errs and "adapter.body.1.downsample" in errs
    assert feats[-1].shape[2:] == (-(-h // 2 ** (len(feats) - 1)), -(-w // 2 ** (len(feats) - 1)))
    f = ours.total_downscale_factor
    assert f == ref.total_downscale_factor and ours.downscale_factor == ref.downscale_factor


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", [None, [0.7, 0.35]])
def test_multi_adapter_matches_diffusers(tiny, dtype, weights):
    """diffusers' MultiAdapter: the weighted sum (default 1/n each) of an RGB full adapter and
    a grayscale one with another depth; weights rounded to float32 as diffusers."""
    diffusers = need("diffusers")
    refs = [copy.deepcopy(tiny(k)[0]).to(torch_dtype(dtype)) for k in ("full", "full_b")]
    ours = MultiAdapter(
        [T2IAdapter.from_pretrained(tiny(k)[1], dtype=dtype) for k in ("full", "full_b")]
    )
    images = [image_for(a.config, 2, 5, 9, dtype, seed=k) for k, a in enumerate(ours.adapters)]
    errs, feats = compare_adapter(ours, diffusers.MultiAdapter(refs), images, dtype, weights)
    assert "adapters.1.adapter.body.2.resnets.0.block2" in errs and len(feats) == 3
    single = ours.adapters[0](images[0])[0]
    assert rel_err(feats[0], single) > 1e-2  # the second adapter contributed


def test_multi_adapter_refuses_mismatched_adapters(tiny):
    a = T2IAdapter.from_pretrained(tiny("full")[1])
    b = T2IAdapter.from_pretrained(tiny("full_gray")[1])
    with pytest.raises(InputError, match=r"adapters\[1\]"):
        MultiAdapter([a, b])
    m = MultiAdapter([a, a])
    img = image_for(a.config, 1, 4, 4, "float32")
    with pytest.raises(InputError, match="one each per adapter"):
        m([img], [1.0, 1.0])
    with pytest.raises(InputError, match=r"adapter_weights\[1\]"):
        m([img, img], [1.0, float("nan")])


@pytest.mark.parametrize("name", list(TINY))
def test_every_checkpoint_key_is_read(tiny, name):
    """A forward pass reads every key of the checkpoint, and nothing else."""
    _, folder = tiny(name)
    ours = T2IAdapter.from_pretrained(folder)
    keys = set(load_file(folder / "diffusion_pytorch_model.safetensors"))
    ours.params = RecordingDict(ours.params)
    ours(image_for(ours.config, 1, 4, 4, "float32"))
    assert ours.params.reads == keys


@pytest.mark.parametrize("name", list(TINY) + list(FULL))
def test_key_table_matches_diffusers(name):
    """param_shapes(config) is exactly diffusers' state dict (built on the meta device)."""
    torch, diffusers = need("torch", "diffusers")
    with torch.device("meta"):
        ref = diffusers.T2IAdapter(**(TINY.get(name) or FULL[name]))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert param_shapes(T2IAdapterConfig.from_dict(dict(ref.config))) == expected


def test_in_memory_constructor_and_weight_modes(tiny):
    """Flat or nested params, and weights="lazy" / "stream", give the eager model's features."""
    ref, folder = tiny("light")
    flat = {k: to_np(v) for k, v in ref.state_dict().items()}
    a = T2IAdapter(dict(ref.config), flat)
    b = T2IAdapter(dict(ref.config), a.params, dtype="float64")
    assert a.dtype == np.float32 and b.dtype == np.float64 and a.device == "cpu"
    img = image_for(a.config, 2, 4, 6, "float64")
    fa, fb = a(img), b(img)
    assert all(rel_err(p, q) < 1e-5 for p, q in zip(fa, fb))
    for mode in ("lazy", "stream"):
        c = T2IAdapter.from_pretrained(folder, dtype="float32", weights=mode)
        assert all(np.array_equal(p, q) for p, q in zip(c(img), fa))


def test_missing_key_names_file_and_key(tiny, tmp_path):
    key = "adapter.body.1.in_conv.weight"
    load = T2IAdapter.from_pretrained
    key_error(load, tiny("full")[1], tmp_path / "a", key, lambda f: f.pop(key))


def test_misshapen_key_names_file_and_key(tiny, tmp_path):
    _, folder = tiny("light")
    key = "adapter.body.2.resnets.1.block2.weight"

    def change(flat):
        flat[key] = flat[key][:, :, :1, :1]  # a 1x1 block2: a full adapter's, not a light one's

    message = key_error(T2IAdapter.from_pretrained, folder, tmp_path / "a", key, change)
    assert "shape" in message


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("adapter_type", "tiny_adapter", "adapter_type"),
        ("_class_name", "ControlNetModel", "_class_name"),
        ("channels", 32, "channels"),
        ("channels", [], "channels"),
        ("num_res_blocks", "2", "num_res_blocks"),
        ("downscale_factor", 0, "downscale_factor"),
        ("in_channels", None, "in_channels"),
        ("some_new_option", 3, "some_new_option"),
    ],
)
def test_unsupported_config_is_refused(tiny, tmp_path, field, value, match):
    _, folder = tiny("full")
    dst, _ = copy_model_folder(folder, tmp_path / "a", config={field: value})
    with pytest.raises(ConfigError, match=match) as e:
        T2IAdapter.from_pretrained(dst)
    assert "config.json" in str(e.value)


def test_light_adapter_needs_four_channels():
    with pytest.raises(ConfigError, match="at least 4"):
        T2IAdapterConfig.from_dict({**TINY["light"], "channels": [8, 2]})


def test_input_errors(tiny):
    ours = T2IAdapter.from_pretrained(tiny("full")[1])
    img = image_for(ours.config, 2, 4, 4, "float32")
    ours(img)  # the valid call
    for bad in (img[:, :1], img[:, :, :-1], img[:, :, :, :12], img[0]):
        with pytest.raises(InputError, match=r"image: expected shape \(N, 3, H, W\)"):
            ours(bad)


# --------------------------------------------------------------------------- backends


def test_array_backend_matches_diffusers(tiny, xp):
    """The adapter (and a MultiAdapter) on each array backend (NumPy; CuPy where a GPU
    exists), float32."""
    from minisd.backend import to_numpy

    ref, folder = tiny("light_gray")
    device = "cpu" if xp is np else "cuda"
    ours = T2IAdapter.from_pretrained(folder, dtype="float32", device=device)
    img = image_for(ours.config, 2, 7, 6, "float32")
    feats = ours(xp.asarray(img))
    assert all(isinstance(f, xp.ndarray) for f in feats)
    with need("torch").no_grad():
        rf = ref(tensor(img))
    for k, (a, r) in enumerate(zip(feats, rf)):
        assert_rel(to_numpy(a), to_np(r), TOL["float32"], f"feature {k}")
    multi = MultiAdapter([ours, ours])(xp.asarray(np.stack([img, img])), [0.5, 0.25])
    assert_rel(to_numpy(multi[1]), 0.75 * to_np(rf[1]), TOL["float32"], "MultiAdapter")


# --------------------------------------------------------------------------- pipeline functions


def _pipe(adapter):
    return SimpleNamespace(adapter=adapter, xp=np, dtype=np.dtype("float32"), device="cpu")


def _pil(h, w, mode="RGB", seed=0):
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a).convert(mode)


def _ref_state(feats, scale, nipp, cfg):
    """StableDiffusionAdapterPipeline's adapter_state from the adapter's output."""
    torch = need("torch")
    feats = [v * scale for v in feats] if scale is not None else feats
    feats = [v.repeat(nipp, 1, 1, 1) for v in feats] if nipp > 1 else feats
    return [to_np(torch.cat([v] * 2) if cfg else v) for v in feats]


def test_prepare_matches_diffusers_pipeline(tiny):
    """One PIL image (Lanczos resize to the output size), a scale, num_images_per_prompt=2 and
    CFG: the adapter_state diffusers' pipeline computes, in float32."""
    torch = need("torch")
    from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter import (
        _preprocess_adapter_image as ref_preprocess,
    )

    for name, mode in (("full", "RGB"), ("full_b", "L")):
        ref, folder = tiny(name)
        pipe = _pipe(T2IAdapter.from_pretrained(folder))
        img = _pil(50, 70, mode)
        state = pipeline_adapter.prepare(
            pipe, img, scale=0.6, factor=0.5, batch=2, nipp=2, size=(64, 48), cfg=True
        )
        with torch.no_grad():
            expect = _ref_state(ref(ref_preprocess(img, 64, 48)), 0.6, 2, True)
        assert state["factor"] == 0.5 and len(state["features"]) == len(expect) == 3
        for k, (a, r) in enumerate(zip(state["features"], expect)):
            assert a.shape == r.shape and a.shape[0] == 4 and a.dtype == np.float32
            assert_rel(a, r, TOL["float32"], f"{name} feature {k}")


def test_prepare_several_adapters_matches_diffusers_multi_adapter(tiny):
    """A list of adapters: diffusers' MultiAdapter with adapter_weights = the scales."""
    torch, diffusers = need("torch", "diffusers")
    from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter import (
        _preprocess_adapter_image as ref_preprocess,
    )

    refs, folders = zip(*(tiny(k) for k in ("full", "full_b")))
    pipe = _pipe(pipeline_adapter.load(list(folders), "float32", "cpu"))
    images = [_pil(64, 64, "RGB", seed=1), _pil(64, 64, "L", seed=2)]
    state = pipeline_adapter.prepare(
        pipe, images, scale=[0.7, 0.4], factor=1.0, batch=1, nipp=1, size=(64, 64), cfg=False
    )
    with torch.no_grad():
        xs = [ref_preprocess(im, 64, 64) for im in images]
        expect = _ref_state(diffusers.MultiAdapter(list(refs))(xs, [0.7, 0.4]), None, 1, False)
    for k, (a, r) in enumerate(zip(state["features"], expect)):
        assert_rel(a, r, TOL["float32"], f"MultiAdapter feature {k}")


def test_prepare_batches_per_prompt_images_as_the_latents(tiny):
    """Two prompts, two images each: [p0, p0, p1, p1] as the latents, then doubled for CFG; an
    RGB image for a grayscale adapter is converted; one image serves every prompt."""
    pipe = _pipe(T2IAdapter.from_pretrained(tiny("full_b")[1]))
    images = [_pil(64, 64, seed=1), _pil(64, 64, seed=2)]
    kw = dict(scale=1.0, factor=1.0, batch=4, nipp=2, size=(64, 64), cfg=True)
    v = pipeline_adapter.prepare(pipe, images, **kw)["features"][0]
    assert v.shape[0] == 8 and np.array_equal(v[4:], v[:4])
    assert np.array_equal(v[0], v[1]) and np.array_equal(v[2], v[3])
    assert rel_err(v[1], v[2]) > 1e-2
    one = pipeline_adapter.prepare(pipe, images[1], **kw)["features"][0]
    assert all(np.array_equal(one[i], v[2]) for i in range(8))
    with pytest.raises(InputError, match=r"adapter_image: 3 images for 2 prompt"):
        pipeline_adapter.prepare(pipe, images + images[:1], **kw)
    with pytest.raises(InputError, match="3-channel image for an adapter with in_channels=1"):
        pipeline_adapter.prepare(pipe, np.zeros((64, 64, 3), np.float32), **kw)
    with pytest.raises(InputError, match="height=60, width=64"):
        pipeline_adapter.prepare(pipe, images[0], **{**kw, "size": (60, 64)})


def test_residuals_follow_the_conditioning_factor():
    """diffusers: features while i < int(n * factor), a fresh list each step."""
    feats = [np.zeros(1), np.ones(1)]
    for factor, n, active in [(1.0, 4, 4), (0.5, 5, 2), (0.0, 3, 0), (0.34, 3, 1), (0.99, 10, 9)]:
        state = {"features": feats, "factor": factor}
        got = [pipeline_adapter.residuals(state, i, n) for i in range(n)]
        assert [g is not None for g in got] == [i < active for i in range(n)]
        for g in got[:active]:
            assert g == feats and g is not feats
            g.pop(0)  # what diffusers' UNet does to its list
        assert len(state["features"]) == 2
    assert pipeline_adapter.residuals(None, 0, 4) is None


def test_check_refuses_bad_arguments(tiny):
    adapter = T2IAdapter.from_pretrained(tiny("full")[1])
    img = _pil(64, 64)
    ok = dict(scale=1.0, factor=1.0)
    pipeline_adapter.check(_pipe(adapter), img, **ok)  # valid
    pipeline_adapter.check(_pipe(None), None, **ok)  # nothing to check
    pipeline_adapter.check(_pipe(adapter), None, **ok)  # the adapter sits the run out
    with pytest.raises(InputError, match="adapter_image: this pipeline has no T2I-Adapter"):
        pipeline_adapter.check(_pipe(None), img, **ok)
    for scale in ("1", float("nan"), float("inf"), None, [1.0, 2.0]):
        with pytest.raises(InputError, match="adapter_conditioning_scale"):
            pipeline_adapter.check(_pipe(adapter), img, scale=scale, factor=1.0)
    for factor in (-0.1, 1.5, float("nan"), "0.5", None):
        with pytest.raises(InputError, match="adapter_conditioning_factor"):
            pipeline_adapter.check(_pipe(adapter), img, scale=1.0, factor=factor)
    two = _pipe([adapter, adapter])
    pipeline_adapter.check(two, [img, img], scale=[1.0, 0.5], factor=0.5)
    for bad in (img, [img], [img, img, img]):
        with pytest.raises(InputError, match="adapter_image: expected a list of 2 images"):
            pipeline_adapter.check(two, bad, **ok)
    with pytest.raises(InputError, match=r"adapter_conditioning_scale: 3 values for 2"):
        pipeline_adapter.check(two, [img, img], scale=[1.0, 1.0, 1.0], factor=1.0)


def test_load_and_first_image(tiny):
    a, b = (tiny(k)[1] for k in ("full", "full_b"))
    one = pipeline_adapter.load(a, "float64", "cpu")
    assert isinstance(one, T2IAdapter) and one.dtype == np.float64
    assert pipeline_adapter.load(one, "float32", "cpu") is one
    both = pipeline_adapter.load([a, one], "float32", "cpu")
    assert isinstance(both, list) and both[1] is one
    with pytest.raises(InputError, match="adapter: an empty list"):
        pipeline_adapter.load([], "float32", "cpu")
    images = [_pil(48, 80), _pil(64, 64)]
    assert pipeline_adapter.first_image(_pipe(both), images) is images[0]
    assert pipeline_adapter.first_image(_pipe(one), images) is images[0]
    assert pipeline_adapter.first_image(_pipe(None), images) is images
