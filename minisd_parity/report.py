"""``minisd parity --model FOLDER``: per-layer tables of minisd vs diffusers / transformers."""

from __future__ import annotations

import numpy as np

from .compare import collect_outputs, layer_table, text_model_names, time_proj_bound

DEFAULT_TOL = {"float64": 1e-10, "float32": 1e-4, "float16": 2e-2}


def _print_table(title, rows, first, tol, limit=400):
    """Print the rows; returns the number of layers compared (traced on both sides)."""
    compared = sum(ok is not None for *_, ok in rows)
    print(f"\n== {title}: {compared} of {len(rows)} reference modules compared, bound {tol:.0e}")
    print(f"{'layer':<64} {'shape':<20} {'max-abs':>10} {'relative':>10} {'cosine':>12}")
    for name, shape, diff, rel, cos, ok in rows[:limit]:
        head = f"{name:<64} {str(tuple(shape)):<20}"
        if ok is None:
            print(f"{head} {'':>10} {'':>10} {'':>12}  (not traced by minisd)")
            continue
        mark = "" if ok else "  <-- over"
        print(f"{head} {diff:10.2e} {rel:10.2e} {cos:12.9f}{mark}")
    print(f"first diverging layer: {first}" if first else "all compared layers within the bound")
    return compared


def _torch_inputs(torch, dtype, rng, shape):
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


def _feed_time_proj(torch, unet, acts):
    """diffusers builds time_proj in float32 in every dtype (a precision island): after its
    output is recorded (collect_outputs' hook comes first), the reference continues from
    minisd's, so later layers are compared from the same input. Returns the hook handle."""
    if "time_proj" not in acts:
        return None
    emb = torch.from_numpy(np.asarray(acts["time_proj"], dtype=np.float32))
    return unet.time_proj.register_forward_hook(lambda m, i, o: emb.to(o.dtype))


def _guidance_cond(torch, dtype, dim):
    """LCM-distilled UNets: the embedding of guidance scale 8 (w = 7), as the pipeline passes
    it, so that time_embedding.cond_proj is compared too; None for other UNets."""
    if dim is None:
        return None
    from minisd.pipeline_steps import guidance_scale_embedding

    return torch.from_numpy(guidance_scale_embedding([7.0], dim)).to(dtype)


def run_parity(args):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    import minisd
    from minisd import trace

    ours_dtype = args.dtype
    ref_name = "float64" if ours_dtype == "float16" else ours_dtype  # fp16: drift vs float64
    tdt = {"float64": torch.float64, "float32": torch.float32}[ref_name]
    tol = args.tol or DEFAULT_TOL[ours_dtype]
    folder = args.model
    pipe = minisd.StableDiffusion.from_pretrained(folder, dtype=ours_dtype)
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=tdt).eval()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=tdt).eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=tdt).eval()
    firsts = {}
    ids = pipe.tokenizer(["a photo of an astronaut riding a horse"])  # (1, 77)
    with torch.no_grad(), collect_outputs(te) as ref_acts:
        ctx = te(torch.from_numpy(ids))[0]
    with trace() as acts:
        pipe.text_encoder(ids)
    rows, firsts["text_encoder"] = layer_table(acts, text_model_names(ref_acts), tol)
    counts = {"text_encoder": _print_table("text encoder", rows, firsts["text_encoder"], tol)}

    rng = np.random.default_rng(0)
    x = _torch_inputs(torch, tdt, rng, (1, unet.config.in_channels, 8, 8))
    t, cond = 500, _guidance_cond(torch, tdt, unet.config.time_cond_proj_dim)
    ours_cond = None if cond is None else cond.numpy().astype(ours_dtype)
    with trace() as acts:
        ours_args = (x.numpy().astype(ours_dtype), t, ctx.numpy().astype(ours_dtype))
        pipe.unet(*ours_args, timestep_cond=ours_cond)
    with torch.no_grad(), collect_outputs(unet) as ref_acts:
        island = _feed_time_proj(torch, unet, acts)
        try:
            unet(x, t, ctx, timestep_cond=cond)
        finally:
            if island is not None:
                island.remove()
    bounds = {"time_proj": max(tol, time_proj_bound(t))}
    rows, firsts["unet"] = layer_table(acts, ref_acts, tol, bounds)
    counts["unet"] = _print_table("UNet (8x8 latents, t=500)", rows, firsts["unet"], tol)

    f = 2 ** (len(vae.config.block_out_channels) - 1)
    for what, shape in (("decode", (1, vae.config.latent_channels, 8, 8)), ("encode", None)):
        shape = shape or (1, vae.config.in_channels, 8 * f, 8 * f)
        v = _torch_inputs(torch, tdt, rng, shape)
        with torch.no_grad(), collect_outputs(vae) as ref_acts:
            getattr(vae, what)(v)
        with trace() as acts:
            getattr(pipe.vae, what)(v.numpy().astype(ours_dtype))
        part = f"vae {what}"
        rows, firsts[part] = layer_table(acts, ref_acts, tol)
        counts[part] = _print_table(f"VAE {what} {shape}", rows, firsts[part], tol)
    bad = {k: f"first diverging layer {v}" for k, v in firsts.items() if v}
    bad.update({k: "no layer could be compared" for k, n in counts.items() if n == 0})
    print(
        "\nsummary:",
        "all components within the bound"
        if not bad
        else "; ".join(f"{k}: {v}" for k, v in bad.items()),
    )
    return 1 if bad else 0
