"""AnimateDiff in Flax: motion modules (diffusers ``MotionAdapter``) on our SD1.5 UNet, as ``UNetMotionModel``.

The motion UNet is :class:`~perflow_jax.models.unet.UNet2DConditionModel` with ``motion=MotionSpec(...)``: after
every resnet(/transformer) layer of the down and up blocks (and after the mid block's transformer) a
:class:`TemporalTransformer` (diffusers ``AnimateDiffTransformer3D``) mixes the frames of each video. Frames
travel flattened into the batch, ``(B·F, ...)``, the frames of one video consecutive, as in diffusers.

Params are one tree: the base UNet's plus ``motion_modules_<i>`` inside the blocks, named as in diffusers'
``UNetMotionModel`` and ``MotionAdapter`` (``down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q``...).
The sinusoidal frame positions (``pos_embed.pe``, the original checkpoints' ``pos_encoder.pe``) are fixed
constants, computed here and ignored in files. Loaders: :func:`load_motion_adapter` (a diffusers
``MotionAdapter`` folder) and :func:`load_original_motion_module` (the original ``mm_sd_v15*`` layout: a
safetensors conversion as is, a ``.ckpt`` pickle only with ``allow_pickle``).
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
from flax import traverse_util

from perflow_jax import values
from perflow_jax.models.config_io import config_from_json
from perflow_jax.models.convert import load_params, torch_to_flax
from perflow_jax.models.layers import Attention, GroupNorm, LayerNorm
from perflow_jax.models.temporal_layers import frames_view
from perflow_jax.models.unet import FeedForward, MotionSpec, UNet2DConditionModel, UNetConfig, load_unet
from perflow_jax.models.weights_io import load_state_dict

Dtype = Any

__all__ = ["MotionAdapterConfig", "TemporalTransformer", "load_motion_adapter", "load_motion_unet",
           "load_original_motion_module", "merge_motion_params", "motion_param_shapes", "motion_spec", "motion_unet",
           "motion_unet_apply", "original_motion_key"]

_POSITIONS = r"\.pos_(embed|encoder)\.pe$"  # fixed sinusoids, computed, never loaded


def frame_positions(length: int, dim: int) -> np.ndarray:
    """diffusers ``SinusoidalPositionalEmbedding.pe[0]``: ``(length, dim)`` float32, sin on even channels, cos on
    odd ones, frequencies ``exp(-ln(10000)·2i/dim)`` in PyTorch's float32 order."""
    div = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim)).astype(np.float32)
    arg = np.arange(length, dtype=np.float32)[:, None] * div[None, :]
    pe = np.zeros((length, dim), np.float32)
    pe[:, 0::2], pe[:, 1::2] = np.sin(arg), np.cos(arg[:, : dim // 2])
    return pe


class TemporalTransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` as AnimateDiff uses it: two self-attentions over frames (each after a
    LayerNorm plus the frame positions) and a GEGLU feed-forward, each with a residual."""

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        pe = jnp.asarray(frame_positions(x.shape[1], dim))[None].astype(x.dtype)
        for i in (1, 2):
            h = LayerNorm(name=f"norm{i}")(x) + pe
            x = x + Attention(self.heads, dim // self.heads, dtype=self.dtype, name=f"attn{i}")(h)
        return x + FeedForward(self.dtype, name="ff")(LayerNorm(name="norm3")(x))


class TemporalTransformer(nn.Module):
    """diffusers ``AnimateDiffTransformer3D`` on ``(B·F, H, W, C)`` NHWC: GroupNorm (eps 1e-6) over each video's
    frames and pixels, ``proj_in``, ``depth`` blocks attending along the F frames of every pixel, ``proj_out``,
    residual."""

    num_frames: int
    heads: int
    depth: int
    max_seq_length: int
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f = self.num_frames
        if f > self.max_seq_length:
            raise ValueError(f"{f} frames exceed the motion modules' motion_max_seq_length={self.max_seq_length}; "
                             "generate at most that many frames.")
        bf, hh, ww, c = x.shape
        video = GroupNorm(self.groups, 1e-6, name="norm")(frames_view(x, f))  # (B, F, H, W, C)
        h = jnp.transpose(video, (0, 2, 3, 1, 4)).reshape(-1, f, c)  # (B·H·W, F, C)
        h = nn.Dense(c, dtype=self.dtype, name="proj_in")(h)
        for i in range(self.depth):
            h = TemporalTransformerBlock(self.heads, self.dtype, name=f"transformer_blocks_{i}")(h)
        h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h)
        h = jnp.transpose(h.reshape(bf // f, hh, ww, f, c), (0, 3, 1, 2, 4)).reshape(bf, hh, ww, c)
        return h + x.astype(h.dtype)


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------


def _per_block(name: str, value: Any, n: int) -> tuple[int, ...]:
    """An int or one int per block → a tuple of n positive ints."""
    items = tuple(value) if isinstance(value, list | tuple) else (value,) * n
    if len(items) != n:
        raise ValueError(f"MotionAdapter config {name}={value!r} needs one entry per block ({n}).")
    return tuple(values.check_int(f"MotionAdapter config {name}", v, min_value=1) for v in items)


@dataclasses.dataclass(frozen=True)
class MotionAdapterConfig:
    """diffusers ``MotionAdapter`` config (same names and defaults: the ``mm_sd_v15_v2`` layout)."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    motion_layers_per_block: int | tuple[int, ...] = 2
    motion_transformer_layers_per_block: int | tuple[int, ...] = 1
    motion_mid_block_layers_per_block: int = 1
    motion_transformer_layers_per_mid_block: int | tuple[int, ...] = 1
    motion_num_attention_heads: int | tuple[int, ...] = 8
    motion_norm_num_groups: int = 32
    motion_max_seq_length: int = 32
    use_motion_mid_block: bool = True
    conv_in_channels: int | None = None

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        for name in ("block_out_channels", "motion_layers_per_block", "motion_transformer_layers_per_block",
                     "motion_num_attention_heads"):
            object.__setattr__(self, name, _per_block(name, getattr(self, name), n))
        mid = _per_block("motion_transformer_layers_per_mid_block", self.motion_transformer_layers_per_mid_block,
                         self.motion_mid_block_layers_per_block)
        object.__setattr__(self, "motion_transformer_layers_per_mid_block", mid)
        if self.motion_mid_block_layers_per_block != 1:
            raise ValueError("MotionAdapter config motion_mid_block_layers_per_block must be 1 (the SD1.5 mid block "
                             f"has one transformer), got {self.motion_mid_block_layers_per_block!r}.")
        if self.conv_in_channels is not None:
            raise ValueError("MotionAdapter config conv_in_channels (SparseCtrl/PIA inputs) is not supported; "
                             "use a text-to-video motion adapter.")
        values.check_int("MotionAdapter config motion_max_seq_length", self.motion_max_seq_length, min_value=1)
        values.check_int("MotionAdapter config motion_norm_num_groups", self.motion_norm_num_groups, min_value=1)
        if not isinstance(self.use_motion_mid_block, bool):
            raise ValueError(f"MotionAdapter config use_motion_mid_block must be true or false, "
                             f"got {self.use_motion_mid_block!r}.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MotionAdapterConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> MotionAdapterConfig:
        """Read a diffusers ``MotionAdapter`` ``config.json`` (or the folder holding it); errors name the file."""
        return config_from_json(cls.from_dict, path)


def motion_spec(unet: UNetConfig, adapter: MotionAdapterConfig, num_frames: int) -> MotionSpec:
    """The motion modules of `adapter` on the base `unet`, for `num_frames`-frame videos; a one-line error when
    the adapter was made for another base."""
    values.check_int("num_frames", num_frames, min_value=1)
    if adapter.block_out_channels != unet.block_out_channels:
        raise ValueError(f"The motion adapter is for a base UNet with block_out_channels "
                         f"{list(adapter.block_out_channels)}, this UNet has {list(unet.block_out_channels)}; "
                         "use a motion adapter made for this base (SD1.5 adapters need an SD1.5 UNet).")
    if adapter.motion_layers_per_block != unet.per_block("layers_per_block"):
        raise ValueError(f"The motion adapter has motion_layers_per_block {list(adapter.motion_layers_per_block)}, "
                         f"this UNet has layers_per_block {list(unet.per_block('layers_per_block'))}; use a motion "
                         "adapter made for this base.")
    if num_frames > adapter.motion_max_seq_length:
        raise ValueError(f"num_frames={num_frames} exceeds the motion adapter's motion_max_seq_length="
                         f"{adapter.motion_max_seq_length}.")
    for ch, heads in zip(unet.block_out_channels, adapter.motion_num_attention_heads, strict=True):
        if ch % heads or ch % adapter.motion_norm_num_groups:
            raise ValueError(f"Motion module channels {ch} must be divisible by its {heads} heads and "
                             f"{adapter.motion_norm_num_groups} norm groups.")
    mid = adapter.motion_transformer_layers_per_mid_block[0] if adapter.use_motion_mid_block else None
    return MotionSpec(num_frames, adapter.motion_num_attention_heads, adapter.motion_transformer_layers_per_block,
                      mid, adapter.motion_max_seq_length, adapter.motion_norm_num_groups)


def motion_unet(unet: UNetConfig, spec: MotionSpec, dtype: Dtype = jnp.float32) -> UNet2DConditionModel:
    """The motion UNet module (the base UNet with motion modules)."""
    return UNet2DConditionModel(unet, dtype=dtype, motion=spec)


# ----------------------------------------------------------------------------------------------------------
# Params
# ----------------------------------------------------------------------------------------------------------


def _is_motion(path: tuple[str, ...]) -> bool:
    return any(p.startswith("motion_modules_") for p in path)


def motion_param_shapes(unet: UNetConfig, adapter: MotionAdapterConfig) -> dict:
    """The motion modules' params tree (``jax.ShapeDtypeStruct`` leaves): what a motion adapter file holds."""
    spec = motion_spec(unet, adapter, 1)
    s = 2 ** (len(unet.block_out_channels) - 1)
    model = motion_unet(unet, spec)
    tree = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, unet.in_channels, s, s)), jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, 1, unet.encoder_dim))))["params"]
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if _is_motion(p)})


def merge_motion_params(unet_params: Mapping, motion_params: Mapping) -> dict:
    """One params tree for the motion UNet: the base UNet's (e.g. with a PeRFlow ΔW and LoRAs merged) plus the
    motion modules; refuses overlapping names."""
    flat = traverse_util.flatten_dict(dict(unet_params))
    extra = traverse_util.flatten_dict(dict(motion_params))
    if any(_is_motion(p) for p in flat) or not all(_is_motion(p) for p in extra):
        raise ValueError("merge_motion_params needs base UNet params without motion modules and motion-module "
                         "params only (e.g. from load_motion_adapter).")
    return traverse_util.unflatten_dict({**flat, **extra})


def load_motion_adapter(folder: str | os.PathLike, unet: UNetConfig, dtype: Dtype | None = None,
                        variant: str | None = None, allow_pickle: bool = False) -> tuple[MotionAdapterConfig, dict]:
    """Load a diffusers ``MotionAdapter`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
    strictly, for the base `unet`. Returns ``(adapter config, motion-module params)``; merge them into the base
    UNet's params with :func:`merge_motion_params`."""
    folder = os.fspath(folder)
    adapter = MotionAdapterConfig.from_json(folder)
    params = load_params(folder, "diffusion_pytorch_model", motion_param_shapes(unet, adapter), variant=variant,
                         allow_pickle=allow_pickle, ignore=[_POSITIONS], dtype=dtype, what="MotionAdapter")
    return adapter, params


def original_motion_key(key: str) -> str:
    """An original AnimateDiff (``mm_sd_v15*``) key → diffusers' ``MotionAdapter`` name (as diffusers'
    ``convert_animatediff_checkpoint_to_diffusers``)."""
    for old, new in ((".norms.0", ".norm1"), (".norms.1", ".norm2"), (".ff_norm", ".norm3"),
                     (".attention_blocks.0", ".attn1"), (".attention_blocks.1", ".attn2"),
                     (".temporal_transformer", "")):
        key = key.replace(old, new)
    return key


def load_original_motion_module(path: str | os.PathLike, unet: UNetConfig, adapter: MotionAdapterConfig | None = None,
                                dtype: Dtype | None = None, allow_pickle: bool = False) -> dict:
    """Load an original AnimateDiff motion-module file (``mm_sd_v15_v2.ckpt`` or its ``.safetensors``
    conversion) strictly. `adapter` describes its layout (default: ``mm_sd_v15_v2``, with a mid block; pass
    ``MotionAdapterConfig(use_motion_mid_block=False, motion_max_seq_length=24)`` for ``mm_sd_v15``). A pickle
    loads only with `allow_pickle` (trusted files only)."""
    adapter = MotionAdapterConfig() if adapter is None else adapter
    tensors = load_state_dict(path, allow_pickle=allow_pickle)
    return torch_to_flax(tensors, motion_param_shapes(unet, adapter), rename=original_motion_key,
                         ignore=[_POSITIONS], dtype=dtype, what=f"AnimateDiff motion module {os.fspath(path)}")


# ----------------------------------------------------------------------------------------------------------
# Apply
# ----------------------------------------------------------------------------------------------------------


def motion_unet_apply(model: UNet2DConditionModel, params: Mapping, sample: jax.Array, timesteps: jax.Array,
                      encoder_hidden_states: jax.Array) -> jax.Array:
    """diffusers ``UNetMotionModel.forward``: `sample` ``(B, C, F, H, W)``, `timesteps` scalar or ``(B,)``,
    `encoder_hidden_states` ``(B, L, D)`` (shared by a video's frames) → ``(B, C_out, F, H, W)``."""
    chex.assert_rank(sample, 5, custom_message="Motion UNet `sample` must be (B, C, F, H, W)")
    b, c, f, h, w = sample.shape
    if model.motion is None or model.motion.num_frames != f:
        raise ValueError(f"The motion UNet was built for {None if model.motion is None else model.motion.num_frames}"
                         f" frames; `sample` has {f} (axis 2 of (B, C, F, H, W)).")
    t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
    frames = jnp.transpose(sample, (0, 2, 1, 3, 4)).reshape(b * f, c, h, w)
    out = model.apply({"params": params}, frames, jnp.repeat(t, f), jnp.repeat(encoder_hidden_states, f, axis=0))
    return jnp.transpose(out.reshape(b, f, *out.shape[1:]), (0, 2, 1, 3, 4))


def load_motion_unet(unet_folder: str | os.PathLike, adapter_folder: str | os.PathLike,
                     dtype: Dtype | None = None) -> tuple[UNetConfig, MotionAdapterConfig, dict]:
    """The base UNet folder plus a ``MotionAdapter`` folder → ``(unet config, adapter config, merged params)``."""
    cfg, base = load_unet(unet_folder, dtype=dtype)
    adapter, motion = load_motion_adapter(adapter_folder, cfg, dtype=dtype)
    return cfg, adapter, merge_motion_params(base, motion)

