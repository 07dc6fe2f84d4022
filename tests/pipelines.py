"""Tiny Stable Diffusion pipeline folders written by diffusers itself (offline, random weights).

SD1-like: conv projections, quick_gelu text encoder, PNDM, epsilon. SD2-like: linear projections,
per-block heads, gelu text encoder, "!" padding, DDIM, v-prediction. Inpaint: SD1-like with a
9-channel UNet. LCM: SD1-like with an LCM-distilled UNet (time_cond_proj_dim) and LCMScheduler.
pix2pix: SD1-like with an 8-channel InstructPix2Pix UNet. depth: SD2-like with a 5-channel
depth2img UNet (epsilon, PNDM, no depth estimator: the tests give depth maps).
The tokenizer is the real CLIP vocabulary bundled with minisd.
"""

from __future__ import annotations

from refharness import need, randomize_

KINDS = {
    "sd1": dict(linear=False, heads=2, act="quick_gelu", pred="epsilon", pad="<|endoftext|>",
                in_channels=4),
    "sd2": dict(linear=True, heads=[1, 2, 2], act="gelu", pred="v_prediction", pad="!",
                in_channels=4),
    "inpaint": dict(linear=False, heads=2, act="quick_gelu", pred="epsilon",
                    pad="<|endoftext|>", in_channels=9),
    # LCM-distilled (Luo et al. 2023): the UNet takes a guidance-scale embedding, LCMScheduler
    "lcm": dict(linear=False, heads=2, act="quick_gelu", pred="epsilon", pad="<|endoftext|>",
                in_channels=4, cond_dim=8),
    # InstructPix2Pix (Brooks et al. 2023): latents and the edited image's latents side by side
    "pix2pix": dict(linear=False, heads=2, act="quick_gelu", pred="epsilon",
                    pad="<|endoftext|>", in_channels=8),
    # depth2img (stable-diffusion-2-depth): SD2-like, latents and a depth channel
    "depth": dict(linear=True, heads=[1, 2, 2], act="gelu", pred="epsilon", pad="!",
                  in_channels=5),
}  # fmt: skip


def components(kind, folder):
    """diffusers/transformers modules of a tiny pipeline, every parameter randomized."""
    torch, diffusers, transformers = need("torch", "diffusers", "transformers")
    from minisd.tokenizer import write_vocab_files

    k = KINDS[kind]
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16, 16), layers_per_block=1, in_channels=k["in_channels"],
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=k["heads"], norm_num_groups=4,
        use_linear_projection=k["linear"], sample_size=8, time_cond_proj_dim=k.get("cond_dim"),
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
        latent_channels=4, sample_size=64,
    )  # fmt: skip
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, hidden_act=k["act"], bos_token_id=49406, eos_token_id=49407,
    ))  # fmt: skip
    for i, module in enumerate((unet, vae, text)):
        randomize_(module, seed=i)
    with torch.no_grad():  # a random UNet is far less smooth than a trained one: sampling with
        unet.conv_out.weight.mul_(0.1)  # it amplifies round-off ~60x per step (see
        unet.conv_out.bias.mul_(0.1)  # test_inpaint_same_seed); smaller eps keeps it ~10x
    tok_dir = write_vocab_files(folder.parent / f"{folder.name}_tokenizer", pad_token=k["pad"])
    tok = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
              prediction_type=k["pred"], steps_offset=1)  # fmt: skip
    if kind == "sd2":
        sched = diffusers.DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=False)
    elif kind == "lcm":
        sched = diffusers.LCMScheduler(**kw, set_alpha_to_one=True)
    else:
        sched = diffusers.PNDMScheduler(**kw, skip_prk_steps=True)
    parts = dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(), tokenizer=tok,
                 scheduler=sched, feature_extractor=None)  # fmt: skip
    if kind == "depth":
        return dict(parts, depth_estimator=None)
    return dict(parts, safety_checker=None, requires_safety_checker=False)


def build(kind, folder):
    """Write the pipeline folder with save_pretrained; returns diffusers' pipeline loaded back
    from it (as a user would: scheduler configs then carry exactly the saved keys)."""
    diffusers = need("diffusers")
    cls = {
        "inpaint": diffusers.StableDiffusionInpaintPipeline,
        "pix2pix": diffusers.StableDiffusionInstructPix2PixPipeline,
        "depth": diffusers.StableDiffusionDepth2ImgPipeline,
    }.get(kind, diffusers.StableDiffusionPipeline)
    cls(**components(kind, folder)).save_pretrained(str(folder), safe_serialization=True)
    none = ("depth_estimator", "feature_extractor") if kind == "depth" else ("safety_checker",)
    kw = dict.fromkeys(none)
    pipe = cls.from_pretrained(str(folder), **kw, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
