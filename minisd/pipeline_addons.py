"""What StableDiffusion takes on top of a checkpoint: LoRAs merged into its weights
(minisd/lora.py), textual inversion embeddings added to its tokenizer and text encoder
(minisd/textual_inversion.py), FreeU's re-weighting of the UNet's decoder (minisd/freeu.py) and
IP-Adapter's image prompts (minisd/pipeline_ip.py). ControlNets and T2I-Adapters are pipeline
attributes (pipeline_control.py, pipeline_adapter.py)."""

from __future__ import annotations


class AddOns:
    """StableDiffusion's load / unload methods, with diffusers' names where it has them."""

    def load_lora(self, lora, scale=1.0):
        """Merge a LoRA (a .safetensors path, a folder, a state dict or a minisd.lora.LoRA)
        into the UNet and the text encoder: W += scale * alpha / r * up @ down, as diffusers'
        ``load_lora_weights`` + ``fuse_lora(lora_scale=scale)``. Formats: minisd/lora.py.
        Returns a handle for :meth:`unload_lora`."""
        from .lora import apply_lora

        return apply_lora(self, lora, scale)

    def unload_lora(self, handle=None):
        """Put back the weights a LoRA replaced, bit for bit; None: every LoRA, last first."""
        from .lora import remove_lora

        remove_lora(self, handle)

    def load_textual_inversion(self, source, token=None):
        """Add textual inversion embeddings (a .safetensors path, a folder, a state dict, or an
        (n, D) array with ``token``) as diffusers' ``load_textual_inversion``: their tokens can
        then be used in prompts. Returns the added tokens ("<tok>", "<tok>_1", ...)."""
        from .textual_inversion import load_textual_inversion

        return load_textual_inversion(self, source, token)

    def unload_textual_inversion(self, tokens=None):
        """Remove embeddings (a token, a list, or None: all); once none is left the tokenizer
        and the embedding table are the originals, bit for bit."""
        from .textual_inversion import unload_textual_inversion

        unload_textual_inversion(self, tokens)

    def enable_freeu(self, s1, s2, b1, b2):
        """FreeU (Si et al. 2023) on the UNet, as diffusers' ``pipe.enable_freeu``: s1, s2
        damp the skip features' lowest frequencies and b1, b2 amplify half the backbone's
        channels in the decoder's first two stages. SD1.5: (0.9, 0.2, 1.5, 1.6); SD2.1:
        (0.9, 0.2, 1.4, 1.6). See UNet2DConditionModel.enable_freeu."""
        self.unet.enable_freeu(s1, s2, b1, b2)

    def disable_freeu(self):
        """Turn FreeU off; the pipeline then computes exactly what it did before."""
        self.unet.disable_freeu()

    def load_ip_adapter(self, weights, image_encoder=None, scale=1.0):
        """Attach an IP-Adapter (Ye et al. 2023): ``weights`` its .safetensors file (h94's
        layout), ``image_encoder`` the folder of its CLIP vision model; then
        ``pipe(..., ip_adapter_image=)`` prompts with an image too. ``image_encoder=None``:
        the run takes precomputed ``ip_adapter_image_embeds`` instead (FaceID always does).
        diffusers' ``load_ip_adapter`` + ``set_ip_adapter_scale(scale)``; minisd/pipeline_ip.py."""
        from .pipeline_ip import load_ip_adapter

        return load_ip_adapter(self, weights, image_encoder, scale)

    def set_ip_adapter_scale(self, scale):
        """The weight of the image prompt's attention (0: none; 1: as trained)."""
        from .pipeline_ip import set_ip_adapter_scale

        set_ip_adapter_scale(self, scale)

    def unload_ip_adapter(self):
        """Detach the IP-Adapter: the UNet is the original again, bit for bit."""
        from .pipeline_ip import unload_ip_adapter

        unload_ip_adapter(self)
