"""Stable Video Diffusion's VAE (diffusers ``AutoencoderKLTemporalDecoder``) in Flax.

The encoder is SD's (:mod:`perflow_jax.models.vae`'s, reused as is) with ``quant_conv``; there is no
``post_quant_conv``. The decoder decodes a clip: its resnets are
:class:`~perflow_jax.models.temporal_layers.SpatioTemporalResBlock` s (a 2-D resnet per frame blended with a
temporal resnet across the clip's frames) and a final (3, 1, 1) ``time_conv_out`` mixes neighbouring frames.
So a clip's frames depend on each other: decoding a video in chunks (diffusers' ``decode_chunk_size``) decodes
each chunk as its own clip, exactly as diffusers' pipeline does (:func:`decode_frames`).

Public tensors are NCHW like diffusers: images ``(N, 3, H, W)`` in [-1, 1], latents ``(N, 4, H/8, W/8)``.
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

from perflow_jax.models.config_io import config_from_json
from perflow_jax.models.convert import load_params
from perflow_jax.models.keymap import rename_torch_attention
from perflow_jax.models.layers import GroupNorm, Upsample2D, conv2d
from perflow_jax.models.shape_cache import cached_param_shapes
from perflow_jax.models.temporal_layers import SpatioTemporalResBlock, frames_view, temporal_conv
from perflow_jax.models.vae import VAE_EPS, LatentDistribution, VAEConfig, _AttentionBlock, _Encoder

Dtype = Any

__all__ = ["AutoencoderKLTemporalDecoder", "TemporalVAEConfig", "decode_frames", "load_temporal_vae",
           "temporal_vae_param_shapes"]


@dataclasses.dataclass(frozen=True)
class TemporalVAEConfig:
    """diffusers ``AutoencoderKLTemporalDecoder`` config (same names and defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True

    def __post_init__(self) -> None:
        _ = self.encoder_config  # validates the shared fields (channels, block types, groups)
        if self.layers_per_block < 2:
            raise ValueError(f"TemporalVAEConfig.layers_per_block={self.layers_per_block} is not supported: the "
                             "temporal decoder's mid-block attention only runs with 2 or more layers (SVD has 2).")

    @property
    def encoder_config(self) -> VAEConfig:
        """The equivalent SD VAE config, whose encoder is this model's encoder."""
        n = len(self.block_out_channels) if isinstance(self.block_out_channels, tuple) else 0
        return VAEConfig(in_channels=self.in_channels, out_channels=self.out_channels,
                         down_block_types=self.down_block_types, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                         latent_channels=self.latent_channels, norm_num_groups=32, sample_size=self.sample_size,
                         scaling_factor=self.scaling_factor, use_post_quant_conv=False)

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TemporalVAEConfig:
        """From a diffusers ``config.json`` dict, ignoring keys the model does not use."""
        class_name = d.get("_class_name", "AutoencoderKLTemporalDecoder")
        if class_name != "AutoencoderKLTemporalDecoder":
            raise ValueError(f"Unsupported video VAE class {class_name!r}; expected AutoencoderKLTemporalDecoder.")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TemporalVAEConfig:
        """Read ``config.json`` (or the folder holding it); errors name the file."""
        return config_from_json(cls.from_dict, path)


def _resnet(channels: int, num_frames: int, dtype: Dtype, name: str) -> SpatioTemporalResBlock:
    # The decoder's blocks: spatial eps 1e-6, temporal eps 1e-5, α = 1 − sigmoid(mix_factor), no time embedding.
    return SpatioTemporalResBlock(channels, num_frames, VAE_EPS, 1e-5, switch_mix=True, dtype=dtype, name=name)


class _TemporalDecoder(nn.Module):
    """diffusers ``TemporalDecoder`` on ``(N·F, h, w, C)`` latents → ``(N·F, 8h, 8w, out)`` images."""

    config: TemporalVAEConfig
    num_frames: int
    dtype: Dtype

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, f = self.config, self.num_frames
        channels = tuple(reversed(cfg.block_out_channels))
        x = conv2d(channels[0], 3, self.dtype, "conv_in")(z)
        x = _MidBlock(channels[0], f, self.dtype, name="mid_block")(x)
        for i, ch in enumerate(channels):
            x = _UpBlock(ch, cfg.layers_per_block + 1, i < len(channels) - 1, f, self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(GroupNorm(32, VAE_EPS, name="conv_norm_out")(x))
        x = conv2d(cfg.out_channels, 3, self.dtype, "conv_out")(x)
        video = temporal_conv(cfg.out_channels, 3, self.dtype, "time_conv_out")(frames_view(x, f))
        return video.reshape(x.shape)


class _UpBlock(nn.Module):
    """``UpBlockTemporalDecoder``: ``num_layers`` resnets, then an optional 2× ``upsamplers_0``."""

    channels: int
    num_layers: int
    add_upsample: bool
    num_frames: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = _resnet(self.channels, self.num_frames, self.dtype, f"resnets_{j}")(x)
        return Upsample2D(self.channels, self.dtype, name="upsamplers_0")(x) if self.add_upsample else x


class _MidBlock(nn.Module):
    """``MidBlockTemporalDecoder``: resnet, single-head spatial attention (``group_norm``, residual), resnet."""

    channels: int
    num_frames: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _resnet(self.channels, self.num_frames, self.dtype, "resnets_0")(x)
        x = _AttentionBlock(self.channels, 32, self.dtype, name="attentions_0")(x)
        return _resnet(self.channels, self.num_frames, self.dtype, "resnets_1")(x)


class AutoencoderKLTemporalDecoder(nn.Module):
    """SVD's VAE: :meth:`encode` images → :class:`~perflow_jax.models.vae.LatentDistribution`, :meth:`decode`
    ``num_frames``-frame clips of unscaled latents → images.

    Attributes:
      config: the :class:`TemporalVAEConfig`.
      num_frames: frames per clip in :meth:`decode` (its batch is a whole number of clips).
      dtype: compute dtype (GroupNorm and the attention softmax run in float32).
    """

    config: TemporalVAEConfig
    num_frames: int = 1
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = _Encoder(cfg.encoder_config, self.dtype)
        self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=self.dtype)
        self.decoder = _TemporalDecoder(cfg, self.num_frames, self.dtype)

    def __call__(self, sample: jax.Array) -> jax.Array:
        """Reconstruct `sample` (a clip of ``num_frames`` frames) from its posterior mean."""
        return self.decode(self.encode(sample).mode())

    def encode(self, sample: jax.Array) -> LatentDistribution:
        """Images ``(N, in_channels, H, W)`` in [-1, 1] → posterior over unscaled ``(N, 4, H/8, W/8)`` latents."""
        cfg = self.config
        chex.assert_rank(sample, 4, custom_message="Video VAE.encode expects NCHW images (N, C, H, W)")
        f = cfg.downscale_factor
        if sample.shape[1] != cfg.in_channels or sample.shape[2] % f or sample.shape[3] % f:
            raise ValueError(f"Video VAE.encode needs (N, {cfg.in_channels}, H, W) with H and W divisible by {f}, "
                             f"got {sample.shape}.")
        h = self.quant_conv(self.encoder(jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)))
        mean, logvar = jnp.split(h, 2, axis=-1)
        return LatentDistribution(jnp.transpose(mean, (0, 3, 1, 2)),
                                  jnp.transpose(jnp.clip(logvar, -30.0, 20.0), (0, 3, 1, 2)))

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents ``(N·num_frames, latent_channels, h, w)`` → images ``(N·num_frames, out, 8h, 8w)``."""
        cfg = self.config
        chex.assert_rank(latents, 4, custom_message="Video VAE.decode expects NCHW latents (N·F, C, h, w)")
        chex.assert_axis_dimension(latents, 1, cfg.latent_channels,
                                   custom_message=f"Video VAE.decode expects {cfg.latent_channels} latent channels")
        x = self.decoder(jnp.transpose(latents, (0, 2, 3, 1)).astype(self.dtype))
        return jnp.transpose(x, (0, 3, 1, 2))


def decode_frames(config: TemporalVAEConfig, params: Mapping, latents: jax.Array, chunk_size: int,
                  dtype: Dtype = jnp.float32) -> jax.Array:
    """Decode a video's unscaled latents ``(F, C, h, w)`` in clips of `chunk_size` frames (the last one shorter
    when `chunk_size` does not divide F), each clip on its own as diffusers' SVD pipeline does; returns
    ``(F, out, 8h, 8w)``. Traceable: one program per (F, chunk_size)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"decode_chunk_size must be a positive integer, got {chunk_size!r}.")
    frames = latents.shape[0]
    outs = []
    for start in range(0, frames, chunk_size):
        clip = latents[start:start + chunk_size]
        model = AutoencoderKLTemporalDecoder(config, clip.shape[0], dtype)
        outs.append(model.apply({"params": params}, clip, method=AutoencoderKLTemporalDecoder.decode))
    return jnp.concatenate(outs, axis=0)


def temporal_vae_param_shapes(config: TemporalVAEConfig) -> dict:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves (float32), traced once per config."""

    def trace() -> dict:
        size = 2 * config.downscale_factor
        images = jax.ShapeDtypeStruct((1, config.in_channels, size, size), jnp.float32)
        return jax.eval_shape(AutoencoderKLTemporalDecoder(config).init, jax.random.key(0), images)["params"]

    return cached_param_shapes("vae_temporal", config, trace)


def load_temporal_vae(folder: str | os.PathLike, dtype: Dtype | None = None, variant: str | None = None,
                      allow_pickle: bool = False) -> tuple[TemporalVAEConfig, dict]:
    """Read a diffusers ``AutoencoderKLTemporalDecoder`` folder (``config.json`` +
    ``diffusion_pytorch_model[.variant].safetensors``, or a converted ``flax_model.msgpack``), strictly."""
    folder = os.fspath(folder)
    config = TemporalVAEConfig.from_json(folder)
    params = load_params(folder, "diffusion_pytorch_model", temporal_vae_param_shapes(config), variant=variant,
                         allow_pickle=allow_pickle, rename=rename_torch_attention, dtype=dtype,
                         what="AutoencoderKLTemporalDecoder")
    return config, params
