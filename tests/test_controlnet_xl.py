"""SDXL ControlNets (diffusers' ControlNetModel with addition_embed_type "text_time", as
diffusers/controlnet-canny-sdxl-1.0 and its -mid / -small variants) against diffusers: every
named module and the residuals, float64 and float32, tiny and at SDXL's widths; the key table;
the residuals driving an SDXL UNet as in diffusers; errors.

Every parameter of the reference is randomized (zero convolutions, norms and add_embedding
included). Precision islands: time_proj and add_time_proj are float32 sinusoids in every model
dtype (minisd/controlnet.py); in float64 runs the reference continues from minisd's, each held
to its own bound (test_controlnet.compare_controlnet).
"""

from __future__ import annotations

import copy
import gc

import numpy as np
import pytest
from refharness import (
    TOL,
    assert_rel,
    diffusers_models,
    need,
    rand,
    randomize_,
    rel_err,
    save_pretrained,
    to_np,
    torch_dtype,
)
from test_controlnet import TINY as SD_TINY
from test_controlnet import build_full_size, compare_controlnet, make_inputs, tensor
from test_unet_xl import TINY as UNET_XL

from minisd.controlnet import ControlNetConfig, ControlNetModel, param_shapes
from minisd.errors import ConfigError, InputError
from minisd.unet import UNet2DConditionModel
from minisd.weights import RecordingDict, load_file

DTYPES = ["float64", "float32"]
_XL = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    attention_head_dim=(2, 4, 4), use_linear_projection=True, cross_attention_dim=48,
    norm_num_groups=8, conditioning_embedding_out_channels=(8, 8, 16, 16),
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)  # fmt: skip
TINY = {
    # SDXL's layout: no attention at the top level (its depth 0 is unused), depth 2 at the
    # last level, which is also the mid block's depth (diffusers: transformer_layers_per_block[-1])
    "base": {**_XL, "transformer_layers_per_block": (0, 1, 2)},
    # diffusers' "-mid" ControlNets: a depth-0 Transformer2D (norm, proj_in, proj_out only)
    "mid": {**_XL, "transformer_layers_per_block": (0, 0, 1)},
    # "-small": no attention in the down blocks, only in the mid block; five time ids
    "small": {
        **_XL, "down_block_types": ("DownBlock2D",) * 3, "layers_per_block": 1,
        "transformer_layers_per_block": (0, 0, 1), "addition_time_embed_dim": 16,
        "projection_class_embeddings_input_dim": 24 + 5 * 16,
    },
}  # fmt: skip
IDS = {  # (original_size, crop, target_size) per row; five numbers: the refiner's layout
    6: np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 832, 1216]], float),
    5: np.array([[1024, 1024, 0, 0, 6.0], [512, 768, 16, 0, 2.5]]),
}
# case: (tiny model, batch, (h, w), timestep, call options; "image_batch": control images)
CASES = {
    "base_per_item_t": ("base", 2, (8, 8), np.array([999, 37]), {}),
    "base_guess_mode": ("base", 2, (8, 8), 10, {"guess_mode": True, "conditioning_scale": 0.7}),
    "base_one_image": ("base", 2, (8, 12), 500, {"conditioning_scale": 0.5, "image_batch": 1}),
    "mid_depth_0": ("mid", 2, (8, 8), 700, {}),
    "small_odd_guess": ("small", 1, (6, 10), 250, {"guess_mode": True, "conditioning_scale": 1.3}),
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(ref_cache):
    return diffusers_models(ref_cache, "ControlNetModel", TINY, "controlnet_xl", seed=3)


def added_kwargs(cfg, n, dtype, k=6):
    """{"text_embeds": (n, P), "time_ids": (n, k)}, ``dtype`` arrays: k time ids per row, the
    pooled width P what ``cfg``'s projection_class_embeddings_input_dim leaves for the text."""
    pooled = cfg.projection_class_embeddings_input_dim - k * cfg.addition_time_embed_dim
    text = rand(n, pooled, seed=4).astype(dtype)
    return {"text_embeds": text, "time_ids": IDS[k][np.arange(n) % 2].astype(dtype)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_every_layer_matches_diffusers(tiny, case, dtype):
    name, n, (h, w), t, opts = CASES[case]
    opts = dict(opts)
    ref, folder = tiny(name)
    ours = ControlNetModel.from_pretrained(folder, dtype=dtype)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    x, ctx, img, _ = make_inputs(
        ours.config, n, h, w, dtype, image_batch=opts.pop("image_batch", None)
    )
    added = added_kwargs(ours.config, n, dtype, k=5 if name == "small" else 6)
    errs, _ = compare_controlnet(ours, ref, x, t, ctx, img, None, dtype, added=added, **opts)
    assert {"add_embedding.linear_1", "add_embedding.linear_2", "add_embedding"} <= set(errs)
    assert "controlnet_cond_embedding.conv_out" in errs and "controlnet_mid_block" in errs
    assert len(errs) > 30


@pytest.mark.parametrize("name", list(TINY))
def test_every_checkpoint_key_is_read(tiny, name):
    """A forward pass reads every key of the checkpoint (add_embedding too), and nothing else."""
    _, folder = tiny(name)
    cn = ControlNetModel.from_pretrained(folder)
    keys = set(load_file(folder / "diffusion_pytorch_model.safetensors"))
    assert "add_embedding.linear_2.bias" in keys
    cn.params = RecordingDict(cn.params)
    x, ctx, img, _ = make_inputs(cn.config, 2, 4, 4, "float32")
    added = added_kwargs(cn.config, 2, "float32", k=5 if name == "small" else 6)
    cn(x, 10, ctx, img, added_cond_kwargs=added)
    assert cn.params.reads == keys


# diffusers/controlnet-canny-sdxl-1.0's config.json as published (upcast_attention null, the
# unused addition_embed_type_num_heads); its depths [1, 2, 10] make the mid block 10 deep.
SDXL_CANNY = {
    "_class_name": "ControlNetModel", "_diffusers_version": "0.20.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "class_embed_type": None, "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "global_pool_conditions": False, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "projection_class_embeddings_input_dim": 2816, "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": [1, 2, 10], "upcast_attention": None,
    "use_linear_projection": True,
}  # fmt: skip
FULL = {
    "sdxl_canny": SDXL_CANNY,
    "sdxl_mid_like": {**SDXL_CANNY, "transformer_layers_per_block": [0, 0, 1]},
    "sdxl_small_like": {
        **SDXL_CANNY, "down_block_types": ["DownBlock2D"] * 3,
        "transformer_layers_per_block": [0, 0, 1],
    },
}  # fmt: skip


@pytest.mark.parametrize("name", list(TINY) + list(FULL))
def test_key_table_matches_diffusers(name):
    """param_shapes(config) is exactly diffusers' state dict (built on the meta device), the
    published SDXL config parsed as it is."""
    torch, diffusers = need("torch", "diffusers")
    config = TINY.get(name) or FULL[name]
    with torch.device("meta"):
        ref = diffusers.ControlNetModel.from_config(config)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = param_shapes(ControlNetConfig.from_dict(dict(config)))
    assert ours == expected
    assert (
        ours["add_embedding.linear_1.weight"][1] == config["projection_class_embeddings_input_dim"]
    )
    mid_depth = {
        k.split(".")[4] for k in ours if k.startswith("mid_block.attentions.0.transformer_blocks.")
    }
    assert len(mid_depth) == config["transformer_layers_per_block"][-1]


# --------------------------------------------------------------------------- with the UNet


@pytest.mark.parametrize("guess_mode", [False, True])
def test_residuals_drive_the_sdxl_unet_as_in_diffusers(ref_cache, guess_mode):
    """Our SDXL ControlNet's residuals into our SDXL UNet == diffusers' into diffusers' (float32),
    both models fed the same added_cond_kwargs (as StableDiffusionXLControlNetPipeline does); the
    ControlNet is diffusers' ControlNetModel.from_unet of tests/test_unet_xl.py's tiny base UNet
    (text_time, per-block depths [1, 2, 3]), then randomized."""
    torch, diffusers = need("torch", "diffusers")
    get = diffusers_models(ref_cache, "UNet2DConditionModel", UNET_XL, "cnxl_e2e_unet", seed=5)
    unet_ref, unet_folder = get("base")
    cn_ref = diffusers.ControlNetModel.from_unet(
        unet_ref, conditioning_embedding_out_channels=(8, 16, 16, 32)
    )
    assert cn_ref.config.addition_embed_type == "text_time"
    cn_ref = randomize_(cn_ref, seed=6).eval()
    cn_folder = save_pretrained(cn_ref, ref_cache / f"cnxl_e2e_{guess_mode}")
    unet = UNet2DConditionModel.from_pretrained(unet_folder, dtype="float32")
    cn = ControlNetModel.from_pretrained(cn_folder, dtype="float32")
    x, ctx, img, _ = make_inputs(cn.config, 2, 8, 8, "float32")
    added = added_kwargs(cn.config, 2, "float32")
    t = np.array([3, 900])
    down, mid = cn(x, t, ctx, img, 0.8, guess_mode, added_cond_kwargs=added)
    eps = unet(x, t, ctx, down, mid, added_cond_kwargs=added)
    with torch.no_grad():
        args = (tensor(x), tensor(t), tensor(ctx))
        ref_added = {k: tensor(v) for k, v in added.items()}
        rd, rm = cn_ref(
            *args, tensor(img), conditioning_scale=0.8, guess_mode=guess_mode,
            added_cond_kwargs=ref_added, return_dict=False,
        )  # fmt: skip
        r = unet_ref(
            *args, down_block_additional_residuals=rd, mid_block_additional_residual=rm,
            added_cond_kwargs=ref_added,
        ).sample  # fmt: skip
        plain = unet_ref(*args, added_cond_kwargs=ref_added).sample
    assert_rel(eps, to_np(r), TOL["float32"], "eps with SDXL ControlNet residuals")
    assert rel_err(to_np(plain), to_np(r)) > 1e-2  # the control changes eps


def test_micro_conditioning_changes_the_residuals(tiny):
    """The time ids and the pooled embedding both reach the residuals (nothing dropped)."""
    _, folder = tiny("base")
    cn = ControlNetModel.from_pretrained(folder)
    x, ctx, img, _ = make_inputs(cn.config, 1, 8, 8, "float32")
    added = added_kwargs(cn.config, 1, "float32")
    _, base = cn(x, 500, ctx, img, added_cond_kwargs=added)
    other_ids = {**added, "time_ids": added["time_ids"] + np.float32(64)}
    other_text = {**added, "text_embeds": -added["text_embeds"]}
    for changed in (other_ids, other_text):
        _, mid = cn(x, 500, ctx, img, added_cond_kwargs=changed)
        assert rel_err(mid, base) > 1e-3


def test_array_backend_matches_diffusers(tiny, xp):
    """The same SDXL ControlNet on each array backend (NumPy; CuPy's code path, faked on the CPU
    and on a GPU where one exists), float32, added_cond_kwargs given as device arrays."""
    torch = need("torch")
    from minisd.backend import to_numpy

    ref, folder = tiny("mid")
    device = "cpu" if xp is np else "cuda"
    cn = ControlNetModel.from_pretrained(folder, dtype="float32", device=device)
    x, ctx, img, _ = make_inputs(cn.config, 2, 6, 10, "float32")
    added = added_kwargs(cn.config, 2, "float32")
    t = np.array([7, 700])
    dev = {k: xp.asarray(v) for k, v in added.items()}
    args = (xp.asarray(x), xp.asarray(t), xp.asarray(ctx), xp.asarray(img), 0.9, True)
    downs, mid = cn(*args, added_cond_kwargs=dev)
    assert isinstance(mid, xp.ndarray) and all(isinstance(d, xp.ndarray) for d in downs)
    with torch.no_grad():
        rd, rm = ref(
            tensor(x), tensor(t), tensor(ctx), tensor(img), 0.9, guess_mode=True,
            added_cond_kwargs={k: tensor(v) for k, v in added.items()}, return_dict=False,
        )  # fmt: skip
    assert_rel(to_numpy(mid), to_np(rm), TOL["float32"], "mid")
    for k, (d, r) in enumerate(zip(downs, rd)):
        assert_rel(to_numpy(d), to_np(r), TOL["float32"], f"down {k}")


# --------------------------------------------------------------------------- errors


def test_added_cond_kwargs_errors(tiny, ref_cache):
    _, folder = tiny("base")
    cn = ControlNetModel.from_pretrained(folder)
    x, ctx, img, _ = make_inputs(cn.config, 2, 8, 8, "float32")
    added = added_kwargs(cn.config, 2, "float32")
    cn(x, 1, ctx, img, added_cond_kwargs=added)  # the valid call
    need_it = "added_cond_kwargs: this ControlNetModel has addition_embed_type='text_time'"
    with pytest.raises(InputError, match=need_it):
        cn(x, 1, ctx, img)
    with pytest.raises(InputError, match=need_it):
        cn(x, 1, ctx, img, added_cond_kwargs={"text_embeds": added["text_embeds"]})
    bad = {**added, "time_ids": added["time_ids"][:, :5]}
    with pytest.raises(InputError, match="projection_class_embeddings_input_dim 80"):
        cn(x, 1, ctx, img, added_cond_kwargs=bad)
    with pytest.raises(InputError, match="2 rows"):
        cn(x, 1, ctx, img, added_cond_kwargs={**added, "time_ids": added["time_ids"][:1]})
    _, sd_folder = diffusers_models(ref_cache, "ControlNetModel", SD_TINY, "cnxl_sd", seed=2)("sd1")
    sd = ControlNetModel.from_pretrained(sd_folder)
    x, ctx, img, _ = make_inputs(sd.config, 2, 8, 8, "float32")
    with pytest.raises(InputError, match="added_cond_kwargs: this ControlNetModel has no addition"):
        sd(x, 1, ctx, img, added_cond_kwargs=added)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"addition_embed_type": "text"}, "addition_embed_type='text' is not supported"),
        ({"addition_embed_type": "text_image"}, "addition_embed_type='text_image' is not"),
        ({"addition_time_embed_dim": None}, "'text_time' needs addition_time_embed_dim"),
        ({"projection_class_embeddings_input_dim": None}, "'text_time' needs addition_time"),
        ({"addition_time_embed_dim": 0}, "addition_time_embed_dim=0"),
        ({"projection_class_embeddings_input_dim": 2.5}, "projection_class_embeddings_input_dim"),
        ({"transformer_layers_per_block": (0, -1, 2)}, r"transformer_layers_per_block=\(0, -1"),
        ({"transformer_layers_per_block": (1, 2)}, "transformer_layers_per_block.*3 ints"),
        ({"class_embed_type": "projection"}, "class_embed_type"),
    ],
)
def test_bad_configs_are_refused(change, match):
    with pytest.raises(ConfigError, match=match) as e:
        ControlNetConfig.from_dict({**TINY["base"], **change}, source="controlnet/config.json")
    assert "controlnet/config.json" in str(e.value)


# --------------------------------------------------------------------------- SDXL widths

# SDXL's widths (320/640/1280 channels, heads of 64, a 2048-wide context, 2816 = 1280 pooled +
# 6 x 256), the published depths [1, 2, 10] cut to [1, 2, 1] so that the float64 reference
# (about 0.4e9 parameters instead of 1.25e9) stays small and quick.
FULL_XL = {**SDXL_CANNY, "transformer_layers_per_block": [1, 2, 1]}


@pytest.mark.slow
def test_sdxl_widths_every_layer():
    """At 8x8 latents (a 64x64 control image), batch 2, guess mode with scale 0.6, float64 then
    float32; ours shares the reference's memory (no files)."""
    config = {k: v for k, v in FULL_XL.items() if not k.startswith("_")}
    ref = build_full_size(config, seed=8)
    try:
        for dtype in DTYPES:
            ref = ref.to(torch_dtype(dtype))
            flat = {k: to_np(v) for k, v in ref.state_dict().items()}
            ours = ControlNetModel(dict(ref.config), flat)
            x, _, img, _ = make_inputs(ours.config, 2, 8, 8, dtype)
            ctx = rand(2, 77, 2048, seed=1).astype(dtype)
            added = added_kwargs(ours.config, 2, dtype)
            errs, _ = compare_controlnet(
                ours, ref, x, np.array([999, 20]), ctx, img, None, dtype, added=added,
                guess_mode=True, conditioning_scale=0.6,
            )  # fmt: skip
            assert len(errs) > 150 and "add_embedding" in errs
            del ours, flat
            gc.collect()
    finally:
        del ref
        gc.collect()
