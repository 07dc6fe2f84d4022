"""T2I-Adapter guidance in the sampling loop (Mou et al. 2023, "T2I-Adapter"), as diffusers'
StableDiffusionAdapterPipeline (``pipelines/t2i_adapter/pipeline_stable_diffusion_adapter.py``)
and StableDiffusionXLAdapterPipeline (``pipeline_stable_diffusion_xl_adapter.py``) run it.

The adapter (minisd/t2i_adapter.py) turns the condition image into one feature map per UNet
down block, once per generation; the UNet adds them inside its down path at every step:

    features = [f * scale for f in adapter(image)]         several adapters: sum_k s_k * A_k
    eps = unet(x_in, t, ctx, down_intrablock_additional_residuals=features)

only for the first ``int(steps * adapter_conditioning_factor)`` steps (the factor of diffusers'
SDXL adapter pipeline; the SD one has none, i.e. 1.0). Features are repeated for
``num_images_per_prompt`` and doubled for classifier-free guidance (both halves get them).
SDXL (full_adapter_xl, downscale_factor 16) works the same way: its fourth feature goes to the
UNet's mid block output. Output sizes taken from the adapter image are rounded down to
multiples of the adapter's downscale_factor (``round_size``; 16 for SDXL adapters).

Adapters must fit the UNet: :func:`check_fits` (at load time, and before each run) compares
each feature's channels and scale with the place the UNet adds it and refuses an SD1.x / SD2.x
adapter on an SDXL UNet, or an SDXL one on an SD UNet, with a ConfigError naming the adapter.

The image is preprocessed as diffusers' ``_preprocess_adapter_image``: PIL images resized to
the output size with Lanczos, to [0, 1] (not normalized). PIL images are first converted to
grayscale for adapters with in_channels=1, else to RGB (diffusers takes the image's own mode; an
image already in the right mode gives the same numbers). Float arrays (H, W[, C]) in [0, 1] and
uint8 arrays are taken as minisd.image takes them.

Where diffusers fails or differs: one image serves a batch of several prompts (diffusers fails);
per-prompt images follow the latents' order with num_images_per_prompt > 1 (prompt 0's images
first; diffusers' ``repeat`` tiles the features, pairing them with the wrong latents); with
several adapters a single scale applies to each (diffusers needs a list there); a list of one
adapter works as a MultiAdapter of one (diffusers refuses it).
"""

from __future__ import annotations

from PIL import Image

from . import image as imageproc
from .backend import to_device
from .config import is_number
from .errors import ConfigError, InputError


def load(spec, dtype, device):
    """A T2IAdapter from a diffusers T2IAdapter folder (a loaded one is used as it is); a list
    of them: several (a list of T2IAdapters)."""
    from .t2i_adapter import T2IAdapter

    if isinstance(spec, (list, tuple)):
        if not spec:
            raise InputError("adapter: an empty list; give a T2IAdapter folder or a list of them")
        return [load(s, dtype, device) for s in spec]
    if isinstance(spec, T2IAdapter):
        return spec
    return T2IAdapter.from_pretrained(spec, dtype=dtype, device=device)


def adapters(pipe) -> list:
    """The pipeline's adapters: [] / [one] / several (a list, or a MultiAdapter's)."""
    a = getattr(pipe, "adapter", None)
    if a is None:
        return []
    a = getattr(a, "adapters", a)  # a MultiAdapter holds its list
    return list(a) if isinstance(a, (list, tuple)) else [a]


def _several(pipe) -> bool:
    return isinstance(getattr(pipe.adapter, "adapters", pipe.adapter), (list, tuple))


def per_adapter(value, n, name):
    """A scalar for every adapter, or one value per adapter."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise InputError(f"{name}: {len(values)} values for {n} adapter(s)")
    return values


def images_per_adapter(pipe, adapter_image) -> list:
    """One image entry (an image, or a list: one per prompt) per adapter. Several adapters
    take a list with one entry per adapter, as diffusers' MultiAdapter pipelines."""
    if not _several(pipe):
        return [adapter_image]
    n = len(adapters(pipe))
    if not isinstance(adapter_image, (list, tuple)) or len(adapter_image) != n:
        got = len(adapter_image) if isinstance(adapter_image, (list, tuple)) else "not a list"
        raise InputError(f"adapter_image: expected a list of {n} images, one per adapter ({got})")
    return list(adapter_image)


def first_image(pipe, adapter_image):
    """The image whose size sets the output size (the first adapter's; the first of a list)."""
    if adapter_image is None or not adapters(pipe):
        return adapter_image
    image = images_per_adapter(pipe, adapter_image)[0]
    return image[0] if isinstance(image, (list, tuple)) and image else image


def check(pipe, adapter_image, *, scale, factor):
    """Refuse bad T2I-Adapter arguments up front (InputError naming the argument). Without
    ``adapter_image`` there is nothing to check: a loaded adapter then sits the run out."""
    if adapter_image is None:
        return
    n = len(adapters(pipe))
    if n == 0:
        raise InputError(
            "adapter_image: this pipeline has no T2I-Adapter; load one with "
            "StableDiffusion.from_pretrained(..., adapter=FOLDER) or set pipe.adapter"
        )
    images_per_adapter(pipe, adapter_image)
    if getattr(pipe, "unet", None) is not None:  # a pipeline (not only its adapter state)
        check_fits(pipe)
    for v in per_adapter(scale, n, "adapter_conditioning_scale"):
        if not is_number(v):
            raise InputError(f"adapter_conditioning_scale={scale!r}: expected finite numbers")
    if not (is_number(factor) and 0 <= factor <= 1):
        raise InputError(f"adapter_conditioning_factor={factor!r}: expected a number in [0, 1]")


def unet_slots(unet_config, vae_scale_factor) -> list:
    """(channels, image size / feature size) of each place the UNet adds a T2I-Adapter feature
    (minisd/unet_base.py): a CrossAttnDownBlock2D's last layer (before its downsampler), a
    DownBlock2D's output (after it), then the mid block's output."""
    cfg = unet_config
    n, f, slots = len(cfg.down_block_types), vae_scale_factor, []
    for i, kind in enumerate(cfg.down_block_types):
        after = f * 2 if i < n - 1 else f  # every block but the last downsamples
        slots.append((cfg.block_out_channels[i], f if kind == "CrossAttnDownBlock2D" else after))
        f = after
    if cfg.mid_block_type:
        slots.append((cfg.block_out_channels[-1], f))
    return slots


def check_fits(pipe):
    """Refuse an adapter whose features do not fit the pipeline's UNet (ConfigError naming the
    adapter and its config): an SD1.x / SD2.x adapter on an SDXL UNet or the other way round,
    or one built for other channel widths. Fewer features than places is allowed (diffusers
    then leaves the remaining blocks alone)."""
    models = adapters(pipe)
    if not models:
        return
    unet_cfg = pipe.unet.config
    slots = unet_slots(unet_cfg, pipe.vae_scale_factor)
    unet_kind = "an SDXL" if unet_cfg.addition_embed_type == "text_time" else "this"
    for k, a in enumerate(models):
        feats = a.config.features()
        if len(feats) <= len(slots) and all(f == s for f, s in zip(feats, slots)):
            continue
        name = f"adapter[{k}]" if _several(pipe) else "adapter"
        kind = "an SDXL" if a.config.xl else "an SD1.x / SD2.x"
        raise ConfigError(
            f"{name} ({a.config.source}): {kind} T2I-Adapter ({a.config.adapter_type}) does "
            f"not fit {unet_kind} UNet: its features (channels, image size / feature size) "
            f"{feats}, the UNet takes {slots} (down blocks, then the mid block)"
        )


def round_size(pipe, a, height, width):
    """generate's output size (``a``: the call's arguments; height, width: as resolved) where
    the adapter image set it (no ``image`` or ``control_image``; height or width None):
    rounded down to multiples of the adapter's downscale_factor, as diffusers'
    ``_default_height_width`` (16 for SDXL adapters; SD adapters' 8 changes nothing)."""
    sized = a.adapter_image is not None and a.image is None and a.control_image is None
    if not sized or not adapters(pipe):
        return height, width
    f = adapters(pipe)[0].downscale_factor
    h = height // f * f if a.height is None else height
    w = width // f * f if a.width is None else width
    return h, w


def prepare(pipe, adapter_image, *, scale, factor, batch, nipp, size, cfg):
    """The per-run adapter state: the scaled features, batched as the UNet input (repeated for
    num_images_per_prompt, doubled for CFG), in the pipeline's dtype on its device; and the
    conditioning factor. None without an image or an adapter."""
    models = adapters(pipe)
    if adapter_image is None or not models:
        return None
    from .t2i_adapter import MultiAdapter

    check(pipe, adapter_image, scale=scale, factor=factor)
    f = models[0].downscale_factor
    if size[0] % f or size[1] % f:
        raise InputError(
            f"height={size[0]}, width={size[1]}: a T2I-Adapter needs multiples of {f} "
            "(its downscale_factor)"
        )
    entries = images_per_adapter(pipe, adapter_image)
    images = [_adapter_batch(a, im, size, batch // nipp) for a, im in zip(models, entries)]
    m = max(im.shape[0] for im in images)  # 1, or one per prompt
    images = [im.repeat(m, axis=0) if im.shape[0] < m else im for im in images]
    scales = per_adapter(scale, len(models), "adapter_conditioning_scale")
    if _several(pipe):  # diffusers' MultiAdapter: adapter_weights = the scales (float32)
        feats = MultiAdapter(models)(images, scales)
    else:
        feats = [v * float(scales[0]) for v in models[0](images[0])]
    return {"features": [_batched(pipe, v, batch, nipp, cfg) for v in feats], "factor": factor}


def _adapter_batch(adapter, image, size, prompts):
    """diffusers' _preprocess_adapter_image for one adapter: (n, in_channels, H, W) in [0, 1],
    in the adapter's dtype on its device; n = 1 (for every prompt) or one per prompt."""
    c = adapter.config.in_channels
    proc = imageproc.ImageProcessor(1, do_normalize=False)  # Lanczos for PIL images
    img = proc.preprocess(_in_mode(image, c), height=size[0], width=size[1])  # (n, C, H, W)
    if img.shape[1] != c:
        raise InputError(
            f"adapter_image: {img.shape[1]}-channel image for an adapter with in_channels={c}"
        )
    if img.shape[0] not in (1, prompts):
        raise InputError(
            f"adapter_image: {img.shape[0]} images for {prompts} prompt(s); give one image, or "
            "one per prompt"
        )
    return to_device(img, adapter.device, adapter.dtype)


def _in_mode(image, c):
    """PIL images in the mode the adapter reads ("L" for in_channels=1, "RGB" for 3), before
    resizing; images already in that mode (all diffusers accepts) are left as they are."""
    if isinstance(image, (list, tuple)):
        return [_in_mode(im, c) for im in image]
    mode = {1: "L", 3: "RGB"}.get(c)
    if mode and isinstance(image, Image.Image) and image.mode != mode:
        return image.convert(mode)
    return image


def _batched(pipe, v, batch, nipp, cfg):
    """One feature (n, C, h, w), n = 1 or one per prompt -> (B or 2B, C, h, w) in the
    pipeline's dtype and on its device: repeated for the batch, doubled for CFG."""
    xp = pipe.xp
    v = to_device(v, pipe.device, pipe.dtype)
    v = xp.repeat(v, batch if v.shape[0] == 1 else nipp, axis=0)  # (B, C, h, w)
    return xp.concatenate([v, v]) if cfg else v  # (2B, C, h, w): [uncond; text]


def residuals(state, i, n):
    """The features for the UNet's down_intrablock_additional_residuals at step i of n (a new
    list each time), or None: diffusers applies them while ``i < int(n * factor)``."""
    if state is None or not i < int(n * state["factor"]):
        return None
    return list(state["features"])
