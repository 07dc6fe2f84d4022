"""The demo's made-up inputs for model families that need more than a prompt: an input image
(inpainting, InstructPix2Pix, depth2img), a mask (inpainting) and a depth map (depth2img)."""

from __future__ import annotations


def demo_inputs(family, size):
    """(image, mask, depth map) for the demo of ``family`` at ``size`` = (width, height); None
    where the family's UNet takes no such input."""
    image, mask = _image_and_mask(family, size)
    return image, mask, demo_depth_map(size) if family == "sd2-depth" else None


def _image_and_mask(family, size):
    """(image, mask) for a demo family whose UNet needs them (None, None otherwise): a made-up
    picture (sky gradient, sun, ground) of ``size`` = (width, height) for inpainting,
    InstructPix2Pix and depth2img, and for inpainting a mask that repaints the middle third
    (white)."""
    from weights_tools.make_tiny import IN_CHANNELS

    channels = IN_CHANNELS.get(family, 4)
    if channels == 4:
        return None, None
    import numpy as np
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    rgb = np.stack([0.3 + 0.5 * y, 0.5 + 0.3 * y, 0.9 - 0.4 * y], axis=-1)
    rgb[(x - 0.7) ** 2 + (y - 0.3) ** 2 < 0.01] = (1.0, 0.85, 0.3)  # the sun
    rgb[y > 0.7] = (0.3, 0.5, 0.2)  # the ground
    image = Image.fromarray((255 * rgb).astype(np.uint8))
    if channels != 9:
        return image, None
    middle = (abs(x - 0.5) < 1 / 6) & (abs(y - 0.5) < 1 / 6)
    return image, Image.fromarray(np.where(middle, 255, 0).astype(np.uint8)).convert("RGB")


def demo_depth_map(size):
    """The depth demo's made-up depth map of ``size`` = (width, height): nearer towards the
    bottom (the ground), as a (H, W) float32 array."""
    import numpy as np

    w, h = size
    return np.repeat(np.linspace(0, 1, h, dtype=np.float32)[:, None], w, axis=1)  # (H, W)
