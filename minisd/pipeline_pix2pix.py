"""InstructPix2Pix in the sampling loop (Brooks, Holynski & Efros 2023, "InstructPix2Pix:
Learning to Follow Image Editing Instructions"), as diffusers'
StableDiffusionInstructPix2PixPipeline runs it.

An InstructPix2Pix UNet takes twice the latent channels (8): the noisy latents z_t and the
VAE's mode of the image to edit, E(c_I), *unscaled* (no ``scaling_factor``, as diffusers'
``prepare_image_latents``). The prompt is an instruction ("make it snowy"), c_T. Guidance has
one scale per condition (paper eq. 3), with e_TI = eps(z_t, c_I, c_T),
e_I = eps(z_t, c_I, empty) and e_0 = eps(z_t, 0, empty):

    eps = e_0 + s_T (e_TI - e_I) + s_I (e_I - e_0)

three UNet rows per image, in diffusers' order [e_TI, e_I, e_0]: prompt embeddings
[c_T, empty, empty] and image latents [E(c_I), E(c_I), 0]. Guidance is on when s_T > 1 and
s_I >= 1 (diffusers' ``do_classifier_free_guidance``); otherwise one row, e_TI.

The run starts from pure noise (there is no ``strength``); the output size is the image's.
"""

from __future__ import annotations

from .config import is_number
from .errors import InputError
from .pipeline_steps import tile_to

#: diffusers' default image guidance scale (its pipeline's ``image_guidance_scale=1.5``).
DEFAULT_IMAGE_GUIDANCE = 1.5


def is_edit_model(pipe) -> bool:
    """An InstructPix2Pix UNet: latents and image latents side by side (8 channels for SD)."""
    return pipe.unet.config.in_channels == 2 * pipe.vae.config.latent_channels


def rows(guidance_scale, image_guidance_scale) -> int:
    """UNet rows per image: 3 with both guidances, else 1 (the text-and-image row only)."""
    return 3 if guidance_scale > 1.0 and image_guidance_scale >= 1.0 else 1


def check(pipe, *, image, mask_image, image_guidance_scale, control_image, guidance_rescale):
    """The arguments an InstructPix2Pix run needs and the ones it cannot take; for any other
    UNet, ``image_guidance_scale`` must stay None. -> the image guidance scale to use."""
    s = image_guidance_scale
    if not is_edit_model(pipe):
        if s is not None:
            raise InputError(
                f"image_guidance_scale={s!r}: only InstructPix2Pix UNets (in_channels = 2 x "
                f"latent channels) take it; this UNet has {pipe.unet.config.in_channels}"
            )
        return None
    s = DEFAULT_IMAGE_GUIDANCE if s is None else s
    if not (is_number(s) and s >= 0):
        raise InputError(f"image_guidance_scale={s!r}: must be a finite number >= 0")
    if image is None:
        raise InputError("image: an InstructPix2Pix UNet edits an image; give `image`")
    refused = {
        "mask_image": mask_image is not None,
        "control_image": control_image is not None,
        "guidance_rescale": guidance_rescale > 0,
    }
    for name, given in refused.items():
        if given:
            raise InputError(f"{name}: not supported with an InstructPix2Pix UNet")
    return s


def image_latents(pipe, image, shape):
    """The edited image -> E(c_I): the VAE posterior's mode, unscaled, one per latent row
    (one image for all prompts, or one per prompt). (B, 4, h, w)."""
    f = pipe.vae_scale_factor
    init = pipe.image_processor.preprocess(image, height=shape[2] * f, width=shape[3] * f)
    out = pipe.vae.encode(pipe.xp.asarray(init).astype(pipe.dtype))  # (n, 3, H, W) in [-1, 1]
    z = out.mode() if hasattr(out, "mode") else out  # AutoencoderTiny returns latents
    return tile_to(z, shape[0], "image")  # (B, 4, h, w)


def conditioning(pipe, image, shape, ctx, n_rows):
    """(prompt embeddings, image latents) for the UNet rows: with guidance, ctx [empty; c_T]
    as pipeline_steps.encode_prompt gives it becomes [c_T, empty, empty] and the image latents
    [E, E, 0]. -> ((3B or B, 77, D), (3B or B, 4, h, w))."""
    xp = pipe.xp
    z = image_latents(pipe, image, shape)  # (B, 4, h, w)
    if n_rows == 1:
        return ctx, z
    empty, text = ctx[: shape[0]], ctx[shape[0] :]  # (B, 77, D) each
    ctx3 = xp.concatenate([text, empty, empty])  # (3B, 77, D)
    return ctx3, xp.concatenate([z, z, xp.zeros_like(z)])  # (3B, 4, h, w)


def guide(eps, n_rows, text_scale, image_scale):
    """eps = e_0 + s_T (e_TI - e_I) + s_I (e_I - e_0) over the rows [e_TI, e_I, e_0]."""
    if n_rows == 1:
        return eps
    b = eps.shape[0] // 3
    e_ti, e_i, e_0 = eps[:b], eps[b : 2 * b], eps[2 * b :]
    return e_0 + text_scale * (e_ti - e_i) + image_scale * (e_i - e_0)
