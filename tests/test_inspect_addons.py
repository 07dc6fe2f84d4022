"""weights_tools.inspect on IP-Adapter and T2I-Adapter files: kind, layout, variant and what
they fit (CLIP image embedding width, cross_attention_dim, cross-attention layer count; adapter
channels), in the report, in format_report's text and in ``python -m weights_tools inspect``.

The files are written by diffusers' own models (randomized T2IAdapters, a UNet's converted
IP-Adapter state dict) or by tests/test_ip_adapter.py's adapter_state_dict. Full-size files
(SD1.5's shapes, taken from diffusers models built on torch's meta device) are header-only
sparse files: inspect reads headers only.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from refharness import need, randomize_, to_np
from test_ip_adapter import adapter_state_dict, nested

import weights_tools as wt
from minisd.weights import save_file
from weights_tools.__main__ import main

TINY_UNET = dict(
    block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
)  # fmt: skip


def _unet(cross_attention_dim, meta=False, **kw):
    torch, diffusers = need("torch", "diffusers")
    cfg = {**TINY_UNET, **kw} if not meta else kw
    with torch.device("meta" if meta else "cpu"):
        torch.manual_seed(0)
        return diffusers.UNet2DConditionModel(**cfg, cross_attention_dim=cross_attention_dim)


def _attn2_count(unet):
    return sum(name.endswith("attn2.processor") for name in unet.attn_processors)


def _header_only(path, shapes, dtype="F16"):
    """A valid safetensors file with these shapes and no data written (a sparse file)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def _inspect_cli(path, capsys):
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert main(["inspect", "--json", str(path)]) == 0
    return text, json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------- IP-Adapter


@pytest.mark.parametrize("width, family", [(768, "sd1"), (1024, "sd2")])
def test_ip_adapter_h94_file(width, family, tmp_path, capsys):
    unet = _unet(width)
    path = tmp_path / "ip-adapter.safetensors"
    save_file(adapter_state_dict(unet, seed=1, embed_dim=24), path)
    n = _attn2_count(unet)
    report = wt.inspect(path)
    assert report["kind"] == "ip-adapter" and report["layout"] == "h94"
    assert report["family"] == family and report["notes"] == []
    ip = report["ip_adapter"]
    assert ip["variant"] == "base (ImageProjection, 4 image tokens)" and "unsupported" not in ip
    assert (ip["cross_attention_dim"], ip["image_embed_dim"], ip["layers"]) == (width, 24, n)
    assert report["components"]["ip_adapter"]["tensors"] == 4 + 2 * n
    text, js = _inspect_cli(path, capsys)
    assert f"family:              {family}" in text and "kind:                ip-adapter" in text
    line = (f"IP-Adapter: base (ImageProjection, 4 image tokens); image embeddings 24-d; "
            f"cross_attention_dim {width}; {n} cross-attention layers")  # fmt: skip
    assert line in text, text
    assert js["ip_adapter"] == ip


def test_ip_adapter_diffusers_layout(tmp_path):
    """A diffusers UNet's state dict after loading an IP-Adapter (unet.encoder_hid_proj...,
    unet....attn2.processor.to_k_ip.0.weight): the same description, layout diffusers."""
    unet = _unet(768)
    flat = adapter_state_dict(unet, seed=3, embed_dim=20)
    unet._load_ip_adapter_weights(nested(flat))
    sd = unet.state_dict()
    keys = [k for k in sd if "encoder_hid_proj" in k or ".processor." in k]
    path = tmp_path / "converted.safetensors"
    save_file({f"unet.{k}": to_np(sd[k]) for k in keys}, path)
    report = wt.inspect(path)
    assert report["kind"] == "ip-adapter" and report["layout"] == "diffusers"
    ip = report["ip_adapter"]
    n = _attn2_count(unet)
    assert (ip["cross_attention_dim"], ip["image_embed_dim"], ip["layers"]) == (768, 20, n)
    assert report["family"] == "sd1" and report["notes"] == []


def test_ip_adapter_sd15_size(tmp_path):
    """SD1.5's shapes (a full-size UNet on the meta device): 16 cross-attention layers,
    1024-d image embeddings (ViT-H), cross_attention_dim 768."""
    unet = _unet(768, meta=True)
    shapes = {"image_proj.proj.weight": (4 * 768, 1024), "image_proj.proj.bias": (4 * 768,),
              "image_proj.norm.weight": (768,), "image_proj.norm.bias": (768,)}  # fmt: skip
    for n, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            inner = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
            for w in ("to_k_ip", "to_v_ip"):
                shapes[f"ip_adapter.{n}.{w}.weight"] = (inner, 768)
    path = _header_only(tmp_path / "ip-adapter_sd15.safetensors", shapes)
    report = wt.inspect(path)
    ip = report["ip_adapter"]
    assert (ip["cross_attention_dim"], ip["image_embed_dim"], ip["layers"]) == (768, 1024, 16)
    assert report["family"] == "sd1" and report["notes"] == []
    res = subprocess.run([sys.executable, "-m", "weights_tools", "inspect", str(path)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert "ip_adapter       36 tensors     22,319,616 params  F16 x36" in res.stdout, res.stdout
    assert "image embeddings 1024-d; cross_attention_dim 768; 16 cross-attention" in res.stdout


LAYER = {"ip_adapter.1.to_k_ip.weight": (320, 768), "ip_adapter.1.to_v_ip.weight": (320, 768)}
SUPPORTED = {  # partial key sets: described, with minisd's loading error as a note
    "full": ({"image_proj.proj.0.weight": (1024, 1024), "image_proj.proj.2.weight": (768, 1024),
              "image_proj.proj.3.weight": (768,)},
             "Full (MLP projection, one image token per hidden-state token)", 1024,
             "missing key 'image_proj.proj.0.bias'"),
    "faceid": ({"image_proj.proj.0.weight": (1024, 512), "image_proj.proj.2.weight": (3072, 1024),
                "image_proj.norm.weight": (768,),
                "ip_adapter.1.to_k_lora.down.weight": (128, 320),
                "ip_adapter.1.to_k_lora.up.weight": (320, 128)},
               "FaceID (MLPProjModel, 4 image tokens)", 512,
               "missing key 'ip_adapter.1.to_q_lora.down.weight'"),
}  # fmt: skip
VARIANTS = {
    "faceid_plus": ({"image_proj.perceiver_resampler.latents": (1, 4, 768),
                     "image_proj.proj.0.weight": (1024, 512),
                     "ip_adapter.1.to_q_lora.down.weight": (128, 320)},
                    "IP-Adapter FaceID Plus (perceiver resampler)", 512),
}  # fmt: skip


@pytest.mark.parametrize("name", list(VARIANTS))
def test_ip_adapter_variants_are_named_unsupported(name, tmp_path, capsys):
    """FaceID Plus files: named by their keys (as minisd refuses them when loading), still
    described; FaceID's LoRA keys do not make it a LoRA."""
    keys, variant, embed = VARIANTS[name]
    path = tmp_path / f"{name}.safetensors"
    save_file({k: np.zeros(s, np.float16) for k, s in {**keys, **LAYER}.items()}, path)
    report = wt.inspect(path)
    assert report["kind"] == "ip-adapter" and "lora" not in report
    ip = report["ip_adapter"]
    assert ip["variant"] == variant and variant in ip["unsupported"]
    assert (ip["cross_attention_dim"], ip["image_embed_dim"], ip["layers"]) == (768, embed, 1)
    assert report["family"] == "sd1"
    text, _ = _inspect_cli(path, capsys)
    assert f"note: unsupported: {variant} (minisd loads the base, Plus, Full and FaceID" in text


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_ip_adapter_full_and_faceid_are_described(name, tmp_path):
    """Full / FaceID files: their variant and widths; FaceID's LoRA keys do not make it a LoRA;
    these partial files get minisd's loading error as a note."""
    keys, variant, embed, error = SUPPORTED[name]
    path = tmp_path / f"{name}.safetensors"
    save_file({k: np.zeros(s, np.float16) for k, s in {**keys, **LAYER}.items()}, path)
    report = wt.inspect(path)
    assert report["kind"] == "ip-adapter" and "lora" not in report
    ip = report["ip_adapter"]
    assert ip["variant"] == variant and "unsupported" not in ip
    assert (ip["cross_attention_dim"], ip["image_embed_dim"], ip["layers"]) == (768, embed, 1)
    assert report["family"] == "sd1" and error in report["notes"][0]


def _plus_shapes(c=768, w=1280, h=768, queries=16, heads=12, depth=4):
    """h94's Resampler keys and shapes (ip-adapter-plus_sd15 by default: 4 layers of 768, 12
    heads of 64, 16 queries, on ViT-H's 1280-wide hidden states)."""
    i = 64 * heads
    shapes = {"image_proj.latents": (1, queries, h), "image_proj.proj_in.weight": (h, w),
              "image_proj.proj_in.bias": (h,), "image_proj.proj_out.weight": (c, h),
              "image_proj.proj_out.bias": (c,), "image_proj.norm_out.weight": (c,),
              "image_proj.norm_out.bias": (c,)}  # fmt: skip
    for n in range(depth):
        pre = f"image_proj.layers.{n}."
        for norm in ("0.norm1", "0.norm2", "1.0"):
            shapes[f"{pre}{norm}.weight"] = shapes[f"{pre}{norm}.bias"] = (h,)
        shapes.update({f"{pre}0.to_q.weight": (i, h), f"{pre}0.to_kv.weight": (2 * i, h),
                       f"{pre}0.to_out.weight": (h, i), f"{pre}1.1.weight": (4 * h, h),
                       f"{pre}1.3.weight": (h, 4 * h)})  # fmt: skip
    return shapes


def test_ip_adapter_plus_sd15_size(tmp_path, capsys):
    """ip-adapter-plus_sd15's shapes (49,087,488 parameters, 98 MB in float16): a supported
    Plus adapter with 16 image tokens, on 1280-wide hidden states; without its layers' to_q it
    is still described, with minisd's loading error as a note."""
    unet = _unet(768, meta=True)
    shapes = _plus_shapes()
    for n, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            inner = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
            for w in ("to_k_ip", "to_v_ip"):
                shapes[f"ip_adapter.{n}.{w}.weight"] = (inner, 768)
    path = _header_only(tmp_path / "ip-adapter-plus_sd15.safetensors", shapes)
    report = wt.inspect(path)
    ip = report["ip_adapter"]
    assert ip["variant"] == "Plus (Resampler, 16 image tokens)" and "unsupported" not in ip
    assert (ip["cross_attention_dim"], ip["image_embed_dim"], ip["layers"]) == (768, 1280, 16)
    assert report["family"] == "sd1" and report["notes"] == []
    text, _ = _inspect_cli(path, capsys)
    assert "ip_adapter       83 tensors     49,087,488 params  F16 x83" in text, text
    assert ("IP-Adapter: Plus (Resampler, 16 image tokens); image embeddings 1280-d; "
            "cross_attention_dim 768; 16 cross-attention layers") in text  # fmt: skip
    del shapes["image_proj.layers.0.0.to_q.weight"]
    report = wt.inspect(_header_only(tmp_path / "broken.safetensors", shapes))
    assert report["ip_adapter"]["variant"] == "Plus (Resampler, 16 image tokens)"
    assert report["notes"] == [
        "minisd would not load it: missing key 'image_proj.layers.0.0.to_q.weight'"
    ]


def test_broken_base_ip_adapter_is_described_with_a_note(tmp_path):
    """A base file minisd would refuse (a layer's to_v_ip missing): still an IP-Adapter, and
    the note is minisd's own loading error."""
    flat = adapter_state_dict(_unet(768), seed=1, embed_dim=24)
    del flat["ip_adapter.1.to_v_ip.weight"]
    save_file(flat, tmp_path / "broken.safetensors")
    report = wt.inspect(tmp_path / "broken.safetensors")
    assert report["kind"] == "ip-adapter" and "unsupported" not in report["ip_adapter"]
    assert report["notes"] == [
        "minisd would not load it: missing key 'ip_adapter.1.to_v_ip.weight'"
    ]


# ------------------------------------------------------------------------- T2I-Adapter

T2I = {
    "full": (dict(in_channels=3, channels=(8, 16, 16), num_res_blocks=2),
             ("full_adapter", 3, [8, 16, 16], 2, [8, 16, 16])),
    "light_gray": (dict(in_channels=1, channels=(8, 16), num_res_blocks=3,
                        adapter_type="light_adapter"),
                   ("light_adapter", 1, [8, 16], 3, [8, 16, 16])),
}  # fmt: skip


@pytest.mark.parametrize("name", list(T2I))
def test_t2i_adapter_file_and_folder(name, tmp_path, capsys):
    torch, diffusers = need("torch", "diffusers")
    cfg, (kind, cin, channels, res, features) = T2I[name]
    torch.manual_seed(0)
    adapter = randomize_(diffusers.T2IAdapter(**cfg), seed=4)
    adapter.save_pretrained(str(tmp_path / name), safe_serialization=True)
    path = tmp_path / name / "diffusion_pytorch_model.safetensors"
    report = wt.inspect(path)
    assert report["kind"] == "t2i-adapter" and report["layout"] == "diffusers"
    assert report["notes"] == [] and report["family"] == "unknown"  # not SD-sized
    t = report["t2i_adapter"]
    assert (t["adapter_type"], t["in_channels"], t["channels"]) == (kind, cin, channels)
    assert (t["num_res_blocks"], t["feature_channels"]) == (res, features)
    n = sum(p.numel() for p in adapter.parameters())
    assert report["components"]["adapter"]["parameters"] == n
    folder = wt.inspect(tmp_path / name)
    assert folder["kind"] == "t2i-adapter" and folder["t2i_adapter"] == t
    text, _ = _inspect_cli(path, capsys)
    line = (f"T2I-Adapter: {kind}; in_channels {cin}; channels {channels}; {res} resnets per "
            f"block; features for UNet down blocks of {features} channels")  # fmt: skip
    assert line in text and "kind:                t2i-adapter" in text, text


@pytest.mark.parametrize(
    "cfg, family, channels",
    [
        (dict(), "sd1/sd2", [320, 640, 1280, 1280]),  # TencentARC t2iadapter_*_sd15v2
        (dict(in_channels=3, channels=(320, 640, 1280), num_res_blocks=4,
              adapter_type="light_adapter"), "sd1/sd2", [320, 640, 1280]),  # color_sd14v1
        (dict(in_channels=3, channels=(320, 640, 1280, 1280), num_res_blocks=2,
              downscale_factor=16, adapter_type="full_adapter_xl"), "sdxl", [320, 640, 1280, 1280]),
    ],
)  # fmt: skip
def test_t2i_adapter_full_size(cfg, family, channels, tmp_path):
    torch, diffusers = need("torch", "diffusers")
    with torch.device("meta"):
        adapter = diffusers.T2IAdapter(**cfg)
    shapes = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    report = wt.inspect(_header_only(tmp_path / "adapter.safetensors", shapes))
    t = report["t2i_adapter"]
    assert report["family"] == family and t["channels"] == channels
    assert t["feature_channels"] == [320, 640, 1280, 1280] and t["in_channels"] == 3
    if family == "sdxl":
        assert "full_adapter_xl" in t["unsupported"]
    else:
        assert report["notes"] == [] and "unsupported" not in t


def test_t2i_adapter_with_a_wrong_shape_has_a_note(tmp_path):
    torch, diffusers = need("torch", "diffusers")
    adapter = diffusers.T2IAdapter(in_channels=3, channels=(8, 16), num_res_blocks=1)
    flat = {k: to_np(v) for k, v in adapter.state_dict().items()}
    flat["adapter.body.1.resnets.0.block2.weight"] = np.zeros((16, 16, 3, 3), np.float32)
    save_file(flat, tmp_path / "bad.safetensors")
    report = wt.inspect(tmp_path / "bad.safetensors")
    assert report["kind"] == "t2i-adapter"
    assert report["notes"] == [
        "not a T2I-Adapter minisd reads: key 'adapter.body.1.resnets.0.block2.weight' is "
        "(16, 16, 3, 3), expected (16, 16, 1, 1)"
    ]


def test_other_add_ons_are_still_told_apart(tmp_path):
    """A LoRA whose keys mention the adapter modules is still a LoRA, and a ControlNet is
    still a ControlNet (the new checks come first)."""
    lora = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora."
            "down.weight": (4, 8)}  # fmt: skip
    save_file({k: np.zeros(s, np.float16) for k, s in lora.items()}, tmp_path / "l.safetensors")
    assert wt.inspect(tmp_path / "l.safetensors")["kind"] == "lora"
    cn = {"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3)}
    save_file({k: np.zeros(s, np.float16) for k, s in cn.items()}, tmp_path / "c.safetensors")
    assert wt.inspect(tmp_path / "c.safetensors")["kind"] == "controlnet"


@pytest.mark.parametrize(
    "keys, family",
    [
        ({"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (8, 2048)}, "sdxl"),
        ({"mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight": (8, 768)}, "sd1"),
        ({"input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 1024)}, "sd2"),
        ({"add_embedding.linear_1.weight": (16, 40)}, "sdxl"),  # tiny / attention-free SDXL
        ({"label_emb.0.0.weight": (16, 40)}, "sdxl"),  # the same, original layout
        ({}, "unknown"),
    ],
)
def test_controlnet_family(keys, family, tmp_path):
    """A ControlNet's family comes from its context width (SDXL's is 2048, the width of the
    two text encoders side by side), else from SDXL's micro-conditioning MLP."""
    original = any(k.startswith(("input_blocks", "label_emb")) for k in keys)
    hint = "input_hint_block.0" if original else "controlnet_cond_embedding.conv_in"
    shapes = {f"{hint}.weight": (16, 3, 3, 3), **keys}
    save_file({k: np.zeros(s, np.float16) for k, s in shapes.items()}, tmp_path / "c.safetensors")
    report = wt.inspect(tmp_path / "c.safetensors")
    assert report["kind"] == "controlnet" and report["family"] == family
