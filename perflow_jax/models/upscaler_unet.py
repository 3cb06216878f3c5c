"""Flax UNet of the SD ×2 latent upscaler: diffusers' ``UNet2DConditionModel`` with K-upscaler blocks.

The upscaler (``stabilityai/sd-x2-latent-upscaler``, Katherine Crowson's k-diffusion model) is a different UNet
from SD's: ``KDownBlock2D`` / ``KCrossAttnDownBlock2D`` / ``KCrossAttnUpBlock2D`` / ``KUpBlock2D`` blocks, no mid
block and no output GroupNorm, a Gaussian Fourier time embedding of ``c_noise = log(σ)/4``, a conditioning
vector (noise-level features + CLIP pooled text) projected into the time embedding (``time_cond_proj_dim``),
resnets whose GroupNorms are modulated by that embedding (``AdaGroupNorm``: ``norm(x)·(1 + scale) + shift``),
fixed-filter 4×4 (1, 3, 3, 1)/8 down/upsampling with reflect padding, and attention blocks without
feed-forward (self-attention only in the innermost blocks, LayerNorm on the text before cross-attention).

Loaded from a diffusers UNet folder with :func:`load_upscaler_unet` through the same strict, torch-free
:func:`perflow_jax.models.convert.load_params` as every model here. Parameter names normalise to the PyTorch
keys (``down_blocks_1/attentions_0/attn2/norm_cross``...), so no renaming is needed. Matches PyTorch to ~1e-6
in float32: exact (erf) GELU, float32 GroupNorm/LayerNorm, Fourier features computed in PyTorch's order.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from perflow_jax import values
from perflow_jax.models.config_io import config_fields, config_from_json, per_block
from perflow_jax.models.convert import load_params
from perflow_jax.models.layers import Attention, AttentionImpl, Conv2D, GroupNorm, conv2d, group_norm

Dtype = Any

__all__ = ["UpscalerUNet", "UpscalerUNetConfig", "is_upscaler_config", "load_upscaler_unet", "upscaler_param_shapes"]

RESNET_GROUP_SIZE = 32  # K blocks: GroupNorm groups = channels // 32 (diffusers' fixed resnet_group_size)
_DOWN_TYPES = {"KDownBlock2D": False, "KCrossAttnDownBlock2D": True}  # type → has attention
_UP_TYPES = {"KUpBlock2D": False, "KCrossAttnUpBlock2D": True}
_ACTIVATIONS = {"gelu": lambda x: nn.gelu(x, approximate=False), "silu": nn.silu, "swish": nn.silu}

# diffusers config keys with the one value this layout uses (key → accepted values).
_FIXED: dict[str, tuple] = {
    "mid_block_type": (None,),
    "time_embedding_type": ("fourier",),
    "center_input_sample": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_act_fn": (None,),
    "class_embeddings_concat": (False,),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),
    "attention_type": ("default",),
    "dropout": (0.0,),
}
# diffusers config keys the K blocks never read.
_IRRELEVANT = {"freq_shift", "downsample_padding", "mid_block_scale_factor", "transformer_layers_per_block",
               "reverse_transformer_layers_per_block", "num_attention_heads", "use_linear_projection",
               "upcast_attention", "resnet_time_scale_shift", "resnet_skip_time_act", "resnet_out_scale_factor",
               "addition_time_embed_dim", "projection_class_embeddings_input_dim", "mid_block_only_cross_attention",
               "cross_attention_norm", "addition_embed_type_num_heads"}


def is_upscaler_config(d: Mapping[str, Any]) -> bool:
    """Whether a diffusers UNet config dict describes a K-upscaler UNet (K blocks), not an SD UNet."""
    types = d.get("down_block_types")
    return isinstance(types, list | tuple) and any(t in _DOWN_TYPES for t in types)


def _tupleize(v: Any) -> Any:
    return tuple(_tupleize(x) for x in v) if isinstance(v, list | tuple) else v


def _positive_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1


@dataclasses.dataclass(frozen=True)
class UpscalerUNetConfig:
    """The K-upscaler subset of diffusers' ``UNet2DConditionModel`` config (same names and defaults where they
    apply). Frozen and hashable (a static ``jax.jit`` argument).

    Unlike SD configs, ``attention_head_dim`` here is the size of each head (K blocks use
    ``channels // attention_head_dim`` heads), as in diffusers. The defaults are the layout of diffusers' own
    latent-upscaler test model (a valid K layout: diffusers gives the first up block self-attention and no skip
    only when its channels equal the time embedding size); a real model's values come from its ``config.json``.
    """

    sample_size: int | tuple[int, ...] | None = None
    in_channels: int = 8
    out_channels: int = 5
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("KDownBlock2D",) + ("KCrossAttnDownBlock2D",) * 3
    up_block_types: tuple[str, ...] = ("KCrossAttnUpBlock2D",) * 3 + ("KUpBlock2D",)
    block_out_channels: tuple[int, ...] = (32, 32, 64, 64)
    layers_per_block: int | tuple[int, ...] = 2
    act_fn: str = "gelu"
    norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    cross_attention_dim: int = 32
    attention_head_dim: int | tuple[int, ...] = 8
    time_embedding_dim: int | None = None
    timestep_post_act: str | None = "gelu"
    time_cond_proj_dim: int = 160
    conv_in_kernel: int = 1
    conv_out_kernel: int = 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UpscalerUNetConfig:
        """From a diffusers config dict: ``_`` keys ignored, unknown keys warn, unsupported values raise."""
        if "down_block_types" in d and not is_upscaler_config(d):
            raise ValueError(f"not a latent-upscaler UNet: down_block_types {d['down_block_types']!r} has no K block "
                             f"({', '.join(_DOWN_TYPES)}); pass the SD ×2 latent upscaler "
                             "(stabilityai/sd-x2-latent-upscaler), not an SD model.")
        for key, allowed in _FIXED.items():
            if key in d and d[key] not in allowed:
                raise ValueError(f"Unsupported latent-upscaler UNet config {key}={d[key]!r}; only {allowed} is "
                                 "supported.")
        known = config_fields(cls, d, "latent-upscaler UNet", known={*_FIXED, *_IRRELEVANT})
        return cls(**{k: _tupleize(v) for k, v in known.items()})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> UpscalerUNetConfig:
        """Read a diffusers ``config.json`` (or the folder holding it); errors name the file."""
        return config_from_json(cls.from_dict, path)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tupleize(getattr(self, f.name)))
        n = len(self.block_out_channels) if isinstance(self.block_out_channels, tuple) else 0
        if n < 2 or not all(_positive_int(c) and c % RESNET_GROUP_SIZE == 0 for c in self.block_out_channels):
            raise ValueError(f"latent-upscaler UNet config block_out_channels must list ≥ 2 positive multiples of "
                             f"{RESNET_GROUP_SIZE} (the K blocks' GroupNorm group size), got "
                             f"{self.block_out_channels!r}.")
        for name in ("in_channels", "out_channels", "cross_attention_dim", "time_cond_proj_dim", "conv_in_kernel",
                     "conv_out_kernel"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"latent-upscaler UNet config {name} must be a positive integer, got "
                                 f"{getattr(self, name)!r}.")
        for name in ("time_embedding_dim", "norm_num_groups"):
            v = getattr(self, name)
            if v is not None and not _positive_int(v):
                raise ValueError(f"latent-upscaler UNet config {name} must be a positive integer or null, got {v!r}.")
        if self.time_embed_dim % 2:
            raise ValueError(f"latent-upscaler UNet time embedding size {self.time_embed_dim} must be even.")
        if self.out_channels < 2:
            raise ValueError("latent-upscaler UNet config out_channels must be ≥ 2 (latents + the unused variance "
                             f"channel), got {self.out_channels}.")
        for name in ("act_fn", "timestep_post_act"):
            v = getattr(self, name)
            if v not in _ACTIVATIONS and not (name == "timestep_post_act" and v is None):
                raise ValueError(f"Unsupported latent-upscaler UNet config {name}={v!r}; supported: "
                                 f"{sorted(_ACTIVATIONS)}{' or null' if name == 'timestep_post_act' else ''}.")
        if not isinstance(self.flip_sin_to_cos, bool):
            raise ValueError(f"latent-upscaler UNet config flip_sin_to_cos must be true or false, got "
                             f"{self.flip_sin_to_cos!r}.")
        if not values.check_float("latent-upscaler UNet config norm_eps", self.norm_eps) > 0:
            raise ValueError(f"latent-upscaler UNet config norm_eps must be positive, got {self.norm_eps!r}.")
        for key, types, ok in (("down_block_types", self.down_block_types, _DOWN_TYPES),
                               ("up_block_types", self.up_block_types, _UP_TYPES)):
            if not isinstance(types, tuple) or len(types) != n or any(t not in ok for t in types):
                raise ValueError(f"latent-upscaler UNet config {key} must list one of {sorted(ok)} per "
                                 f"block_out_channels entry ({n}), got {types!r}.")
        for key in ("layers_per_block", "attention_head_dim"):
            if not all(_positive_int(v) for v in self.per_block(key)):
                raise ValueError(f"latent-upscaler UNet config {key} must be a positive integer or one per block, "
                                 f"got {getattr(self, key)!r}.")

    def per_block(self, key: str) -> tuple:
        """A per-block value as a tuple over down blocks (a single value is repeated)."""
        return per_block(getattr(self, key), len(self.block_out_channels), f"latent-upscaler UNet config {key}")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 2 * self.block_out_channels[0]

    @property
    def size_multiple(self) -> int:
        """Latent height and width must be multiples of this (the K blocks take no upsampling size)."""
        return 2 ** (len(self.block_out_channels) - 1)


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------


class AdaGroupNorm(nn.Module):
    """diffusers ``AdaGroupNorm``: affine-free GroupNorm (float32) modulated by the embedding,
    ``norm(x)·(1 + scale) + shift`` with ``(scale, shift)`` from a Dense named ``linear``."""

    num_groups: int
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        scale, shift = jnp.split(nn.Dense(2 * x.shape[-1], dtype=self.dtype, name="linear")(emb), 2, axis=-1)
        h = group_norm(x, self.num_groups, self.eps)
        return h * (1 + scale[:, None, None, :]) + shift[:, None, None, :]


class ResnetBlockCondNorm(nn.Module):
    """diffusers ``ResnetBlockCondNorm2D`` (``time_embedding_norm="ada_group"``, as the K blocks build it):
    ``shortcut(x) + conv2(act(norm2(conv1(act(norm1(x, emb))), emb)))``; the 1×1 ``conv_shortcut`` (no bias)
    exists when the channel count changes."""

    out_channels: int  # conv1's (and norm2's) channels
    conv2_channels: int  # the block's output channels
    groups: int
    groups_out: int
    eps: float
    act_fn: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.act_fn]
        h = act(AdaGroupNorm(self.groups, self.eps, self.dtype, name="norm1")(x, emb))
        h = conv2d(self.out_channels, 3, self.dtype, "conv1")(h)
        h = act(AdaGroupNorm(self.groups_out, self.eps, self.dtype, name="norm2")(h, emb))
        h = conv2d(self.conv2_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.conv2_channels:
            x = Conv2D(self.conv2_channels, (1, 1), dtype=self.dtype, use_bias=False, name="conv_shortcut")(x)
        return x.astype(h.dtype) + h


class KAttentionBlock(nn.Module):
    """diffusers ``KAttentionBlock``: [x + self-attention(AdaGroupNorm(x))] then x + cross-attention on the
    LayerNormed text; biases on q/k/v, no feed-forward."""

    heads: int
    head_dim: int
    self_attention: bool
    group_size: int = RESNET_GROUP_SIZE
    dtype: Dtype = jnp.float32
    implementation: AttentionImpl = None
    chunk_size: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, emb: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        groups = max(1, c // self.group_size)
        attn = dict(heads=self.heads, head_dim=self.head_dim, qkv_bias=True, dtype=self.dtype,
                    implementation=self.implementation, chunk_size=self.chunk_size)
        if self.self_attention:
            n = AdaGroupNorm(groups, dtype=self.dtype, name="norm1")(x, emb).reshape(b, h * w, c)
            x = x + Attention(**attn, name="attn1")(n).reshape(b, h, w, c)
        n = AdaGroupNorm(groups, dtype=self.dtype, name="norm2")(x, emb).reshape(b, h * w, c)
        return x + Attention(**attn, norm_context=True, name="attn2")(n, context).reshape(b, h, w, c)


_FIR_1D = np.array([1.0, 3.0, 3.0, 1.0], np.float32) / 8  # diffusers KDownsample2D / KUpsample2D (×2) kernel


def _depthwise_fir(x: jax.Array, up: bool) -> jax.Array:
    """The fixed (1, 3, 3, 1)/8 ⊗ (1, 3, 3, 1)/8 filter per channel on a reflect-padded map: stride-2
    downsampling (``KDownsample2D``), or the transposed convolution with twice the kernel (``KUpsample2D``),
    written as the equivalent input-dilated convolution. NHWC."""
    c = x.shape[-1]
    k1 = _FIR_1D * (2 if up else 1)
    kernel = jnp.asarray(np.tile(np.outer(k1, k1)[:, :, None, None], (1, 1, 1, c)), x.dtype)  # HWIO, groups = C
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    dims = ("NHWC", "HWIO", "NHWC")
    if up:  # conv_transpose2d(stride 2, padding 3) of a symmetric 4×4 kernel
        return lax.conv_general_dilated(x, kernel, (1, 1), ((0, 0), (0, 0)), lhs_dilation=(2, 2),
                                        dimension_numbers=dims, feature_group_count=c)
    return lax.conv_general_dilated(x, kernel, (2, 2), ((0, 0), (0, 0)), dimension_numbers=dims,
                                    feature_group_count=c)


def fourier_embedding(t: jax.Array, weight: jax.Array, flip_sin_to_cos: bool) -> jax.Array:
    """diffusers ``GaussianFourierProjection`` (``log=False``): ``x = t·W·2·π``, then [sin, cos] (or
    [cos, sin] with `flip_sin_to_cos`); float32, in PyTorch's order of operations."""
    x = t.astype(jnp.float32)[:, None] * weight.astype(jnp.float32)[None, :] * 2 * np.float32(math.pi)
    parts = [jnp.cos(x), jnp.sin(x)] if flip_sin_to_cos else [jnp.sin(x), jnp.cos(x)]
    return jnp.concatenate(parts, axis=-1)


class CondTimestepEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding`` with ``cond_proj``: ``post_act(linear_2(act(linear_1(t + cond_proj(c)))))``."""

    features: int
    act_fn: str
    post_act: str | None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t_emb: jax.Array, cond: jax.Array) -> jax.Array:
        x = t_emb.astype(self.dtype) + nn.Dense(t_emb.shape[-1], use_bias=False, dtype=self.dtype,
                                                name="cond_proj")(cond.astype(self.dtype))
        x = _ACTIVATIONS[self.act_fn](nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x))
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_2")(x)
        return x if self.post_act is None else _ACTIVATIONS[self.post_act](x)


# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------


class KDownBlock(nn.Module):
    """``KDownBlock2D`` / ``KCrossAttnDownBlock2D``: resnets [+ attention], then an optional ``KDownsample2D``.
    Returns the output and the block's skip states in diffusers' order: every resnet output for
    ``KDownBlock2D``; for the attention block the outputs when it downsamples, else None per layer."""

    out_channels: int
    num_layers: int
    attention: bool
    add_downsample: bool
    head_dim: int
    eps: float
    act_fn: str
    dtype: Dtype = jnp.float32
    implementation: AttentionImpl = None
    chunk_size: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, context: jax.Array) -> tuple[jax.Array, list]:
        skips: list[jax.Array | None] = []
        g = RESNET_GROUP_SIZE
        for i in range(self.num_layers):
            x = ResnetBlockCondNorm(self.out_channels, self.out_channels, x.shape[-1] // g, self.out_channels // g,
                                    self.eps, self.act_fn, self.dtype, name=f"resnets_{i}")(x, emb)
            if self.attention:
                x = KAttentionBlock(self.out_channels // self.head_dim, self.head_dim, not self.add_downsample,
                                    dtype=self.dtype, implementation=self.implementation,
                                    chunk_size=self.chunk_size, name=f"attentions_{i}")(x, context, emb)
                skips.append(x if self.add_downsample else None)
            else:
                skips.append(x)
        if self.add_downsample:
            x = _depthwise_fir(x, up=False)
        return x, skips


class KUpBlock(nn.Module):
    """``KUpBlock2D`` / ``KCrossAttnUpBlock2D`` built from the up block's (in, out) channels as diffusers does:
    the last skip of the block's share (if not None) is concatenated first; ``num_layers`` resnets [+ attention]
    end at ``in_channels``; then an optional ``KUpsample2D``. The attention block's first up block (in = out =
    time embedding size) adds self-attention and takes no skip."""

    in_channels: int
    out_channels: int
    num_layers: int
    attention: bool
    add_upsample: bool
    head_dim: int
    temb_channels: int
    eps: float
    act_fn: str
    dtype: Dtype = jnp.float32
    implementation: AttentionImpl = None
    chunk_size: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array | None, emb: jax.Array, context: jax.Array) -> jax.Array:
        if skip is not None:
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        cin, cout, g = self.in_channels, self.out_channels, RESNET_GROUP_SIZE
        first = self.attention and cin == cout == self.temb_channels
        middle = cin != cout
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            if self.attention:  # KCrossAttnUpBlock2D: conv2 ends at in_channels only in a "middle" block
                conv1, conv2 = cout, (cin if middle and last else cout)
            else:  # KUpBlock2D: conv1 (and conv2) end at in_channels in the last resnet
                conv1 = conv2 = cin if last else cout
            x = ResnetBlockCondNorm(conv1, conv2, x.shape[-1] // g, cout // g, self.eps, self.act_fn, self.dtype,
                                    name=f"resnets_{i}")(x, emb)
            if self.attention:
                dim = cin if last else cout
                x = KAttentionBlock(dim // self.head_dim, self.head_dim, first, dtype=self.dtype,
                                    implementation=self.implementation, chunk_size=self.chunk_size,
                                    name=f"attentions_{i}")(x, context, emb)
        if self.add_upsample:
            x = _depthwise_fir(x, up=True)
        return x


# ----------------------------------------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------------------------------------


class UpscalerUNet(nn.Module):
    """The latent upscaler's UNet (NCHW in and out, NHWC inside).

    Attributes:
      config: the :class:`UpscalerUNetConfig`.
      dtype: compute dtype; norms, Fourier features and the attention softmax stay float32.
      attention_implementation, attention_chunk_size: as in :class:`~perflow_jax.models.unet.UNet2DConditionModel`.
    """

    config: UpscalerUNetConfig
    dtype: Dtype = jnp.float32
    attention_implementation: AttentionImpl = None
    attention_chunk_size: int | None = None

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
                 timestep_cond: jax.Array) -> jax.Array:
        """The raw model output for an already scaled `sample`.

        Args:
          sample: ``(B, in_channels, H, W)``: the scaled noisy latents and the upsampled low-res latents.
          timesteps: the continuous noise level ``c_noise`` (log σ / 4), scalar, ``(1,)`` or ``(B,)``.
          encoder_hidden_states: ``(B, L, cross_attention_dim)`` text hidden states.
          timestep_cond: ``(B, time_cond_proj_dim)``: noise-level features and the pooled text embedding.

        Returns:
          ``(B, out_channels, H, W)`` in ``dtype``.
        """
        cfg = self.config
        chex.assert_rank(sample, 4, custom_message="upscaler UNet `sample` must be (B, C, H, W)")
        chex.assert_axis_dimension(sample, 1, cfg.in_channels,
                                   custom_message=f"upscaler UNet `sample` needs {cfg.in_channels} channels (NCHW)")
        b, _, hh, ww = sample.shape
        m = cfg.size_multiple
        if hh % m or ww % m:
            raise ValueError(f"upscaler UNet `sample` height and width must be multiples of {m}, got {hh}×{ww}.")
        chex.assert_shape(encoder_hidden_states, (b, None, cfg.cross_attention_dim),
                          custom_message="upscaler UNet `encoder_hidden_states` must be (B, L, cross_attention_dim)")
        chex.assert_shape(timestep_cond, (b, cfg.time_cond_proj_dim),
                          custom_message="upscaler UNet `timestep_cond` must be (B, time_cond_proj_dim)")
        t = jnp.asarray(timesteps)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, b)):
            raise ValueError(f"upscaler UNet `timesteps` must be a scalar, (1,) or (B={b},); got shape {t.shape}.")
        t = jnp.broadcast_to(t.reshape(-1), (b,))

        d = cfg.time_embed_dim
        fourier = FourierProjection(d // 2, cfg.flip_sin_to_cos, name="time_proj")(t)
        emb = CondTimestepEmbedding(d, cfg.act_fn, cfg.timestep_post_act, self.dtype, name="time_embedding")(
            fourier, timestep_cond)
        context = encoder_hidden_states.astype(self.dtype)
        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)
        x = conv2d(cfg.block_out_channels[0], cfg.conv_in_kernel, self.dtype, "conv_in")(x)

        n = len(cfg.block_out_channels)
        layers, heads = cfg.per_block("layers_per_block"), cfg.per_block("attention_head_dim")
        common = dict(eps=cfg.norm_eps, act_fn=cfg.act_fn, dtype=self.dtype,
                      implementation=self.attention_implementation, chunk_size=self.attention_chunk_size)
        skips: list[jax.Array | None] = [x]
        for i in range(n):
            x, res = KDownBlock(cfg.block_out_channels[i], layers[i], _DOWN_TYPES[cfg.down_block_types[i]],
                                i < n - 1, heads[i], name=f"down_blocks_{i}", **common)(x, emb, context)
            skips += res

        rev = list(reversed(cfg.block_out_channels))
        for i in range(n):
            r = n - 1 - i
            share, skips = skips[-layers[r]:], skips[:-layers[r]]  # as many skips as the block has resnets
            x = KUpBlock(rev[min(i + 1, n - 1)], rev[i], layers[r], _UP_TYPES[cfg.up_block_types[i]], i < n - 1,
                         heads[i], d,  # diffusers gives up block i the head size of down block i
                         name=f"up_blocks_{i}", **common)(x, share[-1], emb, context)

        if cfg.norm_num_groups is not None:
            x = _ACTIVATIONS[cfg.act_fn](GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out")(x))
        x = conv2d(cfg.out_channels, cfg.conv_out_kernel, self.dtype, "conv_out")(x)
        return jnp.transpose(x, (0, 3, 1, 2))


class FourierProjection(nn.Module):
    """The ``time_proj`` module: Gaussian Fourier frequencies ``weight`` (fixed after training) and
    :func:`fourier_embedding`."""

    size: int
    flip_sin_to_cos: bool

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        weight = self.param("scale", nn.initializers.normal(1.0), (self.size,), jnp.float32)
        return fourier_embedding(t, weight, self.flip_sin_to_cos)


# ----------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------


def _dummy_inputs(config: UpscalerUNetConfig) -> dict[str, Any]:
    s = config.size_multiple
    return dict(sample=jnp.zeros((1, config.in_channels, s, s)), timesteps=jnp.zeros((1,)),
                encoder_hidden_states=jnp.zeros((1, 1, config.cross_attention_dim)),
                timestep_cond=jnp.zeros((1, config.time_cond_proj_dim)))


def upscaler_param_shapes(config: UpscalerUNetConfig) -> dict:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves (float32), without allocating anything."""
    model = UpscalerUNet(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **_dummy_inputs(config)))["params"]


def load_upscaler_unet(folder: str | os.PathLike, dtype: Dtype | None = None, variant: str | None = None,
                       allow_pickle: bool = False) -> tuple[UpscalerUNetConfig, dict]:
    """Load the latent upscaler's diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model*``
    safetensors, or a converted ``flax_model.msgpack``), strictly and without torch.

    Returns ``(config, params)`` for :class:`UpscalerUNet`. Raises ValueError for an unsupported config and
    ``ConversionError`` when the weights do not match it.
    """
    folder = os.fspath(folder)
    config = UpscalerUNetConfig.from_json(folder)
    params = load_params(folder, "diffusion_pytorch_model", upscaler_param_shapes(config), variant=variant,
                         allow_pickle=allow_pickle, dtype=dtype, what="latent-upscaler UNet")
    return config, params
