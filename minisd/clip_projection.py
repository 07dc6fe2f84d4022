"""CLIP text encoder with its projection, as transformers' ``CLIPTextModelWithProjection``
(SDXL's second text encoder, OpenCLIP ViT-bigG/14: 32 layers x 1280, gelu):

    last        = final_layer_norm(x_n)                          (N, L, D)
    pooled      = last[i, position of row i's EOS token]         (N, D)
    text_embeds = text_projection(pooled)                        (N, projection_dim), no bias

SDXL conditions its UNet on ``hidden_states[-2]`` (no final layer norm) of both encoders,
concatenated, and on this encoder's ``text_embeds`` (minisd/pipeline_xl.py).
Checkpoint keys: CLIPTextModel's plus ``text_projection.weight`` (P, D), never prefixed.
Traced names: CLIPTextModel's plus ``text_projection``.
"""

from __future__ import annotations

from . import trace
from .backend import device_of, to_device
from .clip import CLIPTextConfig, CLIPTextModel, lin
from .errors import InputError, WeightsError

KEY = "text_projection.weight"


class CLIPTextModelWithProjection(CLIPTextModel):
    """``te(ids)`` -> last_hidden_state as CLIPTextModel; :meth:`text_embeds` and
    :meth:`encode_xl` add the projected pooled output."""

    text_projection = None  # {"weight": (projection_dim, hidden_size)}, set by from_state_dict

    @classmethod
    def from_state_dict(
        cls, flat, config, source="state dict", *, dtype=None, device="cpu", weights="eager"
    ):
        """As CLIPTextModel's, with ``text_projection.weight`` required (kept in the model
        dtype on the model's device whatever ``weights`` says: it is one small matrix)."""
        if not isinstance(config, CLIPTextConfig):
            config = CLIPTextConfig.from_dict(config, source)
        flat = dict(flat)
        if KEY not in flat:
            raise WeightsError(
                f"{source}: missing key {KEY!r} (a CLIPTextModelWithProjection checkpoint; "
                "plain CLIPTextModel weights have no projection)"
            )
        proj = flat.pop(KEY)
        want = (config.projection_dim, config.hidden_size)
        if tuple(proj.shape) != want:
            raise WeightsError(f"{source}: {KEY} has shape {tuple(proj.shape)}, expected {want}")
        model = super().from_state_dict(
            flat, config, source, dtype=dtype, device=device, weights=weights
        )
        where = device_of(model.params["final_layer_norm"]["weight"])
        model.text_projection = {"weight": to_device(proj, where, model.dtype)}
        return model

    def _project(self, input_ids, last):
        with trace.scope("text_model"):
            pooled = self.pooled_output(input_ids, last)  # (N, D)
        return trace.record("text_projection", lin(pooled, self.text_projection))  # (N, P)

    def text_embeds(self, input_ids):
        """transformers' ``text_embeds``: the projected pooled output (N, projection_dim)."""
        return self._project(input_ids, self(input_ids))

    def encode_xl(self, input_ids, clip_skip=None):
        """SDXL's two outputs of this encoder: (``hidden_states[-(k + 2)]`` (N, L, D) for
        ``clip_skip=k``, ``text_embeds`` (N, P)); all layers run (the pooled output needs the
        last one)."""
        n = self.config.num_hidden_layers
        k = 0 if clip_skip is None else int(clip_skip)
        if not 0 <= k <= n - 1:
            raise InputError(f"clip_skip={clip_skip!r}: expected 0..{n - 1} (or None)")
        last, states = self(input_ids, output_hidden_states=True)
        return states[-(k + 2)], self._project(input_ids, last)
