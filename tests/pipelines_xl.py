"""Tiny SDXL pipeline folders written by diffusers itself (offline, random weights).

base: two text encoders (CLIP ViT-L-like quick_gelu, bigG-like gelu with a projection, "!"
padding), a "text_time" UNet taking six time ids, EulerDiscreteScheduler as SDXL's config,
force_zeros_for_empty_prompt. refiner: the second encoder only, five time ids (aesthetic score),
requires_aesthetics_score, no zeroed negatives, and a VAE with latents_mean / latents_std.
inpaint: base with a 9-channel UNet (latents, mask, masked-image latents), saved as a
StableDiffusionXLInpaintPipeline (SDXL 1.0 inpainting 0.1's layout).
"""

from __future__ import annotations

from refharness import need, randomize_

KINDS = {
    "base": dict(first=True, n_ids=6, stats=False),
    "refiner": dict(first=False, n_ids=5, stats=True),
    "inpaint": dict(first=True, n_ids=6, stats=False, in_channels=9),
}


def _text_encoders(kind, transformers):
    common = dict(vocab_size=49408, intermediate_size=24, num_attention_heads=2,
                  bos_token_id=49406, eos_token_id=49407)  # fmt: skip
    te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        **common, hidden_size=16, num_hidden_layers=3, hidden_act="gelu", projection_dim=12,
    ))  # fmt: skip
    te1 = None
    if KINDS[kind]["first"]:
        te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            **common, hidden_size=8, num_hidden_layers=2, hidden_act="quick_gelu",
        ))  # fmt: skip
    return te1, te2


def components(kind, folder):
    """diffusers/transformers modules of a tiny SDXL pipeline, every parameter randomized."""
    torch, diffusers, transformers = need("torch", "diffusers", "transformers")
    from minisd.tokenizer import write_vocab_files

    k = KINDS[kind]
    te1, te2 = _text_encoders(kind, transformers)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16, 16), layers_per_block=1, sample_size=8,
        in_channels=k.get("in_channels", 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4),
        use_linear_projection=True, norm_num_groups=4,
        cross_attention_dim=16 + (8 if k["first"] else 0), addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=12 + 4 * k["n_ids"],
    )  # fmt: skip
    stats = dict(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.9, 1.2, 0.7, 1.1])
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
        latent_channels=4, sample_size=64, scaling_factor=0.13025, force_upcast=True,
        **(stats if k["stats"] else {}),
    )  # fmt: skip
    for i, module in enumerate((unet, vae, te2, te1)):
        if module is not None:
            randomize_(module, seed=20 + i)
    with torch.no_grad():  # smaller eps: a random UNet amplifies round-off (tests/pipelines.py)
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    tok2 = _tokenizer(folder, "tokenizer_2", "!", write_vocab_files, transformers)
    tok1 = _tokenizer(folder, "tokenizer", "<|endoftext|>", write_vocab_files, transformers)
    sched = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon",
    )  # fmt: skip
    return dict(
        unet=unet.eval(), vae=vae.eval(), text_encoder_2=te2.eval(), tokenizer_2=tok2,
        text_encoder=None if te1 is None else te1.eval(), tokenizer=tok1 if k["first"] else None,
        scheduler=sched,
    )  # fmt: skip


def _tokenizer(folder, name, pad, write_vocab_files, transformers):
    path = write_vocab_files(folder.parent / f"{folder.name}_{name}", pad_token=pad)
    return transformers.CLIPTokenizer.from_pretrained(str(path))


def _flags(kind):
    refiner = kind == "refiner"
    flags = dict(force_zeros_for_empty_prompt=not refiner, add_watermarker=False)
    if refiner:
        flags["requires_aesthetics_score"] = True
    return flags


def build(kind, folder):
    """Write the folder with save_pretrained (base: StableDiffusionXLPipeline; refiner:
    StableDiffusionXLImg2ImgPipeline; inpaint: StableDiffusionXLInpaintPipeline) and return
    diffusers' pipelines loaded back from it, sharing their modules: (txt2img, img2img), the
    inpaint kind's first one an inpainting pipeline."""
    diffusers = need("diffusers")
    flags = _flags(kind)
    cls = {
        "refiner": diffusers.StableDiffusionXLImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionXLInpaintPipeline,
    }.get(kind, diffusers.StableDiffusionXLPipeline)
    cls(**components(kind, folder), **flags).save_pretrained(str(folder), safe_serialization=True)
    pipe = cls.from_pretrained(str(folder), local_files_only=True, add_watermarker=False)
    i2i = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components, **flags)
    for p in (pipe, i2i):
        p.set_progress_bar_config(disable=True)
    return pipe, i2i


def build_inpaint(kind, folder):
    """Write ``kind``'s folder (see build) and return diffusers' StableDiffusionXLInpaintPipeline
    over its modules: a 9-channel UNet for "inpaint", mask blending for "base" / "refiner"."""
    diffusers = need("diffusers")
    pipe = diffusers.StableDiffusionXLInpaintPipeline(**build(kind, folder)[0].components,
                                                      **_flags(kind))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_controlnet(unet, folder, seed=7):
    """An SDXL ControlNet (addition_embed_type "text_time") copied from a tiny SDXL UNet with
    diffusers' ControlNetModel.from_unet, a small conditioning embedding (still 8x the latent
    size), every parameter randomized (zero convolutions included, scaled by 0.1 to keep
    sampling well-conditioned), saved to ``folder``. Returns the diffusers module."""
    diffusers = need("diffusers")
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 4, 8, 8))
    return _randomized_save(cn, folder, seed)


def _randomized_save(cn, folder, seed):
    """Randomize ``cn`` (zero convolutions scaled by 0.1), save it to ``folder``, return it."""
    torch = need("torch")
    randomize_(cn, seed=seed)
    with torch.no_grad():
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            conv.weight.mul_(0.1)
    cn.eval().save_pretrained(str(folder), safe_serialization=True)
    return cn


def build_union_controlnet(unet, folder, seed=7):
    """A union ControlNet (diffusers' ControlNetUnionModel: six control types, one attention
    layer of 2 heads over conv_in's width) with a tiny SDXL UNet's architecture, randomized and
    saved as build_controlnet's. Returns the diffusers module."""
    diffusers = need("diffusers")
    keys = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block",
            "transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
            "use_linear_projection", "norm_num_groups", "cross_attention_dim",
            "addition_embed_type", "addition_time_embed_dim",
            "projection_class_embeddings_input_dim")  # fmt: skip
    c0 = unet.config.block_out_channels[0]
    cn = diffusers.ControlNetUnionModel(
        **{k: unet.config[k] for k in keys}, conditioning_embedding_out_channels=(4, 4, 8, 8),
        num_trans_channel=c0, num_proj_channel=c0, num_trans_head=2,
    )  # fmt: skip
    return _randomized_save(cn, folder, seed)


def controlnet_pipeline(components, controlnet, task="txt2img", union=False):
    """diffusers' StableDiffusionXLControlNet{,Union}{,Img2Img,Inpaint}Pipeline (``task``:
    "txt2img", "img2img", "inpaint") over a base folder's modules and a ControlNet (a list:
    several)."""
    diffusers = need("diffusers")
    name = {"txt2img": "", "img2img": "Img2Img", "inpaint": "Inpaint"}[task]
    cls = getattr(diffusers, f"StableDiffusionXLControlNet{'Union' * union}{name}Pipeline")
    keys = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")
    pipe = cls(**{k: components[k] for k in keys}, scheduler=components["scheduler"],
               controlnet=controlnet, **_flags("base"))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
