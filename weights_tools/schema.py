"""Expected diffusers-layout parameter shapes of each component, from its config.

Used to check converted checkpoints (every key present, no stray key, right shapes) and by
make_tiny to create random models. Covers what Stable Diffusion 1.x/2.x use: UNet2DCondition
with (CrossAttn)Down/UpBlock2D, AutoencoderKL, CLIPTextModel; for SDXL the UNet's "text_time"
add_embedding and CLIPTextModelWithProjection. Channel bookkeeping follows
diffusers' UNet2DConditionModel / get_up_block and AutoencoderKL's Encoder / Decoder.
"""

from __future__ import annotations

from minisd.errors import ConfigError
from minisd.weights import check_keys


class _Shapes(dict):
    def conv(self, name, cout, cin, k):
        self[f"{name}.weight"] = (cout, cin, k, k)
        self[f"{name}.bias"] = (cout,)

    def linear(self, name, cout, cin, bias=True):
        self[f"{name}.weight"] = (cout, cin)
        if bias:
            self[f"{name}.bias"] = (cout,)

    def norm(self, name, c):
        self[f"{name}.weight"] = (c,)
        self[f"{name}.bias"] = (c,)

    def resnet(self, name, cin, cout, temb=None):
        self.norm(f"{name}.norm1", cin)
        self.conv(f"{name}.conv1", cout, cin, 3)
        if temb is not None:
            self.linear(f"{name}.time_emb_proj", cout, temb)
        self.norm(f"{name}.norm2", cout)
        self.conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            self.conv(f"{name}.conv_shortcut", cout, cin, 1)

    def transformer(self, name, c, cross, depth, linear):
        self.norm(f"{name}.norm", c)
        for proj in ("proj_in", "proj_out"):
            self.linear(f"{name}.{proj}", c, c) if linear else self.conv(f"{name}.{proj}", c, c, 1)
        for d in range(depth):
            tb = f"{name}.transformer_blocks.{d}"
            for i in (1, 2, 3):
                self.norm(f"{tb}.norm{i}", c)
            for attn, ctx in (("attn1", c), ("attn2", cross)):
                self.linear(f"{tb}.{attn}.to_q", c, c, bias=False)
                self.linear(f"{tb}.{attn}.to_k", c, ctx, bias=False)
                self.linear(f"{tb}.{attn}.to_v", c, ctx, bias=False)
                self.linear(f"{tb}.{attn}.to_out.0", c, c)
            self.linear(f"{tb}.ff.net.0.proj", 8 * c, c)  # GEGLU: value and gate, 4c each
            self.linear(f"{tb}.ff.net.2", c, 4 * c)


def _per_block(value, n, field):
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ConfigError(f"config: {field}={value!r} needs one value per block ({n} blocks)")
    return values


def unet_shapes(cfg):
    """{name: shape} of a UNet2DConditionModel with config ``cfg`` (a dict)."""
    C = list(cfg["block_out_channels"])
    n, L = len(C), cfg["layers_per_block"]
    if not isinstance(L, int):
        raise ConfigError("config: per-block layers_per_block is not supported")
    depth = _per_block(
        cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block"
    )
    cross, linear = cfg["cross_attention_dim"], bool(cfg.get("use_linear_projection", False))
    temb = 4 * C[0]
    s = _Shapes()
    s.conv("conv_in", C[0], cfg["in_channels"], 3)
    s.linear("time_embedding.linear_1", temb, C[0])
    s.linear("time_embedding.linear_2", temb, temb)
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text + time ids -> temb
        s.linear("add_embedding.linear_1", temb, cfg["projection_class_embeddings_input_dim"])
        s.linear("add_embedding.linear_2", temb, temb)
    ch = C[0]
    for b, kind in enumerate(cfg["down_block_types"]):
        for l in range(L):
            s.resnet(f"down_blocks.{b}.resnets.{l}", ch if l == 0 else C[b], C[b], temb)
            if kind.startswith("CrossAttn"):
                s.transformer(f"down_blocks.{b}.attentions.{l}", C[b], cross, depth[b], linear)
        if b < n - 1:
            s.conv(f"down_blocks.{b}.downsamplers.0.conv", C[b], C[b], 3)
        ch = C[b]
    for k in range(2):
        s.resnet(f"mid_block.resnets.{k}", C[-1], C[-1], temb)
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        s.transformer("mid_block.attentions.0", C[-1], cross, depth[-1], linear)
    R, rdepth = C[::-1], depth[::-1]
    prev = R[0]
    for b, kind in enumerate(cfg["up_block_types"]):
        skip_in = R[min(b + 1, n - 1)]
        for l in range(L + 1):
            skip = skip_in if l == L else R[b]
            s.resnet(f"up_blocks.{b}.resnets.{l}", (prev if l == 0 else R[b]) + skip, R[b], temb)
            if kind.startswith("CrossAttn"):
                s.transformer(f"up_blocks.{b}.attentions.{l}", R[b], cross, rdepth[b], linear)
        if b < n - 1:
            s.conv(f"up_blocks.{b}.upsamplers.0.conv", R[b], R[b], 3)
        prev = R[b]
    s.norm("conv_norm_out", C[0])
    s.conv("conv_out", cfg["out_channels"], C[0], 3)
    return dict(s)


def vae_shapes(cfg):
    """{name: shape} of an AutoencoderKL with config ``cfg``."""
    C, L, z = list(cfg["block_out_channels"]), cfg["layers_per_block"], cfg["latent_channels"]
    n = len(C)
    s = _Shapes()
    s.conv("encoder.conv_in", C[0], cfg["in_channels"], 3)
    ch = C[0]
    for i in range(n):
        for j in range(L):
            s.resnet(f"encoder.down_blocks.{i}.resnets.{j}", ch if j == 0 else C[i], C[i])
        if i < n - 1:
            s.conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", C[i], C[i], 3)
        ch = C[i]
    for part in ("encoder", "decoder"):
        for k in range(2):
            s.resnet(f"{part}.mid_block.resnets.{k}", C[-1], C[-1])
        s.norm(f"{part}.mid_block.attentions.0.group_norm", C[-1])
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            s.linear(f"{part}.mid_block.attentions.0.{proj}", C[-1], C[-1])
    s.norm("encoder.conv_norm_out", C[-1])
    s.conv("encoder.conv_out", 2 * z, C[-1], 3)
    s.conv("decoder.conv_in", C[-1], z, 3)
    R = C[::-1]
    prev = R[0]
    for i in range(n):
        for j in range(L + 1):
            s.resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else R[i], R[i])
        if i < n - 1:
            s.conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", R[i], R[i], 3)
        prev = R[i]
    s.norm("decoder.conv_norm_out", C[0])
    s.conv("decoder.conv_out", cfg["out_channels"], C[0], 3)
    s.conv("quant_conv", 2 * z, 2 * z, 1)
    s.conv("post_quant_conv", z, z, 1)
    return dict(s)


def text_encoder_shapes(cfg, prefix=""):
    """{name: shape} of a CLIPTextModel (``prefix`` "text_model." for the older key layout)."""
    D, inner = cfg["hidden_size"], cfg["intermediate_size"]
    s = _Shapes()
    s[f"{prefix}embeddings.token_embedding.weight"] = (cfg["vocab_size"], D)
    s[f"{prefix}embeddings.position_embedding.weight"] = (cfg["max_position_embeddings"], D)
    for i in range(cfg["num_hidden_layers"]):
        layer = f"{prefix}encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s.linear(f"{layer}.self_attn.{proj}", D, D)
        s.norm(f"{layer}.layer_norm1", D)
        s.norm(f"{layer}.layer_norm2", D)
        s.linear(f"{layer}.mlp.fc1", inner, D)
        s.linear(f"{layer}.mlp.fc2", D, inner)
    s.norm(f"{prefix}final_layer_norm", D)
    return dict(s)


def component_shapes(part, cfg, text_prefix=""):
    if part == "unet":
        return unet_shapes(cfg)
    if part == "vae":
        return vae_shapes(cfg)
    s = text_encoder_shapes(cfg, text_prefix)
    if part == "text_encoder_2":  # CLIPTextModelWithProjection: a Linear without bias
        s["text_projection.weight"] = (cfg["projection_dim"], cfg["hidden_size"])
    return s


class _Shaped(dict):
    """{name: shape} presented as {name: object with .shape} for minisd.weights.check_keys."""

    class _S:
        def __init__(self, shape):
            self.shape = shape

    def __getitem__(self, key):
        return self._S(super().__getitem__(key))


def check_shapes(shapes, expected, source):
    """minisd.weights.check_keys on names and shapes alone ({name: shape}, no tensors read):
    a WeightsError naming ``source`` and the first missing, unexpected or misshapen key."""
    check_keys(_Shaped(shapes), expected, source)
