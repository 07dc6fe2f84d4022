"""What ``StableDiffusion.__call__`` does, in order: check every argument before any heavy work,
prepare the add-ons' conditioning once (ControlNet, T2I-Adapter, IP-Adapter, InstructPix2Pix),
run the denoising loop (denoise.py), decode.

The add-ons reach the loop as one dict (``denoise.run(..., addons=)``):
- ``control``: pipeline_control.prepare's state (ControlNet residuals, computed every step)
- ``adapter``: pipeline_adapter.prepare's state (T2I-Adapter features, computed once)
- ``image_embeds``: pipeline_ip.prepare's CLIP image embeddings (IP-Adapter, computed once)
- ``image_guidance_scale``: InstructPix2Pix's s_I (pipeline_pix2pix.py), None otherwise
- ``depth_map``: a depth UNet's depth map (pipeline_depth.py), None otherwise
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from . import pipeline_adapter, pipeline_control, pipeline_depth, pipeline_pix2pix
from . import pipeline_steps as steps
from .backend import to_numpy
from .errors import InputError


def generate(pipe, a: SimpleNamespace):
    """``a``: StableDiffusion.__call__'s arguments by name."""
    from .denoise import run

    prompts, negative = prompt_lists(a.prompt, a.negative_prompt)
    # padding_mask_crop: the crop takes the model's size by default (diffusers' inpainting
    # pipelines; its ControlNet inpainting pipelines keep the image's size)
    crop = getattr(a, "padding_mask_crop", None) is not None and a.control_image is None
    sized_by = None if crop else _sized_by(pipe, a)
    height, width = pipe._resolve_size(a.height, a.width, sized_by)
    height, width = pipeline_adapter.round_size(pipe, a, height, width)  # SDXL adapters: 16
    masked = a.image is not None and a.mask_image is not None
    steps.validate(
        prompts=prompts, negative=negative, height=height, width=width,
        steps=a.num_inference_steps, guidance_scale=a.guidance_scale, strength=a.strength,
        image=a.image, mask_image=a.mask_image,
        scheduler=pipe.scheduler_name if a.scheduler is None else a.scheduler,
        output_type=a.output_type, num_images_per_prompt=a.num_images_per_prompt, eta=a.eta,
        clip_skip=a.clip_skip, callback=a.callback, guidance_rescale=a.guidance_rescale,
        image_hw=steps.pixel_size(pipe, a.image) if masked else None,
    )  # fmt: skip
    overlay = _crop_to_mask(a, height, width)  # padding_mask_crop: inpaint a crop, paste it back
    steps.check_inpaint(pipe, a.image, a.mask_image)
    cn_args = _controlnet_args(pipe, a)
    pipeline_control.check(pipe, a.control_image, **cn_args)
    edit = _check_edit(pipe, a)
    depth_map = pipeline_depth.check(pipe, a)  # (N, H, W) float64, or None
    _check_adapters(pipe, a)
    rng = a.rng
    if rng is None:
        from .rng import make_rng

        rng = make_rng(a.seed)
    pipe._free_phases = (
        pipe.free_memory_between_phases
        if a.free_memory_between_phases is None
        else a.free_memory_between_phases
    )
    batch = len(prompts) * a.num_images_per_prompt
    rows = unet_rows(pipe, a.guidance_scale, edit)
    pipe._set_attention_chunk(batch * rows, height, width)
    addons = _prepare_addons(pipe, a, cn_args, batch=batch, size=(height, width), cfg=rows > 1)
    addons["image_guidance_scale"] = edit
    addons["depth_map"] = depth_map
    addons["text"] = pipe._text_extra(a, height, width)  # SDXL's second prompts and time ids
    addons.update(_experts(a))
    lat = run(
        pipe, prompts=prompts, negative=negative, steps=a.num_inference_steps,
        guidance_scale=a.guidance_scale, height=height, width=width, scheduler=a.scheduler,
        nipp=a.num_images_per_prompt, latents=a.latents, image=a.image, strength=a.strength,
        mask_image=a.mask_image, clip_skip=a.clip_skip, eta=a.eta, callback=a.callback,
        rng=rng, progress=a.progress, addons=addons, guidance_rescale=a.guidance_rescale,
    )  # fmt: skip
    pipe.phase_done("denoising")
    out = output(pipe, lat, a.output_type)
    return out if overlay is None else overlay(out)


def unet_conditioning(pipe, prompt, height, width):
    """One prompt's UNet conditioning without guidance, every other argument at the pipeline's
    default (for the trace and parity tools): (context (1, 77, D), added_cond_kwargs or None;
    SDXL's has the pooled embedding and the time ids of a height x width image)."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    a = SimpleNamespace(**{k: p.default for k, p in params.items() if k != "self"})
    a.prompt = prompt
    extra = pipe._text_extra(a, height, width)
    return pipe.text_conditioning([prompt], None, 1, False, None, extra)


def unet_class_labels(pipe):
    """The class labels one UNet call needs (for the trace and parity tools): None, or for a
    UNet with a class embedding (the x4 upscaler) its pipeline's default noise level, (1,)."""
    if not getattr(pipe.unet.config, "num_class_embeds", None):
        return None
    import inspect

    level = inspect.signature(type(pipe).__call__).parameters.get("noise_level")
    return np.asarray([0 if level is None else level.default])  # (1,)


def unet_rows(pipe, guidance_scale, image_guidance_scale=None) -> int:
    """UNet rows per image: 1 without guidance, 2 with classifier-free guidance (except for
    LCM-distilled UNets, which take the scale as an embedding, as diffusers), 3 for
    InstructPix2Pix's two guidances (pipeline_pix2pix.py)."""
    if image_guidance_scale is not None:
        return pipeline_pix2pix.rows(guidance_scale, image_guidance_scale)
    return 2 if guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None else 1


def _sized_by(pipe, a):
    """The image whose size is the default output size, as diffusers: ``image`` (img2img,
    inpainting, InstructPix2Pix), else the (first) control image, else the (first) T2I-Adapter
    image; None: txt2img's unet.sample_size."""
    if a.image is not None:
        return a.image
    if a.control_image is not None:
        return pipeline_control.first_image(pipe, a.control_image)
    if a.adapter_image is not None:
        from . import pipeline_adapter

        return pipeline_adapter.first_image(pipe, a.adapter_image)
    return None


def _crop_to_mask(a, height, width):
    """``padding_mask_crop`` (diffusers' inpainting pipelines; minisd/mask_crop.py): inpaint
    the mask's surroundings at (height, width) and paste the result back into the image.
    Replaces ``a.image``, ``a.mask_image`` and PIL control images by their crops. -> the
    function that pastes generated PIL images back, or None without padding_mask_crop."""
    pad = getattr(a, "padding_mask_crop", None)
    if pad is None:
        return None
    from PIL import Image

    from . import mask_crop

    if a.mask_image is None:
        raise InputError("padding_mask_crop: crops around the mask; give mask_image")
    for name in ("image", "mask_image"):
        if not isinstance(getattr(a, name), Image.Image):
            got = type(getattr(a, name)).__name__
            raise InputError(f"{name}: padding_mask_crop needs one PIL image, got {got}")
    if a.output_type != "pil":
        raise InputError(
            f"output_type={a.output_type!r}: padding_mask_crop pastes the results back into "
            "the PIL image; use output_type='pil'"
        )
    image, mask = a.image, a.mask_image
    a.image, a.mask_image, region = mask_crop.crop_inputs(image, mask, width, height, pad)
    if getattr(a, "control_image", None) is not None:  # cropped alike (ControlNet inpainting)
        one = not isinstance(a.control_image, (list, tuple))
        crops = [
            _crop_control(c, region, width, height)
            for c in ([a.control_image] if one else a.control_image)
        ]
        a.control_image = crops[0] if one else crops
    return lambda images: [mask_crop.apply_overlay(mask, image, im, region) for im in images]


def _crop_control(control, region, width, height):
    from PIL import Image

    from . import mask_crop

    if not isinstance(control, Image.Image):
        got = type(control).__name__
        raise InputError(f"control_image: padding_mask_crop crops PIL images, got {got}")
    return mask_crop.crop_and_resize(control, region, width, height)


def prompt_lists(prompt, negative_prompt):
    """(prompts, negative prompts or None) as lists; one negative string serves every prompt."""
    prompts = steps.as_prompt_list(prompt)
    negative = None
    if negative_prompt is not None:
        negative = steps.as_prompt_list(negative_prompt, "negative_prompt")
        if isinstance(negative_prompt, str):
            negative = negative * len(prompts)
    return prompts, negative


def _controlnet_args(pipe, a):
    scale = pipeline_control.default_scale(
        a.controlnet_conditioning_scale, a.image, a.mask_image, pipe
    )
    return dict(
        scale=scale,
        guess_mode=a.guess_mode,
        start=a.control_guidance_start,
        end=a.control_guidance_end,
        mode=getattr(a, "control_mode", None),  # union ControlNets (SDXL pipelines only)
    )


def _check_edit(pipe, a):
    """InstructPix2Pix's image guidance scale (None for other UNets); it takes no adapters."""
    edit = pipeline_pix2pix.check(
        pipe, image=a.image, mask_image=a.mask_image, image_guidance_scale=a.image_guidance_scale,
        control_image=a.control_image, guidance_rescale=a.guidance_rescale,
    )  # fmt: skip
    if edit is not None:
        for name in ("adapter_image", "ip_adapter_image", "ip_adapter_image_embeds"):
            if getattr(a, name, None) is not None:
                raise InputError(f"{name}: not supported with an InstructPix2Pix UNet")
    return edit


def _check_adapters(pipe, a):
    """A loaded T2I-Adapter without ``adapter_image`` sits the run out (as a ControlNet does);
    a loaded IP-Adapter changes the UNet's cross-attention, so it needs its image."""
    if a.adapter_image is not None:
        from . import pipeline_adapter

        pipeline_adapter.check(
            pipe, a.adapter_image,
            scale=a.adapter_conditioning_scale, factor=a.adapter_conditioning_factor,
        )  # fmt: skip
    embeds = getattr(a, "ip_adapter_image_embeds", None)
    loaded = getattr(pipe.unet, "ip_adapter", None) is not None
    if a.ip_adapter_image is not None or embeds is not None or loaded:
        from . import pipeline_ip

        pipeline_ip.check(pipe, a.ip_adapter_image, embeds)


def _prepare_addons(pipe, a, cn_args, *, batch, size, cfg):
    """Each add-on's conditioning, computed before the loop (None where it is not used)."""
    nipp = a.num_images_per_prompt
    addons = {"adapter": None, "image_embeds": None}
    addons["control"] = pipeline_control.prepare(
        pipe, a.control_image, **cn_args, batch=batch, nipp=nipp, size=size, cfg=cfg
    )
    if a.adapter_image is not None:
        from . import pipeline_adapter

        addons["adapter"] = pipeline_adapter.prepare(
            pipe, a.adapter_image, scale=a.adapter_conditioning_scale,
            factor=a.adapter_conditioning_factor, batch=batch, nipp=nipp, size=size, cfg=cfg,
        )  # fmt: skip
    embeds = getattr(a, "ip_adapter_image_embeds", None)
    if a.ip_adapter_image is not None or embeds is not None:
        from . import pipeline_ip

        addons["image_embeds"] = pipeline_ip.prepare(
            pipe, a.ip_adapter_image, batch=batch, nipp=nipp, cfg=cfg, embeds=embeds
        )
    return addons


def _experts(a):
    """SDXL's denoising_start / denoising_end (None elsewhere), checked: fractions in (0, 1),
    the start only for img2img, start < end."""
    start, end = getattr(a, "denoising_start", None), getattr(a, "denoising_end", None)
    for name, v in (("denoising_start", start), ("denoising_end", end)):
        if v is not None and not (steps.is_number(v) and 0 < v < 1):
            raise InputError(f"{name}={v!r}: must be a fraction in (0, 1) or None")
    if start is not None and a.image is None:
        raise InputError("denoising_start: needs `image` (the latents or image to continue)")
    if start is not None and end is not None and start >= end:
        raise InputError(f"denoising_start={start} must be < denoising_end={end}")
    return {"denoising_start": start, "denoising_end": end}


def output(pipe, lat, output_type):
    """Denoised latents -> "latent" (as they are), or decoded "pil" / "np" images."""
    if output_type == "latent":
        return to_numpy(lat)
    decoded = pipe.decode_latents(lat)  # (N, 3, H, W)
    out = pipe.image_processor.postprocess(to_numpy(decoded), output_type=output_type)
    del decoded
    pipe.phase_done("decoding")
    return out
