"""Stable Diffusion's VAE (diffusers ``AutoencoderKL``) in Flax.

Public tensors are NCHW like diffusers: images ``(B, 3, H, W)`` in [-1, 1], latents ``(B, 4, H/f, W/f)``;
internally everything is NHWC. Parameter names follow the former ``FlaxAutoencoderKL`` (``encoder/conv_in``,
``encoder/down_blocks_0/resnets_0/conv1``, ``encoder/mid_block/attentions_0/query``, ``quant_conv``, ...).

As in diffusers, :meth:`AutoencoderKL.encode` / :meth:`AutoencoderKL.decode` do not apply the latent
``scaling_factor``; use :func:`latents_from_encoding` / :func:`scale_latents` before the UNet and
:func:`unscale_latents` before decoding.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import values
from perflow_jax.models.config_io import config_from_json
from perflow_jax.models.convert import load_params
from perflow_jax.models.keymap import rename_torch_attention
from perflow_jax.models.layers import (
    VAE_ATTENTION_NAMES,
    Attention,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    conv2d,
)
from perflow_jax.models.shape_cache import cached_param_shapes

VAE_EPS = 1e-6  # every GroupNorm in the VAE
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` config (defaults are diffusers' constructor defaults).

    ``scaling_factor`` is 0.18215 for SD1/SD2 and 0.13025 for SDXL; ``shift_factor`` (SD3/Flux-style) and
    per-channel ``latents_mean`` / ``latents_std`` are only used by the scaling helpers.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            _check_positive_int(name, getattr(self, name))
        if not isinstance(self.block_out_channels, tuple) or not self.block_out_channels:
            raise ValueError(f"VAEConfig.block_out_channels must be a non-empty list, got {self.block_out_channels!r}.")
        for name in ("down_block_types", "up_block_types"):
            if not isinstance(getattr(self, name), tuple):
                raise ValueError(f"VAEConfig.{name} must be a list of block type names, got {getattr(self, name)!r}.")
        for ch in self.block_out_channels:
            _check_positive_int("block_out_channels entry", ch)
            if ch % self.norm_num_groups:
                raise ValueError(f"block_out_channels {self.block_out_channels} must be divisible by "
                                 f"norm_num_groups={self.norm_num_groups}.")
        n = len(self.block_out_channels)
        block_types = (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D"))
        for name, allowed in block_types:
            types = getattr(self, name)
            if len(types) != n:
                raise ValueError(f"{name} has {len(types)} entries but block_out_channels has {n}.")
            if any(t != allowed for t in types):
                raise ValueError(f"Unsupported VAE {name} {types}; only {allowed!r} is implemented.")
        if self.act_fn != "silu":
            raise ValueError(f"Unsupported VAE act_fn {self.act_fn!r}; only 'silu' is implemented.")
        if not values.check_float("VAEConfig.scaling_factor", self.scaling_factor) > 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor!r}.")
        if self.shift_factor is not None:
            values.check_float("VAEConfig.shift_factor", self.shift_factor)
        size = self.sample_size
        if size is not None and not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0
                                        for v in (size if isinstance(size, tuple) and size else (size,))):
            raise ValueError(f"VAEConfig.sample_size must be a positive integer or a [height, width] pair, "
                             f"got {size!r}.")
        for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"VAEConfig.{name} must be true or false, got {getattr(self, name)!r}.")
        for name in ("latents_mean", "latents_std"):
            stats = getattr(self, name)
            if stats is not None and not isinstance(stats, tuple):
                raise ValueError(f"VAEConfig.{name} must be a list of numbers or null, got {stats!r}.")
            for v in stats or ():
                values.check_float(f"VAEConfig.{name} entry", v)
            if stats is not None and len(stats) != self.latent_channels:
                raise ValueError(
                    f"{name} needs latent_channels={self.latent_channels} values, got {len(stats)}."
                )
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("latents_mean and latents_std must be given together.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VAEConfig:
        """Build from a diffusers VAE ``config.json`` dict, ignoring keys the model does not use."""
        if not isinstance(d, Mapping):
            raise TypeError(f"VAEConfig.from_dict expects a mapping, got {type(d).__name__}.")
        class_name = d.get("_class_name", "AutoencoderKL")
        if class_name not in ("AutoencoderKL", "FlaxAutoencoderKL"):
            raise ValueError(
                f"Unsupported VAE class {class_name!r}; only diffusers' AutoencoderKL is implemented."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> VAEConfig:
        """Read ``config.json`` (or the folder holding it); errors name the file."""
        return config_from_json(cls.from_dict, path)

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"VAEConfig.{name} must be a positive integer, got {value!r}.")


class LatentDistribution(NamedTuple):
    """Diagonal Gaussian posterior ``N(mean, exp(logvar))`` over NCHW latents (logvar within [-30, 20])."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        """``mean + std * ε`` with ``ε ~ N(0, I)`` drawn (in float32) from `key`."""
        eps = jax.random.normal(key, self.mean.shape, jnp.float32)
        return (self.mean.astype(jnp.float32) + self.std.astype(jnp.float32) * eps).astype(self.mean.dtype)


# ----------------------------------------------------------------------------------------------------------
# Scaling helpers (the UNet sees scaled latents)
# ----------------------------------------------------------------------------------------------------------


def scale_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
    """VAE latents → UNet latents: ``(x - shift_factor) * scaling_factor`` (shift 0 when unset).

    With per-channel ``latents_mean`` / ``latents_std`` in the config (as diffusers' SDXL pipelines):
    ``(x - mean) * scaling_factor / std``.
    """
    chex.assert_rank(latents, 4, custom_message="latents must be NCHW (B, C, h, w)")
    if config.latents_mean is not None:
        mean, std = _channel_stats(config, latents.dtype)
        return (latents - mean) * config.scaling_factor / std
    return (latents - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
    """Inverse of :func:`scale_latents`: UNet latents → what :meth:`AutoencoderKL.decode` expects."""
    chex.assert_rank(latents, 4, custom_message="latents must be NCHW (B, C, h, w)")
    if config.latents_mean is not None:
        mean, std = _channel_stats(config, latents.dtype)
        return latents * std / config.scaling_factor + mean
    return latents / config.scaling_factor + (config.shift_factor or 0.0)


def latents_from_encoding(dist: LatentDistribution, config: VAEConfig,
                          key: jax.Array | None = None) -> jax.Array:
    """Scaled UNet latents from :meth:`AutoencoderKL.encode`'s posterior: a sample if `key` is given, else
    its mean (mode)."""
    z = dist.mode() if key is None else dist.sample(key)
    return scale_latents(z, config)


def _channel_stats(config: VAEConfig, dtype: Any) -> tuple[jax.Array, jax.Array]:
    mean = jnp.asarray(config.latents_mean, dtype).reshape(1, -1, 1, 1)
    std = jnp.asarray(config.latents_std, dtype).reshape(1, -1, 1, 1)
    return mean, std


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    """KL autoencoder: :meth:`encode` images → :class:`LatentDistribution`, :meth:`decode` latents → images.

    Attributes:
      config: the VAE config.
      dtype: compute dtype (GroupNorm and the attention softmax always run in float32).
      decode_chunk_size: if set, :meth:`decode` runs this many samples at a time (sequentially, with
        ``lax.map``) to bound activation memory; the result equals unchunked decoding.
    """

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    decode_chunk_size: int | None = None

    def setup(self) -> None:
        cfg = self.config
        if self.decode_chunk_size is not None and self.decode_chunk_size <= 0:
            raise ValueError(
                f"decode_chunk_size must be a positive int or None, got {self.decode_chunk_size}."
            )
        self.encoder = _Encoder(cfg, self.dtype)
        self.decoder = _Decoder(cfg, self.dtype)
        z2 = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv(z2, (1, 1), dtype=self.dtype) if cfg.use_quant_conv else None
        self.post_quant_conv = (nn.Conv(cfg.latent_channels, (1, 1), dtype=self.dtype)
                                if cfg.use_post_quant_conv else None)

    def __call__(self, sample: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruct `sample`: decode the posterior mean, or a posterior sample when `key` is given."""
        dist = self.encode(sample)
        return self.decode(dist.mode() if key is None else dist.sample(key))

    def encode(self, sample: jax.Array) -> LatentDistribution:
        """Images ``(B, in_channels, H, W)`` in [-1, 1] → posterior over unscaled ``(B, 4, H/8, W/8)`` latents."""
        cfg = self.config
        chex.assert_rank(sample, 4, custom_message="VAE.encode expects NCHW images (B, C, H, W)")
        chex.assert_axis_dimension(sample, 1, cfg.in_channels,
                                   custom_message=f"VAE.encode expects {cfg.in_channels} channels (NCHW)")
        f = cfg.downscale_factor
        if sample.shape[2] % f or sample.shape[3] % f:
            raise ValueError(f"VAE.encode needs H and W divisible by {f}, got {sample.shape[2:]}.")
        h = self.encoder(_to_nhwc(sample).astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return LatentDistribution(_to_nchw(mean), _to_nchw(jnp.clip(logvar, *LOGVAR_RANGE)))

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents ``(B, latent_channels, h, w)`` → images ``(B, out_channels, 8h, 8w)`` ≈ [-1, 1]."""
        cfg = self.config
        chex.assert_rank(latents, 4, custom_message="VAE.decode expects NCHW latents (B, C, h, w)")
        chex.assert_axis_dimension(latents, 1, cfg.latent_channels,
                                   custom_message=f"VAE.decode expects {cfg.latent_channels} latent channels")
        chunk = self.decode_chunk_size
        if chunk is None or chunk >= latents.shape[0] or self.is_initializing():
            return self._decode(latents)
        # Sequential chunks: lax.map over a pure apply of an unbound copy of this module.
        plain = self.clone(parent=None, decode_chunk_size=None)
        variables = self.variables

        def decode_one(z: jax.Array) -> jax.Array:
            return plain.apply(variables, z[None], method=AutoencoderKL._decode)[0]

        return jax.lax.map(decode_one, latents, batch_size=chunk)

    def _decode(self, latents: jax.Array) -> jax.Array:
        z = _to_nhwc(latents).astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return _to_nchw(self.decoder(z))


def vae_param_shapes(config: VAEConfig) -> dict:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves (float32), without allocating anything (traced once
    per config: :func:`~perflow_jax.models.shape_cache.cached_param_shapes`)."""

    def trace() -> dict:
        size = 2 * config.downscale_factor
        images = jax.ShapeDtypeStruct((1, config.in_channels, size, size), jnp.float32)
        return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), images)["params"]

    return cached_param_shapes("vae", config, trace)


def load_vae(folder: str | os.PathLike, dtype: Any = None, variant: str | None = None,
             allow_pickle: bool = False) -> tuple[VAEConfig, dict]:
    """Read ``config.json`` and ``diffusion_pytorch_model[.variant].safetensors`` (or a converted
    ``flax_model.msgpack``) from a diffusers VAE folder.

    Returns ``(config, params)``, ``params`` being the ``"params"`` collection cast to `dtype` (default: keep
    the file's dtype).
    """
    folder = os.fspath(folder)
    config = VAEConfig.from_json(folder)
    params = load_params(folder, "diffusion_pytorch_model", vae_param_shapes(config), variant=variant,
                         allow_pickle=allow_pickle, rename=rename_torch_attention, dtype=dtype, what="AutoencoderKL")
    return config, jax.tree_util.tree_map(jnp.asarray, params)


def _to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def _to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


# ----------------------------------------------------------------------------------------------------------
# Encoder / decoder (NHWC; names follow diffusers' former Flax VAE)
# ----------------------------------------------------------------------------------------------------------


def _resnet(channels: int, config: VAEConfig, dtype: jnp.dtype, name: str) -> ResnetBlock2D:
    return ResnetBlock2D(channels, groups=config.norm_num_groups, eps=VAE_EPS, use_time_emb=False,
                         dtype=dtype, name=name)


class _Encoder(nn.Module):
    config: VAEConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        channels = cfg.block_out_channels
        x = conv2d(channels[0], 3, self.dtype, "conv_in")(x)
        for i, ch in enumerate(channels):
            x = _DownEncoderBlock(cfg, ch, cfg.layers_per_block, i < len(channels) - 1, self.dtype,
                                  name=f"down_blocks_{i}")(x)
        x = _MidBlock(cfg, self.dtype, name="mid_block")(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, VAE_EPS, name="conv_norm_out")(x))
        return conv2d(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(x)


class _Decoder(nn.Module):
    config: VAEConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        channels = tuple(reversed(cfg.block_out_channels))
        x = conv2d(channels[0], 3, self.dtype, "conv_in")(z)
        x = _MidBlock(cfg, self.dtype, name="mid_block")(x)
        for i, ch in enumerate(channels):
            x = _UpDecoderBlock(cfg, ch, cfg.layers_per_block + 1, i < len(channels) - 1, self.dtype,
                                name=f"up_blocks_{i}")(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, VAE_EPS, name="conv_norm_out")(x))
        return conv2d(cfg.out_channels, 3, self.dtype, "conv_out")(x)


class _DownEncoderBlock(nn.Module):
    config: VAEConfig
    out_channels: int
    num_layers: int
    add_downsample: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = _resnet(self.out_channels, self.config, self.dtype, f"resnets_{j}")(x)
        if self.add_downsample:  # diffusers' VAE: pad bottom/right by one, then a VALID stride-2 conv
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class _UpDecoderBlock(nn.Module):
    config: VAEConfig
    out_channels: int
    num_layers: int
    add_upsample: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = _resnet(self.out_channels, self.config, self.dtype, f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class _MidBlock(nn.Module):
    """resnet → (attention) → resnet at the lowest resolution."""

    config: VAEConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        ch = x.shape[-1]
        x = _resnet(ch, cfg, self.dtype, "resnets_0")(x)
        if cfg.mid_block_add_attention:
            x = _AttentionBlock(ch, cfg.norm_num_groups, self.dtype, name="attentions_0")(x)
        return _resnet(ch, cfg, self.dtype, "resnets_1")(x)


class _AttentionBlock(nn.Module):
    """Single-head spatial self-attention: ``(x + proj_attn(attn(group_norm(x)))) / rescale_output_factor``.

    The q/k/v/output projections (``query``, ``key``, ``value``, ``proj_attn``) live directly in this
    module's scope next to ``group_norm``, as in the former Flax VAE.
    """

    channels: int
    groups: int
    dtype: jnp.dtype
    rescale_output_factor: float = 1.0

    def setup(self) -> None:
        self.group_norm = GroupNorm(self.groups, VAE_EPS)
        self.attn = Attention(heads=1, head_dim=self.channels, qkv_bias=True, param_names=VAE_ATTENTION_NAMES,
                              dtype=self.dtype)
        nn.share_scope(self, self.attn)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.attn(self.group_norm(x).reshape(b, h * w, c)).reshape(b, h, w, c)
        out = x + y
        return out / self.rescale_output_factor if self.rescale_output_factor != 1.0 else out
