"""Stable Diffusion txt2img written out by hand from minisd's components, then checked against
``StableDiffusion.__call__``: the same image, to float32 round-off.

    python examples/txt2img_by_hand.py                      # the random-weight demo model
    python examples/txt2img_by_hand.py --model path/to/stable-diffusion-v1-5 --size 512

Latent diffusion (Rombach et al. 2022): a text encoder turns the prompt into a sequence of
vectors, a UNet predicts the noise eps in a 4-channel latent image, a sampler (here DDIM, Song
et al. 2021) walks from pure noise to a clean latent, and the VAE decoder turns that into pixels.
Without --model the demo model (random weights, as ``minisd demo``) is built in a temporary
folder: the image is noise-like, but every number is computed exactly as with real weights.
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
from _common import model_or_demo, parser

import minisd
from minisd.image import numpy_to_pil
from minisd.rng import make_rng
from minisd.schedulers import DDIMScheduler


def text_conditioning(pipe, prompt):
    """[uncond; cond] CLIP hidden states, (2, 77, D): "" and the prompt, as diffusers orders them
    for classifier-free guidance."""
    uncond = pipe.text_encoder(pipe.tokenizer([""]))  # (1, 77, D) last hidden state
    cond = pipe.text_encoder(pipe.tokenizer([prompt]))  # (1, 77, D)
    return np.concatenate([uncond, cond])  # (2, 77, D)


def sample(pipe, ctx, *, size, steps, guidance, seed):
    """The DDIM loop with classifier-free guidance (Ho & Salimans 2022):
    eps = eps(x, "") + w (eps(x, prompt) - eps(x, "")), then x_t -> x_{t-1} (DDIM eq. 12)."""
    f = pipe.vae_scale_factor  # 8 = 2^(VAE levels - 1): the VAE's downsampling
    shape = (1, pipe.unet.config.in_channels, size // f, size // f)  # (1, 4, h, w)
    x = make_rng(seed).standard_normal(shape, dtype=np.float32)  # torch.randn's numbers
    sched = DDIMScheduler.from_config(pipe.scheduler_config)  # the checkpoint's betas
    sched.set_timesteps(steps)
    x = x * sched.init_noise_sigma  # 1.0 for DDIM
    for t in sched.timesteps:
        x_in = sched.scale_model_input(np.concatenate([x, x]), t)  # (2, 4, h, w)
        eps_uncond, eps_text = np.split(pipe.unet(x_in, t, ctx), 2)  # (1, 4, h, w) each
        eps = eps_uncond + guidance * (eps_text - eps_uncond)
        x = sched.step(eps, t, x).prev_sample  # (1, 4, h, w)
    return x


def decode(pipe, latents):
    """Latents were scaled by scaling_factor (0.18215 for SD1.x) in training: undo it, decode,
    and map [-1, 1] to [0, 1] pixels, NHWC."""
    img = pipe.vae.decode(latents / pipe.vae.config.scaling_factor)  # (1, 3, H, W)
    return np.clip(img / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)  # (1, H, W, 3)


def main(argv=None):
    p = parser(__doc__, steps=10, out="by_hand.png")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="minisd-example-") as tmp:
        model = model_or_demo(args.model, tmp)
        pipe = minisd.StableDiffusion.from_pretrained(model, dtype="float32")
        ctx = text_conditioning(pipe, args.prompt)
        kw = {"size": args.size, "steps": args.steps, "guidance": args.guidance, "seed": args.seed}
        by_hand = decode(pipe, sample(pipe, ctx, **kw))  # (1, H, W, 3)
        ref = pipe(
            args.prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.size,
            width=args.size,
            seed=args.seed,
            scheduler="ddim",
            output_type="np",
            progress=False,
        )  # (1, H, W, 3)
    err = float(np.abs(by_hand - ref).max())
    print(f"by hand vs StableDiffusion.__call__: max |difference| = {err:.2e} (pixels in [0, 1])")
    numpy_to_pil(by_hand)[0].save(args.out)
    print(f"wrote {args.out}")
    return 0 if err <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
