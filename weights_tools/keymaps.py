"""Rename tables between checkpoint layouts, and nothing else.

minisd's internal names are diffusers' safetensors names. Every other layout is renamed here,
once, at load time.
"""

# Older diffusers VAE files name the attention projections of the mid-block attention as below.
LEGACY_VAE_ATTENTION = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}


def rename_legacy_vae_attention(flat):
    """Rename ``...attentions.0.query.weight`` -> ``...attentions.0.to_q.weight`` etc."""
    out = {}
    for name, value in flat.items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in LEGACY_VAE_ATTENTION and ".attentions." in name:
            name = ".".join(parts[:-2] + [LEGACY_VAE_ATTENTION[parts[-2]], parts[-1]])
        out[name] = value
    return out
