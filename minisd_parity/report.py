"""``minisd parity --model FOLDER``: per-layer tables of minisd vs diffusers / transformers."""

from __future__ import annotations

import numpy as np

from minisd import trace

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
    """diffusers builds time_proj (and SDXL's add_time_proj) in float32 in every dtype (a
    precision island): after its output is recorded (collect_outputs' hook comes first), the
    reference continues from minisd's, so later layers are compared from the same input.
    Returns the hook handles."""
    hooks = []
    for name in ("time_proj", "add_time_proj"):
        if name in acts:
            emb = torch.from_numpy(np.asarray(acts[name], dtype=np.float32))
            hook = getattr(unet, name).register_forward_hook(lambda m, i, o, e=emb: e.to(o.dtype))
            hooks.append(hook)
    return hooks


def _guidance_cond(torch, dtype, dim):
    """LCM-distilled UNets: the embedding of guidance scale 8 (w = 7), as the pipeline passes
    it, so that time_embedding.cond_proj is compared too; None for other UNets."""
    if dim is None:
        return None
    from minisd.pipeline_steps import guidance_scale_embedding

    return torch.from_numpy(guidance_scale_embedding([7.0], dim)).to(dtype)


def _text_encoders(pipe, folder, tdt, tol, counts, firsts):
    """Compare each text encoder (SDXL: both) on one prompt, layer by layer."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    ids = pipe.tokenizer_2 if getattr(pipe, "tokenizer", None) is None else pipe.tokenizer
    ids = ids(["a photo of an astronaut riding a horse"])  # (1, 77)
    encoders = [("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)]
    for name, cls in encoders:
        ours = getattr(pipe, name, None)
        if ours is None:
            continue
        ref = cls.from_pretrained(folder, subfolder=name, torch_dtype=tdt).eval()
        with torch.no_grad(), collect_outputs(ref) as ref_acts:
            ref(torch.from_numpy(ids))
        with trace() as acts:
            ours.text_embeds(ids) if hasattr(ours, "text_embeds") else ours(ids)
        rows, firsts[name] = layer_table(acts, text_model_names(ref_acts), tol)
        counts[name] = _print_table(name.replace("_", " "), rows, firsts[name], tol)


def _unet(pipe, folder, ours_dtype, tdt, tol, counts, firsts):
    """One UNet call on 8x8 latents at t=500 with the prompt's conditioning (SDXL: with its
    pooled embedding and default time ids), the same inputs on both sides."""
    import torch
    from diffusers import UNet2DConditionModel

    from minisd.backend import to_numpy
    from minisd.pipeline_call import unet_class_labels, unet_conditioning

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=tdt).eval()
    ctx, added = unet_conditioning(pipe, "a photo of an astronaut riding a horse", 64, 64)
    ctx = to_numpy(ctx)
    added = None if added is None else {k: to_numpy(v) for k, v in added.items()}
    x = np.random.default_rng(0).standard_normal((1, unet.config.in_channels, 8, 8))
    t, cond = 500, _guidance_cond(torch, tdt, unet.config.time_cond_proj_dim)
    ours_cond = None if cond is None else cond.numpy().astype(ours_dtype)
    labels = unet_class_labels(pipe)  # the x4 upscaler's noise level, else None
    with trace() as acts:
        pipe.unet(
            x.astype(ours_dtype), t, ctx, timestep_cond=ours_cond, added_cond_kwargs=added,
            class_labels=labels,
        )  # fmt: skip
    ref_added = None
    if added is not None:
        ref_added = {k: torch.from_numpy(v).to(tdt) for k, v in added.items()}
    args = (torch.from_numpy(x).to(tdt), t, torch.from_numpy(ctx).to(tdt))
    ref_labels = None if labels is None else torch.from_numpy(labels)
    with torch.no_grad(), collect_outputs(unet) as ref_acts:
        islands = _feed_time_proj(torch, unet, acts)
        try:
            unet(*args, timestep_cond=cond, added_cond_kwargs=ref_added, class_labels=ref_labels)
        finally:
            for hook in islands:
                hook.remove()
    bounds = {"time_proj": max(tol, time_proj_bound(t))}
    if added is not None:
        bounds["add_time_proj"] = max(tol, time_proj_bound(added["time_ids"]))
    rows, firsts["unet"] = layer_table(acts, ref_acts, tol, bounds)
    counts["unet"] = _print_table("UNet (8x8 latents, t=500)", rows, firsts["unet"], tol)


def run_parity(args):
    import torch
    from diffusers import AutoencoderKL

    import minisd

    ours_dtype = args.dtype
    ref_name = "float64" if ours_dtype == "float16" else ours_dtype  # fp16: drift vs float64
    tdt = {"float64": torch.float64, "float32": torch.float32}[ref_name]
    tol = args.tol or DEFAULT_TOL[ours_dtype]
    folder = args.model
    pipe = minisd.StableDiffusion.from_pretrained(folder, dtype=ours_dtype)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=tdt).eval()
    firsts, counts = {}, {}
    _text_encoders(pipe, folder, tdt, tol, counts, firsts)
    _unet(pipe, folder, ours_dtype, tdt, tol, counts, firsts)
    rng = np.random.default_rng(0)
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
