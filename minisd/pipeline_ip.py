"""IP-Adapter in the pipeline (Ye et al. 2023; minisd/ip_adapter.py has the model), as diffusers'
``IPAdapterMixin`` (loaders/ip_adapter.py) and StableDiffusion(XL)Pipeline's ``encode_image`` /
``prepare_ip_adapter_image_embeds`` do it for one base or Plus IP-Adapter, on SD1.x / SD2.x and
on SDXL (minisd.StableDiffusionXL: h94's ip-adapter_sdxl with the ViT-bigG encoder,
ip-adapter_sdxl_vit-h and ip-adapter-plus(-face)_sdxl_vit-h with ViT-H; the same code, the
tokens 2048 wide):

    pipe.load_ip_adapter(weights, image_encoder, scale=1.0)   # .safetensors + CLIP vision folder
    pipe(prompt, ip_adapter_image=image)                       # the image prompts with the text
    pipe.set_ip_adapter_scale(0.6); pipe.unload_ip_adapter()   # UNet restored bit for bit

Once per run the image is encoded (``pipe.image_encoder``, minisd/clip_vision.py, after
CLIPImageProcessor's preprocessing at the encoder's image_size), repeated for every image of
the batch; with classifier-free guidance the unconditional rows get zero embeddings,
[zeros; embeds] in the order of the prompt embeddings. Every step the UNet projects them to 4
tokens per image (``unet(..., image_embeds=)``). IP-Adapter Plus takes the encoder's penultimate
hidden states (N, 257, 1280 for ViT-H) instead, and its unconditional rows are those of an
all-zeros input (zero pixel values after the normalization), as diffusers' ``encode_image`` with
``output_hidden_states=True``; its Resampler makes 16 tokens per image.

``ip_adapter_image``: one image (PIL / uint8 (H, W, 3) array) for every prompt; ``[image]``
likewise; ``[[a, b, ...]]``: several images, all seen by every prompt (their tokens are
concatenated, as diffusers does); beyond diffusers, a list of one image per prompt (diffusers
takes only one list entry per adapter).
"""

from __future__ import annotations

import numpy as np

from .clip_vision import CLIPVisionModelWithProjection, preprocess
from .errors import InputError, WeightsError
from .ip_adapter import attach, detach, read_ip_adapter, resolve, set_scale


def load_ip_adapter(pipe, weights, image_encoder, scale=1.0):
    """Read an IP-Adapter (a .safetensors file or a folder holding one; minisd/
    ip_adapter_files.py), load its image encoder (a transformers CLIPVisionModelWithProjection
    folder, in the pipeline's dtype and device, or a loaded model) and attach the adapter to
    ``pipe.unet`` (replacing one already attached). Returns the attached state."""
    adapter = read_ip_adapter(weights)
    resolve(adapter, pipe.unet)  # fits this UNet (widths, layers) before the encoder loads
    if image_encoder is None:
        raise InputError(
            "image_encoder: the IP-Adapter needs its CLIP image encoder (a folder with "
            "config.json and model.safetensors, e.g. h94/IP-Adapter's models/image_encoder)"
        )
    encoder = image_encoder
    if not isinstance(encoder, CLIPVisionModelWithProjection):
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            image_encoder, dtype=pipe.dtype, device=pipe.device
        )
    dim = getattr(encoder.config, adapter.encoder_field)
    if dim != adapter.embed_dim:
        what = "hidden states" if adapter.plus else "image embeddings"
        raise WeightsError(
            f"{adapter.source}: key {adapter.embed_key!r} takes {adapter.embed_dim}-d {what}; "
            f"the image encoder gives {dim}-d ones ({adapter.encoder_field})"
        )
    state = attach(pipe.unet, adapter, scale)
    pipe.image_encoder = encoder
    return state


def set_ip_adapter_scale(pipe, scale):
    """The weight of the image prompt (one number; 0 turns it off, 1 is the adapter as
    trained), as diffusers' ``set_ip_adapter_scale(float)``."""
    set_scale(pipe.unet, scale)


def unload_ip_adapter(pipe):
    """Detach the IP-Adapter (the UNet's params are exactly the original ones again) and drop
    the image encoder. Nothing happens when none is loaded."""
    detach(pipe.unet)
    pipe.image_encoder = None


def check(pipe, ip_adapter_image):
    """An image prompt needs a loaded IP-Adapter, and a loaded IP-Adapter needs an image (it
    changes every cross-attention layer; diffusers fails in the UNet without one)."""
    state = getattr(pipe.unet, "ip_adapter", None)
    if ip_adapter_image is not None and state is None:
        raise InputError(
            "ip_adapter_image: no IP-Adapter is loaded (pipe.load_ip_adapter(weights, "
            "image_encoder))"
        )
    if ip_adapter_image is None and state is not None:
        raise InputError(
            f"ip_adapter_image: an IP-Adapter is loaded ({state.source}); give an image "
            "prompt, or pipe.unload_ip_adapter() first"
        )
    if ip_adapter_image is not None:
        _groups(ip_adapter_image)


def _groups(image):
    """The images as (images, shared): ``shared`` True for one group seen by every prompt
    (one image, [image], [[images]]), False for one image per prompt."""
    if not isinstance(image, (list, tuple)):
        return [image], True
    if len(image) == 1 and isinstance(image[0], (list, tuple)):
        if not image[0]:
            raise InputError("ip_adapter_image: an empty list of images")
        return list(image[0]), True
    if not image:
        raise InputError("ip_adapter_image: an empty list of images")
    if any(isinstance(im, (list, tuple)) for im in image):
        raise InputError(
            "ip_adapter_image: nested lists are for one IP-Adapter's several images, "
            "[[a, b, ...]]; several IP-Adapters at once are not supported"
        )
    return list(image), len(image) == 1


def encode(pipe, images, cfg=True):
    """diffusers' ``encode_image``: CLIPImageProcessor at the encoder's image size, then the
    image encoder's image_embeds (M, D), on ``pipe.xp`` in ``pipe.dtype``; the unconditional
    rows' embedding: None (zeros). Plus: the penultimate hidden states (M, P, W), and with
    ``cfg`` those of all-zeros pixel values (1, P, W) (the same for every image; else None)."""
    enc = pipe.image_encoder
    pixels = preprocess(images, size=enc.config.image_size)  # (M, 3, S, S) float32
    if not pipe.unet.ip_adapter.plus:
        return enc(pixels).astype(pipe.dtype), None  # (M, D)
    h = enc.hidden_state(pixels, -2).astype(pipe.dtype)  # (M, P, W)
    if not cfg:
        return h, None
    zeros = enc.hidden_state(np.zeros_like(pixels[:1]), -2).astype(pipe.dtype)  # (1, P, W)
    return h, zeros


def prepare(pipe, ip_adapter_image, *, batch, nipp, cfg):
    """The run's image embeddings for ``unet(..., image_embeds=)``: (B, n, D) for a batch of B
    = prompts * nipp images, n images per row; with CFG (2B, n, D) as [uncond; embeds]
    (base: zeros; Plus: (B, n, P, W) hidden states, the all-zeros input's for uncond). None
    without an image."""
    if ip_adapter_image is None:
        return None
    xp = pipe.xp
    images, shared = _groups(ip_adapter_image)
    prompts = batch // nipp
    if not shared and len(images) != prompts:
        raise InputError(
            f"ip_adapter_image: {len(images)} images for {prompts} prompt(s); give one image, "
            "one per prompt, or [[a, b, ...]] for several images seen by every prompt"
        )
    e, uncond = encode(pipe, images, cfg)
    e = xp.asarray(e)  # (M, D) or (M, P, W)
    if shared:
        e = xp.broadcast_to(e[None], (batch, *e.shape))  # (B, n, ...)
    else:
        e = xp.repeat(e[:, None], nipp, axis=0)  # (B, 1, ...): prompt 0, prompt 0, prompt 1, ...
    e = xp.ascontiguousarray(e)
    if cfg:
        u = xp.zeros_like(e) if uncond is None else xp.broadcast_to(xp.asarray(uncond), e.shape)
        e = xp.concatenate([u, e], axis=0)  # (2B, n, ...): [uncond; text]
    return e
