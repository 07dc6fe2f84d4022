"""UNet2DConditionModel against diffusers: every named module's output and the final eps.

Reference precision island (documented here and in minisd/unet_blocks.time_embedding):
diffusers builds the sinusoidal timestep embedding (``time_proj``) in float32 even in a float64
model, and torch's vectorized float32 sin/cos (and exp, for a few of the 160 frequencies of
SD's 320-wide embedding) are not correctly rounded, while minisd's are. So in float64 runs
``time_proj`` is held to 2.5e-7 (1-2 float32 ulp of values in [-1, 1]) plus t * 2^-23 (one ulp
of a frequency f < 1 moves the float32 argument t * f by up to t * 2^-23), as tests/test_ops.py
does; the reference is then fed minisd's own ``time_proj`` output (a forward hook), so every
later layer is held to 1e-10.
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
    to_np,
    torch_dtype,
)
from test_unet_blocks import traced_names

import minisd
from minisd import ops
from minisd.errors import ConfigError, InputError
from minisd.unet import UNet2DConditionModel, UNetConfig, param_shapes
from minisd.weights import RecordingDict, load_file
from minisd_parity.compare import time_proj_bound  # (shared with `minisd parity`)

DTYPES = ["float64", "float32"]

_TINY_SD1 = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,  # SD1 meaning: 4 heads in every block
    norm_num_groups=8,
)
TINY = {
    "sd1": _TINY_SD1,
    "sd2": {  # SD2: linear projections, heads per block (16 channels each), upcast attention
        **_TINY_SD1,
        "layers_per_block": 1,
        "attention_head_dim": (2, 4, 4),
        "use_linear_projection": True,
        "upcast_attention": True,
        "cross_attention_dim": 48,
    },
    "inpaint": {**_TINY_SD1, "in_channels": 9},
    "lcm": {**_TINY_SD1, "time_cond_proj_dim": 24},  # LCM-distilled: guidance embedding input
}
# case: (tiny model, batch, (h, w), timestep, extra input: None | "controlnet" | "cond")
CASES = {
    "sd1_8x8": ("sd1", 2, (8, 8), 500, None),
    "sd1_12x20": ("sd1", 1, (12, 20), 999, None),
    "sd1_odd_13x19": ("sd1", 2, (13, 19), 1, None),  # forward_upsample_size
    "sd2_batch3_per_item_t": ("sd2", 3, (8, 12), np.array([1.5, 500.0, 999.0]), None),
    "inpaint_9ch": ("inpaint", 2, (16, 8), np.array([250]), None),
    "sd1_controlnet": ("sd1", 2, (12, 12), np.array([3, 900]), "controlnet"),
    "lcm_timestep_cond": ("lcm", 2, (8, 8), np.array([999, 259]), "cond"),
    "lcm_without_cond": ("lcm", 1, (8, 8), 499, None),  # diffusers then skips cond_proj
}


@pytest.fixture(scope="module")
def tiny(ref_cache):
    """name -> (randomized float32 diffusers model, its save_pretrained folder)."""
    return diffusers_models(ref_cache, "UNet2DConditionModel", TINY, "unet", seed=1)


def skip_shapes(cfg, n, h, w):
    """Shapes of the skip states (ControlNet's down residuals) and of the mid block output."""
    shapes = [(n, cfg.block_out_channels[0], h, w)]
    for i, c in enumerate(cfg.block_out_channels):
        shapes += [(n, c, h, w)] * cfg.layers_per_block[i]
        if i < len(cfg.block_out_channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((n, c, h, w))
    return shapes, (n, cfg.block_out_channels[-1], h, w)


def compare_whole(ours, ref, our_args, ref_args, dtype, *, ref_kwargs=None, time_ids=None):
    """Run both models and compare the output and every traced module, with the time_proj
    island rule of the module docstring (in float64 the reference continues from minisd's
    time_proj, and from its add_time_proj for SDXL UNets, whose ``time_ids`` bound that
    island). Returns the per-layer errors."""
    torch = need("torch")
    with minisd.trace() as acts:
        out = ours(*our_args)
    islands = {"time_proj": our_args[1]}
    if time_ids is not None:
        islands["add_time_proj"] = time_ids
    with torch.no_grad(), collect_outputs(ref) as racts:
        hooks = []
        if dtype == "float64":  # registered after collect_outputs' hook: that one sees torch's
            for name in islands:
                ours_tp = torch.from_numpy(acts[name])
                hook = getattr(ref, name).register_forward_hook(lambda m, i, o, v=ours_tp: v)
                hooks.append(hook)
        try:
            r = ref(*ref_args, **(ref_kwargs or {})).sample
        finally:
            for hook in hooks:
                hook.remove()
    names = traced_names(ref, racts)
    assert not set(acts) - set(racts), f"names no diffusers module has: {set(acts) - set(racts)}"
    tol = TOL[dtype]
    # time_proj is float32 in every model dtype; its bound applies to float32 runs too, since
    # t * 2^-23 reaches 1.2e-4 at t = 999 (above the float32 layer tolerance).
    for name, t in islands.items():
        assert acts[name].dtype == np.float32
        err = np.abs(acts[name] - racts[name]).max()
        assert err <= time_proj_bound(t), f"{name}: {err:.2e}"
        names.remove(name)
    errs = compare_traces(acts, racts, tol, names)
    errs["<output>"] = assert_rel(out, to_np(r), tol, "output")
    assert out.dtype == np.dtype(dtype)
    return errs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_every_layer_matches_diffusers(tiny, case, dtype):
    torch = need("torch")
    name, n, (h, w), t, extra = CASES[case]
    ref, folder = tiny(name)
    ours = UNet2DConditionModel.from_pretrained(folder, dtype=dtype)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    cfg = ours.config
    x = rand(n, cfg.in_channels, h, w).astype(dtype)
    ctx = rand(n, 7, cfg.cross_attention_dim[0], seed=1).astype(dtype)
    our_args, kw = [x, t, ctx], {}
    if extra == "controlnet":
        downs, mid = skip_shapes(cfg, n, h, w)
        res = [rand(*s, seed=10 + i).astype(dtype) for i, s in enumerate(downs)]
        mid = rand(*mid, seed=9).astype(dtype)
        our_args += [res, mid]
        kw = dict(
            down_block_additional_residuals=tuple(torch.from_numpy(r) for r in res),
            mid_block_additional_residual=torch.from_numpy(mid),
        )
    elif extra == "cond":
        cond = rand(n, cfg.time_cond_proj_dim, seed=2).astype(dtype)
        our_args += [None, None, cond]
        kw = dict(timestep_cond=torch.from_numpy(cond))
    tt = torch.from_numpy(t) if isinstance(t, np.ndarray) else t
    errs = compare_whole(
        ours, ref, our_args, [torch.from_numpy(x), tt, torch.from_numpy(ctx)], dtype, ref_kwargs=kw
    )
    assert len(errs) > 100  # every resnet / attention / transformer submodule was compared


def test_time_proj_is_a_float32_precision_island(tiny):
    """time_proj is float32 in a float64 model (as diffusers), within the bound of torch's."""
    torch = need("torch")
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.arange(0, 1000, 7)
    for flip, shift in [(True, 0), (False, 1)]:
        ours = ops.timestep_embedding(t, 320, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        ref = get_timestep_embedding(torch.from_numpy(t), 320, flip, shift)
        assert ours.dtype == np.float32
        err = np.abs(ours - to_np(ref)).max()
        assert err <= time_proj_bound(t), f"time_proj: {err:.2e}"
        small = np.abs(ours[:15] - to_np(ref)[:15]).max()  # t < 100: sin/cos rounding dominates
        assert small <= 2.5e-7 + 100 * 2.0**-23, f"time_proj (t < 100): {small:.2e}"
    ref, folder = tiny("sd1")
    unet = UNet2DConditionModel.from_pretrained(folder, dtype="float64")
    with minisd.trace() as acts:
        unet(rand(1, 4, 8, 8), 321, rand(1, 3, 32))
    assert acts["time_proj"].dtype == np.float32
    assert acts["time_embedding.linear_1"].dtype == np.float64


# --------------------------------------------------------------------------- keys and errors


@pytest.mark.parametrize("name", list(TINY))
def test_every_checkpoint_key_is_read(tiny, name):
    """A forward pass reads every key of the checkpoint, and nothing else (a read of a missing
    key would raise KeyError)."""
    _, folder = tiny(name)
    unet = UNet2DConditionModel.from_pretrained(folder)
    keys = set(load_file(folder / "diffusion_pytorch_model.safetensors"))
    unet.params = RecordingDict(unet.params)
    cfg = unet.config
    cond = None if cfg.time_cond_proj_dim is None else rand(2, cfg.time_cond_proj_dim)
    unet(
        rand(2, cfg.in_channels, 8, 8), 10, rand(2, 5, cfg.cross_attention_dim[0]), None, None, cond
    )
    assert unet.params.reads == keys


def _ref_config(name):
    return {**TINY[name]} if name in TINY else FULL[name]


@pytest.mark.parametrize("name", ["sd1", "sd2", "inpaint", "lcm", "sd15", "sd21"])
def test_key_table_matches_diffusers(name):
    """param_shapes(config) is exactly diffusers' state dict (built on the meta device)."""
    torch, diffusers = need("torch", "diffusers")
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**_ref_config(name))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert param_shapes(UNetConfig.from_dict(dict(ref.config))) == expected


def test_in_memory_constructor_flat_or_nested(tiny):
    ref, _ = tiny("sd2")
    flat = {k: to_np(v) for k, v in ref.state_dict().items()}
    a = UNet2DConditionModel(dict(ref.config), flat)
    b = UNet2DConditionModel(dict(ref.config), a.params, dtype="float64")
    x, ctx = rand(2, 4, 8, 8), rand(2, 3, 48)
    assert b.dtype == np.float64 and a.dtype == np.float32
    assert rel_err(a(x, 7, ctx), b(x, 7, ctx)) < 1e-5


def _copy_folder(folder, tmp_path, change=None, config=None):
    return copy_model_folder(folder, tmp_path / "unet", change, config)


def test_missing_key_names_file_and_key(tiny, tmp_path):
    key = "mid_block.attentions.0.proj_in.weight"
    load = UNet2DConditionModel.from_pretrained
    key_error(load, tiny("sd1")[1], tmp_path / "unet", key, lambda f: f.pop(key))


def test_misshapen_key_names_file_and_key(tiny, tmp_path):
    _, folder = tiny("sd1")
    key = "down_blocks.1.resnets.0.conv1.weight"

    def change(flat):
        flat[key] = flat[key][:, :-1]

    load = UNet2DConditionModel.from_pretrained
    message = key_error(load, folder, tmp_path / "unet", key, change)
    assert "shape" in message


def test_unsupported_config_is_refused(tiny, tmp_path):
    _, folder = tiny("sd1")
    dst, _ = _copy_folder(folder, tmp_path, config={"class_embed_type": "timestep"})
    with pytest.raises(ConfigError, match="class_embed_type") as e:
        UNet2DConditionModel.from_pretrained(dst)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("norm_num_groups", 0),  # ZeroDivisionError in a forward pass otherwise
        ("norm_num_groups", 7),  # a reshape error in a forward pass otherwise
        ("norm_num_groups", "8"),
        ("attention_head_dim", 0),
        ("attention_head_dim", 3),  # heads that do not divide the channels
        ("block_out_channels", [32, "x"]),
        ("block_out_channels", []),
        ("sample_size", "8"),
        ("norm_eps", "x"),
    ],
)
def test_bad_config_values_are_refused_at_load(tiny, field, value):
    _, folder = tiny("sd1")
    cfg = json.loads((folder / "config.json").read_text())
    with pytest.raises(ConfigError, match=f"cfg.json: {field}=") as e:
        UNetConfig.from_dict({**cfg, field: value}, source="cfg.json")
    assert repr(tuple(value) if isinstance(value, list) else value) in str(e.value)


def test_input_errors(tiny):
    _, folder = tiny("sd1")
    unet = UNet2DConditionModel.from_pretrained(folder)
    x, ctx = rand(2, 4, 8, 8), rand(2, 5, 32)
    with pytest.raises(InputError, match="in_channels=4"):
        unet(rand(2, 9, 8, 8), 1, ctx)
    with pytest.raises(InputError, match="encoder_hidden_states"):
        unet(x, 1, rand(2, 5, 31))
    with pytest.raises(InputError, match="timestep"):
        unet(x, np.array([1, 2, 3]), ctx)
    downs, mid = skip_shapes(unet.config, 2, 8, 8)
    res = [np.zeros(s) for s in downs]
    with pytest.raises(InputError, match="both or neither"):
        unet(x, 1, ctx, down_block_additional_residuals=res)
    with pytest.raises(InputError, match="skip states"):
        unet(x, 1, ctx, res[:-1], np.zeros(mid))
    with pytest.raises(InputError, match=r"residuals\[2\]"):
        unet(x, 1, ctx, res[:2] + [np.zeros((2, 1, 8, 8))] + res[3:], np.zeros(mid))
    with pytest.raises(InputError, match="no time_cond_proj_dim"):
        unet(x, 1, ctx, timestep_cond=rand(2, 24))


def test_timestep_cond_shape_is_checked(tiny):
    _, folder = tiny("lcm")
    unet = UNet2DConditionModel.from_pretrained(folder)
    x, ctx = rand(2, 4, 8, 8), rand(2, 5, 32)
    with pytest.raises(InputError, match=r"timestep_cond: expected shape \(2, 24\)"):
        unet(x, 1, ctx, timestep_cond=rand(2, 23))
    with pytest.raises(InputError, match=r"timestep_cond: expected shape \(2, 24\)"):
        unet(x, 1, ctx, timestep_cond=rand(1, 24))


def test_attention_is_chunked_over_queries(tiny, monkeypatch):
    """Every attention call gets the model's chunk size; the result does not depend on it.
    The default keeps 64x64 latents (4096 queries) from making full 4096x4096 score tensors."""
    assert 0 < UNet2DConditionModel.attention_chunk_size < 4096
    _, folder = tiny("sd1")
    unet = UNet2DConditionModel.from_pretrained(folder, dtype="float64")
    x, ctx = rand(2, 4, 8, 8), rand(2, 5, 32)
    unet.attention_chunk_size = None
    full = unet(x, 5, ctx)
    seen = []
    real = ops.attention

    def spy(q, k, v, **kw):
        seen.append(kw["chunk_size"])
        return real(q, k, v, **kw)

    monkeypatch.setattr(ops, "attention", spy)
    unet.attention_chunk_size = 5
    chunked = unet(x, 5, ctx)
    assert seen and set(seen) == {5}
    assert rel_err(chunked, full) <= 1e-12


# --------------------------------------------------------------------------- full size

FULL = {
    "sd15": dict(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
    ),
    "sd21": dict(
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
        block_out_channels=(320, 640, 1280, 1280),
    ),
}


def build_full_size(cls, config, seed):
    """A randomized full-size float64 reference, allocated once (meta device, then to_empty:
    no float32 copy and no default init)."""
    torch = need("torch")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.device("meta"):
            ref = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return randomize_(ref.to_empty(device="cpu"), seed).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FULL))
def test_full_size_every_layer(name):
    """Full-size SD1.5 / SD2.1 architectures (random weights) at 8x8 latents, float64 then
    float32. Ours shares the reference's memory (state dict -> numpy views, no files)."""
    torch, diffusers = need("torch", "diffusers")
    ref = build_full_size(diffusers.UNet2DConditionModel, FULL[name], seed=3)
    x = rand(2, 4, 8, 8)
    ctx = rand(2, 77, FULL[name]["cross_attention_dim"], seed=1)
    t = np.array([999, 20])

    def check(dtype, ours, ref):
        xs, cs = x.astype(dtype), ctx.astype(dtype)
        ref_args = [torch.from_numpy(xs), torch.from_numpy(t), torch.from_numpy(cs)]
        assert len(compare_whole(ours, ref, [xs, t, cs], ref_args, dtype)) > 500

    in_each_dtype(ref, check)


def in_each_dtype(ref, check):
    """``check(dtype, ours, ref)`` for each of DTYPES, the full-size reference cast in place
    and minisd's UNet sharing its memory (state dict -> numpy views, no files); each pair is
    freed before the next cast, so only one precision's weights are alive at a time."""
    try:
        for dtype in DTYPES:
            ref = ref.to(torch_dtype(dtype))
            flat = {k: to_np(v) for k, v in ref.state_dict().items()}
            ours = UNet2DConditionModel(dict(ref.config), flat)
            check(dtype, ours, ref)
            del ours, flat
            gc.collect()
    finally:
        del ref
        gc.collect()


def test_array_backend_matches_diffusers(tiny, xp):
    """The same model on each array backend (NumPy; CuPy where a GPU exists), float32."""
    torch = need("torch")
    from minisd.backend import to_numpy

    ref, folder = tiny("sd2")
    unet = UNet2DConditionModel.from_pretrained(
        folder, dtype="float32", device="cpu" if xp is np else "cuda"
    )
    x, ctx = rand(2, 4, 6, 10).astype(np.float32), rand(2, 5, 48, seed=1).astype(np.float32)
    out = unet(xp.asarray(x), xp.asarray(np.array([7, 700])), xp.asarray(ctx))
    assert isinstance(out, xp.ndarray)
    with torch.no_grad():
        r = ref(torch.from_numpy(x), torch.tensor([7, 700]), torch.from_numpy(ctx)).sample
    assert_rel(to_numpy(out), to_np(r), TOL["float32"], "output")
