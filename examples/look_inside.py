"""Look inside a denoising run: every module's output by its diffusers name, and the latents
step by step.

    python examples/look_inside.py                          # the random-weight demo model
    python examples/look_inside.py --model path/to/stable-diffusion-v1-5 --size 512

1. ``minisd.trace()`` around one UNet call records the output of every named module under its
   diffusers path (``down_blocks.1.attentions.0.transformer_blocks.0.attn2`` is the
   cross-attention of the second down block); a name filter keeps only what you ask for.
2. A pipeline ``callback`` sees the latents after every sampler step: how far each step moves
   them, and a preview of the last ones through the fixed latent-to-RGB map (no decoder).
Without --model the demo model (random weights, as ``minisd demo``) is built in a temporary
folder, so the numbers show the machinery, not a trained model's behaviour.
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
from _common import model_or_demo, parser
from PIL import Image

import minisd
from minisd.image import latents_to_rgb


def one_unet_call(pipe, prompt, size, names=None):
    """The named outputs (all, or those in ``names``) of one UNet call at t = 500 on noise,
    with the prompt's embedding."""
    ctx = pipe.text_encoder(pipe.tokenizer([prompt]))  # (1, 77, D)
    f = pipe.vae_scale_factor
    x = np.random.default_rng(0).standard_normal((1, 4, size // f, size // f), dtype=np.float32)
    with minisd.trace(names) as acts:
        pipe.unet(x, 500, ctx)  # (1, 4, h, w)
    return acts


def print_table(acts, keep):
    print(f"{'module':58s} {'shape':>18s} {'mean':>9s} {'std':>9s}")
    for name, a in acts.items():
        if keep(name):
            shape = "x".join(map(str, a.shape))
            print(f"{name:58s} {shape:>18s} {a.mean():9.4f} {a.std():9.4f}")


def main(argv=None):
    p = parser(__doc__, steps=8, out="latents_preview.png")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="minisd-example-") as tmp:
        model = model_or_demo(args.model, tmp)
        pipe = minisd.StableDiffusion.from_pretrained(model, dtype="float32")

        acts = one_unet_call(pipe, args.prompt, args.size)
        print(f"one UNet call recorded {len(acts)} named outputs; the blocks' own outputs:")
        print_table(acts, lambda n: "." not in n or (n.count(".") == 1 and n[-1].isdigit()))
        print("\nthe cross-attentions (text enters the image here):")
        print_table(acts, lambda n: n.endswith("attn2"))
        only = one_unet_call(pipe, args.prompt, args.size, names=["mid_block", "conv_out"])
        print(f"\nwith a name filter, only {list(only)} are kept")
        assert np.array_equal(only["conv_out"], acts["conv_out"])  # the same computation

        seen = []
        pipe(
            args.prompt,
            num_inference_steps=args.steps,
            height=args.size,
            width=args.size,
            scheduler="ddim",
            callback=lambda i, t, z: seen.append((i, int(t), z.copy())),
            output_type="latent",
            progress=False,
        )
    print("\nsampler steps: timestep, latent std, and how far the step moved the latents")
    prev = None
    for i, t, z in seen:
        moved = "" if prev is None else f"{np.abs(z - prev).mean():.4f}"
        print(f"  step {i:2d}  t = {t:4d}  std {z.std():.4f}  {moved}")
        prev = z
    Image.fromarray(latents_to_rgb(seen[-1][2])[0]).resize((256, 256), Image.NEAREST).save(args.out)
    print(f"wrote {args.out} (the final latents through the latent-to-RGB map)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
