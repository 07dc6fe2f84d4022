"""StableDiffusionUpscale: Stability's Stable Diffusion x4 upscaler (stabilityai/
stable-diffusion-x4-upscaler, released with SD 2.0), as diffusers' StableDiffusionUpscalePipeline.

    pipe = minisd.StableDiffusionUpscale.from_pretrained("path/to/x4-upscaler-folder")
    images = pipe("a white cat", image=low_res_image, num_inference_steps=75, seed=0)

A text-guided latent diffusion model (Rombach et al. 2022) that works on the low-resolution image
itself as conditioning: the UNet denoises latents of the image's own size (h, w), with the
image's pixels concatenated on channels (4 + 3 = 7), and the VAE (3 levels: 4x) decodes them to
(4h, 4w). Noise augmentation (Ho et al. 2022, "Cascaded Diffusion Models for High Fidelity Image
Generation", sec. 3.2): the low-resolution image is first noised by the ``low_res_scheduler``
(DDPM's forward process q(x_t | x_0) at t = ``noise_level``), and the UNet is told that level
through its class embedding (``class_labels``), so it learns to repair degraded inputs; more
noise lets it invent more detail.

As diffusers, in order: the prompts are encoded ([negative; positive] with classifier-free
guidance); the image is preprocessed to [-1, 1] (bicubic resizing of PIL images to a multiple of
the VAE's factor); then the random draws: the image noise first (one per input image), then the
initial latents, then one per stochastic scheduler step. The image rows repeat the whole image
batch (2 x num_images_per_prompt copies: image 0, image 1, image 0, ...) while the latent rows
repeat each prompt in place (diffusers' pairing, kept for identical results: with several prompts
and num_images_per_prompt > 1 a prompt's samples see different images). The VAE decodes
``latents / 0.08333`` (diffusers forces that scaling factor on this pipeline's VAE), in float32
when a float16 VAE sets ``force_upcast``.

Not supported here: single-file checkpoints, ControlNets and adapters, and the invisible
watermark / safety checker (minisd never marks or filters images).
"""

from __future__ import annotations

import inspect

import numpy as np
from tqdm.auto import tqdm

from . import image as imageproc
from . import pipeline_steps as steps
from .config import is_int, path_arg
from .denoise import initial_latents
from .errors import ConfigError, InputError
from .pipeline import StableDiffusion
from .pipeline_call import output, prompt_lists
from .weights import read_config

#: The VAE scaling factor diffusers' StableDiffusionUpscalePipeline sets on its VAE, whatever
#: vae/config.json says (1 / 12: the upscaler's latents have about unit variance at that scale).
SCALING_FACTOR = 0.08333
#: diffusers' default ``max_noise_level`` (model_index.json of the x4 upscaler holds 350 too).
MAX_NOISE_LEVEL = 350
_PIPELINE_CLASS = "StableDiffusionUpscalePipeline"


def is_upscale_folder(path) -> bool:
    """A diffusers folder of the x4 upscaler: model_index.json names its pipeline class."""
    index = path_arg(path, "path") / "model_index.json"
    return index.is_file() and read_config(index).get("_class_name") == _PIPELINE_CLASS


class StableDiffusionUpscale(StableDiffusion):
    """The x4 upscaler: StableDiffusion's tokenizer, text_encoder, unet (7 input channels, a
    noise-level class embedding), vae and scheduler, plus ``low_res_scheduler`` (the DDPM
    schedule that noises the input) and ``max_noise_level``."""

    def __init__(self, *, low_res_scheduler_config, max_noise_level=MAX_NOISE_LEVEL, **components):
        super().__init__(**components)
        self.image_processor = imageproc.ImageProcessor(self.vae_scale_factor, resample="bicubic")
        self.low_res_scheduler_config = dict(low_res_scheduler_config)
        self.low_res_scheduler = _low_res_scheduler(self.low_res_scheduler_config)
        if not (is_int(max_noise_level) and max_noise_level >= 0):
            raise ConfigError(f"max_noise_level={max_noise_level!r}: expected an integer >= 0")
        self.max_noise_level = int(max_noise_level)
        _check_models(self)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", *, weights="eager"):
        """Load a diffusers folder of the x4 upscaler (model_index.json names
        StableDiffusionUpscalePipeline; low_res_scheduler/ beside scheduler/). ``dtype`` None:
        float32 on the CPU, float16 on "cuda"; ``weights`` as StableDiffusion.from_pretrained."""
        path = path_arg(path, "path")
        if path.is_dir() and not is_upscale_folder(path):
            raise ConfigError(
                f"{path}: not an x4 upscaler folder (model_index.json must name "
                f"{_PIPELINE_CLASS}); load other Stable Diffusion folders with StableDiffusion"
            )
        return super().from_pretrained(path, dtype, device, weights=weights)

    @classmethod
    def _from_folder(cls, folder, dtype, device, weights="eager"):
        """StableDiffusion's components, then the upscaler's own parts of the folder."""
        base = StableDiffusion._from_folder(folder, dtype, device, weights=weights)
        index = read_config(folder / "model_index.json")
        return cls(
            tokenizer=base.tokenizer,
            text_encoder=base.text_encoder,
            unet=base.unet,
            vae=base.vae,
            scheduler_config=base.scheduler_config,
            low_res_scheduler_config=read_config(
                folder / "low_res_scheduler" / "scheduler_config.json"
            ),
            max_noise_level=index.get("max_noise_level", MAX_NOISE_LEVEL),
            dtype=dtype,
            device=device,
        )

    @classmethod
    def _from_single_file(cls, path, *args, **kw):
        raise ConfigError(
            f"{path}: StableDiffusionUpscale loads diffusers folders only (model_index.json, "
            "unet/, vae/, text_encoder/, tokenizer/, scheduler/, low_res_scheduler/)"
        )

    def _unscale(self, lat):
        """Denoised latents -> the VAE's latent space: z = lat / 0.08333 (SCALING_FACTOR)."""
        return lat / SCALING_FACTOR

    # ------------------------------------------------------------------ generation

    def __call__(
        self,
        prompt,
        image=None,
        num_inference_steps=75,
        guidance_scale=9.0,
        noise_level=20,
        negative_prompt=None,
        num_images_per_prompt=1,
        eta=0.0,
        seed=0,
        latents=None,
        output_type="pil",
        callback=None,
        scheduler=None,
        clip_skip=None,
        rng=None,
        progress=True,
    ):
        """Upscale ``image`` (a PIL image, an array (H, W, 3) / (N, H, W, 3) in [0, 1], or a
        list; one per prompt) 4x, guided by ``prompt``. ``noise_level``: an integer in [0,
        max_noise_level], the low_res_scheduler timestep the input is noised to (and the UNet's
        class label). ``latents`` (N, 4, h, w) at the input's size (h, w rounded down to a
        multiple of 4): the initial noise, scaled by init_noise_sigma as diffusers.
        ``scheduler``: a name (minisd.schedulers.NAMES) or None for the checkpoint's own
        (DDIM for the x4 upscaler). ``rng`` overrides ``seed`` (minisd.rng.TorchGenerator by
        default: torch.Generator().manual_seed(seed)'s numbers). ``callback(step, t, latents)``
        after each solver step, as diffusers' legacy callback. Output as StableDiffusion's:
        "pil", "np" (N, 4h, 4w, 3) in [0, 1], or "latent"."""
        prompts, negative = prompt_lists(prompt, negative_prompt)
        init = self._check_inputs(prompts, image, noise_level)
        f = self.vae_scale_factor
        steps.validate(
            prompts=prompts, negative=negative, height=init.shape[2] * f,
            width=init.shape[3] * f, steps=num_inference_steps, guidance_scale=guidance_scale,
            strength=1.0, image=image, mask_image=None,
            scheduler=self.scheduler_name if scheduler is None else scheduler,
            output_type=output_type, num_images_per_prompt=num_images_per_prompt, eta=eta,
            clip_skip=clip_skip, callback=callback,
        )  # fmt: skip
        if rng is None:
            from .rng import make_rng

            rng = make_rng(seed)
        self._free_phases = self.free_memory_between_phases
        nipp, cfg = num_images_per_prompt, guidance_scale > 1.0
        self._set_attention_chunk(len(prompts) * nipp * (1 + cfg), *(f * s for s in init.shape[2:]))
        ctx = steps.encode_prompt(self, prompts, negative, nipp, cfg, clip_skip)  # (rows, 77, D)
        self.phase_done("text encoding")
        sched = self.make_scheduler(scheduler)
        sched.set_timesteps(num_inference_steps)
        low = self._noisy_image(init, noise_level, rng, rows=(1 + cfg) * nipp)  # draw 1
        shape = (len(prompts) * nipp, self.vae.config.latent_channels, *init.shape[2:])
        lat = initial_latents(self, sched, shape, latents, rng)  # draw 2
        labels = np.full((low.shape[0],), noise_level, dtype=np.int64)  # (rows,)
        lat = self._denoise(sched, lat, low, ctx, labels, guidance_scale, eta, rng, callback,
                            progress, num_inference_steps)  # fmt: skip
        self.phase_done("denoising")
        return output(self, lat, output_type)

    def _check_inputs(self, prompts, image, noise_level):
        """The noise level and the image, checked before any heavy work; -> the preprocessed
        image (n, 3, h, w) in [-1, 1], float32, one per prompt."""
        if image is None:
            raise InputError("image: the x4 upscaler needs the low-resolution image to upscale")
        top = self.max_noise_level
        if not (is_int(noise_level) and 0 <= noise_level <= top):
            raise InputError(
                f"noise_level={noise_level!r}: must be an integer in [0, {top}] "
                "(max_noise_level in model_index.json)"
            )
        h, w = steps.image_size(image)
        f = self.vae_scale_factor
        if h < f or w < f:
            raise InputError(f"image: {h}x{w} pixels; the upscaler needs at least {f}x{f}")
        init = self.image_processor.preprocess(image)  # (n, 3, h, w), h and w multiples of f
        if init.shape[1] != 3:
            raise InputError(f"image: expected RGB images (3 channels), got {init.shape[1]}")
        if init.shape[0] != len(prompts):
            raise InputError(
                f"image: {init.shape[0]} image(s) for {len(prompts)} prompt(s); give one image "
                "per prompt"
            )
        return init

    def _noisy_image(self, init, noise_level, rng, rows):
        """Noise augmentation: the image noised to t = noise_level by the low_res_scheduler
        (x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, one draw of the images' shape), then
        repeated ``rows`` times (diffusers' ``torch.cat([image] * rows)``). -> (rows n, 3, h, w)"""
        x0 = self.xp.asarray(init).astype(self.dtype)  # (n, 3, h, w)
        noise = steps.draw(self, rng, x0.shape)  # (n, 3, h, w)
        low = self.low_res_scheduler.add_noise(x0, noise, np.asarray([noise_level]))
        return self.xp.concatenate([low] * rows)  # (rows n, 3, h, w)

    def _denoise(self, sched, lat, low, ctx, labels, scale, eta, rng, callback, progress, n):
        """diffusers' loop: [latents (twice with guidance), image] on channels -> eps (or v),
        guided, one scheduler step; the callback after each solver step."""
        xp, cfg = self.xp, scale > 1.0
        params = inspect.signature(sched.step).parameters  # eta: DDIM / DDPM; rng: stochastic
        kw = {k: v for k, v in (("eta", eta), ("rng", rng)) if k in params}
        ts, order = sched.timesteps, getattr(sched, "order", 1)
        last_warmup = len(ts) - n * order  # PNDM's warm-up calls end no solver step
        for i, t in enumerate(tqdm(ts, desc="upscaling", disable=not progress, leave=False)):
            x_in = xp.concatenate([lat] * 2) if cfg else lat  # (rows, 4, h, w)
            x_in = sched.scale_model_input(x_in, t)
            x_in = xp.concatenate([x_in, low], axis=1)  # (rows, 7, h, w)
            eps = self.unet(x_in, t, ctx, class_labels=labels)  # (rows, 4, h, w)
            eps = steps.guide(eps, cfg, scale)  # (B, 4, h, w)
            lat = sched.step(eps, t, lat, **kw).prev_sample
            done = i == len(ts) - 1 or (i + 1 > last_warmup and (i + 1) % order == 0)
            if callback is not None and done:
                callback(i // order, t, lat)
        return lat


def _low_res_scheduler(config):
    """The scheduler that noises the input (DDPMScheduler in diffusers' folders), configured
    from low_res_scheduler/scheduler_config.json."""
    from . import schedulers

    name = config.get("_class_name", "DDPMScheduler")
    cls = getattr(schedulers, str(name), None)
    if cls is None or not hasattr(cls, "add_noise"):
        raise ConfigError(f"low_res_scheduler: {name!r} is not a scheduler minisd implements")
    return cls.from_config(config)


def _check_models(pipe):
    """The UNet takes the latents and the RGB image side by side, and has a class embedding
    with a row for every noise level up to max_noise_level."""
    cfg, latent = pipe.unet.config, pipe.vae.config.latent_channels
    if cfg.in_channels != latent + 3:
        raise ConfigError(
            f"unet: in_channels={cfg.in_channels}; the x4 upscaler's UNet takes the "
            f"{latent} latent channels and the 3 image channels ({latent + 3})"
        )
    if not cfg.num_class_embeds or cfg.num_class_embeds <= pipe.max_noise_level:
        raise ConfigError(
            f"unet: num_class_embeds={cfg.num_class_embeds!r}; the x4 upscaler's UNet embeds "
            f"noise levels 0..max_noise_level={pipe.max_noise_level} as class labels"
        )
