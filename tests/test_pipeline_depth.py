"""depth2img (5-channel depth UNets) in StableDiffusion against diffusers'
StableDiffusionDepth2ImgPipeline on the same tiny SD2-like folder (every parameter randomized).

The depth map is given on both sides (diffusers' DPT estimator is not part of minisd): resized to
the latent grid with PyTorch's bicubic rule, scaled to [-1, 1] per image, concatenated after the
latents in every UNet row; the rest is img2img with its two draws (posterior sample, noise).
"""

import warnings

import numpy as np
import pytest
from pipelines import build
from refharness import assert_rel, need
from test_pipeline import PROMPTS, TOL, _CountingUNet, _image, _mask, _run_ref

import minisd
from minisd.errors import InputError
from minisd.pipeline_depth import resize_bicubic


@pytest.fixture(scope="module")
def depth_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipes") / "depth"
    return folder, build("depth", folder)


@pytest.fixture(scope="module")
def depth_pair(depth_folder):
    """(diffusers pipeline, minisd pipeline) over the same folder."""
    return depth_folder[1], minisd.StableDiffusion.from_pretrained(depth_folder[0])


def _depth(h=64, w=64, n=None, seed=0):
    """A smooth random depth map (N, H, W) or (H, W), float32 (as a DPT output would be)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    maps = [np.sin(3 * xx * rng.uniform(1, 3) + yy) + rng.uniform(0, 2) * yy for _ in range(n or 1)]
    d = np.stack(maps).astype(np.float32) + 5.0
    return d if n else d[0]


def _ref(ref, scheduler, depth, **kw):
    torch = need("torch")
    d = torch.from_numpy(depth if depth.ndim == 3 else depth[None])
    return _run_ref(ref, scheduler, depth_map=d, **kw)


@pytest.mark.parametrize(
    "size", [(8, 6, 64, 48), (10, 10, 10, 10), (7, 9, 13, 17), (100, 80, 12, 10), (3, 2, 1, 1)]
)
def test_resize_bicubic_is_torchs(size):
    torch = need("torch")
    h, w, oh, ow = size
    x = np.random.default_rng(0).standard_normal((2, h, w))
    expect = torch.nn.functional.interpolate(
        torch.from_numpy(x)[:, None], size=(oh, ow), mode="bicubic", align_corners=False
    )[:, 0].numpy()
    assert_rel(resize_bicubic(x, (oh, ow)), expect, 1e-13, f"bicubic {size}")


@pytest.mark.parametrize("scheduler", [None, "ddim", "dpmpp_2m", "euler"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_same_seed_same_result(depth_pair, scheduler, strength):
    """Non-square image (80 x 64) with a depth map of another size (48 x 40): the output takes
    the image's size, the depth map the latent grid's; two prompts share the image and map."""
    ref, ours = depth_pair
    depth = _depth(48, 40, seed=1)
    kw = dict(prompt=PROMPTS, negative_prompt=["blurry", ""], image=_image(80, 64),
              num_inference_steps=4, guidance_scale=7.0, strength=strength,
              output_type="latent")  # fmt: skip
    expect = _ref(ref, scheduler, depth, seed=3, **kw).numpy()
    got = ours(**kw, depth_map=depth, seed=3, scheduler=scheduler, progress=False)
    assert got.shape == (2, 4, 10, 8)
    assert_rel(got, expect, TOL, f"depth2img {scheduler}, strength {strength}")


def test_images_per_prompt_one_map_per_prompt_and_decoded(depth_pair):
    """Seeded euler_a, one depth map per prompt, two images per prompt, decoded to [0, 1]."""
    ref, ours = depth_pair
    depth = _depth(64, 64, n=2, seed=2)
    kw = dict(prompt=PROMPTS, image=_image(seed=3), num_inference_steps=3, guidance_scale=6.0,
              num_images_per_prompt=2, output_type="np")  # fmt: skip
    expect = _ref(ref, "euler_a", depth, seed=11, **kw)
    got = ours(**kw, depth_map=depth, seed=11, scheduler="euler_a", progress=False)
    assert got.shape == expect.shape == (4, 64, 64, 3)
    assert_rel(got, expect, TOL, "depth2img euler_a, one map per prompt")


def test_depth_map_changes_the_result(depth_pair):
    """The depth channel is used: another map, another image (same seed)."""
    _, ours = depth_pair
    kw = dict(prompt=PROMPTS[0], image=_image(), num_inference_steps=2, output_type="latent",
              progress=False)  # fmt: skip
    a = ours(**kw, depth_map=_depth(seed=1))
    b = ours(**kw, depth_map=_depth(seed=2))
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()
    # only relative depth matters: a power-of-two scale changes no rounding, an offset a little
    assert np.array_equal(a, ours(**kw, depth_map=_depth(seed=1) * 4))
    assert_rel(ours(**kw, depth_map=_depth(seed=1) * 3 + 7), a, 1e-5, "depth map scale-free")


@pytest.mark.parametrize("guidance,rows", [(7.5, 2), (1.0, 1)])
def test_unet_rows_and_channels(depth_pair, guidance, rows):
    _, ours = depth_pair
    shapes, saved = [], ours.unet

    class Recording(_CountingUNet):
        def __call__(self, x, t, ctx, *args, **kw):
            shapes.append(x.shape)
            depth = np.asarray(x[:, 4])
            assert depth.min() == -1.0 and depth.max() == 1.0  # scaled per image
            return self.unet(x, t, ctx, *args, **kw)

    try:
        ours.unet = Recording(saved)
        ours("a cat", image=_image(), depth_map=_depth(), num_inference_steps=2,
             guidance_scale=guidance, output_type="latent", progress=False)  # fmt: skip
    finally:
        ours.unet = saved
    assert shapes and all(s == (rows, 5, 8, 8) for s in shapes)


def test_grayscale_image_depth_map_is_the_array(depth_pair):
    from PIL import Image

    _, ours = depth_pair
    d16 = (np.random.default_rng(0).random((64, 64)) * 60000).astype(np.uint16)
    kw = dict(prompt="a cat", image=_image(), num_inference_steps=2, output_type="latent",
              progress=False)  # fmt: skip
    got = ours(**kw, depth_map=Image.fromarray(d16))
    assert np.array_equal(got, ours(**kw, depth_map=d16.astype(np.float64)))


def test_device_path_on_fake_cupy(depth_folder):
    """The depth pipeline with every array on the (fake) device: NumPy's float64 result."""
    import fake_cupy

    kw = dict(prompt=PROMPTS[0], image=_image(), depth_map=_depth(), num_inference_steps=2,
              scheduler="ddim", seed=0, output_type="np", progress=False)  # fmt: skip
    expect = minisd.StableDiffusion.from_pretrained(depth_folder[0], dtype="float64")(**kw)
    with fake_cupy.installed():
        pipe = minisd.StableDiffusion.from_pretrained(
            depth_folder[0], dtype="float64", device="cuda"
        )
        got = pipe(**kw)
    assert type(got) is np.ndarray
    assert_rel(got, expect, 1e-12, "depth2img on fake_cupy")


def _bad_cases():
    flat = np.full((64, 64), 3.0)
    return [
        ({"depth_map": None}, "depth_map: a depth UNet needs"),
        ({"image": None}, "image: a depth UNet"),
        ({"mask_image": _mask()}, "mask_image: not supported with a depth UNet"),
        ({"depth_map": flat}, "depth_map: constant"),
        ({"depth_map": np.zeros((2, 3, 4, 4))}, "depth_map: shape"),
        ({"depth_map": np.array([[1.0, np.nan], [0.0, 2.0]])}, "NaN"),
        ({"depth_map": [np.ones((4, 4)), np.ones((5, 4))]}, "one size"),
        ({"depth_map": _image()}, "RGB image"),
        ({"depth_map": "depth.png"}, "got str"),
        ({"depth_map": _depth(n=3)}, "3 item(s) do not divide"),
    ]


@pytest.mark.parametrize("change,message", _bad_cases())
def test_bad_input_is_named(depth_pair, change, message):
    _, ours = depth_pair
    kw = dict(prompt=PROMPTS, image=_image(), depth_map=_depth(), num_inference_steps=2,
              output_type="latent", progress=False)  # fmt: skip
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ours(**{**kw, **change})


def test_depth_map_refused_by_other_unets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipes") / "sd1"
    build("sd1", folder)
    pipe = minisd.StableDiffusion.from_pretrained(folder)
    with pytest.raises(InputError, match="depth_map: only depth UNets"):
        pipe("a cat", image=_image(), depth_map=_depth(), num_inference_steps=1, progress=False)


def test_make_tiny_single_file_with_a_depth_estimator(tmp_path):
    """make_tiny's sd2-depth folder, converted to one original-layout file that also carries
    MiDaS keys (as 512-depth-ema.safetensors does): the estimator's keys are skipped without a
    warning and the result is the folder's (the full-size architecture and epsilon are inferred
    from shapes in test_weights_tools.py)."""
    import weights_tools as wt
    from minisd.weights import load_file, read_header
    from weights_tools.stream import tag_of, write_tensors

    folder = tmp_path / "depth"
    assert wt.make_tiny(folder, family="sd2-depth", seed=0)["family"] == "sd2-depth"
    single = tmp_path / "orig.safetensors"
    wt.to_original(folder, single)
    flat = load_file(single)
    flat["depth_model.model.pretrained.model.cls_token"] = np.ones((1, 1, 8), np.float32)
    bare = tmp_path / "512-depth.safetensors"
    meta = read_header(single)[1]  # the tiny widths are not inferable: keep the configs
    write_tensors(bare, [(k, tag_of(v), v.shape, v) for k, v in sorted(flat.items())], meta)
    kw = dict(prompt="a red sofa", image=_image(), depth_map=_depth(), num_inference_steps=2,
              output_type="latent", seed=1, progress=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = minisd.StableDiffusion.from_pretrained(bare)
    assert loaded.unet.config.in_channels == 5
    assert loaded.scheduler_config["prediction_type"] == "epsilon"
    expect = minisd.StableDiffusion.from_pretrained(folder)(**kw)
    np.testing.assert_array_equal(loaded(**kw), expect)
