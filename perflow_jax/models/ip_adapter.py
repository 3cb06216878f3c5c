"""IP-Adapter (image prompts) for Flax SD UNets: image projections and the released weight layout.

An IP-Adapter turns a CLIP image encoding (:mod:`perflow_jax.models.clip_vision`) into a few "image tokens" in
the UNet's cross-attention space and adds, in every transformer block's ``attn2``, a decoupled attention on
them (``to_k_ip``/``to_v_ip``, :class:`~perflow_jax.models.layers.Attention`) weighted by a traced scale.

- IP-Adapter (``ip-adapter_sd15``, ``ip-adapter_sdxl[_vit-h]``): :class:`ImageProjection`, a linear layer and a
  LayerNorm from the projected ``image_embeds`` to 4 tokens; the unconditional branch projects zeros.
- IP-Adapter Plus (``ip-adapter-plus*``): :class:`PerceiverResampler` over the encoder's penultimate hidden
  states; the unconditional branch resamples the encoding of an all-zero pixel image.

:func:`load_ip_adapter` reads a released ``ip-adapter*.safetensors`` file (keys ``image_proj.*`` and
``ip_adapter.N.to_k_ip.weight``) the way diffusers' ``load_ip_adapter`` maps it: ``N`` counts the UNet's
attention layers (self and cross) in diffusers' processor order (down blocks, up blocks, then the mid block),
so the cross-attention layers are ``1, 3, 5, ...``. :func:`merge_ip_adapter` puts the ``*_ip`` layers into a
UNet params tree (any ΔW or LoRA merge composes with it: they touch other layers).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from perflow_jax.models.convert import torch_to_flax
from perflow_jax.models.layers import IP_ATTENTION_NAMES, LayerNorm, attention
from perflow_jax.models.unet import UNetConfig, unet_param_shapes
from perflow_jax.models.weights_io import load_state_dict

__all__ = [
    "IPAdapter",
    "IPAdapterConfig",
    "ImageProjection",
    "PerceiverResampler",
    "image_projection",
    "ip_attention_paths",
    "load_ip_adapter",
    "merge_ip_adapter",
]

KINDS = ("ip-adapter", "plus")
IP_ADAPTER_TOKENS = 4  # the basic IP-Adapter's token count (fixed in the released models and in diffusers)
RESAMPLER_HEAD_DIM = 64  # the Plus resampler's head size (diffusers derives the head count from it)
_LAYER = re.compile(r"^layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class IPAdapterConfig:
    """The image projection's sizes, read from the weight shapes as diffusers does.

    Attributes:
      kind: ``"ip-adapter"`` (linear + LayerNorm on ``image_embeds``) or ``"plus"`` (Perceiver resampler on the
        penultimate hidden states).
      image_embed_dim: the encoder feature it reads: ``projection_dim`` (ip-adapter) or ``hidden_size`` (plus).
      cross_attention_dim: the token width (the UNet's cross-attention dim).
      num_tokens: image tokens per image.
      hidden_dim, depth, heads: the resampler's width, blocks and heads of 64 (plus only).
      ffn_ratio: the resampler's feed-forward expansion.
    """

    kind: str
    image_embed_dim: int
    cross_attention_dim: int
    num_tokens: int
    hidden_dim: int = 0
    depth: int = 0
    heads: int = 0
    ffn_ratio: int = 4

    @property
    def uses_hidden_states(self) -> bool:
        """Plus reads ``hidden_states[-2]`` of the encoder; the basic adapter reads ``image_embeds``."""
        return self.kind == "plus"


class ImageProjection(nn.Module):
    """``image_embeds (B, E)`` → ``(B, num_tokens, cross_attention_dim)``: Dense ``proj`` then LayerNorm ``norm``."""

    config: IPAdapterConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image_embeds: jax.Array) -> jax.Array:
        cfg = self.config
        chex.assert_shape(image_embeds, (None, cfg.image_embed_dim),
                          custom_message="IP-Adapter image_embeds must be (B, projection_dim of the image encoder)")
        h = nn.Dense(cfg.num_tokens * cfg.cross_attention_dim, dtype=self.dtype, name="proj")(image_embeds)
        return LayerNorm(name="norm")(h.reshape(h.shape[0], cfg.num_tokens, cfg.cross_attention_dim))


class _PerceiverAttention(nn.Module):
    """Latents attend to [image features; latents] (IP-Adapter's ``PerceiverAttention``, fused ``to_kv``)."""

    heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        x, latents = LayerNorm(name="norm1")(x), LayerNorm(name="norm2")(latents)
        b, lq, dim = latents.shape
        inner = self.heads * RESAMPLER_HEAD_DIM

        def heads(t: jax.Array) -> jax.Array:
            return t.reshape(b, t.shape[1], self.heads, RESAMPLER_HEAD_DIM)

        q = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(latents)
        k, v = jnp.split(nn.Dense(2 * inner, use_bias=False, dtype=self.dtype, name="to_kv")(
            jnp.concatenate([x, latents], axis=1)), 2, axis=-1)
        out = attention(heads(q), heads(k), heads(v)).reshape(b, lq, inner)
        return nn.Dense(dim, use_bias=False, dtype=self.dtype, name="to_out")(out)


class _FeedForward(nn.Module):
    """LayerNorm ``0``, Dense ``1`` (no bias), exact GELU, Dense ``3`` (no bias): the released numbering."""

    ratio: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = nn.Dense(dim * self.ratio, use_bias=False, dtype=self.dtype, name="1")(LayerNorm(name="0")(x))
        return nn.Dense(dim, use_bias=False, dtype=self.dtype, name="3")(nn.gelu(h, approximate=False))


class _ResamplerBlock(nn.Module):
    heads: int
    ratio: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        latents = latents + _PerceiverAttention(self.heads, self.dtype, name="0")(x, latents)
        return latents + _FeedForward(self.ratio, self.dtype, name="1")(latents)


class PerceiverResampler(nn.Module):
    """IP-Adapter Plus: learned ``latents`` queries attend to ``proj_in(hidden_states)`` in ``depth`` blocks,
    then ``proj_out`` and ``norm_out``: ``(B, L, E)`` → ``(B, num_tokens, cross_attention_dim)``."""

    config: IPAdapterConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        cfg = self.config
        chex.assert_shape(hidden_states, (None, None, cfg.image_embed_dim),
                          custom_message="IP-Adapter Plus input must be (B, L, hidden_size of the image encoder)")
        b = hidden_states.shape[0]
        latents = self.param("latents", nn.initializers.normal(cfg.hidden_dim ** -0.5),
                             (1, cfg.num_tokens, cfg.hidden_dim), jnp.float32)
        latents = jnp.broadcast_to(latents.astype(self.dtype), (b, cfg.num_tokens, cfg.hidden_dim))
        x = nn.Dense(cfg.hidden_dim, dtype=self.dtype, name="proj_in")(hidden_states)
        for i in range(cfg.depth):
            latents = _ResamplerBlock(cfg.heads, cfg.ffn_ratio, self.dtype, name=f"layers_{i}")(x, latents)
        out = nn.Dense(cfg.cross_attention_dim, dtype=self.dtype, name="proj_out")(latents)
        return LayerNorm(name="norm_out")(out)


def image_projection(config: IPAdapterConfig, dtype: Any = jnp.float32) -> nn.Module:
    """The projection module of `config`: :class:`ImageProjection` or :class:`PerceiverResampler`."""
    return PerceiverResampler(config, dtype) if config.uses_hidden_states else ImageProjection(config, dtype)


# ----------------------------------------------------------------------------------------------------------
# Loading the released layout
# ----------------------------------------------------------------------------------------------------------


class IPAdapter(NamedTuple):
    """A loaded IP-Adapter.

    Attributes:
      config: the projection's sizes and kind.
      projection_params: params of :func:`image_projection` (``config``).
      unet_params: the ``to_k_ip``/``to_v_ip`` layers as a partial UNet params tree (see :func:`merge_ip_adapter`).
      path: the file it came from.
    """

    config: IPAdapterConfig
    projection_params: dict
    unet_params: dict
    path: str


def _projection_config(sd: Mapping[str, np.ndarray], path: str) -> IPAdapterConfig:
    """Sizes from the ``image_proj.*`` shapes (diffusers' rules); other variants are refused by name."""
    if "proj.weight" in sd:
        out, embed = sd["proj.weight"].shape
        return IPAdapterConfig("ip-adapter", int(embed), int(out) // IP_ADAPTER_TOKENS, IP_ADAPTER_TOKENS)
    if "latents" in sd and "proj_in.weight" in sd and "layers.0.0.to_q.weight" in sd and "proj_out.weight" in sd:
        _, queries, hidden = sd["latents"].shape
        depth = 1 + max(int(m.group(1)) for k in sd if (m := _LAYER.match(k)))
        heads = sd["layers.0.0.to_q.weight"].shape[0] // RESAMPLER_HEAD_DIM
        ratio = sd["layers.0.1.1.weight"].shape[0] // hidden if "layers.0.1.1.weight" in sd else 4
        return IPAdapterConfig("plus", int(sd["proj_in.weight"].shape[1]), int(sd["proj_out.weight"].shape[0]),
                               int(queries), int(hidden), depth, int(heads), int(ratio))
    variant = ("IP-Adapter Full Face" if "proj.3.weight" in sd else "IP-Adapter FaceID Plus"
               if "perceiver_resampler.proj_in.weight" in sd else "IP-Adapter FaceID" if "norm.weight" in sd
               else "unknown")
    raise ValueError(f"{path}: unsupported image projection ({variant}); supported: IP-Adapter (image_proj.proj.*) "
                     "and IP-Adapter Plus (image_proj.latents, a Perceiver resampler).")


def _attn2_order(path: tuple[str, ...]) -> tuple:
    """diffusers' ``attn_processors`` order: down blocks, up blocks, mid block; then numerically within."""
    kind = {"down": 0, "up": 1, "mid": 2}[path[0].split("_")[0]]
    return (kind, *(int(n) for p in path for n in re.findall(r"_(\d+)$", p)))


def _ip_layer_shapes(config: UNetConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat ``path → shape`` of the UNet's ``*_ip`` kernels."""
    return {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(unet_param_shapes(config, True)).items()
            if any(n in p for n in IP_ATTENTION_NAMES)}


def ip_attention_paths(config: UNetConfig) -> list[tuple[str, ...]]:
    """The Flax paths of every transformer block's ``attn2`` in diffusers' order: the released file's
    ``ip_adapter.{2k+1}.*`` belongs to entry ``k``."""
    return sorted({p[:-2] for p in _ip_layer_shapes(config)}, key=_attn2_order)


def load_ip_adapter(path: str | os.PathLike, unet_config: UNetConfig, dtype: Any = None) -> IPAdapter:
    """Read a released ``ip-adapter*.safetensors`` for a UNet of `unet_config` (SD1.x/2.x or SDXL).

    Errors are one line naming the file: an unreadable file, another layout, or an adapter whose sizes do not fit
    the UNet (cross-attention dim, number of attention layers, block widths).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IP-Adapter file {path!r} does not exist.")
    try:
        sd = load_state_dict(path)
    except ValueError as e:
        raise ValueError(f"IP-Adapter {path!r}: {str(e).splitlines()[0]}") from None
    proj_sd = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    ip_sd = {k[len("ip_adapter."):]: v for k, v in sd.items() if k.startswith("ip_adapter.")}
    other = sorted(k for k in sd if not k.startswith(("image_proj.", "ip_adapter.")))
    if not proj_sd or not ip_sd or other:
        raise ValueError(f"{path}: not an IP-Adapter file (expected only image_proj.* and ip_adapter.* keys"
                         f"{', found ' + repr(other[:3]) if other else ''}).")
    config = _projection_config(proj_sd, path)
    if config.cross_attention_dim != unet_config.encoder_dim:
        raise ValueError(f"{path}: the adapter's image tokens are {config.cross_attention_dim} wide but the UNet's "
                         f"cross_attention_dim is {unet_config.encoder_dim}; use the adapter made for this model "
                         "family (e.g. ip-adapter_sd15 for SD1.5, ip-adapter_sdxl for SDXL).")
    unet_ip = _unet_ip_params(ip_sd, unet_config, path, dtype)
    module = image_projection(config)
    probe = jnp.zeros((1, 1, config.image_embed_dim) if config.uses_hidden_states else (1, config.image_embed_dim))
    target = jax.eval_shape(module.init, jax.random.key(0), probe)["params"]
    try:  # keys keep their image_proj. prefix: errors name them as in the file
        proj = torch_to_flax({f"image_proj.{k}": v for k, v in proj_sd.items()}, {"image_proj": target},
                             dtype=dtype, what=f"IP-Adapter image projection of {path}")["image_proj"]
    except ValueError as e:
        raise ValueError(" ".join(str(e).split())) from None
    return IPAdapter(config, jax.tree_util.tree_map(jnp.asarray, proj), unet_ip, path)


def _unet_ip_params(ip_sd: Mapping[str, np.ndarray], unet_config: UNetConfig, path: str, dtype: Any) -> dict:
    """``ip_adapter.{2k+1}.to_{k,v}_ip.weight`` → ``<attn2 path k>/to_{k,v}_ip/kernel`` (transposed), checked."""
    shapes = _ip_layer_shapes(unet_config)
    attn2 = sorted({p[:-2] for p in shapes}, key=_attn2_order)
    numbers = sorted({int(k.split(".")[0]) for k in ip_sd})
    want = [2 * k + 1 for k in range(len(attn2))]
    if numbers != want:
        missing, extra = sorted(set(want) - set(numbers))[:3], sorted(set(numbers) - set(want))[:3]
        detail = "; ".join(f"{what} ip_adapter.{{{', '.join(map(str, ns))}{', ...' if len(ns) == 3 else ''}}}"
                           for what, ns in (("missing", missing), ("unexpected", extra)) if ns)
        raise ValueError(f"{path}: the adapter has {len(numbers)} cross-attention layers but the UNet has "
                         f"{len(attn2)} ({detail}); use the adapter made for this model.")
    flat = {}
    for k, attn in enumerate(attn2):
        for name in IP_ATTENTION_NAMES:
            key = f"ip_adapter.{2 * k + 1}.{name}.weight"
            value = ip_sd.get(key[len("ip_adapter."):])
            expected = shapes[(*attn, name, "kernel")]
            if value is None:
                raise ValueError(f"{path}: {key} is missing.")
            if value.ndim != 2 or value.shape[::-1] != expected:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)} but the UNet's {'/'.join(attn)} needs "
                                 f"{expected[::-1]} (out, in); the adapter does not fit this UNet.")
            flat[(*attn, name, "kernel")] = jnp.asarray(value.T if dtype is None else value.T.astype(dtype))
    extra = sorted(set(ip_sd) - {k[len("ip_adapter."):] for k in (f"ip_adapter.{n}.{m}.weight" for n in want
                                                                  for m in IP_ATTENTION_NAMES)})
    if extra:
        raise ValueError(f"{path}: unexpected IP-Adapter keys {['ip_adapter.' + k for k in extra[:3]]} (IP-Adapter "
                         "LoRA or multi-adapter files are not supported).")
    return traverse_util.unflatten_dict(flat)


def merge_ip_adapter(unet_params: Mapping, adapter: IPAdapter | Mapping) -> dict:
    """A new UNet params tree with the adapter's ``to_k_ip``/``to_v_ip`` layers added (no input is modified).

    Replaces the layers of an adapter merged before; every ``attn2`` path must exist in `unet_params`.
    """
    ip = adapter.unet_params if isinstance(adapter, IPAdapter) else adapter
    flat = dict(traverse_util.flatten_dict(dict(unet_params)))
    flat = {p: v for p, v in flat.items() if not any(n in p for n in IP_ATTENTION_NAMES)}
    for p, v in traverse_util.flatten_dict(dict(ip)).items():
        attn = p[:-2]
        if (*attn, "to_k", "kernel") not in flat:
            raise ValueError(f"The UNet params have no attention layer {'/'.join(attn)} for the IP-Adapter.")
        flat[p] = v
    return traverse_util.unflatten_dict(flat)
