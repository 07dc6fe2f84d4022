"""CLIP text transformer (Radford et al. 2021), as transformers' ``CLIPTextModel``.

    x_0 = token_embedding[ids] + position_embedding[positions]                 (N, L, D)
    x_i = x_{i-1} + SelfAttn(LN1(x_{i-1}), causal mask)                          pre-LN block
    x_i = x_i + fc2(act(fc1(LN2(x_i))))                                          act: quick_gelu
    last_hidden_state = final_layer_norm(x_n)                                         or gelu

SD1.x uses OpenAI's ViT-L/14 text tower (12 layers x 768, 12 heads, quick_gelu); SD2.x uses
OpenCLIP ViT-H/14 (23 of its 24 layers x 1024, 16 heads, gelu). The only attention mask is the
causal one: diffusers' SD pipelines pass no padding mask (``use_attention_mask`` is unset).

Parameters keep transformers' names without the ``text_model.`` prefix (``encoder.layers.3.
self_attn.q_proj.weight``); files in either layout load (SD checkpoints and transformers 4 write
the prefix, transformers 5 ``save_pretrained`` does not). Traced names carry the prefix
(``text_model.encoder.layers.3.mlp``), as SD's checkpoint keys and transformers 4's modules do.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import blocks, ops, parallel, trace
from .backend import array_module, resolve_device_dtype, resolve_dtype
from .blocks import ln
from .config import check_divides, check_numbers
from .errors import ConfigError, InputError, WeightsError
from .weights import (
    check_keys,
    check_weights_mode,
    find_weights,
    flatten,
    load_file,
    nest,
    prepare_weights,
    read_config,
)

ACTIVATIONS = {"quick_gelu": ops.quick_gelu, "gelu": ops.gelu}
PREFIX = "text_model."


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' CLIPTextConfig that the forward pass uses."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    projection_dim: int = 512  # CLIPTextModelWithProjection's text_projection width

    @classmethod
    def from_dict(cls, d, source="config"):
        """Known fields from a config.json dict (unknown ones are ignored), validated."""
        if "text_config" in d:  # a full CLIPModel config: take its text tower
            d = d["text_config"]
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        ints += ("num_attention_heads", "max_position_embeddings", "projection_dim")
        check_numbers(source, cfg, ints=ints, floats=("layer_norm_eps",))
        if cfg.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"{source}: hidden_act={cfg.hidden_act!r} is not supported "
                f"(expected one of {sorted(ACTIVATIONS)})"
            )
        heads = cfg.num_attention_heads
        check_divides(source, "num_attention_heads", heads, "hidden_size", (cfg.hidden_size,))
        return cfg


def expected_shapes(cfg):
    """{key: shape} of a CLIPTextModel checkpoint (without the ``text_model.`` prefix)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "embeddings.token_embedding.weight": (cfg.vocab_size, d),
        "embeddings.position_embedding.weight": (cfg.max_position_embeddings, d),
        "final_layer_norm.weight": (d,),
        "final_layer_norm.bias": (d,),
    }
    for i in range(cfg.num_hidden_layers):
        pre = f"encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{pre}self_attn.{name}.weight"] = (d, d)
            shapes[f"{pre}self_attn.{name}.bias"] = (d,)
        for name in ("layer_norm1", "layer_norm2"):
            shapes[f"{pre}{name}.weight"] = (d,)
            shapes[f"{pre}{name}.bias"] = (d,)
        shapes[f"{pre}mlp.fc1.weight"], shapes[f"{pre}mlp.fc1.bias"] = (f, d), (f,)
        shapes[f"{pre}mlp.fc2.weight"], shapes[f"{pre}mlp.fc2.bias"] = (d, f), (d,)
    return shapes


def strip_prefix(flat, source):
    """Checkpoint keys in one layout: drop ``text_model.`` if every key has it."""
    prefixed = [k.startswith(PREFIX) for k in flat]
    if all(prefixed):
        return {k[len(PREFIX) :]: v for k, v in flat.items()}
    if any(prefixed):
        key = next(k for k in flat if not k.startswith(PREFIX))
        raise WeightsError(f"{source}: key {key!r} lacks the 'text_model.' prefix the others have")
    return dict(flat)


# --------------------------------------------------------------------------- layers


def lin(x, p):
    """A Linear module on (..., in) as a single 2-D GEMM: numpy's stacked (3-D) matmul runs
    the batch as separate, smaller GEMMs and is up to 2x slower here."""
    y = blocks.lin(x.reshape(-1, x.shape[-1]), p)  # (N*L, out)
    return y.reshape(*x.shape[:-1], y.shape[-1])  # (..., out)


def embeddings(ids, p, positions):
    """Token + learned absolute position embeddings. ids (N, L) int -> (N, L, D)."""
    tok = trace.record("token_embedding", p["token_embedding"]["weight"][ids])  # (N, L, D)
    pos = p["position_embedding"]["weight"][positions[None, : ids.shape[1]]]  # (1, L, D)
    trace.record("position_embedding", pos)
    return tok + pos


def self_attention(x, p, *, heads, mask):
    """Multi-head self-attention, softmax(q k^T / sqrt(d) + mask) v (Vaswani et al. 2017).
    x (N, L, D) -> (N, L, D)."""
    n, length, dim = x.shape
    d = dim // heads
    split = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        y = trace.record(name, lin(x, p[name]))  # (N, L, D)
        split[name] = y.reshape(n, length, heads, d).swapaxes(1, 2)  # (N, heads, L, d)
    o = ops.attention(split["q_proj"], split["k_proj"], split["v_proj"], scale=d**-0.5, mask=mask)
    o = o.swapaxes(1, 2).reshape(n, length, dim)  # (N, L, D)
    return trace.record("out_proj", lin(o, p["out_proj"]))


def mlp(x, p, *, act):
    """fc2(act(fc1(x))). x (N, L, D) -> (N, L, F) -> (N, L, D)."""
    h = trace.record("fc1", lin(x, p["fc1"]))  # (N, L, F)
    h = trace.record("activation_fn", act(h))
    return trace.record("fc2", lin(h, p["fc2"]))  # (N, L, D)


def encoder_layer(x, p, *, heads, act, eps, mask):
    """Pre-LN transformer block (CLIPEncoderLayer). x (N, L, D) -> (N, L, D)."""
    h = trace.record("layer_norm1", ln(x, p["layer_norm1"], eps=eps))
    with trace.scope("self_attn"):
        h = self_attention(h, p["self_attn"], heads=heads, mask=mask)
    x = x + trace.record("self_attn", h)
    h = trace.record("layer_norm2", ln(x, p["layer_norm2"], eps=eps))
    with trace.scope("mlp"):
        h = mlp(h, p["mlp"], act=act)
    return x + trace.record("mlp", h)


def causal_mask(xp, length, dtype):
    """Additive mask (1, 1, L, L): 0 where key <= query, the dtype's lowest value above the
    diagonal (as transformers' ``create_causal_mask``; exp underflows to exactly 0)."""
    upper = xp.triu(xp.ones((length, length), dtype=bool), k=1)  # (L, L)
    mask = xp.where(upper, np.finfo(dtype).min, 0).astype(dtype)  # (L, L)
    return mask[None, None]  # (1, 1, L, L)


# --------------------------------------------------------------------------- model


class CLIPTextModel:
    """CLIP text encoder: ``te(ids)`` -> last_hidden_state (N, L, D)."""

    def __init__(self, config, params):
        """config: CLIPTextConfig or a config.json dict; params: nested dict (keys as
        :func:`expected_shapes`, optionally ``embeddings.position_ids``)."""
        if not isinstance(config, CLIPTextConfig):
            config = CLIPTextConfig.from_dict(config)
        self.config = config
        self.params = params
        flat = flatten(params)
        want = expected_shapes(config)
        if "embeddings.position_ids" in flat:  # buffer some checkpoints carry: (1, max_pos)
            want["embeddings.position_ids"] = (1, config.max_position_embeddings)
        check_keys(flat, want, "CLIPTextModel params")

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device="cpu", *, weights="eager"):
        """Load a transformers CLIPTextModel folder (config.json + model.safetensors).
        ``weights``: "eager" | "lazy" | "stream", see minisd/weights.py (memory policy).
        ``dtype`` None: float32 on the CPU, float16 on a GPU (``backend.default_dtype``)."""
        dtype = resolve_device_dtype(dtype, device)
        folder = Path(folder)
        config = CLIPTextConfig.from_dict(
            read_config(folder / "config.json"), folder / "config.json"
        )
        path = find_weights(folder, names=("model.safetensors",))
        if check_weights_mode(weights) != "eager":  # keep the file's dtype, cast on read
            flat = load_file(path)
            return cls.from_state_dict(
                flat, config, source=path, dtype=dtype, device=device, weights=weights
            )
        flat = load_file(path, dtype=resolve_dtype(dtype), device=device)
        return cls.from_state_dict(flat, config, source=path)

    @classmethod
    def from_state_dict(
        cls, flat, config, source="state dict", *, dtype=None, device="cpu", weights="eager"
    ):
        """From a flat {key: array} in either key layout, with errors that name ``source``.
        ``weights`` "eager": arrays moved to ``device`` and cast to ``dtype`` now (used as given
        when ``dtype`` is None); "lazy" / "stream": kept in their dtype, cast on read."""
        if not isinstance(config, CLIPTextConfig):
            config = CLIPTextConfig.from_dict(config, source)
        flat = strip_prefix(flat, source)
        if check_weights_mode(weights) == "eager" and dtype is None:
            params = nest(flat)
        else:
            dtype = dtype or flat["final_layer_norm.weight"].dtype
            params = prepare_weights(flat, dtype=dtype, device=device, weights=weights)
        try:
            return cls(config, params)
        except WeightsError as e:
            raise WeightsError(str(e).replace("CLIPTextModel params", str(source))) from None

    @property
    def dtype(self):
        return self.params["final_layer_norm"]["weight"].dtype

    def _table_node(self):
        emb = dict.__getitem__(self.params, "embeddings")  # no cast on the way (CastOnRead)
        return dict.__getitem__(emb, "token_embedding")

    @property
    def token_embedding(self):
        """The token embedding table (V, D) as stored: in the file's dtype under
        weights="lazy" / "stream" (reading it through ``params`` casts it)."""
        return dict.__getitem__(self._table_node(), "weight")

    def set_token_embedding(self, table):
        """Store ``table`` (V', D) as the token embedding table, as given (textual inversion
        appends rows); ``config.vocab_size`` becomes V'."""
        if table.ndim != 2 or table.shape[1] != self.config.hidden_size:
            raise InputError(
                f"token embedding: expected (V, {self.config.hidden_size}), got {table.shape}"
            )
        dict.__setitem__(self._table_node(), "weight", table)
        self.config = dataclasses.replace(self.config, vocab_size=int(table.shape[0]))

    def _positions(self, xp):
        emb = self.params["embeddings"]
        if "position_ids" in emb:  # the checkpoint's own buffer (always 0..max_pos-1)
            return xp.asarray(emb["position_ids"])[0].astype(np.int64)  # (max_pos,)
        return xp.arange(self.config.max_position_embeddings)  # (max_pos,)

    def _check_ids(self, input_ids):
        w = self.params["embeddings"]["token_embedding"]["weight"]
        xp = array_module(w)
        ids = xp.asarray(input_ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise InputError(f"input_ids: expected integer ids (N, L), got {ids.dtype} {ids.shape}")
        most = self.config.max_position_embeddings
        if not 0 < ids.shape[1] <= most:
            raise InputError(f"input_ids: length {ids.shape[1]} is outside 1..{most}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise InputError(f"input_ids: ids must lie in 0..{self.config.vocab_size - 1}")
        return xp, ids.astype(np.int64)

    def _forward(self, input_ids, n_layers, keep_states):
        """Embeddings and the first ``n_layers`` layers: (x, states or None)."""
        xp, ids = self._check_ids(input_ids)
        cfg, p = self.config, self.params
        act = ACTIVATIONS[cfg.hidden_act]
        with trace.scope("text_model"), parallel.blas_threads():
            with trace.scope("embeddings"):
                x = embeddings(ids, p["embeddings"], self._positions(xp))  # (N, L, D)
            trace.record("embeddings", x)
            mask = causal_mask(xp, ids.shape[1], x.dtype)  # (1, 1, L, L)
            states = [x] if keep_states else None
            for i in range(n_layers):
                with trace.scope(f"encoder.layers.{i}"):
                    x = encoder_layer(
                        x,
                        p["encoder"]["layers"][i],
                        heads=cfg.num_attention_heads,
                        act=act,
                        eps=cfg.layer_norm_eps,
                        mask=mask,
                    )  # (N, L, D)
                trace.record(f"encoder.layers.{i}", x)
                if keep_states:
                    states.append(x)
            if n_layers == cfg.num_hidden_layers:
                trace.record("encoder", x)
        return x, states

    def final_layer_norm(self, x):
        with trace.scope("text_model"):
            y = ln(x, self.params["final_layer_norm"], eps=self.config.layer_norm_eps)
            return trace.record("final_layer_norm", y)

    def __call__(self, input_ids, output_hidden_states=False):
        """input_ids (N, L) ints -> last_hidden_state (N, L, D). With
        ``output_hidden_states``: (last, states), states as transformers' hidden_states: the
        embeddings output, then each layer's output (no final layer norm), n_layers + 1 arrays."""
        x, states = self._forward(input_ids, self.config.num_hidden_layers, output_hidden_states)
        last = self.final_layer_norm(x)  # (N, L, D)
        return (last, tuple(states)) if output_hidden_states else last

    def encode(self, input_ids, clip_skip=None):
        """Prompt embeddings as diffusers' ``encode_prompt``: with ``clip_skip=k`` the output of
        hidden state ``states[-(k+1)]`` through the final layer norm (k=1: the penultimate
        layer, A1111's "clip skip 2"); the last k layers are not run."""
        n = self.config.num_hidden_layers
        k = 0 if clip_skip is None else int(clip_skip)
        if not 0 <= k <= n:
            raise InputError(f"clip_skip={clip_skip!r}: expected 0..{n} (or None)")
        x, _ = self._forward(input_ids, n - k, False)  # (N, L, D)
        return self.final_layer_norm(x)

    def hidden_state(self, input_ids, clip_skip=None):
        """SDXL's prompt embeddings: transformers' ``hidden_states[-(k + 2)]`` for
        ``clip_skip=k`` (None: 0), i.e. the output of layer n - 1 - k without the final layer
        norm; the layers after it are not run."""
        n = self.config.num_hidden_layers
        k = 0 if clip_skip is None else int(clip_skip)
        if not 0 <= k <= n - 1:
            raise InputError(f"clip_skip={clip_skip!r}: expected 0..{n - 1} (or None)")
        return self._forward(input_ids, n - 1 - k, False)[0]  # (N, L, D)

    def pooled_output(self, input_ids, last_hidden_state):
        """transformers' pooler_output: the state at each row's EOS token (N, D). Configs with
        the pre-2023 ``eos_token_id == 2`` (SD's) take the argmax id instead, as transformers."""
        xp = array_module(last_hidden_state)
        ids = xp.asarray(input_ids)
        if self.config.eos_token_id == 2:
            where = ids.argmax(axis=-1)  # (N,)
        else:
            where = (ids == self.config.eos_token_id).argmax(axis=-1)  # (N,)
        return last_hidden_state[xp.arange(ids.shape[0]), where]  # (N, D)


def encode_long(te, chunks, clip_skip=None):
    """Long-prompt embeddings: each 77-token window of ``tok.chunked(...)`` encoded on its own,
    the results concatenated along the sequence (the A1111 convention; docs/long_prompts.md).
    chunks (N, C, 77) -> (N, C*77, D)."""
    chunks = chunks if hasattr(chunks, "ndim") else np.asarray(chunks)
    if chunks.ndim != 3:
        raise InputError(f"chunks: expected (N, n_chunks, 77), got shape {chunks.shape}")
    n, c, length = chunks.shape
    h = te.encode(chunks.reshape(n * c, length), clip_skip=clip_skip)  # (N*C, 77, D)
    return h.reshape(n, c * length, h.shape[-1])  # (N, C*77, D)
