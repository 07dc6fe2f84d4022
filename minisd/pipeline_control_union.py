"""Union ControlNets (minisd/controlnet_union.py) in the sampling loop, as diffusers'
StableDiffusionXLControlNetUnion(Img2Img / Inpaint)Pipeline run them.

One union ControlNet takes several control images at once, each with its control type
(``control_mode``: an int per image, the checkpoint's numbering, e.g. xinsir's 0 openpose,
1 depth, 2 hed, 3 canny, 4 normal, 5 segmentation, 6 tile, 7 repaint); their conditioning
scales and [control_guidance_start, control_guidance_end] windows are per image:

    pipe(prompt, control_image=[pose, depth], control_mode=[0, 1],
         controlnet_conditioning_scale=[1.0, 0.6])

Outside its window an image's scale is 0: with one image the ControlNet is then skipped (its
residuals would be zeros); with several, it still runs, the image weighed 0 (diffusers' model
then scales nothing at its end, so the residuals of the plain latents remain, as in diffusers).
Several union ControlNets (``controlnet=[a, b]``, diffusers' MultiControlNetUnionModel) take
one image and one mode each, with per-ControlNet scales and windows; their residuals are summed.
Union and plain ControlNets are not mixed (diffusers has no such pipeline).

The control-type flags (1.0 at every mode in use) are the same for every row of the batch.
Guess mode with classifier-free guidance: the ControlNet sees the prompt rows only, and its
flags are given for those rows (diffusers repeats them for both halves and fails there).
"""

from __future__ import annotations

from .config import is_number
from .errors import InputError


def is_union(net) -> bool:
    return hasattr(net.config, "num_control_type")


def check(models, control_image, mode):
    """``control_mode`` against the loaded ControlNets: required (one int per image) for union
    ControlNets, refused for plain ones. -> per ControlNet (its images, its modes)."""
    unions = [is_union(m) for m in models]
    if not any(unions):
        if mode is not None:
            raise InputError(
                "control_mode: only union ControlNets (ControlNetUnionModel) take control modes"
            )
        return None
    if not all(unions):
        raise InputError(
            "controlnet: union and plain ControlNets cannot be combined; load only union ones"
        )
    if mode is None:
        raise InputError(
            "control_mode: a union ControlNet needs the control type of each control image "
            "(an int, or one per image, e.g. control_mode=[0, 3]: see the checkpoint's card)"
        )
    if len(models) == 1:
        images = (
            list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
        )
        modes = list(mode) if isinstance(mode, (list, tuple)) else [mode]
        if len(modes) != len(images):
            raise InputError(
                f"control_mode: {len(modes)} modes for {len(images)} control images (one each)"
            )
        plan = [(images, modes)]
    else:
        modes = list(mode) if isinstance(mode, (list, tuple)) else [mode]
        if len(modes) != len(models):
            raise InputError(
                f"control_mode: {len(modes)} modes for {len(models)} union ControlNets (one each)"
            )
        plan = [([img], [m]) for img, m in zip(control_image, modes)]
    for net, (_, ms) in zip(models, plan):
        k = net.config.num_control_type
        for m in ms:
            if not (isinstance(m, int) and not isinstance(m, bool) and 0 <= m < k):
                raise InputError(f"control_mode: {m!r} is no control type of this ControlNet "
                                 f"(0 to {k - 1})")  # fmt: skip
    return plan


def per_image(value, n, name):
    """A number for every image, or one per image."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n or not all(is_number(v) for v in values):
        raise InputError(f"{name}={value!r}: expected a number or {n} numbers (one per image)")
    return values


def units(xp, models, plan, batched, *, scale, start, end):
    """The per-run states of the union ControlNets ``models``; ``plan``: :func:`check`'s;
    ``batched(net, image)``: the preprocessed control image, rows as the ControlNet's input.
    One ControlNet: scale and window per image; several: per ControlNet (one image each)."""
    from .pipeline_control import per_net

    if len(models) == 1:
        (images, modes), net = plan[0], models[0]
        images = [batched(net, im) for im in images]
        return [unit(xp, net, images, modes, scale=scale, start=start, end=end, from_multi=False)]
    n = len(models)
    scales = per_net(scale, n, "controlnet_conditioning_scale")
    starts = per_net(start, n, "control_guidance_start")
    ends = per_net(end, n, "control_guidance_end")
    return [
        unit(xp, net, [batched(net, im)], modes, scale=s, start=a, end=b, from_multi=True)
        for net, ((im,), modes), s, a, b in zip(models, plan, scales, starts, ends)
    ]


def unit(xp, net, images, modes, *, scale, start, end, from_multi):
    """One union ControlNet's per-run state; ``images``: its preprocessed control images
    (B or 2B rows each), ``scale`` / ``start`` / ``end``: one value per image."""
    flags = [0.0] * net.config.num_control_type
    for m in modes:
        flags[m] = 1.0
    n = len(images)
    return {
        "net": net, "images": images, "modes": modes,
        "control_type": xp.asarray([flags], dtype=net.dtype),  # (1, K): every row alike
        "scales": per_image(scale, n, "controlnet_conditioning_scale"),
        "starts": per_image(start, n, "control_guidance_start"),
        "ends": per_image(end, n, "control_guidance_end"), "from_multi": from_multi,
    }  # fmt: skip


def run(u, x, t, ctx, i, n, guess, added, keep):
    """(down, mid) residuals of union unit ``u`` at step i of n, or None where they would be
    zeros (one image, or one of several ControlNets, with scale 0 at this step)."""
    scales = [s * keep(i, n, a, b) for s, a, b in zip(u["scales"], u["starts"], u["ends"])]
    single = u["from_multi"] or len(scales) == 1
    if single and scales[0] == 0:
        return None
    return u["net"](
        x, t, ctx, u["images"], u["control_type"], u["modes"], conditioning_scale=scales,
        guess_mode=guess, added_cond_kwargs=added, from_multi=u["from_multi"],
    )  # fmt: skip
