"""ControlNetModel against diffusers: every named module's output and the returned residuals.

Every parameter of the reference is randomized (refharness.randomize_), the zero-initialized
ones too (controlnet_down_blocks, controlnet_mid_block, controlnet_cond_embedding.conv_out),
which would otherwise hide a dropped or misplaced term behind zeros.

Reference precision islands (minisd/controlnet.py): ``time_proj`` is float32 in every model
dtype, handled as in tests/test_unet.py (held to its own bound; in float64 runs the reference
continues from minisd's time_proj, so every later layer is held to 1e-10); the guess-mode
scales are float32 (torch.logspace in the default dtype), which minisd reproduces bit for bit.

The LCM case has no diffusers ControlNetModel to compare with (it takes no time_cond_proj_dim):
its reference is a diffusers ControlNetModel whose time_embedding is replaced by diffusers'
TimestepEmbedding(..., cond_proj_dim), which its forward then calls with timestep_cond.
"""

from __future__ import annotations

import copy
import gc
import json

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
    rand,
    randomize_,
    rel_err,
    save_pretrained,
    to_np,
    torch_dtype,
)
from test_unet import TINY as UNET_TINY
from test_unet_blocks import traced_names

import minisd
from minisd.controlnet import ControlNetConfig, ControlNetModel, guess_mode_scales, param_shapes
from minisd.errors import ConfigError, InputError
from minisd.unet import UNet2DConditionModel
from minisd.weights import RecordingDict, load_file
from minisd_parity.compare import time_proj_bound

DTYPES = ["float64", "float32"]

_SD1 = dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,  # SD1 meaning: 4 heads in every block
    norm_num_groups=8,
    conditioning_embedding_out_channels=(8, 8, 16, 16),  # 3 stride-2 convs: image = 8x latents
)
TINY = {
    "sd1": _SD1,
    "sd2": {  # linear projections, heads per block, upcast, 2 transformer layers in block 1
        **_SD1,
        "layers_per_block": 1,
        "attention_head_dim": (2, 4, 4),
        "use_linear_projection": True,
        "upcast_attention": True,
        "cross_attention_dim": 48,
        "transformer_layers_per_block": (1, 2, 1),
    },
    "bgr": {**_SD1, "controlnet_conditioning_channel_order": "bgr"},
    "pool": {**_SD1, "global_pool_conditions": True},  # shuffle ControlNets
    "lcm": {**_SD1, "time_cond_proj_dim": 24},  # minisd's extension (module docstring)
    "variants": {  # every other supported config value
        **_SD1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "num_attention_heads": (2, 4, 8),
        "layers_per_block": 1,
        "mid_block_type": "UNetMidBlock2D",
        "mid_block_scale_factor": 1.5,
        "resnet_time_scale_shift": "scale_shift",
        "downsample_padding": 0,
        "conditioning_channels": 1,
        "conditioning_embedding_out_channels": (8, 16),  # image = 2x latents
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "norm_eps": 1e-6,
    },
}
# case: (tiny model, batch, (h, w), timestep, call options; "image_batch": control images)
CASES = {
    "sd1_8x8": ("sd1", 2, (8, 8), 500, {}),
    "sd1_odd_13x19": ("sd1", 1, (13, 19), 999, {}),
    "sd2_batch3_per_item_t": ("sd2", 3, (8, 12), np.array([1.5, 500.0, 999.0]), {}),
    "bgr_one_image_for_batch": ("bgr", 2, (8, 8), 250, {"image_batch": 1}),
    "guess_mode": ("sd1", 2, (8, 8), 10, {"guess_mode": True, "conditioning_scale": 0.7}),
    "conditioning_scale_half": ("sd1", 1, (8, 8), 700, {"conditioning_scale": 0.5}),
    "global_pool": ("pool", 2, (8, 8), 300, {"guess_mode": True, "conditioning_scale": 0.8}),
    "lcm_timestep_cond": ("lcm", 2, (8, 8), np.array([999, 259]), {"timestep_cond": True}),
    "variants": ("variants", 2, (6, 10), 42, {}),
}


def make_reference(config):
    """A diffusers ControlNetModel for ``config`` (for time_cond_proj_dim: with an LCM-style
    TimestepEmbedding swapped in, see the module docstring). Not yet randomized."""
    torch, diffusers = need("torch", "diffusers")
    from diffusers.models.embeddings import TimestepEmbedding

    config = dict(config)
    cond_dim = config.pop("time_cond_proj_dim", None)
    torch.manual_seed(0)
    model = diffusers.ControlNetModel(**config)
    if cond_dim:
        c0 = model.config.block_out_channels[0]
        model.time_embedding = TimestepEmbedding(c0, 4 * c0, cond_proj_dim=cond_dim)
    return model


@pytest.fixture(scope="module")
def tiny(ref_cache):
    """name -> (randomized float32 reference, its save_pretrained folder)."""
    cache = {}

    def get(name):
        if name not in cache:
            ref = randomize_(make_reference(TINY[name]), seed=2).eval()
            folder = save_pretrained(ref, ref_cache / f"controlnet_{name}")
            if "time_cond_proj_dim" in TINY[name]:
                cfg = json.loads((folder / "config.json").read_text())
                cfg["time_cond_proj_dim"] = TINY[name]["time_cond_proj_dim"]
                (folder / "config.json").write_text(json.dumps(cfg))
            cache[name] = (ref, folder)
        return cache[name]

    return get


def make_inputs(cfg, n, h, w, dtype, *, image_batch=None, timestep_cond=False):
    """Latents, prompt embedding, control image in [0, 1] (8x the latents) and, for LCM, a
    guidance embedding, as ``dtype`` arrays."""
    f = cfg.cond_factor
    x = rand(n, cfg.in_channels, h, w).astype(dtype)
    ctx = rand(n, 7, cfg.cross_attention_dim, seed=1).astype(dtype)
    shape = (image_batch or n, cfg.conditioning_channels, f * h, f * w)
    img = np.random.RandomState(2).uniform(size=shape).astype(dtype)
    cond = rand(n, cfg.time_cond_proj_dim, seed=3).astype(dtype) if timestep_cond else None
    return x, ctx, img, cond


def tensor(a):
    torch = need("torch")
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


def compare_controlnet(ours, ref, x, t, ctx, img, cond, dtype, *, added=None, **kw):
    """Run both; compare every traced module (time_proj island rule of the module docstring;
    for SDXL ControlNets, ``added`` = added_cond_kwargs, the same rule for add_time_proj, bound
    by the time ids) and the returned residuals. Returns ({name: error}, (our downs, our
    mid))."""
    with minisd.trace() as acts:
        downs, mid = ours(x, t, ctx, img, timestep_cond=cond, added_cond_kwargs=added, **kw)
    tt = tensor(t) if isinstance(t, np.ndarray) else t
    islands = {"time_proj": t}
    if added is not None:
        islands["add_time_proj"] = added["time_ids"]
        kw["added_cond_kwargs"] = {k: tensor(v) for k, v in added.items()}

    def call():
        return ref(
            tensor(x), tt, tensor(ctx), tensor(img), timestep_cond=tensor(cond),
            return_dict=False, **kw,
        )  # fmt: skip

    errs = check_residuals(ref, call, acts, islands, (downs, mid), dtype)
    return errs, (downs, mid)


def check_residuals(ref, call, acts, islands, ours, dtype):
    """``call()`` runs the reference (hooks on every module; in float64 it continues from
    minisd's float32 ``islands``, each held to time_proj_bound(islands[name])); then every
    traced module and the residuals ``ours`` = (downs, mid) are compared. -> {name: error}."""
    torch = need("torch")
    with torch.no_grad(), collect_outputs(ref) as racts:
        hooks = []
        if dtype == "float64":  # the reference continues from minisd's float32 sinusoids
            for name in islands:
                v = torch.from_numpy(acts[name])
                hooks.append(getattr(ref, name).register_forward_hook(lambda m, i, o, v=v: v))
        try:
            rd, rm = call()
        finally:
            for hook in hooks:
                hook.remove()
    names = traced_names(ref, racts)
    assert not set(acts) - set(racts), f"names no diffusers module has: {set(acts) - set(racts)}"
    for name, bound_by in islands.items():
        err = np.abs(acts[name] - racts[name]).max()
        assert acts[name].dtype == np.float32 and err <= time_proj_bound(bound_by), name
        names.remove(name)
    tol, (downs, mid) = TOL[dtype], ours
    errs = compare_traces(acts, racts, tol, names)
    assert isinstance(downs, list) and len(downs) == len(rd)
    for k, (d, r) in enumerate(zip(downs, rd)):
        errs[f"<down {k}>"] = assert_rel(d, to_np(r), tol, f"down_block_res_samples[{k}]")
        assert d.dtype == np.dtype(dtype)
    errs["<mid>"] = assert_rel(mid, to_np(rm), tol, "mid_block_res_sample")
    return errs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_every_layer_matches_diffusers(tiny, case, dtype):
    name, n, (h, w), t, opts = CASES[case]
    opts = dict(opts)
    ref, folder = tiny(name)
    ours = ControlNetModel.from_pretrained(folder, dtype=dtype)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    extra = {k: opts.pop(k) for k in ("image_batch", "timestep_cond") if k in opts}
    x, ctx, img, cond = make_inputs(ours.config, n, h, w, dtype, **extra)
    errs, (downs, mid) = compare_controlnet(ours, ref, x, t, ctx, img, cond, dtype, **opts)
    assert len(errs) > 40  # every resnet / attention / zero-conv / embedding conv was compared
    assert "controlnet_cond_embedding.conv_out" in errs and "controlnet_mid_block" in errs
    if ours.config.global_pool_conditions:
        assert mid.shape[2:] == (1, 1) and all(d.shape[2:] == (1, 1) for d in downs)


def test_guess_mode_scales_are_torch_logspace_in_float32():
    """The float32 island: minisd's scales equal torch.logspace(-1, 0, n + 1) * scale bit for
    bit (n = 12 down residuals in SD; 13 scales from 0.1 to 1)."""
    torch = need("torch")
    for n in range(1, 40):
        for s in (1.0, 0.7, 0.3, 1.3):
            ref = (torch.logspace(-1, 0, n + 1) * s).numpy()
            assert guess_mode_scales(n, s) == ref.tolist()
    g = guess_mode_scales(12, 1.0)
    assert len(g) == 13 and g[0] == np.float32(0.1) and g[-1] == 1.0


# --------------------------------------------------------------------------- with the UNet


@pytest.mark.parametrize("guess_mode, pool", [(False, False), (True, False), (True, True)])
def test_residuals_drive_the_unet_as_in_diffusers(ref_cache, guess_mode, pool):
    """Our ControlNet's residuals into our UNet == diffusers' into diffusers' (float32), with a
    ControlNet made by diffusers' ControlNetModel.from_unet for tests/test_unet.py's tiny SD1
    UNet (then randomized). pool: global_pool_conditions (shuffle ControlNets), whose (N, C,
    1, 1) residuals the UNet broadcasts over its skip states."""
    torch, diffusers = need("torch", "diffusers")
    get = diffusers_models(ref_cache, "UNet2DConditionModel", UNET_TINY, "cn_e2e_unet", seed=1)
    unet_ref, unet_folder = get("sd1")
    cn_ref = diffusers.ControlNetModel.from_unet(
        unet_ref, conditioning_embedding_out_channels=(8, 16, 16, 32)
    )
    if pool:
        cn_ref.register_to_config(global_pool_conditions=True)
    cn_ref = randomize_(cn_ref, seed=5).eval()
    cn_folder = save_pretrained(cn_ref, ref_cache / f"cn_e2e_{guess_mode}_{pool}")
    unet = UNet2DConditionModel.from_pretrained(unet_folder, dtype="float32")
    cn = ControlNetModel.from_pretrained(cn_folder, dtype="float32")
    x, ctx, img, _ = make_inputs(cn.config, 2, 12, 12, "float32")
    t = np.array([3, 900])
    down, mid = cn(x, t, ctx, img, conditioning_scale=0.8, guess_mode=guess_mode)
    assert (mid.shape[2:] == (1, 1)) == pool
    eps = unet(x, t, ctx, down, mid)
    with torch.no_grad():
        args = (tensor(x), tensor(t), tensor(ctx))
        rd, rm = cn_ref(
            *args, tensor(img), conditioning_scale=0.8, guess_mode=guess_mode, return_dict=False
        )
        r = unet_ref(*args, down_block_additional_residuals=rd, mid_block_additional_residual=rm)
        plain = unet_ref(*args).sample
    assert_rel(eps, to_np(r.sample), TOL["float32"], "eps with ControlNet residuals")
    assert rel_err(to_np(plain), to_np(r.sample)) > 1e-2  # the control changes eps


# --------------------------------------------------------------------------- keys and configs


@pytest.mark.parametrize("name", list(TINY))
def test_every_checkpoint_key_is_read(tiny, name):
    """A forward pass reads every key of the checkpoint, and nothing else."""
    _, folder = tiny(name)
    cn = ControlNetModel.from_pretrained(folder)
    keys = set(load_file(folder / "diffusion_pytorch_model.safetensors"))
    cn.params = RecordingDict(cn.params)
    x, ctx, img, cond = make_inputs(
        cn.config, 2, 4, 4, "float32", timestep_cond=cn.config.time_cond_proj_dim is not None
    )
    cn(x, 10, ctx, img, timestep_cond=cond)
    assert cn.params.reads == keys


FULL = {
    "sd15": dict(cross_attention_dim=768),  # lllyasviel/sd-controlnet-* and control_v11p_sd15_*
    "sd21": dict(
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
    ),
}


@pytest.mark.parametrize("name", list(TINY) + list(FULL))
def test_key_table_matches_diffusers(name):
    """param_shapes(config) is exactly diffusers' state dict (built on the meta device)."""
    torch = need("torch")
    config = TINY.get(name) or FULL[name]
    with torch.device("meta"):
        ref = make_reference(config)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    extra = {"time_cond_proj_dim": config["time_cond_proj_dim"]} if "lcm" in name else {}
    assert param_shapes(ControlNetConfig.from_dict({**dict(ref.config), **extra})) == expected


def test_in_memory_constructor_and_weight_modes(tiny):
    """Flat or nested params, and weights="lazy" / "stream" (cast on read) give the eager
    model's residuals."""
    ref, folder = tiny("sd2")
    flat = {k: to_np(v) for k, v in ref.state_dict().items()}
    a = ControlNetModel(dict(ref.config), flat)
    b = ControlNetModel(dict(ref.config), a.params, dtype="float64")
    x, ctx, img, _ = make_inputs(a.config, 2, 4, 6, "float64")
    assert a.dtype == np.float32 and b.dtype == np.float64
    da, ma = a(x, 7, ctx, img)
    db, mb = b(x, 7, ctx, img)
    assert rel_err(ma, mb) < 1e-5 and all(rel_err(p, q) < 1e-5 for p, q in zip(da, db))
    for mode in ("lazy", "stream"):
        c = ControlNetModel.from_pretrained(folder, dtype="float32", weights=mode)
        dc, mc = c(x, 7, ctx, img)
        assert np.array_equal(mc, ma) and all(np.array_equal(p, q) for p, q in zip(dc, da))


def _copy_folder(folder, tmp_path, change=None, config=None):
    return copy_model_folder(folder, tmp_path / "controlnet", change, config)


def test_missing_key_names_file_and_key(tiny, tmp_path):
    key = "controlnet_down_blocks.3.weight"
    load = ControlNetModel.from_pretrained
    key_error(load, tiny("sd1")[1], tmp_path / "controlnet", key, lambda f: f.pop(key))


def test_misshapen_key_names_file_and_key(tiny, tmp_path):
    _, folder = tiny("sd1")
    key = "controlnet_cond_embedding.blocks.1.weight"

    def change(flat):
        flat[key] = flat[key][:, :-1]

    load = ControlNetModel.from_pretrained
    message = key_error(load, folder, tmp_path / "controlnet", key, change)
    assert "shape" in message


@pytest.mark.parametrize(
    "field, value",
    [
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text"),  # Kandinsky's; SDXL's "text_time" is supported
        ("encoder_hid_dim", 32),
        ("act_fn", "gelu"),
        ("only_cross_attention", True),
        ("controlnet_conditioning_channel_order", "rbg"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("resnet_time_scale_shift", "spatial"),
        ("down_block_types", ["DownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
        ("layers_per_block", [2, 2, 2]),  # ControlNetModel takes one int
        ("cross_attention_dim", [32, 32, 32]),
        ("norm_num_groups", 7),
        ("attention_head_dim", 3),
        ("num_attention_heads", [4, 4, 3]),
        ("conditioning_embedding_out_channels", []),
        ("conditioning_channels", 0),
        ("time_cond_proj_dim", "24"),
    ],
)
def test_unsupported_config_is_refused(tiny, tmp_path, field, value):
    _, folder = tiny("sd1")
    dst, _ = _copy_folder(folder, tmp_path, config={field: value})
    with pytest.raises(ConfigError, match=field) as e:
        ControlNetModel.from_pretrained(dst)
    assert "config.json" in str(e.value)


def test_input_errors(tiny):
    _, folder = tiny("sd1")
    cn = ControlNetModel.from_pretrained(folder)
    x, ctx, img, _ = make_inputs(cn.config, 2, 8, 8, "float32")
    cn(x, 1, ctx, img)  # the valid call
    for bad in [
        img[:, :, :-1],
        img[:, :2],
        img[:, :, ::2, ::2],
        img[0],
        np.concatenate([img, img]),
    ]:
        with pytest.raises(InputError, match=r"controlnet_cond: expected shape \(2, 3, 64, 64\)"):
            cn(x, 1, ctx, bad)
    with pytest.raises(InputError, match="in_channels=4"):
        cn(rand(2, 9, 8, 8), 1, ctx, img)
    with pytest.raises(InputError, match="encoder_hidden_states"):
        cn(x, 1, ctx[..., :-1], img)
    with pytest.raises(InputError, match="timestep"):
        cn(x, np.array([1, 2, 3]), ctx, img)
    with pytest.raises(InputError, match="conditioning_scale"):
        cn(x, 1, ctx, img, conditioning_scale="1")
    with pytest.raises(InputError, match="no time_cond_proj_dim"):
        cn(x, 1, ctx, img, timestep_cond=rand(2, 24))
    _, folder = tiny("lcm")
    lcm = ControlNetModel.from_pretrained(folder)
    with pytest.raises(InputError, match=r"timestep_cond: expected shape \(2, 24\)"):
        lcm(x, 1, ctx, img, timestep_cond=rand(2, 23))


# --------------------------------------------------------------------------- full size and GPU


def build_full_size(config, seed):
    """A randomized full-size float32 reference: built on the meta device, then to_empty (no
    default init), then randomize_'s distributions drawn in place in float32 (a third of the
    time of randomize_'s float64 draws for 361M parameters)."""
    torch = need("torch")
    with torch.device("meta"):
        ref = make_reference(config)
    ref = ref.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            elif name.endswith("weight"):
                p.uniform_(0.5, 1.5, generator=g)
            else:
                p.normal_(0.0, 0.1, generator=g)
    assert not list(ref.buffers())  # nothing left uninitialized
    return ref.eval()


@pytest.mark.slow
def test_full_size_sd15_controlnet():
    """The SD1.5 ControlNet architecture (random weights) at 16x16 latents (a 128x128 control
    image), float32, every layer. Ours shares the reference's memory (no files)."""
    ref = build_full_size(FULL["sd15"], seed=3)
    try:
        flat = {k: to_np(v) for k, v in ref.state_dict().items()}
        ours = ControlNetModel(dict(ref.config), flat)
        x, ctx, img, _ = make_inputs(ours.config, 1, 16, 16, "float32")
        ctx = rand(1, 77, 768, seed=1).astype(np.float32)
        errs, _ = compare_controlnet(ours, ref, x, 981, ctx, img, None, "float32")
        assert len(errs) > 250
    finally:
        del ref
        gc.collect()


def test_array_backend_matches_diffusers(tiny, xp):
    """The same model on each array backend (NumPy; CuPy where a GPU exists), float32."""
    torch = need("torch")
    from minisd.backend import to_numpy

    ref, folder = tiny("bgr")
    device = "cpu" if xp is np else "cuda"
    cn = ControlNetModel.from_pretrained(folder, dtype="float32", device=device)
    x, ctx, img, _ = make_inputs(cn.config, 2, 6, 10, "float32")
    t = np.array([7, 700])
    downs, mid = cn(xp.asarray(x), xp.asarray(t), xp.asarray(ctx), xp.asarray(img), 0.9, True)
    assert isinstance(mid, xp.ndarray) and all(isinstance(d, xp.ndarray) for d in downs)
    with torch.no_grad():
        rd, rm = ref(
            tensor(x), tensor(t), tensor(ctx), tensor(img), 0.9, guess_mode=True, return_dict=False
        )
    assert_rel(to_numpy(mid), to_np(rm), TOL["float32"], "mid")
    for k, (d, r) in enumerate(zip(downs, rd)):
        assert_rel(to_numpy(d), to_np(r), TOL["float32"], f"down {k}")
