"""Config dicts of Stable Diffusion components as diffusers / transformers write them.

Defaults are SD1.5's (the values of its published config.json files); callers override fields.
"""

from __future__ import annotations

from minisd.errors import ConfigError, InputError

DIFFUSERS_VERSION = "0.42.0"
SCHEDULER_BASE = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def unet_config(**fields):
    """A complete UNet2DConditionModel config.json dict (diffusers' defaults + ``fields``)."""
    cfg = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "class_embed_type": None,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "resnet_time_scale_shift": "default",
        "sample_size": 64,
        "time_embedding_type": "positional",
        "transformer_layers_per_block": 1,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "upcast_attention": False,
        "use_linear_projection": False,
    }
    cfg.update(fields)
    return cfg


def vae_config(**fields):
    """A complete AutoencoderKL config.json dict."""
    cfg = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 512,
        "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    cfg.update(fields)
    n = len(cfg["block_out_channels"])
    cfg["down_block_types"] = ["DownEncoderBlock2D"] * n
    cfg["up_block_types"] = ["UpDecoderBlock2D"] * n
    return cfg


def text_encoder_config(**fields):
    """A complete CLIPTextModel config.json dict (SD1.5's values unless overridden)."""
    cfg = {
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 768,
        "torch_dtype": "float32",
        "vocab_size": 49408,
    }
    cfg.update(fields)
    return cfg


def check_prediction_type(prediction_type):
    """InputError unless ``prediction_type`` is None or one of PREDICTION_TYPES."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise InputError(
            f"prediction_type={prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}"
        )


def scheduler_config(prediction_type="epsilon", class_name=None):
    """Stable Diffusion's scheduler_config.json: PNDM (SD1.x, SD2-base) or DDIM (SD2.x-v)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}"
        )
    if class_name is None:
        class_name = "DDIMScheduler" if prediction_type == "v_prediction" else "PNDMScheduler"
    cfg = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **SCHEDULER_BASE}
    cfg["prediction_type"] = prediction_type
    return cfg


#: diffusers' pipeline class by UNet input channels (4: text-to-image, 5: depth2img,
#: 8: InstructPix2Pix, 9: inpainting).
PIPELINE_CLASSES = {
    5: "StableDiffusionDepth2ImgPipeline",
    8: "StableDiffusionInstructPix2PixPipeline",
    9: "StableDiffusionInpaintPipeline",
}


def model_index(scheduler_class="PNDMScheduler", in_channels=4):
    """model_index.json of a StableDiffusion pipeline folder without safety checker; the
    pipeline class follows the UNet's input channels (depth2img's has a depth estimator slot
    instead of the safety checker's, left empty: minisd takes depth maps)."""
    if in_channels == 5:
        optional = {"depth_estimator": [None, None], "feature_extractor": [None, None]}
    else:
        optional = {"feature_extractor": [None, None], "image_encoder": [None, None]}
        optional.update(requires_safety_checker=False, safety_checker=[None, None])
    return {
        "_class_name": PIPELINE_CLASSES.get(in_channels, "StableDiffusionPipeline"),
        "_diffusers_version": DIFFUSERS_VERSION,
        **optional,
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def family_of(unet_cfg, text_cfg, prediction_type):
    """sd1, sd2, sd2-v, inpaint, sd2-inpaint, sd2-depth, sd2-x4-upscaler, instruct-pix2pix, from
    configs; SDXL UNets ("text_time"): sdxl, sdxl-inpaint (a 9-channel UNet), or sdxl-refiner
    when there is no first text encoder (``text_cfg`` None or {})."""
    in_ch = unet_cfg.get("in_channels", 4)
    if unet_cfg.get("addition_embed_type") == "text_time":
        return ("sdxl-inpaint" if in_ch == 9 else "sdxl") if text_cfg else "sdxl-refiner"
    sd2 = text_cfg.get("hidden_act") == "gelu" or bool(unet_cfg.get("use_linear_projection"))
    if in_ch == 9:
        return "sd2-inpaint" if sd2 else "inpaint"
    if in_ch == 8:
        return "instruct-pix2pix"
    if in_ch == 5:
        return "sd2-depth"
    if in_ch == 7 and unet_cfg.get("num_class_embeds"):  # noise-level class embedding
        return "sd2-x4-upscaler"
    if sd2:
        return "sd2-v" if prediction_type == "v_prediction" else "sd2"
    return "sd1"


# ------------------------------------------------------------------------- SDXL

#: scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0 (and the refiner's)
SDXL_SCHEDULER = {
    "interpolation_type": "linear",
    "sample_max_value": 1.0,
    "use_karras_sigmas": False,
}


def sdxl_scheduler_config(prediction_type="epsilon"):
    """SDXL's EulerDiscreteScheduler config (scaled_linear 0.00085..0.012, "leading")."""
    cfg = scheduler_config(prediction_type, "EulerDiscreteScheduler")
    return {**cfg, **SDXL_SCHEDULER}


def sdxl_model_index(refiner=False, scheduler_class="EulerDiscreteScheduler", in_channels=4):
    """model_index.json of an SDXL base (StableDiffusionXLPipeline) or refiner
    (StableDiffusionXLImg2ImgPipeline: no first text encoder, aesthetic-score conditioning,
    no zeroed negative prompt) folder; a 9-channel UNet's (SDXL 1.0 inpainting 0.1):
    StableDiffusionXLInpaintPipeline, which writes requires_aesthetics_score either way."""
    first = [None, None] if refiner else ["transformers", "CLIPTextModel"]
    kind = "Img2ImgPipeline" if refiner else "Pipeline"
    out = {
        "_class_name": "StableDiffusionXL" + ("InpaintPipeline" if in_channels == 9 else kind),
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": not refiner,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": first,
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if refiner or in_channels == 9:
        out["requires_aesthetics_score"] = refiner
    return out
