"""StableDiffusion: txt2img, img2img and inpainting over minisd's components.

    pipe = minisd.StableDiffusion.from_pretrained("path/to/folder_or_file.safetensors")
    images = pipe("a photo of a cat", num_inference_steps=30, seed=0)

Semantics follow diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline step by step, so that the
same inputs (or the same seed, through minisd.rng's torch-compatible generator) give the same
images. The steps themselves live in ``pipeline_steps.py``.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

from . import image as imageproc
from . import parallel, pipeline_control
from . import pipeline_steps as steps
from .backend import (
    attention_chunk_for,
    free_memory,
    get_xp,
    memory_info,
    resolve_device_dtype,
    resolve_dtype,
)
from .config import path_arg
from .errors import ConfigError, InputError, WeightsError
from .pipeline_addons import AddOns
from .weights import CastOnRead, check_weights_mode, read_config, refuse_pickle

# diffusers scheduler class -> minisd scheduler name (for the checkpoint's default scheduler)
_CLASS_TO_NAME = {
    "PNDMScheduler": "pndm",
    "PLMSScheduler": "plms",
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "KDPM2DiscreteScheduler": "dpm2",
    "KDPM2AncestralDiscreteScheduler": "dpm2_a",
    "LMSDiscreteScheduler": "lms",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "DPMSolverSinglestepScheduler": "dpmpp_2s",
    "DEISMultistepScheduler": "deis",
    "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
    "EDMEulerScheduler": "edm_euler",
    "EDMDPMSolverMultistepScheduler": "edm_dpmpp_2m",  # Playground v2.5's
    "DPMSolverSDEScheduler": "dpmpp_sde",
}


def _default_scheduler_name(class_name) -> str:
    """The minisd name of a checkpoint's scheduler class; "pndm" (SD1's) with a warning for a
    class minisd does not implement, "pndm" silently when the config names none."""
    if class_name is not None and class_name not in _CLASS_TO_NAME:
        logging.getLogger("minisd").warning(
            "scheduler_config: %s is not implemented by minisd; using pndm (choose another "
            "with scheduler=..., one of %s)", class_name, ", ".join(steps.SCHEDULERS))  # fmt: skip
    return _CLASS_TO_NAME.get(class_name, "pndm")


class StableDiffusion(AddOns):
    """A loaded Stable Diffusion model: tokenizer, text_encoder, unet, vae and scheduler."""

    # GPU memory and precision policy (docs/gpu.md); plain attributes, set them per pipeline.
    #: Give CuPy's cached blocks back to CUDA after text encoding, denoising and decoding.
    free_memory_between_phases = False
    #: UNet attention query chunk: "auto" sizes it from free GPU memory on CUDA (no chunking when
    #: the scores fit) and leaves the UNet's own setting on the CPU; an int or None is used as is.
    attention_chunk_size = "auto"
    #: Decode in float32: "auto" when the VAE is float16 and its config sets force_upcast.
    upcast_vae = "auto"

    def __init__(
        self, *, tokenizer, text_encoder, unet, vae, scheduler_config, dtype="float32", device="cpu"
    ):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.scheduler_config = dict(scheduler_config)
        self.dtype = resolve_dtype(dtype)
        self.device = device
        self.xp = get_xp(device)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = imageproc.ImageProcessor(self.vae_scale_factor)
        self.mask_processor = imageproc.mask_processor(self.vae_scale_factor)
        self.scheduler_name = _default_scheduler_name(self.scheduler_config.get("_class_name"))
        self.scheduler = self.make_scheduler()
        self.loras = []  # handles of the merged LoRAs, in the order applied (minisd.lora)
        self.controlnet = None  # a ControlNetModel for control_image= (pipeline_control.py)
        self.adapter = None  # a T2IAdapter for adapter_image= (pipeline_adapter.py)
        self.image_encoder = None  # an IP-Adapter's CLIP vision model (pipeline_ip.py)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls, path, dtype=None, device="cpu", *, config=None, prediction_type=None,
        weights="eager", controlnet=None, adapter=None,
    ):  # fmt: skip
        """Load a diffusers folder (model_index.json + component subfolders) or a single
        original-layout ``.safetensors`` checkpoint (converted in memory, no temp files).
        ``config``: a diffusers folder whose configs override the inferred architecture.
        ``weights``: "eager" (cast at load), "lazy" or "stream" (keep float16 files memory-mapped
        and cast per layer: bounded memory, see minisd/weights.py).
        ``dtype`` None: float32 on the CPU, float16 on "cuda" (backend.default_dtype).
        ``controlnet``: a diffusers ControlNet folder, an original single-file .safetensors
        ControlNet (lllyasviel's layout), or a loaded ControlNetModel, kept as
        ``self.controlnet`` for ``control_image=`` (pipeline_control.py); a list: several.
        ``adapter``: a diffusers T2I-Adapter folder or a loaded T2IAdapter (a list: several),
        kept as ``self.adapter`` for ``adapter_image=`` (pipeline_adapter.py)."""
        dtype = resolve_device_dtype(dtype, device).name
        kw = {"weights": check_weights_mode(weights)}
        path = path_arg(path, "path")
        refuse_pickle(path)
        if cls is StableDiffusion and _is_upscale_folder(path):  # the x4 upscaler: its own class
            from .pipeline_upscale import StableDiffusionUpscale

            if any(v is not None for v in (config, prediction_type, controlnet, adapter)):
                raise InputError(
                    f"{path}: an x4 upscaler folder (StableDiffusionUpscale); it takes none of "
                    "config=, prediction_type=, controlnet=, adapter="
                )
            return StableDiffusionUpscale.from_pretrained(path, dtype, device, weights=weights)
        if cls is StableDiffusion and _is_xl_folder(path):  # SDXL: its own pipeline class
            from .pipeline_xl import StableDiffusionXL

            return StableDiffusionXL.from_pretrained(
                path, dtype, device, config=config, prediction_type=prediction_type,
                weights=weights, controlnet=controlnet, adapter=adapter,
            )  # fmt: skip
        pipe = cls._load(path, dtype, device, config, prediction_type, kw)
        if controlnet is not None:
            pipe.controlnet = pipeline_control.load(controlnet, dtype, device, kw["weights"])
            pipeline_control.check_fit(pipe)  # ConfigError: it does not fit this UNet
        if adapter is not None:
            from . import pipeline_adapter

            pipe.adapter = pipeline_adapter.load(adapter, dtype, device)
            pipeline_adapter.check_fits(pipe)  # an SD adapter on SDXL, or vice versa: refused
        return pipe

    @classmethod
    def _load(cls, path, dtype, device, config, prediction_type, kw):
        if path.is_dir():
            if config is not None or prediction_type is not None:
                raise InputError(
                    f"{path}: config= and prediction_type= apply to single-file checkpoints; "
                    "a folder brings its own configs (edit scheduler/scheduler_config.json)"
                )
            return cls._from_folder(path, dtype, device, **kw)
        if path.suffix == ".safetensors" and path.is_file():
            return cls._from_single_file(path, dtype, device, config, prediction_type, **kw)
        if not path.exists():
            raise WeightsError(f"{path}: no such model folder or file")
        raise WeightsError(f"{path}: expected a diffusers folder or a .safetensors file")

    @classmethod
    def _from_folder(cls, folder, dtype, device, weights="eager"):
        from .clip import CLIPTextModel
        from .tokenizer import CLIPTokenizer
        from .unet import UNet2DConditionModel

        if not (folder / "model_index.json").is_file():
            raise ConfigError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
        kw = {"dtype": dtype, "device": device}
        w = {"weights": weights}
        return cls(
            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", **kw, **w),
            unet=UNet2DConditionModel.from_pretrained(folder / "unet", **kw, **w),
            vae=_vae_class(folder).from_pretrained(folder / "vae", **kw, **w),
            scheduler_config=read_config(folder / "scheduler" / "scheduler_config.json"),
            **kw,
        )

    @classmethod
    def _from_single_file(cls, path, dtype, device, config, prediction_type, weights="eager"):
        from weights_tools.convert import load_single_file

        parts = load_single_file(path, config=config, prediction_type=prediction_type)
        parts["source"] = str(path)
        if str(parts.get("family", "")).startswith("sdxl"):  # SDXL: its own pipeline class
            from .pipeline_xl import StableDiffusionXL

            if cls is StableDiffusion:
                return StableDiffusionXL._from_parts(parts, dtype, device, weights)
            raise ConfigError(f"{path}: an SDXL checkpoint; load it with StableDiffusionXL")
        return cls._from_parts(parts, dtype, device, weights)

    @classmethod
    def _from_parts(cls, parts, dtype, device, weights="eager"):
        """Build from {"unet": (config, flat), "vae": ..., "text_encoder": ..., "scheduler":
        config, "tokenizer": folder or None, "source": file name for error messages}."""
        from .clip import CLIPTextModel
        from .unet import UNet2DConditionModel
        from .vae import AutoencoderKL

        kw = {"dtype": dtype, "device": device}
        te_cfg, te_flat = parts["text_encoder"]
        te_kw = {"source": parts["source"], "weights": weights, **kw}
        return cls(
            tokenizer=_tokenizer(parts),
            text_encoder=CLIPTextModel.from_state_dict(te_flat, te_cfg, **te_kw),
            unet=UNet2DConditionModel(
                *parts["unet"], source=parts["source"], weights=weights, **kw
            ),
            vae=AutoencoderKL(*parts["vae"], source=parts["source"], weights=weights, **kw),
            scheduler_config=parts["scheduler"],
            **kw,
        )

    def make_scheduler(self, name=None):
        """A fresh scheduler ``name`` configured from the checkpoint's scheduler_config.json, as
        diffusers' ``Cls.from_config(pipe.scheduler.config)``. None: the checkpoint's own
        scheduler with its config as it is (no preset of ``schedulers.NAMES`` applied)."""
        from . import schedulers

        own = self.scheduler_config.get("_class_name")
        if name is None and own in _CLASS_TO_NAME:
            return getattr(schedulers, own).from_config(self.scheduler_config)
        return schedulers.get_scheduler(name or self.scheduler_name, self.scheduler_config)

    # ------------------------------------------------------------------ generation

    def __call__(
        self,
        prompt,
        negative_prompt=None,
        num_inference_steps=50,
        guidance_scale=7.5,
        height=None,
        width=None,
        seed=0,
        scheduler="pndm",
        num_images_per_prompt=1,
        latents=None,
        image=None,
        strength=0.8,
        mask_image=None,
        clip_skip=None,
        eta=0.0,
        callback=None,
        output_type="pil",
        rng=None,
        progress=True,
        free_memory_between_phases=None,
        control_image=None,
        controlnet_conditioning_scale=None,
        guess_mode=False,
        control_guidance_start=0.0,
        control_guidance_end=1.0,
        guidance_rescale=0.0,
        image_guidance_scale=None,
        adapter_image=None,
        adapter_conditioning_scale=1.0,
        adapter_conditioning_factor=1.0,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        depth_map=None,
        padding_mask_crop=None,
    ):
        """Generate images. See DESIGN.md for the arguments. ``scheduler``: a name (see
        minisd.schedulers.NAMES), or None for the checkpoint's own scheduler, configured exactly
        as its scheduler_config.json says (PNDM for SD1.x), as diffusers' pipelines do.
        ``rng`` overrides ``seed`` with any generator that has ``standard_normal(shape, dtype)``
        (minisd.rng.TorchGenerator by default, which draws exactly what
        torch.Generator().manual_seed(seed) draws). ``callback(step, t, latents)`` runs as
        diffusers' ``callback``: once per solver step, after its last model call (Heun makes
        two; PNDM's and PLMS's warm-up calls report nothing), ``step`` = model call // order.
        ``free_memory_between_phases``: None uses the pipeline attribute of that name.
        ``control_image`` and the four arguments after it: ControlNet guidance, with diffusers'
        StableDiffusionControlNetPipeline's names and meaning (minisd/pipeline_control.py); it
        needs ``self.controlnet``, and works with img2img and inpainting too.
        ``guidance_rescale`` (0..1): pipeline_steps.rescale_guidance, as diffusers' txt2img
        pipeline (applied in img2img and inpainting too).
        ``image_guidance_scale`` (None: 1.5): InstructPix2Pix UNets only, which edit ``image``
        (minisd/pipeline_pix2pix.py). ``adapter_image`` and the two arguments after it:
        T2I-Adapter guidance with diffusers' StableDiffusionAdapterPipeline's meaning (its
        ``image`` is ``adapter_image`` here; needs ``self.adapter``, minisd/pipeline_adapter.py).
        ``ip_adapter_image``: the image prompt of a loaded IP-Adapter (``load_ip_adapter``,
        minisd/pipeline_ip.py); ``ip_adapter_image_embeds``: precomputed embeddings instead
        (diffusers' argument and meaning; IP-Adapter FaceID's face embedding).
        ``depth_map``: depth UNets only (stable-diffusion-2-depth), which restyle ``image``
        keeping its depth layout (minisd/pipeline_depth.py).
        ``padding_mask_crop`` (pixels): inpaint only a crop around the mask, grown by that
        margin and widened to height:width, at (height, width) (default: the model's size),
        then paste it back into ``image`` through the mask (diffusers' argument of that name;
        one PIL image and mask, output_type "pil"; minisd/mask_crop.py). The steps of a call:
        minisd/pipeline_call.py."""
        from .pipeline_call import generate

        args = dict(locals())
        del args["self"], args["generate"]
        return generate(self, SimpleNamespace(**args))

    # ------------------------------------------------------------------ GPU policy

    def decode_latents(self, lat):
        """VAE decode of scaled latents; in float32 when ``upcast_vae`` says so ("auto": a
        float16 VAE whose config sets force_upcast, the rule of diffusers' SDXL pipelines)."""
        up = self.vae.needs_upcast if self.upcast_vae == "auto" else bool(self.upcast_vae)
        vae = self.vae.upcast() if up else self.vae
        if up:  # cast before scaling, as diffusers: float16 division would round the latents
            lat = lat.astype(vae.dtype)
        return vae.decode(self._unscale(lat))  # (N, 3, H, W)

    def _unscale(self, lat):
        """Denoised latents -> the VAE's latent space: z = lat / scaling_factor."""
        return lat / self.vae.config.scaling_factor

    def encode_image(self, image, rng):
        """Pixels (N, 3, H, W) in [-1, 1] -> scaled latents, sampling the VAE posterior with
        ``rng`` (AutoencoderKL); a VAE whose encoder returns latents (AutoencoderTiny) draws
        nothing, as diffusers' ``retrieve_latents``."""
        out = self.vae.encode(image)
        z = out.sample(rng) if hasattr(out, "sample") else out  # (N, 4, H/8, W/8)
        return self.vae.config.scaling_factor * z

    def encode_inpaint_image(self, image, rng):
        """Inpainting's image and masked image -> scaled latents: ``encode_image`` (diffusers'
        StableDiffusionInpaintPipeline._encode_vae_image; SDXL's differs)."""
        return self.encode_image(image, rng)

    def text_conditioning(self, prompts, negative, nipp, cfg, clip_skip, extra=None):
        """(encoder_hidden_states (rows, 77, D), added_cond_kwargs or None) for the UNet's rows:
        [negative; positive] with classifier-free guidance (pipeline_steps.encode_prompt).
        ``extra``: what ``_text_extra`` prepared (None here; SDXL's second prompts and time
        ids in pipeline_xl.py)."""
        return steps.encode_prompt(self, prompts, negative, nipp, cfg, clip_skip), None

    def _text_extra(self, a, height, width):
        """Per-call inputs of ``text_conditioning`` beyond the prompts (none for SD1.x/2.x)."""
        return None

    def phase_done(self, phase):
        """End of a phase (text encoding, denoising, decoding): free the work arrays the phase's
        loops reused (``parallel.scratch``; the next phase's are sized differently) and release
        CuPy's cached blocks when ``free_memory_between_phases`` is on."""
        parallel.release_scratch()
        if getattr(self, "_free_phases", False):
            free_memory(self.device)
        done = {
            "text encoding": [self.text_encoder, getattr(self, "text_encoder_2", None)],
            "denoising": [self.unet, *pipeline_control.nets(self)],
            "decoding": [self.vae],
        }
        for model in done.get(phase, ()):
            params = getattr(model, "params", None)
            if isinstance(params, CastOnRead):  # weights="lazy": give the file pages back
                params.release()

    def _set_attention_chunk(self, batch, height, width):
        """Apply ``attention_chunk_size``; "auto" on a GPU: the largest self-attention score
        tile (batch x heads x L x L, float32 scores + a copy in the model dtype) gets half of the
        free memory, so there is no chunking unless it would not fit."""
        if self.attention_chunk_size != "auto":
            self.unet.attention_chunk_size = self.attention_chunk_size
            return
        info = memory_info(self.device)
        if info is None:
            return
        cfg, f = self.unet.config, self.vae_scale_factor
        tokens = (height // f) * (width // f)
        worst, rows = 0, tokens
        for i, heads in enumerate(cfg.attention_head_dim):  # (L at level i) = tokens / 4^i
            if cfg.down_block_types[i] != "CrossAttnDownBlock2D":
                continue  # no attention at this level (SDXL's first, 128x128 latents at 1024^2)
            level_tokens = tokens // 4**i
            per_query = batch * heads * level_tokens * (4 + self.dtype.itemsize)
            if level_tokens * per_query > worst:
                worst, rows = level_tokens * per_query, level_tokens
        self.unet.attention_chunk_size = attention_chunk_for(rows, worst // rows, info[0])

    def _resolve_size(self, height, width, image):
        """Defaults: txt2img uses unet.sample_size * 8 (512 for SD1.x, 768 for SD2.x-v), as
        diffusers; img2img and inpainting the input image's size floored to a multiple of 8
        (diffusers' img2img does; its inpainting pipelines stretch the image to sample_size * 8,
        which height= / width= reproduce)."""
        f = self.vae_scale_factor
        if image is not None:
            h, w = steps.image_size(image)
            dh, dw = int(h) // f * f, int(w) // f * f
        elif height is None or width is None:
            size = self.unet.config.sample_size
            if size is None:
                raise InputError("height, width: the UNet config has no sample_size; give both")
            dh, dw = (size, size) if isinstance(size, int) else size
            dh, dw = dh * f, dw * f
        else:
            dh, dw = height, width
        return (dh if height is None else height), (dw if width is None else width)


def _is_upscale_folder(path):
    """A diffusers folder of the SD x4 upscaler (model_index.json names its pipeline)."""
    from .pipeline_upscale import is_upscale_folder

    return is_upscale_folder(path)


def _is_xl_folder(path):
    """A diffusers folder of an SDXL pipeline (model_index.json names one)."""
    index = path / "model_index.json"
    return index.is_file() and "XL" in str(read_config(index).get("_class_name", ""))


def _vae_class(folder):
    """AutoencoderKL, or AutoencoderTiny (TAESD) where the folder's VAE config names it."""
    from .vae import AutoencoderKL
    from .vae_tiny import AutoencoderTiny

    name = read_config(folder / "vae" / "config.json").get("_class_name")
    return AutoencoderTiny if name == "AutoencoderTiny" else AutoencoderKL


def _tokenizer(parts):
    """The checkpoint's tokenizer folder if given, else the bundled CLIP vocabulary with the
    family's padding (SD1.x pads with <|endoftext|>, SD2.x with "!")."""
    from .tokenizer import CLIPTokenizer, bundled_vocab

    if parts.get("tokenizer") is not None:
        return CLIPTokenizer.from_pretrained(parts["tokenizer"])
    if parts.get("pad_token"):
        return CLIPTokenizer(*bundled_vocab(), pad_token=parts["pad_token"])
    return CLIPTokenizer.from_pretrained(None)
