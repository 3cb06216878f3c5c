"""Flax ``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion) numerically matching diffusers' PyTorch model.

Loaded from a diffusers UNet folder with :func:`load_unet_spatiotemporal` through the strict, torch-free
:func:`perflow_jax.models.convert.load_params`. Parameter names normalise to the PyTorch keys
(``down_blocks_0/resnets_0/temporal_res_block/conv1/kernel``...), so no renaming is needed.

The model is SD's UNet with video layers: every resnet is a :class:`~perflow_jax.models.temporal_layers.
SpatioTemporalResBlock` and every transformer a :class:`TransformerSpatioTemporal` (a spatial transformer per
frame, then a temporal transformer per pixel across frames, blended by a learned α). The time embedding adds
an embedding of ``added_time_ids`` (SVD: ``[fps − 1, motion_bucket_id, noise_aug_strength]``). Frames are
flattened into the batch inside; the public tensors are diffusers' ``(B, F, C, H, W)``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.models.config_io import config_fields, config_from_json, per_block
from perflow_jax.models.convert import load_params
from perflow_jax.models.layers import (
    Attention,
    AttentionImpl,
    Downsample2D,
    GroupNorm,
    LayerNorm,
    Upsample2D,
    conv2d,
)
from perflow_jax.models.shape_cache import cached_param_shapes
from perflow_jax.models.temporal_layers import AlphaBlender, SpatioTemporalResBlock, frames_view
from perflow_jax.models.unet import BasicTransformerBlock, FeedForward, TimestepEmbedding, _AttnSpec, timestep_embedding

Dtype = Any

__all__ = [
    "SpatioTemporalUNetConfig",
    "TransformerSpatioTemporal",
    "UNetSpatioTemporalConditionModel",
    "load_unet_spatiotemporal",
    "unet_spatiotemporal_param_shapes",
]

_DOWN_TYPES = {"CrossAttnDownBlockSpatioTemporal": True, "DownBlockSpatioTemporal": False}  # → has attention
_UP_TYPES = {"CrossAttnUpBlockSpatioTemporal": True, "UpBlockSpatioTemporal": False}
GROUPS = 32  # every GroupNorm of the model (diffusers hard-codes it)


def _tupleize(v: Any) -> Any:
    return tuple(_tupleize(x) for x in v) if isinstance(v, list | tuple) else v


def _positive(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1


@dataclasses.dataclass(frozen=True)
class SpatioTemporalUNetConfig:
    """diffusers ``UNetSpatioTemporalConditionModel`` config (same names and defaults). Frozen and hashable,
    so it can be a static ``jax.jit`` argument. ``num_frames`` is the training length; any frame count runs."""

    sample_size: int | None = None
    in_channels: int = 8
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",)
    up_block_types: tuple[str, ...] = ("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 768
    layers_per_block: int | tuple[int, ...] = 2
    cross_attention_dim: int | tuple[int, ...] = 1024
    transformer_layers_per_block: int | tuple[int, ...] = 1
    num_attention_heads: int | tuple[int, ...] = (5, 10, 20, 20)
    num_frames: int = 25

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpatioTemporalUNetConfig:
        """From a diffusers config dict: ``_`` keys ignored, unknown keys warn."""
        return cls(**{k: _tupleize(v) for k, v in config_fields(cls, d, "SVD UNet").items()})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SpatioTemporalUNetConfig:
        """Read a diffusers ``config.json`` (or the folder holding it); errors name the file."""
        return config_from_json(cls.from_dict, path)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tupleize(getattr(self, f.name)))
        n = len(self.block_out_channels)
        if not n or not all(_positive(c) for c in self.block_out_channels):
            raise ValueError(f"SVD UNet config block_out_channels must be a list of positive integers, got "
                             f"{self.block_out_channels!r}.")
        for name in ("in_channels", "out_channels", "addition_time_embed_dim",
                     "projection_class_embeddings_input_dim", "num_frames"):
            if not _positive(getattr(self, name)):
                raise ValueError(f"SVD UNet config {name} must be a positive integer, got {getattr(self, name)!r}.")
        for name, ok in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
            types = getattr(self, name)
            if not isinstance(types, tuple) or len(types) != n or any(t not in ok for t in types):
                raise ValueError(f"SVD UNet config {name} must list one of {sorted(ok)} per block_out_channels "
                                 f"entry ({n}), got {types!r}.")
        for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "num_attention_heads"):
            values = self.per_block(key)
            if not all(_positive(v) for v in values):
                raise ValueError(f"SVD UNet config {key} must be positive integers, got {getattr(self, key)!r}.")
        if len(set(self.per_block("cross_attention_dim"))) != 1:
            raise ValueError(f"cross_attention_dim {self.cross_attention_dim} must be the same for all blocks.")
        for ch, heads in zip(self.block_out_channels, self.per_block("num_attention_heads"), strict=True):
            if ch % GROUPS or ch % heads:
                raise ValueError(f"SVD UNet block channels {ch} must be divisible by {GROUPS} groups and by "
                                 f"num_attention_heads {heads}.")

    def per_block(self, key: str) -> tuple:
        """A per-block value as a tuple over down blocks (ints are repeated)."""
        return per_block(getattr(self, key), len(self.block_out_channels), f"SVD UNet config {key}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def encoder_dim(self) -> int:
        return self.per_block("cross_attention_dim")[0]

    @property
    def num_added_time_ids(self) -> int:
        """How many ``added_time_ids`` the add-embedding expects (3 for SVD)."""
        return self.projection_class_embeddings_input_dim // self.addition_time_embed_dim


# ----------------------------------------------------------------------------------------------------------
# Transformers
# ----------------------------------------------------------------------------------------------------------


class _FrameEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding(c, 4c, out_dim=c)``: ``linear_1`` to 4c → SiLU → ``linear_2`` back to c."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        h = nn.silu(nn.Dense(4 * c, dtype=self.dtype, name="linear_1")(x.astype(self.dtype)))
        return nn.Dense(c, dtype=self.dtype, name="linear_2")(h)


class TemporalTransformerBlock(nn.Module):
    """diffusers ``TemporalBasicTransformerBlock`` on ``(B·F, L, C)``: attention across the F frames of each
    pixel: ``ff_in`` (residual), self-attention, cross-attention on the first frame's context, feed-forward,
    each pre-LayerNorm."""

    spec: _AttnSpec
    num_frames: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        s, f = self.spec, self.num_frames
        bf, seq, c = x.shape
        b = bf // f
        h = x.reshape(b, f, seq, c).transpose(0, 2, 1, 3).reshape(b * seq, f, c)

        def attn(name: str) -> Attention:
            return Attention(s.heads, c // s.heads, dtype=self.dtype, implementation=s.implementation,
                             chunk_size=s.chunk_size, name=name)

        h = h + FeedForward(self.dtype, name="ff_in")(LayerNorm(name="norm_in")(h))
        h = h + attn("attn1")(LayerNorm(name="norm1")(h))
        h = h + attn("attn2")(LayerNorm(name="norm2")(h), context)
        h = h + FeedForward(self.dtype, name="ff")(LayerNorm(name="norm3")(h))
        return h.reshape(b, seq, f, c).transpose(0, 2, 1, 3).reshape(bf, seq, c)


class TransformerSpatioTemporal(nn.Module):
    """diffusers ``TransformerSpatioTemporalModel`` on ``(B·F, H, W, C)`` with ``context`` ``(B·F, L, D)``.

    GroupNorm (eps 1e-6) → ``proj_in`` → per layer: spatial block per frame; temporal block per pixel on
    (spatial output + a frame-index embedding), with the first frame's context; blended by ``time_mixer`` →
    ``proj_out`` → residual.
    """

    spec: _AttnSpec
    depth: int
    num_frames: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        bf, hh, ww, c = x.shape
        f = self.num_frames
        b = bf // f
        first = frames_view(context, f)[:, 0]  # (B, L, D): the temporal blocks' context, same for every pixel
        time_context = jnp.broadcast_to(first[:, None], (b, hh * ww, *first.shape[1:]))
        time_context = time_context.reshape(b * hh * ww, *first.shape[1:])
        h = GroupNorm(GROUPS, 1e-6, name="norm")(x).reshape(bf, hh * ww, c)
        h = nn.Dense(c, dtype=self.dtype, name="proj_in")(h)
        frame_ids = jnp.tile(jnp.arange(f, dtype=jnp.float32), b)
        emb = _FrameEmbedding(self.dtype, name="time_pos_embed")(timestep_embedding(frame_ids, c, True, 0))
        emb = emb[:, None, :]
        mixer = AlphaBlender(name="time_mixer")  # one α shared by every layer, as in diffusers
        for i in range(self.depth):
            h = BasicTransformerBlock(self.spec, self.dtype, name=f"transformer_blocks_{i}")(h, context)
            mixed = TemporalTransformerBlock(self.spec, f, self.dtype, name=f"temporal_transformer_blocks_{i}")(
                h + emb.astype(h.dtype), time_context)
            h = mixer(h, mixed)
        h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h).reshape(bf, hh, ww, c)
        return h + x


# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------


class _DownBlock(nn.Module):
    """``(CrossAttn)DownBlockSpatioTemporal``: ``num_layers`` × (resnet [+ transformer]), then an optional
    stride-2 ``downsamplers_0``; returns the output and the skip connections."""

    out_channels: int
    num_layers: int
    attn: _AttnSpec | None
    depth: int
    add_downsample: bool
    eps: float
    num_frames: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for i in range(self.num_layers):
            x = SpatioTemporalResBlock(self.out_channels, self.num_frames, self.eps, dtype=self.dtype,
                                       name=f"resnets_{i}")(x, temb)
            if self.attn is not None:
                x = TransformerSpatioTemporal(self.attn, self.depth, self.num_frames, self.dtype,
                                              name=f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, 1, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class _UpBlock(nn.Module):
    """``(CrossAttn)UpBlockSpatioTemporal``: per layer, the next skip concatenated on channels, resnet
    [+ transformer]; then an optional ``upsamplers_0``."""

    out_channels: int
    num_layers: int
    attn: _AttnSpec | None
    depth: int
    add_upsample: bool
    num_frames: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skips: list[jax.Array], temb: jax.Array, context: jax.Array,
                 upsample_size: tuple[int, int] | None) -> jax.Array:
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = SpatioTemporalResBlock(self.out_channels, self.num_frames, 1e-6, dtype=self.dtype,
                                       name=f"resnets_{i}")(x, temb)
            if self.attn is not None:
                x = TransformerSpatioTemporal(self.attn, self.depth, self.num_frames, self.dtype,
                                              name=f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x, upsample_size)
        return x


class _MidBlock(nn.Module):
    """``UNetMidBlockSpatioTemporal``: resnet, transformer, resnet (eps 1e-5)."""

    attn: _AttnSpec
    depth: int
    num_frames: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = SpatioTemporalResBlock(c, self.num_frames, 1e-5, dtype=self.dtype, name="resnets_0")(x, temb)
        x = TransformerSpatioTemporal(self.attn, self.depth, self.num_frames, self.dtype,
                                      name="attentions_0")(x, context)
        return SpatioTemporalResBlock(c, self.num_frames, 1e-5, dtype=self.dtype, name="resnets_1")(x, temb)


# ----------------------------------------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------------------------------------


class UNetSpatioTemporalConditionModel(nn.Module):
    """diffusers ``UNetSpatioTemporalConditionModel`` in Flax.

    Attributes:
      config: the :class:`SpatioTemporalUNetConfig`.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); norms, sinusoids and the attention softmax stay float32.
      attention_implementation: ``jax.nn.dot_product_attention``'s: None (JAX chooses), ``'xla'`` or
        ``'cudnn'`` (GPU flash attention; fp16/bf16 only).
      attention_chunk_size: None, or process attention queries this many at a time (less memory, same result).
    """

    config: SpatioTemporalUNetConfig
    dtype: Dtype = jnp.float32
    attention_implementation: AttentionImpl = None
    attention_chunk_size: int | None = None

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
                 added_time_ids: jax.Array) -> jax.Array:
        """Predict the model output for a noisy video.

        Args:
          sample: ``(B, F, in_channels, H, W)`` (SVD: the noisy latents and the conditioning image's latents
            concatenated on channels).
          timesteps: scalar, ``(1,)`` or ``(B,)`` floats (SVD: ``0.25·ln σ``).
          encoder_hidden_states: ``(B, L, cross_attention_dim)`` (SVD: the CLIP image embedding, L = 1).
          added_time_ids: ``(B, K)`` (SVD: ``[fps − 1, motion_bucket_id, noise_aug_strength]``).

        Returns:
          ``(B, F, out_channels, H, W)`` in ``dtype``.
        """
        cfg = self.config
        chex.assert_rank(sample, 5, custom_message="SVD UNet `sample` must be (B, F, C, H, W)")
        b, f, c, hh, ww = sample.shape
        if c != cfg.in_channels:
            raise ValueError(f"SVD UNet `sample` has {c} channels; the config says in_channels={cfg.in_channels}.")
        chex.assert_shape(encoder_hidden_states, (b, None, cfg.encoder_dim),
                          custom_message="SVD UNet encoder_hidden_states must be (B, L, cross_attention_dim)")
        chex.assert_shape(added_time_ids, (b, cfg.num_added_time_ids),
                          custom_message="SVD UNet added_time_ids must be (B, projection dim / time embed dim)")
        t = jnp.asarray(timesteps)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, b)):
            raise ValueError(f"SVD UNet `timesteps` must be a scalar, (1,) or (B={b},); got shape {t.shape}.")
        t = jnp.broadcast_to(t.reshape(-1), (b,))
        emb = TimestepEmbedding(cfg.time_embed_dim, self.dtype, name="time_embedding")(
            timestep_embedding(t, cfg.block_out_channels[0], True, 0))
        ids = timestep_embedding(added_time_ids.reshape(-1), cfg.addition_time_embed_dim, True, 0).reshape(b, -1)
        emb = emb + TimestepEmbedding(cfg.time_embed_dim, self.dtype, name="add_embedding")(ids)
        emb = jnp.repeat(emb, f, axis=0)
        context = jnp.repeat(encoder_hidden_states.astype(self.dtype), f, axis=0)

        x = jnp.transpose(sample.reshape(b * f, c, hh, ww), (0, 2, 3, 1)).astype(self.dtype)
        x = conv2d(cfg.block_out_channels[0], 3, self.dtype, "conv_in")(x)
        n = len(cfg.block_out_channels)
        heads, layers = cfg.per_block("num_attention_heads"), cfg.per_block("layers_per_block")
        tlayers = cfg.per_block("transformer_layers_per_block")

        def spec(r: int) -> _AttnSpec:
            return _AttnSpec(heads[r], (), True, False, self.attention_implementation, self.attention_chunk_size)

        skips = [x]
        for i in range(n):
            attn = spec(i) if _DOWN_TYPES[cfg.down_block_types[i]] else None
            x, res = _DownBlock(cfg.block_out_channels[i], layers[i], attn, tlayers[i], i < n - 1,
                                1e-6 if attn else 1e-5, f, self.dtype, name=f"down_blocks_{i}")(x, emb, context)
            skips += res
        x = _MidBlock(spec(n - 1), tlayers[-1], f, self.dtype, name="mid_block")(x, emb, context)

        forward_size = hh % 2 ** (n - 1) or ww % 2 ** (n - 1)
        for i in range(n):
            r = n - 1 - i
            res, skips = skips[-(layers[r] + 1):], skips[:-(layers[r] + 1)]
            size = tuple(skips[-1].shape[1:3]) if forward_size and i < n - 1 else None
            attn = spec(r) if _UP_TYPES[cfg.up_block_types[i]] else None
            x = _UpBlock(cfg.block_out_channels[r], layers[r] + 1, attn, tlayers[r], i < n - 1, f, self.dtype,
                         name=f"up_blocks_{i}")(x, res, emb, context, size)

        x = nn.silu(GroupNorm(GROUPS, 1e-5, name="conv_norm_out")(x))
        x = conv2d(cfg.out_channels, 3, self.dtype, "conv_out")(x)
        return jnp.transpose(x, (0, 3, 1, 2)).reshape(b, f, cfg.out_channels, hh, ww)


# ----------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------


def _dummy_inputs(config: SpatioTemporalUNetConfig) -> dict[str, Any]:
    s = 2 ** (len(config.block_out_channels) - 1)
    return dict(sample=jnp.zeros((1, 1, config.in_channels, s, s), jnp.float32),
                timesteps=jnp.zeros((1,), jnp.float32),
                encoder_hidden_states=jnp.zeros((1, 1, config.encoder_dim), jnp.float32),
                added_time_ids=jnp.zeros((1, config.num_added_time_ids), jnp.float32))


def unet_spatiotemporal_param_shapes(config: SpatioTemporalUNetConfig) -> dict:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves (float32), traced once per config."""

    def trace() -> dict:
        model = UNetSpatioTemporalConditionModel(config)
        return jax.eval_shape(lambda: model.init(jax.random.key(0), **_dummy_inputs(config)))["params"]

    return cached_param_shapes("unet_spatiotemporal", config, trace)


def load_unet_spatiotemporal(folder: str | os.PathLike, dtype: Dtype | None = None, variant: str | None = None,
                             allow_pickle: bool = False) -> tuple[SpatioTemporalUNetConfig, dict]:
    """Load a diffusers SVD UNet folder (``config.json`` + ``diffusion_pytorch_model[.variant].safetensors``, or
    a converted ``flax_model.msgpack``), strictly: every key used, every param filled with the right shape.

    Returns ``(config, params)``; raises ``ValueError`` for an unsupported config and
    :class:`~perflow_jax.models.mismatch.ConversionError` when the weights do not match it.
    """
    folder = os.fspath(folder)
    config = SpatioTemporalUNetConfig.from_json(folder)
    params = load_params(folder, "diffusion_pytorch_model", unet_spatiotemporal_param_shapes(config),
                         variant=variant, allow_pickle=allow_pickle, dtype=dtype, what="SVD UNet")
    return config, params
