"""Union ControlNets (diffusers' ControlNetUnionModel, xinsir's controlnet-union-sdxl-1.0 and
ProMax) against diffusers: every named module and the residuals, float64 and float32, for one
control image, several (the scales acting inside), one model among several (``from_multi``),
guess mode, global pooling; the key table; errors.

Every parameter of the reference is randomized (task embedding, attention in-projection, layer
norms and zero convolutions included). Precision islands: time_proj, add_time_proj and
control_type_proj are float32 sinusoids in every model dtype; in float64 runs the reference
continues from minisd's, each held to its own bound (as tests/test_controlnet.py).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from refharness import (
    TOL,
    assert_rel,
    diffusers_models,
    need,
    rel_err,
    torch_dtype,
)
from test_controlnet import check_residuals, make_inputs, tensor
from test_controlnet_xl import SDXL_CANNY, added_kwargs

import minisd
from minisd.controlnet_union import ControlNetUnionConfig, ControlNetUnionModel
from minisd.controlnet_union import union_param_shapes as param_shapes
from minisd.errors import ConfigError, InputError
from minisd.weights import RecordingDict, load_file

DTYPES = ["float64", "float32"]
_XL = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    attention_head_dim=(2, 4, 4), use_linear_projection=True, cross_attention_dim=48,
    norm_num_groups=8, conditioning_embedding_out_channels=(8, 8, 16, 16),
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=(0, 1, 2),
    num_trans_channel=32, num_proj_channel=32, num_trans_head=4,
)  # fmt: skip
TINY = {
    "union": {**_XL, "num_trans_layer": 2},  # six control types (the first release)
    "promax": {**_XL, "num_control_type": 8, "num_trans_layer": 1},  # + tile, repaint
    "pooled": {**_XL, "global_pool_conditions": True, "num_trans_layer": 1},
}
# case: (model, batch, (h, w), timestep, modes, call options)
CASES = {
    "one_image": ("union", 2, (8, 8), np.array([999, 37]), [3], {"conditioning_scale": 0.7}),
    "two_images": ("union", 2, (8, 8), 500, [3, 1], {"conditioning_scale": [0.5, 1.2]}),
    "three_odd_size": ("promax", 2, (6, 10), 250, [0, 6, 7], {"conditioning_scale": 0.8}),
    "from_multi": ("promax", 2, (8, 8), 10, [5], {"conditioning_scale": 0.6, "from_multi": True}),
    "guess_one": ("union", 1, (8, 8), 700, [2], {"guess_mode": True, "conditioning_scale": 1.3}),
    "guess_two": ("union", 2, (8, 8), 300, [4, 0], {"guess_mode": True}),
    "pooled": ("pooled", 2, (8, 8), 400, [1, 2], {"conditioning_scale": [0.9, 0.3]}),
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(ref_cache):
    return diffusers_models(ref_cache, "ControlNetUnionModel", TINY, "cn_union", seed=3)


def union_inputs(cfg, n, h, w, dtype, modes):
    """Latents, context, one control image per mode, the control-type flags (n, K) and SDXL's
    added_cond_kwargs, as ``dtype`` arrays."""
    x, ctx, _, _ = make_inputs(cfg, n, h, w, dtype)
    f = cfg.cond_factor
    images = [
        np.random.RandomState(10 + k).uniform(size=(n, 3, f * h, f * w)).astype(dtype)
        for k in range(len(modes))
    ]
    flags = np.zeros((n, cfg.num_control_type), dtype)
    flags[:, modes] = 1
    return x, ctx, images, flags, added_kwargs(cfg, n, dtype)


def compare_union(ours, ref, t, inputs, modes, dtype, **kw):
    """Run both; every traced module (the three float32 islands by their own bound, the
    reference continuing from minisd's in float64) and the residuals. -> {name: error}."""
    x, ctx, images, flags, added = inputs
    with minisd.trace() as acts:
        out = ours(x, t, ctx, images, flags, modes, added_cond_kwargs=added, **kw)
    islands = {"time_proj": t, "add_time_proj": added["time_ids"], "control_type_proj": 1}

    def call():
        return ref(
            tensor(x), tensor(t) if isinstance(t, np.ndarray) else t, tensor(ctx),
            [tensor(i) for i in images], control_type=tensor(flags), control_type_idx=modes,
            added_cond_kwargs={k: tensor(v) for k, v in added.items()}, return_dict=False, **kw,
        )  # fmt: skip

    return check_residuals(ref, call, acts, islands, out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_every_layer_matches_diffusers(tiny, case, dtype):
    name, n, (h, w), t, modes, opts = CASES[case]
    ref, folder = tiny(name)
    ours = ControlNetUnionModel.from_pretrained(folder, dtype=dtype)
    ref = copy.deepcopy(ref).to(torch_dtype(dtype))
    inputs = union_inputs(ours.config, n, h, w, dtype, modes)
    errs = compare_union(ours, ref, t, inputs, modes, dtype, **opts)
    union = {"control_add_embedding.linear_2", "transformer_layes.0.attn", "spatial_ch_projs"}
    assert union | {"controlnet_cond_embedding.conv_out", "controlnet_mid_block"} <= set(errs)
    assert len(errs) > 40


@pytest.mark.parametrize("name", list(TINY))
def test_every_checkpoint_key_is_read(tiny, name):
    _, folder = tiny(name)
    cn = ControlNetUnionModel.from_pretrained(folder)
    keys = set(load_file(folder / "diffusion_pytorch_model.safetensors"))
    assert {"task_embedding", "transformer_layes.0.attn.in_proj_weight"} <= keys
    cn.params = RecordingDict(cn.params)
    cn(*_call_args(cn, [1, 2]))
    assert cn.params.reads == keys


def _call_args(cn, modes, n=2, dtype="float32"):
    x, ctx, images, flags, added = union_inputs(cn.config, n, 4, 4, dtype, modes)
    return x, 10, ctx, images, flags, modes, 1.0, False, None, added


# xinsir's controlnet-union-sdxl-1.0 ProMax as converted for ControlNetUnionModel: the SDXL
# ControlNet's architecture with eight control types and one 320-wide attention layer
PROMAX = {
    **SDXL_CANNY, "_class_name": "ControlNetUnionModel", "num_control_type": 8,
    "num_trans_channel": 320, "num_trans_head": 8, "num_trans_layer": 1, "num_proj_channel": 320,
}  # fmt: skip


@pytest.mark.parametrize("name", [*TINY, "promax_full"])
def test_key_table_matches_diffusers(name):
    """union_param_shapes(config) is exactly diffusers' state dict (on the meta device)."""
    torch, diffusers = need("torch", "diffusers")
    config = PROMAX if name == "promax_full" else TINY[name]
    with torch.device("meta"):
        ref = diffusers.ControlNetUnionModel.from_config(config)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert param_shapes(ControlNetUnionConfig.from_dict(dict(config))) == expected


def test_attention_runs_over_the_batch(tiny):
    """The union tokens attend over the batch rows (torch's sequence-first MultiheadAttention):
    changing one row's control image changes the other row's residuals, as in diffusers."""
    _, folder = tiny("union")
    cn = ControlNetUnionModel.from_pretrained(folder)
    x, t, ctx, images, flags, modes, *rest = _call_args(cn, [3])
    _, mid = cn(x, t, ctx, images, flags, modes, *rest)
    other = [images[0].copy()]
    other[0][1] = 1 - other[0][1]  # only row 1 changes
    _, mid2 = cn(x, t, ctx, other, flags, modes, *rest)
    assert rel_err(mid2[0], mid[0]) > 1e-4


def test_array_backend_matches_numpy(tiny, xp):
    """The same union ControlNet on each array backend (NumPy; CuPy's code path, faked on the
    CPU and on a GPU where one exists), float32, against the NumPy result."""
    from minisd.backend import to_numpy

    _, folder = tiny("promax")
    host = ControlNetUnionModel.from_pretrained(folder, dtype="float32")
    dev = ControlNetUnionModel.from_pretrained(
        folder, dtype="float32", device="cpu" if xp is np else "cuda"
    )
    x, t, ctx, images, flags, modes, *_, added = _call_args(host, [0, 7])
    downs, mid = host(x, t, ctx, images, flags, modes, [0.8, 0.5], added_cond_kwargs=added)
    args = (xp.asarray(x), t, xp.asarray(ctx), [xp.asarray(i) for i in images], xp.asarray(flags))
    added = {k: xp.asarray(v) for k, v in added.items()}
    d_downs, d_mid = dev(*args, modes, [0.8, 0.5], added_cond_kwargs=added)
    assert isinstance(d_mid, xp.ndarray)
    assert_rel(to_numpy(d_mid), mid, TOL["float32"], "mid")
    for k, (d, r) in enumerate(zip(d_downs, downs)):
        assert_rel(to_numpy(d), r, TOL["float32"], f"down {k}")


# --------------------------------------------------------------------------- errors


def test_call_errors(tiny):
    _, folder = tiny("union")
    cn = ControlNetUnionModel.from_pretrained(folder)
    x, t, ctx, images, flags, modes, *rest = _call_args(cn, [3])
    cn(x, t, ctx, images, flags, modes, *rest)  # the valid call
    with pytest.raises(InputError, match="control_type_idx: 6 is no control type"):
        cn(x, t, ctx, images, flags, [6], *rest)
    with pytest.raises(InputError, match="2 / 1 values for 1 control images"):
        cn(x, t, ctx, images, flags, [3, 1], *rest)
    with pytest.raises(InputError, match="expected a list of control images"):
        cn(x, t, ctx, images[0], flags, modes, *rest)
    with pytest.raises(InputError, match=r"control_type: expected shape \(2, 6\)"):
        cn(x, t, ctx, images, flags[:, :4], modes, *rest)
    with pytest.raises(InputError, match=r"controlnet_cond: expected shape \(2, 3, 32, 32\)"):
        cn(x, t, ctx, [images[0][:, :, :16]], flags, modes, *rest)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_trans_channel=16), "must equal block_out_channels"),
        (dict(num_trans_head=5), "num_trans_head=5 does not divide"),
        (dict(num_control_type=0), "num_control_type=0: expected a positive int"),
        (dict(addition_time_embed_dim=None, addition_embed_type=None,
              projection_class_embeddings_input_dim=None), "addition_time_embed_dim"),
    ],
)  # fmt: skip
def test_config_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        ControlNetUnionConfig.from_dict({**TINY["union"], **change}, source="union.json")


def test_single_file_and_folder_dispatch(tiny, tmp_path):
    """ControlNetModel.from_pretrained gives a ControlNetUnionModel for a union folder and for
    a bare diffusers-layout union file (xinsir's form); the union layer's heads do not show (8
    are assumed: this tiny model has 4, so ``config=`` must say so to match the folder)."""
    import shutil

    from minisd.controlnet import ControlNetModel

    _, folder = tiny("union")
    from_folder = ControlNetModel.from_pretrained(folder)
    assert type(from_folder) is ControlNetUnionModel
    path = tmp_path / "union.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", path)
    hidden = {"attention_head_dim": [2, 4, 4], "norm_num_groups": 8}  # tiny, not SDXL's
    right = ControlNetModel.from_pretrained(path, config={**hidden, "num_trans_head": 4})
    assumed = ControlNetModel.from_pretrained(path, config=hidden)
    assert type(right) is type(assumed) is ControlNetUnionModel
    assert assumed.config.num_trans_head == 8 and assumed.config.num_trans_layer == 2
    args = _call_args(from_folder, [3, 0])
    runs = []
    for cn in (from_folder, right, assumed):
        with minisd.trace(["transformer_layes.1"]) as acts:
            runs.append((cn(*args)[1], acts["transformer_layes.1"]))  # (mid, union tokens)
    assert_rel(runs[1][0], runs[0][0], 1e-6, "single file, heads given")
    assert_rel(runs[1][1], runs[0][1], 1e-6, "single file, heads given: tokens")
    assert rel_err(runs[2][1], runs[0][1]) > 1e-2  # the heads matter
