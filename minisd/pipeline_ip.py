"""IP-Adapter in the pipeline (Ye et al. 2023; minisd/ip_adapter.py has the model), as diffusers'
``IPAdapterMixin`` (loaders/ip_adapter.py) and StableDiffusion(XL)Pipeline's ``encode_image`` /
``prepare_ip_adapter_image_embeds`` do it for one base, Plus, Full or FaceID IP-Adapter, on
SD1.x / SD2.x and on SDXL (minisd.StableDiffusionXL: h94's ip-adapter_sdxl with the ViT-bigG
encoder, ip-adapter_sdxl_vit-h and ip-adapter-plus(-face)_sdxl_vit-h with ViT-H,
ip-adapter-faceid_sdxl; the same code, the tokens 2048 wide):

    pipe.load_ip_adapter(weights, image_encoder, scale=1.0)   # .safetensors + CLIP vision folder
    pipe(prompt, ip_adapter_image=image)                       # the image prompts with the text
    pipe.set_ip_adapter_scale(0.6); pipe.unload_ip_adapter()   # UNet restored bit for bit

Once per run the image is encoded (``pipe.image_encoder``, minisd/clip_vision.py, after
CLIPImageProcessor's preprocessing at the encoder's image_size), repeated for every image of
the batch; with classifier-free guidance the unconditional rows get zero embeddings,
[zeros; embeds] in the order of the prompt embeddings. Every step the UNet projects them to 4
tokens per image (``unet(..., image_embeds=)``). IP-Adapter Plus and Full take the encoder's
penultimate hidden states (N, 257, 1280 for ViT-H) instead, and their unconditional rows are
those of an all-zeros input (zero pixel values after the normalization), as diffusers'
``encode_image`` with ``output_hidden_states=True`` (diffusers asks for hidden states for every
projection that is not an ImageProjection); Plus's Resampler makes 16 tokens per image, Full's
MLP one per hidden-state token (257).

``ip_adapter_image``: one image (PIL / uint8 (H, W, 3) array) for every prompt; ``[image]``
likewise; ``[[a, b, ...]]``: several images, all seen by every prompt (their tokens are
concatenated, as diffusers does); beyond diffusers, a list of one image per prompt (diffusers
takes only one list entry per adapter).

``ip_adapter_image_embeds``: precomputed embeddings instead of the image, with diffusers'
meaning (:func:`from_embeds`): ``[e]`` or ``e`` (NumPy / CuPy, or anything np.asarray takes),
e (2, n, ...) = [negative; positive] with classifier-free guidance, (1, n, ...) without, where
... is what the adapter's projection takes: (D,) CLIP image embeddings, (P, W) hidden states, or
FaceID's (512,) / (1, 512). IP-Adapter FaceID takes nothing else: its input is insightface's
face embedding (ArcFace ``normed_embedding``), which minisd does not compute; it is loaded with
``image_encoder=None``, and its LoRA is merged into the UNet while it is loaded (minisd/
ip_adapter_lora.py). Any adapter may be loaded without an encoder and run on embeddings.
"""

from __future__ import annotations

import numpy as np

from .backend import is_cupy, to_device
from .clip_vision import CLIPVisionModelWithProjection, preprocess
from .errors import InputError, WeightsError
from .ip_adapter import attach, detach, input_shape, read_ip_adapter, resolve, set_scale


def load_ip_adapter(pipe, weights, image_encoder=None, scale=1.0):
    """Read an IP-Adapter (a .safetensors file or a folder holding one; minisd/
    ip_adapter_files.py), load its image encoder (a transformers CLIPVisionModelWithProjection
    folder, in the pipeline's dtype and device, or a loaded model) and attach the adapter to
    ``pipe.unet`` (replacing one already attached). Returns the attached state.
    ``image_encoder`` None: no encoder (diffusers' ``image_encoder_folder=None``): the run then
    takes ``ip_adapter_image_embeds``, not images. A FaceID adapter takes none (its input is a
    face embedding) and merges its LoRA into the UNet (minisd/ip_adapter_lora.py)."""
    adapter = read_ip_adapter(weights)
    resolve(adapter, pipe.unet)  # fits this UNet (widths, layers) before the encoder loads
    encoder = _encoder(pipe, adapter, image_encoder)
    state = attach(pipe.unet, adapter, scale)
    pipe.image_encoder = encoder
    return state


def _encoder(pipe, adapter, image_encoder):
    """The image encoder, loaded and checked against the adapter's input width; None."""
    if adapter.kind == "faceid" and image_encoder is not None:
        raise InputError(
            f"image_encoder: {adapter.source} is an IP-Adapter FaceID, which takes no image "
            "encoder: its input is insightface's face embedding; load it with "
            "image_encoder=None and pass pipe(..., ip_adapter_image_embeds=...)"
        )
    if image_encoder is None:
        return None
    encoder = image_encoder
    if not isinstance(encoder, CLIPVisionModelWithProjection):
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            image_encoder, dtype=pipe.dtype, device=pipe.device
        )
    dim = getattr(encoder.config, adapter.encoder_field)
    if dim != adapter.embed_dim:
        what = "hidden states" if adapter.hidden_states else "image embeddings"
        raise WeightsError(
            f"{adapter.source}: key {adapter.embed_key!r} takes {adapter.embed_dim}-d {what}; "
            f"the image encoder gives {dim}-d ones ({adapter.encoder_field})"
        )
    return encoder


def set_ip_adapter_scale(pipe, scale):
    """The weight of the image prompt (one number; 0 turns it off, 1 is the adapter as
    trained), as diffusers' ``set_ip_adapter_scale(float)``."""
    set_scale(pipe.unet, scale)


def unload_ip_adapter(pipe):
    """Detach the IP-Adapter (the UNet's params are exactly the original ones again, FaceID's
    LoRA taken out too) and drop the image encoder. Nothing happens when none is loaded."""
    detach(pipe.unet)
    pipe.image_encoder = None


def check(pipe, ip_adapter_image, ip_adapter_image_embeds=None):
    """An image prompt (images or precomputed embeddings, not both) needs a loaded IP-Adapter,
    and a loaded IP-Adapter needs one (it changes every cross-attention layer; diffusers fails
    in the UNet without one). FaceID takes embeddings only; images need the image encoder."""
    state = getattr(pipe.unet, "ip_adapter", None)
    pairs = (
        ("ip_adapter_image", ip_adapter_image),
        ("ip_adapter_image_embeds", ip_adapter_image_embeds),
    )
    given = [name for name, value in pairs if value is not None]
    if len(given) == 2:
        raise InputError("ip_adapter_image, ip_adapter_image_embeds: give one of them, not both")
    if given and state is None:
        raise InputError(
            f"{given[0]}: no IP-Adapter is loaded (pipe.load_ip_adapter(weights, image_encoder))"
        )
    if state is None:
        return
    if not given:
        raise InputError(_missing(state))
    if ip_adapter_image_embeds is not None:
        _embeds_array(ip_adapter_image_embeds, state)
        return
    if state.kind == "faceid":
        raise InputError(f"ip_adapter_image: {_FACEID_INPUT.format(source=state.source)}")
    if pipe.image_encoder is None:
        raise InputError(
            f"ip_adapter_image: the IP-Adapter {state.source} was loaded without an image "
            "encoder (image_encoder=None); pass ip_adapter_image_embeds, or load it with one"
        )
    _groups(ip_adapter_image)


_FACEID_INPUT = (
    "{source} is an IP-Adapter FaceID: it takes insightface's face embedding, not an image; "
    "pass pipe(..., ip_adapter_image_embeds=e), e (2, 1, 512) with classifier-free guidance "
    "([negative; positive], the negative usually zeros) or (1, 1, 512) without, the "
    "positive row FaceAnalysis(name='buffalo_l').get(image)[0].normed_embedding"
)


def _missing(state):
    """The message for a run without an image prompt while ``state``'s adapter is loaded."""
    if state.kind == "faceid":
        return (
            f"ip_adapter_image_embeds: {_FACEID_INPUT.format(source=state.source)}; or "
            "pipe.unload_ip_adapter() first"
        )
    return (
        f"ip_adapter_image: an IP-Adapter is loaded ({state.source}); give an image prompt "
        "(or ip_adapter_image_embeds), or pipe.unload_ip_adapter() first"
    )


def _embeds_array(value, state):
    """``ip_adapter_image_embeds`` as one array (rows, n, ...): diffusers' list with one array
    per adapter (one here), or the array itself; its last axes those the adapter takes
    (ip_adapter.input_shape; FaceID also (rows, n, 1, 512), diffusers' documented form)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise InputError(
                f"ip_adapter_image_embeds: a list of {len(value)} arrays; diffusers' list has "
                "one per IP-Adapter, and one is loaded: give [array] or the array"
            )
        value = value[0]
    e = value if is_cupy(value) else np.asarray(value)
    axes, d, what = input_shape(state)
    faceid = state.kind == "faceid" and e.ndim == 4 and e.shape[2] == 1
    if (e.ndim != axes + 2 and not faceid) or e.shape[-1] != d or 0 in e.shape:
        one = f"P, {d}" if axes == 2 else f"{d}"
        raise InputError(
            f"ip_adapter_image_embeds: expected shape (rows, n, {one}) ({what}; n images; rows "
            "2 = [negative; positive] with classifier-free guidance, else 1, or that many per "
            f"prompt), got {tuple(e.shape)}"
        )
    return e


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
    rows' embedding: None (zeros). Plus / Full: the penultimate hidden states (M, P, W), and
    with ``cfg`` those of all-zeros pixel values (1, P, W) (the same for every image; else
    None), as diffusers for every projection but ImageProjection."""
    enc = pipe.image_encoder
    pixels = preprocess(images, size=enc.config.image_size)  # (M, 3, S, S) float32
    if not pipe.unet.ip_adapter.hidden_states:
        return enc(pixels).astype(pipe.dtype), None  # (M, D)
    h = enc.hidden_state(pixels, -2).astype(pipe.dtype)  # (M, P, W)
    if not cfg:
        return h, None
    zeros = enc.hidden_state(np.zeros_like(pixels[:1]), -2).astype(pipe.dtype)  # (1, P, W)
    return h, zeros


def prepare(pipe, ip_adapter_image, *, batch, nipp, cfg, embeds=None):
    """The run's image embeddings for ``unet(..., image_embeds=)``: (B, n, D) for a batch of B
    = prompts * nipp images, n images per row; with CFG (2B, n, D) as [uncond; embeds]
    (base: zeros; Plus / Full: (B, n, P, W) hidden states, the all-zeros input's for uncond).
    ``embeds``: ``ip_adapter_image_embeds`` instead of the image (:func:`from_embeds`). None
    without either."""
    if embeds is not None:
        return from_embeds(pipe, embeds, batch=batch, nipp=nipp, cfg=cfg)
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


def from_embeds(pipe, embeds, *, batch, nipp, cfg):
    """``ip_adapter_image_embeds`` as diffusers' ``prepare_ip_adapter_image_embeds`` reads it:
    (rows, n, ...) with rows 2 = [negative; positive] under CFG (``chunk(2)``), else 1, each
    half repeated for the B = prompts * nipp rows -> (2B or B, n, ...) in the pipeline's dtype
    and device. Beyond diffusers: rows 2 * prompts (CFG: the negatives first) or prompts give
    each prompt its own, as ``ip_adapter_image`` lists do."""
    e = _embeds_array(embeds, pipe.unet.ip_adapter)
    prompts, halves = batch // nipp, 2 if cfg else 1
    k = e.shape[0] // halves
    if e.shape[0] % halves or k not in (1, prompts):
        want = "2 = [negative; positive]" if cfg else "1"
        mode = "with" if cfg else "without"
        raise InputError(
            f"ip_adapter_image_embeds: {e.shape[0]} rows for {prompts} prompt(s) {mode} "
            f"classifier-free guidance; give {want} (diffusers' form), or {halves} per prompt"
            + (", the negatives first" if cfg else "")
        )
    xp = pipe.xp
    e = to_device(e, pipe.device, pipe.dtype)  # (rows, n, ...)
    parts = []
    for i in range(halves):
        part = e[i * k : (i + 1) * k]  # (k, n, ...)
        if k == 1:
            part = xp.broadcast_to(part, (batch, *part.shape[1:]))  # (B, n, ...)
        else:
            part = xp.repeat(part, nipp, axis=0)  # (B, n, ...): prompt 0, prompt 0, prompt 1...
        parts.append(part)
    return xp.ascontiguousarray(xp.concatenate(parts, axis=0))  # (halves * B, n, ...)
