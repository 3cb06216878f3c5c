"""Flax ``UNet2DConditionModel`` numerically matching diffusers' PyTorch model (SD1.x, SD2.x, SDXL).

Loaded straight from a diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model*.safetensors``) with
:func:`load_unet`. Parameter names follow the former diffusers Flax UNet (``down_blocks_0/attentions_0/
transformer_blocks_0/attn1/to_q``...), which normalise to the PyTorch names, so no renaming is needed.

Matches PyTorch to ~1e-6 in float32 (tiny models): exact (erf) GELU in GEGLU, GroupNorm eps ``norm_eps`` in
resnets and ``conv_norm_out`` but 1e-6 in the transformers' GroupNorm, LayerNorm eps 1e-5, and float32
sinusoidal timestep frequencies computed in PyTorch's order.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import values
from perflow_jax.models.config_io import config_fields, config_from_json, per_block
from perflow_jax.models.convert import load_params
from perflow_jax.models.layers import (
    Attention,
    AttentionImpl,
    Downsample2D,
    GroupNorm,
    LayerNorm,
    ResnetBlock2D,
    Upsample2D,
    conv2d,
)
from perflow_jax.models.shape_cache import cached_param_shapes

Dtype = Any

__all__ = ["REMAT_POLICIES", "ImageContext", "MotionSpec", "UNet2DConditionModel", "UNetConfig", "init_unet_params",
           "load_unet", "unet_param_shapes"]

# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------

_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type → has cross-attention
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}

# diffusers config keys that only have one supported value here (key → supported values).
_FIXED: dict[str, tuple] = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu",),
    "resnet_time_scale_shift": ("default",),
    "dual_cross_attention": (False,),
    "time_cond_proj_dim": (None,),
    "class_embed_type": (None, "projection"),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "cross_attention_norm": (None,),
    "attention_type": ("default",),
    "dropout": (0.0,),
}
# diffusers config keys that only affect block types rejected above (safe to ignore).
_IRRELEVANT = {"resnet_skip_time_act", "resnet_out_scale_factor", "mid_block_only_cross_attention",
               "addition_embed_type_num_heads"}


def _tupleize(v: Any) -> Any:
    """JSON lists → (nested) tuples, so the config is hashable."""
    return tuple(_tupleize(x) for x in v) if isinstance(v, list | tuple) else v


# Integer fields: name → (minimum, how deep lists may nest (1: one per block, 2: per block and layer), None ok).
_INT_FIELDS: dict[str, tuple[int, int, bool]] = {
    "sample_size": (1, 1, True), "in_channels": (1, 0, False), "out_channels": (1, 0, False),
    "layers_per_block": (1, 1, False), "downsample_padding": (0, 0, False),
    "cross_attention_dim": (1, 1, False), "transformer_layers_per_block": (0, 2, False),
    "reverse_transformer_layers_per_block": (0, 2, True), "attention_head_dim": (1, 1, True),
    "num_attention_heads": (1, 1, True), "addition_time_embed_dim": (1, 0, True),
    "projection_class_embeddings_input_dim": (1, 0, True), "num_class_embeds": (1, 0, True),
    "time_embedding_dim": (1, 0, True), "conv_in_kernel": (1, 0, False), "conv_out_kernel": (1, 0, False),
}
_BOOL_FIELDS = ("center_input_sample", "flip_sin_to_cos", "use_linear_projection", "upcast_attention")


def _ints_ok(value: Any, minimum: int, depth: int) -> bool:
    """An int ≥ `minimum` (not a bool), or a non-empty tuple of such, nested at most `depth` deep."""
    if isinstance(value, tuple):
        return depth > 0 and len(value) > 0 and all(_ints_ok(v, minimum, depth - 1) for v in value)
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= minimum


def _check_field_types(cfg: UNetConfig) -> None:
    """Refuse config values of the wrong type or range (``cross_attention_dim: null``, a string, NaN, ...) with
    the field's name, before they fail somewhere inside the model."""
    if not (isinstance(cfg.block_out_channels, tuple) and _ints_ok(cfg.block_out_channels, 1, 1)):
        raise ValueError(f"UNet config block_out_channels must be a list of positive integers, got "
                         f"{cfg.block_out_channels!r}.")
    for name, (minimum, depth, optional) in _INT_FIELDS.items():
        value = getattr(cfg, name)
        if (value is None and optional) or _ints_ok(value, minimum, depth):
            continue
        what = ("a positive integer" if minimum == 1 else "a non-negative integer") + (
            "", " or a list of them (one per block)", " or a (nested) list of them")[depth]
        if name == "sample_size":
            what = "a positive integer or a [height, width] pair"
        raise ValueError(f"UNet config {name} must be {what}{' or null' if optional else ''}, got {value!r}.")
    if cfg.attention_head_dim is None and cfg.num_attention_heads is None:
        raise ValueError("UNet config needs num_attention_heads or attention_head_dim (both are null).")
    for name in _BOOL_FIELDS:
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"UNet config {name} must be true or false, got {getattr(cfg, name)!r}.")
    only = cfg.only_cross_attention
    if not (isinstance(only, bool) or (isinstance(only, tuple) and all(isinstance(v, bool) for v in only))):
        raise ValueError(f"UNet config only_cross_attention must be true/false or one per block, got {only!r}.")
    for name in ("down_block_types", "up_block_types"):
        if not isinstance(getattr(cfg, name), tuple):
            raise ValueError(f"UNet config {name} must be a list of block type names, got {getattr(cfg, name)!r}.")
    for name in ("freq_shift", "mid_block_scale_factor", "norm_eps"):
        values.check_float(f"UNet config {name}", getattr(cfg, name))
    if not cfg.norm_eps > 0:
        raise ValueError(f"UNet config norm_eps must be positive, got {cfg.norm_eps!r}.")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The supported subset of diffusers' ``UNet2DConditionModel`` config (same names and defaults).

    Frozen and hashable (lists become tuples), so it can be a static argument of ``jax.jit``. Quirk kept from
    diffusers: ``attention_head_dim`` is the number of heads per block when ``num_attention_heads`` is None
    (every SD config); the head size is then ``channels // heads``.
    """

    sample_size: int | tuple[int, ...] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple = 1
    reverse_transformer_layers_per_block: tuple | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False  # no effect: logits and softmax are always float32 here
    addition_embed_type: str | None = None
    class_embed_type: str | None = None  # "projection": a float vector (e.g. a camera) MLP'd into the time embedding
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    num_class_embeds: int | None = None
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        """Build from a diffusers config dict: ``_``-prefixed keys are ignored, unknown keys warn, and keys
        with unsupported values raise ``ValueError``."""
        for key, allowed in _FIXED.items():
            if key in d and d[key] not in allowed:
                raise ValueError(f"Unsupported UNet config {key}={d[key]!r}; only {allowed} is supported.")
        known = config_fields(cls, d, "UNet", known={*_FIXED, *_IRRELEVANT})
        return cls(**{k: _tupleize(v) for k, v in known.items()})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> UNetConfig:
        """Read a diffusers ``config.json`` (or the folder holding it); errors name the file."""
        return config_from_json(cls.from_dict, path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tupleize(getattr(self, f.name)))
        if isinstance(self.norm_num_groups, bool) or not isinstance(self.norm_num_groups, int) \
                or self.norm_num_groups <= 0:
            raise ValueError(f"Unsupported UNet config norm_num_groups={self.norm_num_groups!r}; a positive int "
                             "is required (None, i.e. no output GroupNorm, is not supported).")
        _check_field_types(self)
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types {self.down_block_types} and up_block_types "
                             f"{self.up_block_types} need one entry per block_out_channels "
                             f"{self.block_out_channels}.")
        for key, types, ok in (("down_block_types", self.down_block_types, _DOWN_TYPES),
                               ("up_block_types", self.up_block_types, _UP_TYPES)):
            bad = [t for t in types if t not in ok]
            if bad:
                raise ValueError(f"Unsupported UNet config {key} entries {bad}; supported: {sorted(ok)}.")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"Unsupported UNet config addition_embed_type={self.addition_embed_type!r}; "
                             "supported: None or 'text_time' (SDXL).")
        if self.addition_embed_type == "text_time" and not (
                self.addition_time_embed_dim and self.projection_class_embeddings_input_dim):
            raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim.")
        if self.class_embed_type == "projection" and (self.projection_class_embeddings_input_dim is None
                                                      or self.addition_embed_type is not None):
            raise ValueError("class_embed_type='projection' needs projection_class_embeddings_input_dim and no "
                             "addition_embed_type.")
        if len(set(self.per_block("cross_attention_dim"))) != 1:
            raise ValueError(f"cross_attention_dim {self.cross_attention_dim} must be the same for all "
                             "blocks (one encoder_hidden_states tensor feeds every block).")
        if self.reverse_transformer_layers_per_block is None and any(
                isinstance(t, tuple) for t in self.per_block("transformer_layers_per_block")):
            raise ValueError("Per-layer transformer_layers_per_block needs "
                             "reverse_transformer_layers_per_block.")
        for key in ("only_cross_attention", "layers_per_block", "heads"):
            self.per_block(key)  # length checks
        for ch, heads in zip(self.block_out_channels, self.per_block("heads"), strict=True):
            if ch % self.norm_num_groups or ch % heads:
                raise ValueError(f"Block channels {ch} must be divisible by norm_num_groups="
                                 f"{self.norm_num_groups} and by the head count {heads}.")
        for k in (self.conv_in_kernel, self.conv_out_kernel):
            if k % 2 != 1:
                raise ValueError(f"conv_in_kernel/conv_out_kernel must be odd, got {k}.")

    # -- derived per-block settings -----------------------------------------------------------------------

    def per_block(self, key: str) -> tuple:
        """A per-block value as a tuple over down blocks (ints/bools are repeated). ``key="heads"`` resolves
        the head count (``num_attention_heads``, else diffusers' legacy ``attention_head_dim``)."""
        if key == "heads":
            value = self.attention_head_dim if self.num_attention_heads is None else self.num_attention_heads
        else:
            value = getattr(self, key)
        return per_block(value, len(self.down_block_types), f"UNet config {key}")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def encoder_dim(self) -> int:
        return self.per_block("cross_attention_dim")[0]


# ----------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: int = 10000) -> jax.Array:
    """diffusers ``get_timestep_embedding``: ``(N,)`` → ``(N, dim)`` float32 sinusoids.

    The frequencies are constants computed in NumPy with PyTorch's float32 steps and a correctly rounded exp.
    PyTorch's own float32 exp is ≤1 ulp off for a few frequencies (e.g. 2 of 160 at dim 320, CPU), which at
    t≈1000 moves single sinusoid values by up to ~6e-5; PyTorch CPU vs GPU differ in the same way.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - freq_shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    arg = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1`` → SiLU → ``linear_2`` (diffusers ``TimestepEmbedding``)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x.astype(self.dtype)))
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(x)


# ----------------------------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _AttnSpec:
    """Settings of one block's spatial transformers."""

    heads: int
    depths: tuple[int, ...]  # transformer blocks per resnet layer
    linear_projection: bool
    only_cross_attention: bool
    implementation: AttentionImpl
    chunk_size: int | None
    num_views: int = 1  # > 1: self-attention runs jointly over the views of a sample (multi-view UNet)


@dataclasses.dataclass(frozen=True)
class MotionSpec:
    """AnimateDiff motion modules in the UNet (:mod:`perflow_jax.models.motion_unet`): a temporal transformer
    after every resnet(/transformer) layer of the down and up blocks (and after the mid block's transformer),
    mixing the ``num_frames`` consecutive frames of each video in the batch. Shapes only, never weights."""

    num_frames: int
    heads: tuple[int, ...]  # per down block (up blocks use them reversed)
    depths: tuple[int, ...]  # transformer layers per motion module, per down block
    mid_depth: int | None  # None: no motion module in the mid block
    max_seq_length: int
    groups: int = 32

    def block(self, where: str, i: int) -> _BlockMotion | None:
        """The settings of down block `i`, up block `i` or the mid block (None: no motion modules there)."""
        n = len(self.heads)
        if where == "mid":
            return None if self.mid_depth is None else _BlockMotion(self.num_frames, self.heads[-1], self.mid_depth,
                                                                     self.max_seq_length, self.groups)
        r = i if where == "down" else n - 1 - i
        return _BlockMotion(self.num_frames, self.heads[r], self.depths[r], self.max_seq_length, self.groups)


@dataclasses.dataclass(frozen=True)
class _BlockMotion:
    num_frames: int
    heads: int
    depth: int
    max_seq_length: int
    groups: int


def _motion_module(spec: _BlockMotion, dtype: Dtype, name: str) -> nn.Module:
    """The temporal transformer ``motion_modules_<i>`` (imported here: it builds on this module's blocks)."""
    from perflow_jax.models.motion_unet import TemporalTransformer

    return TemporalTransformer(spec.num_frames, spec.heads, spec.depth, spec.max_seq_length, spec.groups, dtype,
                               name=name)


class ImageContext(NamedTuple):
    """The cross-attention context with IP-Adapter image tokens: blocks pass it through untouched and each
    transformer block's ``attn2`` adds the decoupled image attention (:class:`~perflow_jax.models.layers.Attention`).
    """

    text: jax.Array  # (B, L, cross_attention_dim)
    ip_tokens: jax.Array  # (B, Li, cross_attention_dim)
    ip_scale: jax.Array  # (B,) float32, traced


class GEGLU(nn.Module):
    """``proj`` to 2×features, split into (value, gate), ``value * gelu(gate)`` with exact (erf) GELU."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with GEGLU: ``net_0`` (GEGLU to 4·dim) → ``net_2`` (Dense back to dim)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(4 * dim, self.dtype, name="net_0")(x)
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU feed-forward; each pre-LayerNorm (eps 1e-5) with a residual."""

    spec: _AttnSpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        s = self.spec
        dim = x.shape[-1]

        def attn(name: str) -> Attention:
            return Attention(s.heads, dim // s.heads, dtype=self.dtype, implementation=s.implementation,
                             chunk_size=s.chunk_size, name=name)

        ip = None
        if isinstance(context, ImageContext):
            context, ip = context.text, (context.ip_tokens, context.ip_scale)
        h = LayerNorm(name="norm1")(x)
        if s.num_views > 1 and not s.only_cross_attention:  # (B·N, L, C) → (B, N·L, C): views attend jointly
            bn, length, c = h.shape
            h = attn("attn1")(h.reshape(bn // s.num_views, s.num_views * length, c)).reshape(bn, length, c)
        else:
            h = attn("attn1")(h, context if s.only_cross_attention else None)
        x = x + h
        x = x + attn("attn2")(LayerNorm(name="norm2")(x), context, ip)
        return x + FeedForward(self.dtype, name="ff")(LayerNorm(name="norm3")(x))


class Transformer2D(nn.Module):
    """diffusers ``Transformer2DModel`` (continuous input): GroupNorm (eps 1e-6), ``proj_in`` (1×1 conv, or
    Dense with ``use_linear_projection``), ``depth`` transformer blocks, ``proj_out``, residual."""

    spec: _AttnSpec
    depth: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        h = GroupNorm(self.groups, 1e-6, name="norm")(x)
        if self.spec.linear_projection:
            h = nn.Dense(c, dtype=self.dtype, name="proj_in")(h.reshape(b, hh * ww, c))
        else:
            h = nn.Conv(c, (1, 1), dtype=self.dtype, name="proj_in")(h).reshape(b, hh * ww, c)
        for i in range(self.depth):
            h = BasicTransformerBlock(self.spec, self.dtype, name=f"transformer_blocks_{i}")(h, context)
        if self.spec.linear_projection:
            h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h).reshape(b, hh, ww, c)
        else:
            h = nn.Conv(c, (1, 1), dtype=self.dtype, name="proj_out")(h.reshape(b, hh, ww, c))
        return h + x


# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------


class DownBlock(nn.Module):
    """``CrossAttnDownBlock2D`` (when ``attn`` is set) or ``DownBlock2D``: ``num_layers`` × (resnet [+
    transformer]), then an optional stride-2 ``downsamplers_0``. Returns the output and all intermediate
    states (the skip connections, in order)."""

    out_channels: int
    num_layers: int
    attn: _AttnSpec | None
    add_downsample: bool
    groups: int
    eps: float
    downsample_padding: int = 1
    dtype: Dtype = jnp.float32
    motion: _BlockMotion | None = None

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array,
                 context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, dtype=self.dtype,
                              name=f"resnets_{i}")(x, temb)
            if self.attn is not None:
                x = Transformer2D(self.attn, self.attn.depths[i], self.groups, self.dtype,
                                  name=f"attentions_{i}")(x, context)
            if self.motion is not None:
                x = _motion_module(self.motion, self.dtype, f"motion_modules_{i}")(x)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, then (transformer, resnet) per entry of ``attn.depths``."""

    attn: _AttnSpec
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    motion: _BlockMotion | None = None

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        c = x.shape[-1]

        def resnet(i: int) -> ResnetBlock2D:
            return ResnetBlock2D(c, self.groups, self.eps, output_scale_factor=self.output_scale_factor,
                                 dtype=self.dtype, name=f"resnets_{i}")

        x = resnet(0)(x, temb)
        for i, depth in enumerate(self.attn.depths):
            x = Transformer2D(self.attn, depth, self.groups, self.dtype, name=f"attentions_{i}")(x, context)
            if self.motion is not None:
                x = _motion_module(self.motion, self.dtype, f"motion_modules_{i}")(x)
            x = resnet(i + 1)(x, temb)
        return x


class UpBlock(nn.Module):
    """``CrossAttnUpBlock2D`` (when ``attn`` is set) or ``UpBlock2D``: per layer, concatenate the next skip
    (taken from the end of ``skips``) on channels, resnet [+ transformer]; then an optional ``upsamplers_0``
    (to ``upsample_size`` when given, else 2×)."""

    out_channels: int
    num_layers: int
    attn: _AttnSpec | None
    add_upsample: bool
    groups: int
    eps: float
    dtype: Dtype = jnp.float32
    motion: _BlockMotion | None = None

    @nn.compact
    def __call__(self, x: jax.Array, skips: list[jax.Array], temb: jax.Array, context: jax.Array,
                 upsample_size: tuple[int, int] | None = None) -> jax.Array:
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, dtype=self.dtype,
                              name=f"resnets_{i}")(x, temb)
            if self.attn is not None:
                x = Transformer2D(self.attn, self.attn.depths[i], self.groups, self.dtype,
                                  name=f"attentions_{i}")(x, context)
            if self.motion is not None:
                x = _motion_module(self.motion, self.dtype, f"motion_modules_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x, upsample_size)
        return x


# Rematerialization (gradient checkpointing) per block: the name of a `jax.checkpoint` policy saying which
# intermediates of a block's forward pass the backward pass keeps; everything else is recomputed.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the block inputs: least memory, most recompute
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs (no batch dims)
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep every matmul/conv output
}


def _remat_block(cls: type[nn.Module], remat: str | None, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """Block class `cls`, wrapped in ``nn.remat`` with the named policy (`remat` None or ``"none"``: as is).
    Param names and values are unchanged; only what the backward pass stores differs."""
    if remat is None or remat == "none":
        return cls
    if remat not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat policy {remat!r}; expected 'none' or one of {sorted(REMAT_POLICIES)}.")
    return nn.remat(cls, policy=REMAT_POLICIES[remat], static_argnums=static_argnums)


# ----------------------------------------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------------------------------------


def _nhwc(residual: jax.Array, like: jax.Array) -> jax.Array:
    """An NCHW ControlNet residual in the NHWC layout and dtype of the feature map `like` it is added to."""
    chex.assert_shape(residual, (like.shape[0], like.shape[3], like.shape[1], like.shape[2]),
                      custom_message="A ControlNet residual does not match the UNet feature map it is added to")
    return jnp.transpose(residual, (0, 2, 3, 1)).astype(like.dtype)


def _depths(value: int | tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Transformer depth per resnet layer from an int (same for all) or a per-layer tuple."""
    return (value,) * num_layers if isinstance(value, int) else tuple(value[:num_layers])


class UNet2DConditionModel(nn.Module):
    """diffusers ``UNet2DConditionModel`` in Flax (NCHW in and out, NHWC inside).

    Attributes:
      config: the :class:`UNetConfig`.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); GroupNorm/LayerNorm, the timestep sinusoids and the
        attention softmax stay float32. Params keep whatever dtype they were loaded/initialised with.
      attention_implementation: passed to ``jax.nn.dot_product_attention``: None (let JAX choose), ``'xla'``,
        or ``'cudnn'`` (GPU flash attention; fp16/bf16 only).
      attention_chunk_size: None, or process attention queries this many at a time (``lax.map``) to bound the
        memory of the ``(B, heads, Lq, Lk)`` logits at large resolutions; same result, somewhat slower.
      num_views: the batch holds consecutive groups of this many views of one sample whose self-attention runs
        jointly (MVDream; :mod:`perflow_jax.models.multiview_unet`). A shape, never a weight: 1 is the plain UNet.
      motion: AnimateDiff motion modules (:class:`MotionSpec`); the batch then holds consecutive groups of
        ``motion.num_frames`` frames of one video. None is the plain UNet.
      remat: None (or ``"none"``), or a policy name of :data:`REMAT_POLICIES`: each down, mid and up block is
        ``nn.remat``-wrapped (``jax.checkpoint``), so training stores less for the backward pass; same outputs
        and gradients, and the same param tree.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    attention_implementation: AttentionImpl = None
    attention_chunk_size: int | None = None
    num_views: int = 1
    motion: MotionSpec | None = None
    remat: str | None = None

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float | int,
        encoder_hidden_states: jax.Array,
        added_cond_kwargs: Mapping[str, jax.Array] | None = None,
        class_labels: jax.Array | None = None,
        train: bool = False,
        down_block_additional_residuals: tuple[jax.Array, ...] | None = None,
        mid_block_additional_residual: jax.Array | None = None,
        ip_tokens: jax.Array | None = None,
        ip_scale: jax.Array | float | None = None,
    ) -> jax.Array:
        """Predict the model output (noise, v, or velocity, depending on training) for a noisy ``sample``.

        Args:
          sample: ``(B, in_channels, H, W)``.
          timesteps: scalar, ``(1,)`` or ``(B,)``, int or float.
          encoder_hidden_states: ``(B, L, cross_attention_dim)`` text embeddings.
          added_cond_kwargs: SDXL (``addition_embed_type="text_time"``) only: ``{"text_embeds": (B, P),
            "time_ids": (B, K)}`` with ``P + K·addition_time_embed_dim`` equal to
            ``projection_class_embeddings_input_dim``.
          class_labels: ``(B,)`` ints, required iff ``num_class_embeds`` is set; with
            ``class_embed_type="projection"``, optional ``(B, projection_class_embeddings_input_dim)`` floats.
          train: unused (SD UNets have no dropout); kept for a uniform model signature.
          down_block_additional_residuals: ControlNet residuals ``(B, C_i, H_i, W_i)``, one per skip connection
            (``conv_in`` output first), added to the skips before the up blocks, as diffusers does.
          mid_block_additional_residual: ControlNet residual added to the mid block's output.
          ip_tokens: IP-Adapter image tokens ``(B, Li, cross_attention_dim)``
            (:mod:`perflow_jax.models.ip_adapter`); needs the adapter's ``to_k_ip``/``to_v_ip`` params.
          ip_scale: their weight, scalar or ``(B,)`` (traced; default 1).

        Returns:
          ``(B, out_channels, H, W)`` in ``dtype``.
        """
        del train
        cfg = self.config
        chex.assert_rank(sample, 4, custom_message="UNet `sample` must be (B, C, H, W)")
        chex.assert_axis_dimension(sample, 1, cfg.in_channels,
                                   custom_message=f"UNet `sample` needs {cfg.in_channels} channels (NCHW)")
        b = sample.shape[0]
        if self.num_views < 1 or b % self.num_views:
            raise ValueError(f"UNet batch {b} is not a whole number of groups of num_views={self.num_views} views; "
                             "pass B·N samples, the N views of each sample consecutive.")
        chex.assert_shape(encoder_hidden_states, (b, None, cfg.encoder_dim),
                          custom_message="UNet `encoder_hidden_states` must be (B, L, cross_attention_dim)")

        emb = self._embedding(timesteps, b, added_cond_kwargs, class_labels)
        context = encoder_hidden_states.astype(self.dtype)
        if ip_tokens is not None:
            chex.assert_shape(ip_tokens, (b, None, cfg.encoder_dim),
                              custom_message="UNet `ip_tokens` must be (B, Li, cross_attention_dim)")
            scale = jnp.broadcast_to(jnp.asarray(1.0 if ip_scale is None else ip_scale, jnp.float32).reshape(-1),
                                     (b,))
            context = ImageContext(context, ip_tokens.astype(self.dtype), scale)
        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = conv2d(cfg.block_out_channels[0], cfg.conv_in_kernel, self.dtype, "conv_in")(x)
        x, skips = self._down_and_mid(x, emb, context)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"Got {len(down_block_additional_residuals)} down-block residuals; this UNet has "
                                 f"{len(skips)} skip connections (a ControlNet of another layout?).")
            skips = [s + _nhwc(r, s) for s, r in zip(skips, down_block_additional_residuals, strict=True)]
        if mid_block_additional_residual is not None:
            x = x + _nhwc(mid_block_additional_residual, x)

        n = len(cfg.block_out_channels)
        layers = cfg.per_block("layers_per_block")
        common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=self.dtype)

        # diffusers forwards the skip's size to the upsamplers when H or W is not a multiple of 2**(n-1).
        forward_size = any(d % 2 ** (n - 1) for d in sample.shape[2:])
        for i in range(n):
            r = n - 1 - i  # the matching down block
            res, skips = skips[-(layers[r] + 1):], skips[:-(layers[r] + 1)]
            size = tuple(skips[-1].shape[1:3]) if forward_size and i < n - 1 else None
            up = _remat_block(UpBlock, self.remat, static_argnums=(5,))  # upsample_size (self counts)
            x = up(cfg.block_out_channels[r], layers[r] + 1, self._attn_spec("up", i), i < n - 1,
                   motion=self._motion("up", i), name=f"up_blocks_{i}", **common)(x, res, emb, context, size)

        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out")(x))
        x = conv2d(cfg.out_channels, cfg.conv_out_kernel, self.dtype, "conv_out")(x)
        return jnp.transpose(x, (0, 3, 1, 2))

    def _down_and_mid(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """The down blocks and the mid block on ``conv_in``'s output `x` (NHWC): the mid block's output and the
        skip connections (``conv_in``'s output first). Shared with the ControlNet, which is this encoder half."""
        cfg = self.config
        n = len(cfg.block_out_channels)
        layers = cfg.per_block("layers_per_block")
        common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=self.dtype)
        down, mid = _remat_block(DownBlock, self.remat), _remat_block(MidBlock, self.remat)
        skips = [x]
        for i in range(n):
            x, res = down(cfg.block_out_channels[i], layers[i], self._attn_spec("down", i), i < n - 1,
                          downsample_padding=cfg.downsample_padding, motion=self._motion("down", i),
                          name=f"down_blocks_{i}", **common)(
                x, temb, context)
            skips += res
        x = mid(self._attn_spec("mid", 0), output_scale_factor=cfg.mid_block_scale_factor,
                motion=self._motion("mid", 0), name="mid_block", **common)(x, temb, context)
        return x, skips

    def _motion(self, where: str, i: int) -> _BlockMotion | None:
        return None if self.motion is None else self.motion.block(where, i)

    def _attn_spec(self, where: str, i: int) -> _AttnSpec | None:
        """Transformer settings of down block `i`, up block `i` or the mid block; None for plain blocks."""
        cfg = self.config
        heads, layers = cfg.per_block("heads"), cfg.per_block("layers_per_block")
        tlayers = cfg.per_block("transformer_layers_per_block")
        only_cross = cfg.per_block("only_cross_attention")
        n = len(heads)
        if where == "down":
            if not _DOWN_TYPES[cfg.down_block_types[i]]:
                return None
            r, depths = i, _depths(tlayers[i], layers[i])
        elif where == "up":
            if not _UP_TYPES[cfg.up_block_types[i]]:
                return None
            r = n - 1 - i
            rev = cfg.reverse_transformer_layers_per_block or tuple(reversed(tlayers))
            depths = _depths(rev[i], layers[r] + 1)
        else:  # mid: one transformer between two resnets; only_cross_attention does not apply
            r, depths = n - 1, _depths(tlayers[-1], 1)
        return _AttnSpec(heads[r], depths, cfg.use_linear_projection, only_cross[r] and where != "mid",
                         self.attention_implementation, self.attention_chunk_size, self.num_views)

    def _embedding(self, timesteps: jax.Array | float | int, b: int, added_cond_kwargs: Mapping | None,
                   class_labels: jax.Array | None) -> jax.Array:
        """Time embedding (+ class embedding) (+ SDXL text/size embedding), ``(B, time_embed_dim)``."""
        cfg = self.config
        t = jnp.asarray(timesteps)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, b)):
            raise ValueError(f"UNet `timesteps` must be a scalar, (1,) or (B={b},); got shape {t.shape}.")
        t = jnp.broadcast_to(t.reshape(-1), (b,))
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = TimestepEmbedding(cfg.time_embed_dim, self.dtype, name="time_embedding")(t_emb)

        if cfg.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("This UNet has num_class_embeds set: pass `class_labels` of shape (B,).")
            chex.assert_shape(class_labels, (b,), custom_message="UNet `class_labels` must be (B,) ints")
            emb = emb + nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, dtype=self.dtype,
                                 name="class_embedding")(class_labels)
        elif cfg.class_embed_type == "projection":
            if class_labels is not None:  # None: no class (camera) conditioning at all
                chex.assert_shape(class_labels, (b, cfg.projection_class_embeddings_input_dim),
                                  custom_message="UNet `class_labels` must be (B, projection_class_embeddings_"
                                                 "input_dim) floats")
                emb = emb + TimestepEmbedding(cfg.time_embed_dim, self.dtype, name="class_embedding")(
                    class_labels.astype(jnp.float32))
        elif class_labels is not None:
            raise ValueError("`class_labels` were passed but this UNet has no class embedding "
                             "(num_class_embeds is None).")

        if cfg.addition_embed_type == "text_time":
            kwargs = added_cond_kwargs or {}
            if "text_embeds" not in kwargs or "time_ids" not in kwargs:
                raise ValueError("This UNet (addition_embed_type='text_time', SDXL) needs added_cond_kwargs="
                                 "{'text_embeds': (B, P), 'time_ids': (B, K)}.")
            text, ids = kwargs["text_embeds"], kwargs["time_ids"]
            chex.assert_shape([text, ids], [(b, None), (b, None)],
                              custom_message="added_cond_kwargs text_embeds and time_ids must be (B, ·)")
            d = cfg.addition_time_embed_dim
            if text.shape[1] + ids.shape[1] * d != cfg.projection_class_embeddings_input_dim:
                raise ValueError(f"text_embeds {text.shape} and time_ids {ids.shape} give "
                                 f"{text.shape[1]} + {ids.shape[1]}*{d} features; the UNet expects "
                                 f"projection_class_embeddings_input_dim={cfg.projection_class_embeddings_input_dim}.")
            ids_emb = timestep_embedding(ids.reshape(-1), d, cfg.flip_sin_to_cos, cfg.freq_shift)
            add = jnp.concatenate([text.astype(jnp.float32), ids_emb.reshape(b, -1)], axis=-1)
            emb = emb + TimestepEmbedding(cfg.time_embed_dim, self.dtype, name="add_embedding")(add)
        return emb


# ----------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------


def _dummy_inputs(config: UNetConfig) -> dict[str, Any]:
    """Smallest valid inputs (batch 1), used to trace parameter shapes."""
    s = 2 ** (len(config.block_out_channels) - 1)
    kw: dict[str, Any] = dict(
        sample=jnp.zeros((1, config.in_channels, s, s), jnp.float32),
        timesteps=jnp.zeros((1,), jnp.int32),
        encoder_hidden_states=jnp.zeros((1, 1, config.encoder_dim), jnp.float32),
    )
    if config.addition_embed_type == "text_time":
        p = config.projection_class_embeddings_input_dim - config.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": jnp.zeros((1, p)), "time_ids": jnp.zeros((1, 1))}
    if config.num_class_embeds is not None:
        kw["class_labels"] = jnp.zeros((1,), jnp.int32)
    elif config.class_embed_type == "projection":
        kw["class_labels"] = jnp.zeros((1, config.projection_class_embeddings_input_dim), jnp.float32)
    return kw


def unet_param_shapes(config: UNetConfig, ip_adapter: bool = False) -> dict:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves (float32), without allocating anything (traced once
    per config: :func:`~perflow_jax.models.shape_cache.cached_param_shapes`); with `ip_adapter`, including the
    IP-Adapter's ``to_k_ip``/``to_v_ip`` layers."""

    def trace() -> dict:
        model = UNet2DConditionModel(config)
        kw = _dummy_inputs(config)
        if ip_adapter:
            kw["ip_tokens"] = jnp.zeros((1, 1, config.encoder_dim), jnp.float32)
        return jax.eval_shape(lambda: model.init(jax.random.key(0), **kw))["params"]

    return cached_param_shapes("unet+ip_adapter" if ip_adapter else "unet", config, trace)


def init_unet_params(config: UNetConfig, rng: jax.Array) -> dict:
    """Randomly initialised float32 params (Flax default initialisers), e.g. to train from scratch."""
    return jax.jit(lambda r: UNet2DConditionModel(config).init(r, **_dummy_inputs(config)))(rng)["params"]


def load_unet(folder: str | os.PathLike, dtype: Dtype | None = None, variant: str | None = None,
              allow_pickle: bool = False) -> tuple[UNetConfig, dict]:
    """Load a diffusers UNet folder: ``config.json`` + ``diffusion_pytorch_model[.variant].safetensors``
    (or a sharded index; ``.bin`` only with ``allow_pickle``), or an already converted ``flax_model.msgpack``.

    Args:
      folder: e.g. ``<pipeline>/unet``.
      dtype: cast params to this dtype (default: keep the file's, e.g. fp16 for ``variant="fp16"``).
      variant: weights variant such as ``"fp16"``.
      allow_pickle: allow reading a PyTorch pickle (needs torch; only for trusted files).

    Returns:
      ``(config, params)`` with params a nested dict of NumPy arrays for ``UNet2DConditionModel(config)``.

    Raises:
      ValueError: unsupported config; ``ConversionError`` (a ValueError) when the weights do not match it.
    """
    folder = os.fspath(folder)
    config = UNetConfig.from_json(folder)
    params = load_params(folder, "diffusion_pytorch_model", unet_param_shapes(config), variant=variant,
                         allow_pickle=allow_pickle, dtype=dtype, what="UNet")
    return config, params
