"""``minisd trace``: run the text encoder(s) and one UNet call, dump a named intermediate
tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import trace
from .errors import InputError


def run_trace(args):
    from .pipeline import StableDiffusion
    from .pipeline_call import unet_class_labels, unet_conditioning
    from .rng import make_rng

    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise InputError(f"--out {out}: not a file in an existing folder")
    pipe = StableDiffusion.from_pretrained(args.model)
    w, h = args.size
    f = pipe.vae_scale_factor
    if h % f or w % f:
        raise InputError(f"--size {w}x{h}: must be multiples of {f}")
    shape = (1, pipe.unet.config.in_channels, h // f, w // f)
    latents = make_rng(0).standard_normal(shape, dtype=np.float32)  # (1, C, h, w)
    with trace() as acts:
        # (1, 77, D); SDXL: with the pooled embedding and time ids (added_cond_kwargs)
        ctx, added = unet_conditioning(pipe, args.prompt, h, w)
        labels = unet_class_labels(pipe)  # the x4 upscaler's noise level, else None
        pipe.unet(
            pipe.xp.asarray(latents), args.timestep, ctx, added_cond_kwargs=added,
            class_labels=labels,
        )  # fmt: skip
    if args.list or args.module is None:
        for name, value in acts.items():
            print(f"{name:<70} {tuple(value.shape)}")
        return 0
    if args.module not in acts:
        close = [n for n in acts if args.module in n][:10]
        raise InputError(f"--module {args.module!r}: not traced; similar names: {close}")
    np.save(args.out, np.asarray(acts[args.module]))
    print(f"wrote {args.out}: {args.module} {tuple(acts[args.module].shape)}")
    return 0
