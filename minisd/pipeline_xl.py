"""StableDiffusionXL: SDXL's text-to-image, image-to-image and inpainting (Podell et al. 2023),
as diffusers' StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline and
StableDiffusionXLInpaintPipeline, and with ControlNets as StableDiffusionXLControlNet{,Img2Img,
Inpaint}Pipeline.

    pipe = minisd.StableDiffusionXL.from_pretrained("path/to/sdxl-folder")
    images = pipe("a photo of a cat", num_inference_steps=30, seed=0)

What differs from SD1.x / SD2.x (everything else is StableDiffusion's, pipeline_call.py):
- Two text encoders (OpenAI CLIP ViT-L and OpenCLIP ViT-bigG): each gives ``hidden_states[-2]``
  (no final layer norm), concatenated to (N, 77, 768 + 1280); ``prompt_2`` (default: ``prompt``)
  goes to the second. The second's projected pooled output (N, 1280) also conditions the UNet.
- Micro-conditioning (minisd/micro_cond.py): six numbers per row, (original_size,
  crops_coords_top_left, target_size), sizes default to the output's. The refiner
  (``requires_aesthetics_score``) takes (original_size, crops_coords_top_left, aesthetic_score).
- Without ``negative_prompt``, the unconditional row is all zeros (``force_zeros_for_empty_prompt``
  in model_index.json, true for SDXL base) instead of the empty prompt's embedding.
- The default size is unet.sample_size * 8 (1024); the default guidance scale is 5.0 (7.5 for
  inpainting), img2img's default strength 0.3, inpainting's 0.9999 (pipeline_xl_steps.py); a
  float16 VAE with ``force_upcast`` encodes and decodes in float32.
- Inpainting (``mask_image``) is SD's (denoise.py): a 9-channel UNet (SDXL 1.0 inpainting 0.1)
  takes [latents, mask, masked-image latents], a 4-channel one (base or refiner) blends the
  re-noised image latents outside the mask after every step. As diffusers, the image and
  masked-image latents are scaled by scaling_factor alone (no latents_mean / latents_std);
  ``image`` may be latents for a 4-channel UNet (the base's, with ``denoising_start``). The
  output size defaults to the image's, as minisd's SD inpainting (diffusers' SDXL inpainting
  defaults to unet.sample_size * 8 and resizes the image to it).
- The refiner folder has no first text encoder (``tokenizer`` / ``text_encoder`` null).
- Diffusers folders and original single files (Stability's layout, converted in memory by
  weights_tools) load.
- ``denoising_end`` / ``denoising_start``: the base hands its partly denoised latents to the
  refiner (the "ensemble of expert denoisers" of the paper's sec. 2.5).
- LoRA (minisd/lora.py: diffusers/peft files with ``text_encoder_2.`` keys, sd-scripts files
  with the original UNet block names) and textual inversion (minisd/textual_inversion_xl.py:
  ``clip_l`` + ``clip_g`` files) reach both text encoders.
- ControlNet (``from_pretrained(..., controlnet=)``, ``control_image=``): SD's loop
  (minisd/pipeline_control.py) with SDXL ControlNets (addition_embed_type "text_time"), which
  take the UNet's pooled text embedding and time ids, the same rows (the prompt half in guess
  mode). As diffusers' SDXL ControlNet pipelines: the output size defaults to the control
  image's (img2img and inpainting: to ``image``'s), ``original_size`` and ``target_size`` to
  the output size, ``controlnet_conditioning_scale`` to 1.0 (img2img 0.8), img2img's strength
  to 0.8 and inpainting's guidance scale to 5.0; control windows are fractions of the steps
  before a ``denoising_end`` cut. Several ControlNets, guess mode and control_guidance_start /
  end work as for SD1.x.
- T2I-Adapters (``adapter=``, ``adapter_image=``; minisd/pipeline_adapter.py): SDXL's
  ``full_adapter_xl``, whose fourth feature goes to the mid block, as diffusers'
  StableDiffusionXLAdapterPipeline (sizes from the adapter image round down to multiples of 16).
- IP-Adapter (``load_ip_adapter``, ``ip_adapter_image=``; minisd/pipeline_ip.py): h94's plain
  SDXL adapters with their ViT-bigG or ViT-H image encoder, and IP-Adapter Plus
  (ip-adapter-plus(-face)_sdxl_vit-h, minisd/ip_adapter_plus.py).
- Inpainting's ``padding_mask_crop`` (minisd/mask_crop.py).
Not supported here: IP-Adapter FaceID, inpainting's ``masked_image_latents``; and the invisible
watermark diffusers adds when the ``invisible-watermark`` package is installed (minisd never
marks images).
"""

from __future__ import annotations

from types import SimpleNamespace

from .errors import ConfigError
from .pipeline import StableDiffusion
from .weights import read_config

#: StableDiffusion.__call__'s add-on arguments, all off for SDXL
_OFF = dict(image_guidance_scale=None)


class StableDiffusionXL(StableDiffusion):
    """A loaded SDXL model: tokenizer(s), text encoder(s), unet, vae and scheduler."""

    #: img2img's ``image`` may be latents (N, 4, h, w), e.g. the base's output_type="latent"
    takes_latent_images = True
    #: diffusers' default controlnet_conditioning_scale: StableDiffusionXLControlNet{,Img2Img,
    #: Inpaint}Pipeline's (pipeline_control.default_scale)
    control_scales = {"txt2img": 1.0, "img2img": 0.8, "inpaint": 1.0}

    def __init__(
        self, *, tokenizer, text_encoder, tokenizer_2, text_encoder_2, unet, vae,
        scheduler_config, force_zeros_for_empty_prompt=True, requires_aesthetics_score=False,
        dtype="float32", device="cpu",
    ):  # fmt: skip
        super().__init__(
            tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae,
            scheduler_config=scheduler_config, dtype=dtype, device=device,
        )  # fmt: skip
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.requires_aesthetics_score = bool(requires_aesthetics_score)
        if unet.config.addition_embed_type != "text_time":
            raise ConfigError(
                "unet: an SDXL pipeline needs a UNet with addition_embed_type='text_time'; "
                "use minisd.StableDiffusion for SD1.x / SD2.x"
            )

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", *, weights="eager", **kw):
        """Load a diffusers SDXL folder (base or refiner). ``dtype`` None: float32 on the CPU,
        float16 on "cuda". ``weights``: "eager" | "lazy" | "stream" (minisd/weights.py).
        ``controlnet``: an SDXL ControlNet (a diffusers folder, union ones included, a single
        .safetensors file or a loaded ControlNetModel; a list: several), kept as
        ``self.controlnet``; ``adapter``: an SDXL T2I-Adapter (``full_adapter_xl``; a list:
        several), kept as ``self.adapter``; one that does not fit the UNet is refused
        (ConfigError naming it)."""
        return super().from_pretrained(path, dtype, device, weights=weights, **kw)

    @classmethod
    def _from_folder(cls, folder, dtype, device, weights="eager"):
        from .clip import CLIPTextModel
        from .clip_projection import CLIPTextModelWithProjection
        from .pipeline import _vae_class
        from .tokenizer import CLIPTokenizer
        from .unet import UNet2DConditionModel

        index = read_config(folder / "model_index.json")
        kw, w = {"dtype": dtype, "device": device}, {"weights": weights}
        first = index.get("text_encoder", [None, None])[1] is not None
        return cls(
            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer") if first else None,
            text_encoder=(
                CLIPTextModel.from_pretrained(folder / "text_encoder", **kw, **w) if first else None
            ),
            tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                folder / "text_encoder_2", **kw, **w
            ),
            unet=UNet2DConditionModel.from_pretrained(folder / "unet", **kw, **w),
            vae=_vae_class(folder).from_pretrained(folder / "vae", **kw, **w),
            scheduler_config=read_config(folder / "scheduler" / "scheduler_config.json"),
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
            requires_aesthetics_score=index.get("requires_aesthetics_score", False),
            **kw,
        )

    @classmethod
    def _from_single_file(cls, path, dtype, device, config, prediction_type, weights="eager"):
        from weights_tools.convert import load_single_file

        parts = load_single_file(path, config=config, prediction_type=prediction_type)
        parts["source"] = str(path)
        return cls._from_parts(parts, dtype, device, weights)

    @classmethod
    def _from_parts(cls, parts, dtype, device, weights="eager"):
        """From weights_tools.convert.load_single_file's SDXL parts (text_encoder None for a
        refiner; text_encoder_2's flat weights include text_projection.weight)."""
        from .clip import CLIPTextModel
        from .clip_projection import CLIPTextModelWithProjection
        from .unet import UNet2DConditionModel
        from .vae import AutoencoderKL

        src, kw = parts["source"], {"dtype": dtype, "device": device}
        if not str(parts.get("family", "")).startswith("sdxl"):
            raise ConfigError(f"{src}: not an SDXL checkpoint; use minisd.StableDiffusion")
        w = {"source": src, "weights": weights, **kw}
        te, te2 = parts["text_encoder"], parts["text_encoder_2"]
        return cls(
            tokenizer=None if te is None else _tokenizer(parts["tokenizer"], parts["pad_token"]),
            text_encoder=None if te is None else CLIPTextModel.from_state_dict(te[1], te[0], **w),
            tokenizer_2=_tokenizer(parts["tokenizer_2"], parts["pad_token_2"]),
            text_encoder_2=CLIPTextModelWithProjection.from_state_dict(te2[1], te2[0], **w),
            unet=UNet2DConditionModel(*parts["unet"], source=src, weights=weights, **kw),
            vae=AutoencoderKL(*parts["vae"], source=src, weights=weights, **kw),
            scheduler_config=parts["scheduler"],
            force_zeros_for_empty_prompt=parts["force_zeros_for_empty_prompt"],
            requires_aesthetics_score=parts["requires_aesthetics_score"],
            **kw,
        )

    # ------------------------------------------------------------------ add-ons

    def load_textual_inversion(self, source, token=None, *, text_encoder=None, tokenizer=None):
        """Add a textual inversion embedding to both text encoders, as diffusers' two
        ``load_textual_inversion`` calls (one per encoder) do: an SDXL file (kohya / civitai:
        {"clip_l": (n, 768), "clip_g": (n, 1280)}) or state dict; the token is ``token`` or
        the file's stem, usable in ``prompt`` and ``prompt_2``. The refiner takes clip_g only.
        ``text_encoder=pipe.text_encoder`` or ``pipe.text_encoder_2`` (``tokenizer=`` optional)
        loads into that encoder only, also an SD1.x-style one-encoder file of its width, which
        is refused without it. Returns the added tokens ("<tok>", "<tok>_1", ...);
        :meth:`unload_textual_inversion` removes them from both. minisd/textual_inversion_xl.py
        """
        from .textual_inversion_xl import load_textual_inversion_xl

        return load_textual_inversion_xl(self, source, token, text_encoder, tokenizer)

    def load_ip_adapter(self, weights, image_encoder=None, scale=1.0):
        """Attach an SDXL IP-Adapter (Ye et al. 2023) as StableDiffusion.load_ip_adapter does:
        h94's ``sdxl_models/ip-adapter_sdxl.safetensors`` with its ViT-bigG image encoder
        (``sdxl_models/image_encoder``), or ``ip-adapter_sdxl_vit-h.safetensors`` with ViT-H
        (``models/image_encoder``); then ``pipe(..., ip_adapter_image=)``. The image tokens are
        as wide as the UNet's cross-attention (2048); an adapter for another UNet (SD1.x: 768)
        is refused naming the file and both widths. IP-Adapter Plus
        (``ip-adapter-plus(-face)_sdxl_vit-h``, with ViT-H) loads too. minisd/pipeline_ip.py"""
        from .pipeline_ip import load_ip_adapter

        return load_ip_adapter(self, weights, image_encoder, scale)

    # ------------------------------------------------------------------ generation

    def __call__(
        self,
        prompt,
        prompt_2=None,
        negative_prompt=None,
        negative_prompt_2=None,
        num_inference_steps=50,
        guidance_scale=None,
        height=None,
        width=None,
        seed=0,
        scheduler=None,
        num_images_per_prompt=1,
        latents=None,
        image=None,
        strength=None,
        mask_image=None,
        clip_skip=None,
        eta=0.0,
        callback=None,
        output_type="pil",
        rng=None,
        progress=True,
        free_memory_between_phases=None,
        guidance_rescale=0.0,
        original_size=None,
        crops_coords_top_left=(0, 0),
        target_size=None,
        negative_original_size=None,
        negative_crops_coords_top_left=(0, 0),
        negative_target_size=None,
        aesthetic_score=6.0,
        negative_aesthetic_score=2.5,
        denoising_start=None,
        denoising_end=None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        adapter_image=None,
        adapter_conditioning_scale=1.0,
        adapter_conditioning_factor=1.0,
        control_image=None,
        controlnet_conditioning_scale=None,
        guess_mode=False,
        control_guidance_start=0.0,
        control_guidance_end=1.0,
        control_mode=None,
        padding_mask_crop=None,
    ):
        """Generate images, with StableDiffusionXLPipeline's arguments (img2img: ``image``,
        StableDiffusionXLImg2ImgPipeline's; inpainting: ``image`` and ``mask_image``, white =
        repaint, StableDiffusionXLInpaintPipeline's). ``guidance_scale`` None: 5.0, or 7.5 for
        inpainting; ``strength`` None: 0.3 for img2img, 0.9999 for inpainting (diffusers'
        defaults). ``scheduler`` None: the checkpoint's own
        (EulerDiscreteScheduler for SDXL base); a name: see minisd.schedulers.NAMES.
        ``seed`` / ``rng`` / ``callback`` / ``output_type``: as StableDiffusion.__call__.
        Sizes are (height, width) pairs of ints; see the module docstring.
        ``denoising_end`` / ``denoising_start`` (fractions in (0, 1)): SDXL's ensemble of
        experts: the base stops where a fraction of the schedule is denoised (give it
        output_type="latent"); the refiner takes those latents as ``image`` and starts there,
        adding no noise (``strength`` is then unused; inpainting: a 4-channel UNet blends
        the image outside the mask in as usual). ``ip_adapter_image``: the image prompt of a
        loaded IP-Adapter (``load_ip_adapter``; as StableDiffusion.__call__'s), or
        ``ip_adapter_image_embeds`` instead.
        ``adapter_image`` (+ ``adapter_conditioning_scale`` / ``_factor``): the condition image
        of a T2I-Adapter loaded with ``from_pretrained(..., adapter=)`` (an SDXL one,
        full_adapter_xl), as StableDiffusionXLAdapterPipeline's ``image``; minisd/
        pipeline_adapter.py.
        ``control_image`` and the ``control*`` / ``guess_mode`` arguments: the loaded
        ControlNet(s)' (StableDiffusionXLControlNet{,Img2Img,Inpaint}Pipeline's ``image`` /
        ``control_image`` and the rest); ``controlnet_conditioning_scale`` None: 1.0, or 0.8
        for img2img; with a control image, img2img's ``strength`` defaults to 0.8 and
        inpainting's ``guidance_scale`` to 5.0 (diffusers' defaults). ``control_mode``: for
        union ControlNets (ControlNetUnionModel), the control type of each control image, as
        StableDiffusionXLControlNetUnion*Pipeline's (minisd/pipeline_control_union.py); the
        scale and the guidance window are then per image. ``padding_mask_crop``:
        inpaint only a crop around the mask and paste it back, as StableDiffusion.__call__'s."""
        from . import pipeline_xl_steps as xl
        from .pipeline_call import generate

        strength = xl.default_strength(strength, mask_image, control_image)
        guidance_scale = xl.default_guidance(guidance_scale, mask_image, control_image)
        args = dict(locals())
        del args["self"], args["generate"], args["xl"]
        return generate(self, SimpleNamespace(**args, **_OFF))

    def _text_extra(self, a, height, width):
        """SDXL's text-side arguments for text_conditioning: the second prompts and the time
        ids of the positive and negative rows, checked against the UNet's input width."""
        from . import pipeline_xl_steps as xl

        return SimpleNamespace(
            prompt_2=xl.prompt_list(a.prompt_2, a.prompt, "prompt_2"),
            negative_prompt_2=a.negative_prompt_2,
            time_ids=xl.time_ids(self, a, height, width),
        )

    def _resolve_size(self, height, width, image):
        """As StableDiffusion's; latents given as ``image`` size the output (h * 8, w * 8)."""
        from .pipeline_steps import is_latents

        if is_latents(self, image):
            f = self.vae_scale_factor
            h, w = image.shape[2] * f, image.shape[3] * f
            return (h if height is None else height), (w if width is None else width)
        return super()._resolve_size(height, width, image)

    def text_conditioning(self, prompts, negative, nipp, cfg, clip_skip, extra=None):
        from . import pipeline_xl_steps as xl

        return xl.encode(self, prompts, negative, extra, nipp, cfg, clip_skip)

    def encode_image(self, image, rng):
        from . import pipeline_xl_steps as xl

        return xl.encode_image(self, image, rng)

    def encode_inpaint_image(self, image, rng):
        """As ``encode_image``, scaled by scaling_factor alone: diffusers' SDXL inpainting."""
        from . import pipeline_xl_steps as xl

        return xl.encode_image(self, image, rng, use_stats=False)

    def _unscale(self, lat):
        """lat * latents_std / scaling_factor + latents_mean where the VAE config has the
        statistics, else lat / scaling_factor (diffusers' SDXL pipelines)."""
        from . import pipeline_xl_steps as xl

        return xl.unscale(self, lat)


def _tokenizer(folder, pad_token):
    """A tokenizer folder's tokenizer, else the bundled CLIP vocabulary padding with
    ``pad_token`` (SDXL: "<|endoftext|>" for the first encoder, "!" for the second)."""
    from .tokenizer import CLIPTokenizer, bundled_vocab

    if folder is not None:
        return CLIPTokenizer.from_pretrained(folder)
    return CLIPTokenizer(*bundled_vocab(), pad_token=pad_token)
