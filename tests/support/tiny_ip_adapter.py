"""Tiny random IP-Adapter files in the released layout (``image_proj.*``, ``ip_adapter.N.to_k_ip.weight``)."""

from __future__ import annotations

import numpy as np
from safetensors.numpy import save_file

ENCODER = dict(hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=3, num_attention_heads=4,
               image_size=32, patch_size=8, hidden_act="gelu")  # a tiny ViT: 16 patches + class token
# The Plus resampler: depth 4 as released (diffusers assumes it), heads of 64 (inner width 128).
PLUS_TOKENS, PLUS_HIDDEN, PLUS_DEPTH, PLUS_HEADS = 6, 32, 4, 2


def save_tiny_encoder(folder: str, seed: int = 0, **kw):
    """A random transformers ``CLIPVisionModelWithProjection`` (weights perturbed off their init) saved to
    `folder` and returned; `kw` overrides :data:`ENCODER`."""
    import torch
    import transformers

    from tests.support.tiny_sd import _perturb  # the same off-init perturbation as the tiny SD models

    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(**{**ENCODER, **kw})
    model = _perturb(transformers.CLIPVisionModelWithProjection(config), seed)
    model.save_pretrained(folder)
    return model


def ip_adapter_state_dict(unet, image_embed_dim: int, plus: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """A random adapter for the diffusers `unet`: ``ip_adapter.{2k+1}`` for its k-th cross-attention in
    ``unet.attn_processors`` order (what the released files and diffusers use), sized from that layer."""
    rng = np.random.default_rng(seed)

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    cross = unet.config.cross_attention_dim
    sd: dict[str, np.ndarray] = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        module = unet.get_submodule(name[: -len(".processor")])
        hidden = module.to_q.out_features
        sd[f"ip_adapter.{key_id}.to_k_ip.weight"] = rand(hidden, cross)
        sd[f"ip_adapter.{key_id}.to_v_ip.weight"] = rand(hidden, cross)
        key_id += 2
    if not plus:
        sd["image_proj.proj.weight"] = rand(4 * cross, image_embed_dim)
        sd["image_proj.proj.bias"] = rand(4 * cross)
        sd["image_proj.norm.weight"] = 1 + rand(cross)
        sd["image_proj.norm.bias"] = rand(cross)
        return sd
    h, inner = PLUS_HIDDEN, 64 * PLUS_HEADS
    sd["image_proj.latents"] = rand(1, PLUS_TOKENS, h, scale=h ** -0.5)
    sd["image_proj.proj_in.weight"], sd["image_proj.proj_in.bias"] = rand(h, image_embed_dim), rand(h)
    sd["image_proj.proj_out.weight"], sd["image_proj.proj_out.bias"] = rand(cross, h), rand(cross)
    sd["image_proj.norm_out.weight"], sd["image_proj.norm_out.bias"] = 1 + rand(cross), rand(cross)
    for i in range(PLUS_DEPTH):
        p = f"image_proj.layers.{i}"
        for norm in ("norm1", "norm2"):
            sd[f"{p}.0.{norm}.weight"], sd[f"{p}.0.{norm}.bias"] = 1 + rand(h), rand(h)
        sd[f"{p}.0.to_q.weight"] = rand(inner, h)
        sd[f"{p}.0.to_kv.weight"] = rand(2 * inner, h)
        sd[f"{p}.0.to_out.weight"] = rand(h, inner)
        sd[f"{p}.1.0.weight"], sd[f"{p}.1.0.bias"] = 1 + rand(h), rand(h)
        sd[f"{p}.1.1.weight"] = rand(4 * h, h)
        sd[f"{p}.1.3.weight"] = rand(h, 4 * h)
    return sd


def write_ip_adapter(path: str, unet, image_embed_dim: int, plus: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Save :func:`ip_adapter_state_dict` as a ``.safetensors`` file at `path` and return it."""
    sd = ip_adapter_state_dict(unet, image_embed_dim, plus, seed)
    save_file(sd, path)
    return sd
