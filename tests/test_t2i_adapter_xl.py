"""SDXL T2I-Adapters (adapter_type "full_adapter_xl", diffusers' FullAdapterXL) against
diffusers' T2IAdapter, every layer, every parameter randomized; the SDXL UNet taking the
fourth feature after its mid block (diffusers' "To support T2I-Adapter-XL" branch); and the
adapter / UNet fit check of minisd/pipeline_adapter.py.

The tiny adapters: SDXL's layout (one pooled block, body.2) at small widths, RGB and grayscale,
with five blocks (body.3 and body.4 keep their input's channels), and with two (no pooled
block at all). The full-size ones are TencentARC's t2i-adapter-*-sdxl-1.0 architectures
(channels 320, 640, 1280, 1280; downscale_factor 16; grayscale canny / sketch, RGB lineart /
depth / openpose).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
from refharness import TOL, assert_rel, diffusers_models, need, rand, rel_err, to_np, torch_dtype
from test_t2i_adapter import DTYPES, compare_adapter, image_for, tensor
from test_unet_xl import TIME_IDS, _compare, _inputs
from test_unet_xl import TINY as UNET_XL

from minisd import pipeline_adapter
from minisd.errors import ConfigError, InputError
from minisd.t2i_adapter import T2IAdapter, T2IAdapterConfig, param_shapes
from minisd.unet import UNet2DConditionModel, UNetConfig
from minisd.weights import RecordingDict, load_file

XL = dict(adapter_type="full_adapter_xl")
TINY = {  # "xl" fits test_unet_xl's tiny base UNet (channels 32, 64, 64)
    "xl": dict(in_channels=3, channels=(32, 64, 64, 64), num_res_blocks=2, downscale_factor=16,
               **XL),
    "xl_gray_5": dict(in_channels=1, channels=(16, 24, 32, 32, 32), num_res_blocks=1,
                      downscale_factor=4, **XL),
    "xl_short": dict(in_channels=3, channels=(8, 12), num_res_blocks=2, downscale_factor=8, **XL),
}  # fmt: skip
FULL = {  # TencentARC/t2i-adapter-{canny,lineart}-sdxl-1.0's config.json
    "canny_sdxl": dict(in_channels=1, channels=(320, 640, 1280, 1280), num_res_blocks=2,
                       downscale_factor=16, **XL),
    "lineart_sdxl": dict(in_channels=3, channels=(320, 640, 1280, 1280), num_res_blocks=2,
                         downscale_factor=16, **XL),
}  # fmt: skip
CASES = {  # (adapter, batch, image size / downscale_factor)
    "xl_8x8": ("xl", 2, (8, 8)),
    "xl_odd_7x5": ("xl", 1, (7, 5)),  # body.2's ceil-mode pool cuts its windows
    "xl_gray_5_blocks": ("xl_gray_5", 3, (6, 9)),
    "xl_short": ("xl_short", 2, (4, 6)),
}


@pytest.fixture(scope="module")
def tiny(ref_cache):
    return diffusers_models(ref_cache, "T2IAdapter", TINY, "t2i_xl", seed=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_every_layer_matches_diffusers(tiny, case, dtype):
    name, n, (h, w) = CASES[case]
    ref, folder = tiny(name)
    ours = T2IAdapter.from_pretrained(folder, dtype=dtype)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    errs, feats = compare_adapter(ours, ref, image_for(ours.config, n, h, w, dtype), dtype)
    cfg = ours.config
    assert len(errs) >= 2 * len(cfg.body()) * cfg.num_res_blocks  # every conv was compared
    assert "adapter.conv_in" in errs and "adapter.body.1.resnets.0.block2" in errs
    pooled = len(cfg.channels) > 2
    assert ("adapter.body.2.downsample" in errs) == pooled
    assert not any("body.1.downsample" in k or "body.3.downsample" in k for k in errs)
    assert [f.shape[1] for f in feats] == list(cfg.channels)
    assert feats[0].shape[2:] == feats[1].shape[2:] == (h, w)
    if pooled:
        assert feats[-1].shape[2:] == feats[2].shape[2:] == (-(-h // 2), -(-w // 2))
    assert ours.total_downscale_factor == ref.total_downscale_factor
    assert ours.downscale_factor == ref.downscale_factor
    print(f"\n{case} {dtype}: worst {max(errs.values()):.2e} over {len(errs)} outputs")


@pytest.fixture(scope="module")
def full_size(ref_cache):
    return diffusers_models(ref_cache, "T2IAdapter", FULL, "t2i_xl_full", seed=6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_size_adapter_matches_diffusers(full_size, dtype):
    """TencentARC's SDXL canny adapter architecture (79M parameters) at a 256 x 192 image:
    every layer and feature, float64 <= 1e-10, float32 <= 1e-4."""
    ref, folder = full_size("canny_sdxl")
    ours = T2IAdapter.from_pretrained(folder, dtype=dtype)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    errs, feats = compare_adapter(ours, ref, image_for(ours.config, 1, 16, 12, dtype), dtype)
    print(f"\ncanny_sdxl {dtype}: worst {max(errs.values()):.2e} over {len(errs)} outputs")
    shapes = [f.shape for f in feats]
    assert shapes == [(1, 320, 16, 12), (1, 640, 16, 12), (1, 1280, 8, 6), (1, 1280, 8, 6)]
    assert len(errs) > 30


@pytest.mark.parametrize("name", list(TINY) + list(FULL))
def test_key_table_matches_diffusers(name):
    """param_shapes(config) is exactly diffusers' state dict (built on the meta device)."""
    torch, diffusers = need("torch", "diffusers")
    with torch.device("meta"):
        ref = diffusers.T2IAdapter(**(TINY.get(name) or FULL[name]))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    cfg = T2IAdapterConfig.from_dict(dict(ref.config))
    assert param_shapes(cfg) == expected
    assert cfg.total_downscale_factor == ref.total_downscale_factor


@pytest.mark.parametrize("name", list(TINY))
def test_every_checkpoint_key_is_read(tiny, name):
    _, folder = tiny(name)
    ours = T2IAdapter.from_pretrained(folder)
    keys = set(load_file(folder / "diffusion_pytorch_model.safetensors"))
    ours.params = RecordingDict(ours.params)
    ours(image_for(ours.config, 1, 4, 4, "float32"))
    assert ours.params.reads == keys


@pytest.mark.parametrize("channels", [(8, 16, 16, 24), (8, 16, 32, 32, 16)])
def test_channels_diffusers_cannot_run_are_refused(channels):
    """FullAdapterXL's body.i (i >= 3) is C_i -> C_i with no in_conv: diffusers builds it and
    fails in forward when C_i-1 != C_i; minisd refuses the config."""
    with pytest.raises(ConfigError, match=r"channels.*full_adapter_xl.*channels\[\d\]") as e:
        T2IAdapterConfig.from_dict({"channels": list(channels), **XL}, source="a/config.json")
    assert "a/config.json" in str(e.value)


# --------------------------------------------------------------------------- the SDXL UNet


@pytest.fixture(scope="module")
def unet_xl(ref_cache):
    return diffusers_models(ref_cache, "UNet2DConditionModel", UNET_XL, "t2i_unet_xl", seed=5)


def xl_feature_shapes(n, h, w):
    """test_unet_xl's base UNet (DownBlock2D 32, CrossAttn 64, CrossAttn 64) at latents h x w:
    block 0's output after its downsampler, block 1's last layer, block 2's, the mid block's."""
    h2, w2 = -(-h // 2), -(-w // 2)
    h4, w4 = -(-h2 // 2), -(-w2 // 2)
    return [(n, 32, h2, w2), (n, 64, h2, w2), (n, 64, h4, w4), (n, 64, h4, w4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k, size", [(4, (8, 12)), (4, (9, 7)), (3, (8, 8))])
def test_sdxl_unet_takes_the_features_as_diffusers(unet_xl, dtype, k, size):
    """diffusers' SDXL UNet with 4 features (the fourth added to the mid block's output) or 3
    (the mid block left alone): every layer; the caller's list is left as it was."""
    ref, folder = unet_xl("base")
    ours = UNet2DConditionModel.from_pretrained(folder, dtype=dtype)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    x, ctx, added = _inputs(ours.config, TIME_IDS["base"], *size, dtype)
    shapes = xl_feature_shapes(2, *size)[:k]
    feats = [rand(*s, seed=30 + i).astype(dtype) for i, s in enumerate(shapes)]
    given = list(feats)
    call = _with_features(ours, feats, added)
    ref_call = _RefWithFeatures(ref, [tensor(f) for f in feats])
    errs = _compare(call, ref_call, x, np.array([999, 37]), ctx, added, dtype)
    assert len(errs) > 100 and len(feats) == k and all(a is b for a, b in zip(feats, given))
    print(f"\nSDXL UNet with {k} features {dtype}: worst {max(errs.values()):.2e}")
    t = np.array([999, 37])
    with_all = ours(x, t, ctx, down_intrablock_additional_residuals=feats, added_cond_kwargs=added)
    without_mid = ours(x, t, ctx, down_intrablock_additional_residuals=feats[:3],
                       added_cond_kwargs=added)  # fmt: skip
    assert (rel_err(with_all, without_mid) > 1e-3) == (k == 4)


def _with_features(unet, feats, added):
    def call(x, t, ctx, *rest):
        return unet(x, t, ctx, down_intrablock_additional_residuals=feats, added_cond_kwargs=added)

    return call


class _RefWithFeatures:
    """diffusers' UNet called with down_intrablock_additional_residuals (a fresh list: it pops
    from it), everything else forwarded (named_modules, time_proj hooks)."""

    def __init__(self, ref, feats):
        self.ref, self.feats = ref, feats

    def __getattr__(self, name):
        return getattr(self.ref, name)

    def __call__(self, *a, **k):
        return self.ref(*a, **k, down_intrablock_additional_residuals=list(self.feats))


def test_xl_adapter_drives_the_sdxl_unet_as_in_diffusers(tiny, unet_xl):
    """Our SDXL adapter's scaled features into our SDXL UNet == diffusers' into diffusers'."""
    torch = need("torch")
    unet_ref, folder = unet_xl("base")
    unet = UNet2DConditionModel.from_pretrained(folder, dtype="float32")
    ref, afolder = tiny("xl")
    adapter = T2IAdapter.from_pretrained(afolder, dtype="float32")
    x, ctx, added = _inputs(unet.config, TIME_IDS["base"], 8, 6, "float32")
    img = image_for(adapter.config, 2, 4, 3, "float32")  # a 64 x 48 image: latents 8 x 6
    t = np.array([3, 900])
    with torch.no_grad():
        feats = [f * 0.8 for f in ref(tensor(img))]
        r = unet_ref(tensor(x), tensor(t), tensor(ctx), down_intrablock_additional_residuals=feats,
                     added_cond_kwargs={k: tensor(v) for k, v in added.items()}).sample  # fmt: skip
    scaled = [f * 0.8 for f in adapter(img)]
    eps = unet(x, t, ctx, down_intrablock_additional_residuals=scaled, added_cond_kwargs=added)
    err = assert_rel(eps, to_np(r), TOL["float32"], "eps with SDXL adapter features")
    print(f"\nadapter -> SDXL UNet float32: {err:.2e}")
    assert rel_err(unet(x, t, ctx, added_cond_kwargs=added), eps) > 1e-2


def test_sdxl_unet_intrablock_input_errors(unet_xl):
    _, folder = unet_xl("base")
    unet = UNet2DConditionModel.from_pretrained(folder)
    x, ctx, added = _inputs(unet.config, TIME_IDS["base"], 8, 8, "float32")
    feats = [rand(*s).astype(np.float32) for s in xl_feature_shapes(2, 8, 8)]
    kw = dict(added_cond_kwargs=added)
    unet(x, 1, ctx, down_intrablock_additional_residuals=feats, **kw)  # the valid call
    with pytest.raises(InputError, match="3 down blocks.*and one for the mid block"):
        unet(x, 1, ctx, down_intrablock_additional_residuals=feats + feats[-1:], **kw)
    bad = feats[:3] + [feats[3][:, :, :-1]]
    with pytest.raises(InputError, match=r"residuals\[3\].*\(mid_block\)"):
        unet(x, 1, ctx, down_intrablock_additional_residuals=bad, **kw)


# --------------------------------------------------------------------------- fit check


def _unet_config(name):
    from test_unet import TINY as UNET_SD

    return UNetConfig.from_dict(dict((UNET_XL | UNET_SD)[name]))


def _pipe(unet_name, *adapters):
    adapter = list(adapters) if len(adapters) > 1 else adapters[0]
    unet = SimpleNamespace(config=_unet_config(unet_name))
    return SimpleNamespace(adapter=adapter, unet=unet, vae_scale_factor=8)


def _adapter(cfg, source):
    c = T2IAdapterConfig.from_dict(cfg, source=source)
    return SimpleNamespace(config=c, downscale_factor=c.downscale_factor)


def test_unet_slots_are_where_the_unet_adds_features():
    assert pipeline_adapter.unet_slots(_unet_config("base"), 8) == [
        (32, 16), (64, 16), (64, 32), (64, 32),
    ]  # fmt: skip
    sdxl = UNetConfig(
        block_out_channels=(320, 640, 1280), down_block_types=UNET_XL["base"]["down_block_types"],
        up_block_types=UNET_XL["base"]["up_block_types"],
    )  # fmt: skip
    real = T2IAdapterConfig.from_dict(FULL["canny_sdxl"])
    assert pipeline_adapter.unet_slots(sdxl, 8) == real.features()
    sd15 = UNetConfig()  # diffusers' defaults: SD1.x
    sd_adapter = T2IAdapterConfig(channels=(320, 640, 1280, 1280))  # t2iadapter_*_sd15v2
    assert pipeline_adapter.unet_slots(sd15, 8)[:4] == sd_adapter.features()


def test_fit_check_refuses_sd_adapters_on_sdxl_and_vice_versa():
    xl = _adapter(TINY["xl"], "xl/config.json")
    sd = _adapter(dict(channels=(32, 64, 64, 64)), "sd/config.json")
    pipeline_adapter.check_fits(_pipe("base", xl))  # fits
    pipeline_adapter.check_fits(_pipe("base", xl, xl))
    with pytest.raises(ConfigError, match=r"^adapter \(sd/config.json\): an SD1.x / SD2.x") as e:
        pipeline_adapter.check_fits(_pipe("base", sd))
    assert "an SDXL UNet" in str(e.value)
    with pytest.raises(ConfigError, match=r"adapter\[1\] \(sd/config.json\)"):
        pipeline_adapter.check_fits(_pipe("base", xl, sd))
    sd_unet_adapter = _adapter(dict(channels=(32, 64, 64)), "sd1/config.json")
    pipeline_adapter.check_fits(_pipe("sd1", sd_unet_adapter))
    with pytest.raises(ConfigError, match=r"adapter \(xl/config.json\): an SDXL T2I-Adapter"):
        pipeline_adapter.check_fits(_pipe("sd1", xl))
    too_many = _adapter({**TINY["xl"], "channels": (32, 64, 64, 64, 64)}, "five/config.json")
    with pytest.raises(ConfigError, match="five/config.json"):
        pipeline_adapter.check_fits(_pipe("base", too_many))


def test_round_size_follows_the_adapter_downscale_factor():
    pipe = _pipe("base", _adapter(TINY["xl"], "xl"))
    a = SimpleNamespace(adapter_image="img", image=None, control_image=None, height=None,
                        width=None)  # fmt: skip
    assert pipeline_adapter.round_size(pipe, a, 1000, 776) == (992, 768)
    a.height = 1000
    assert pipeline_adapter.round_size(pipe, a, 1000, 776) == (1000, 768)
    a.image = "init"  # img2img: ``image`` set the size
    assert pipeline_adapter.round_size(pipe, a, 1000, 776) == (1000, 776)
