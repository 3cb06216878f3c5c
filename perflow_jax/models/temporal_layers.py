"""Video building blocks shared by the SVD UNet and its temporal VAE decoder, matching diffusers' PyTorch math.

Frames travel flattened into the batch, ``(B·F, H, W, C)`` NHWC, as in diffusers (``(B·F, C, H, W)`` there);
the temporal layers view them as ``(B, F, H, W, C)`` to mix along F:

* :func:`temporal_conv`: diffusers' ``Conv3d`` with kernel (k, 1, 1), a convolution over frames only (param
  ``kernel`` ``(k, 1, 1, Cin, Cout)``, PyTorch ``(Cout, Cin, k, 1, 1)``; :mod:`~perflow_jax.models.keymap` re-lays
  5-D kernels);
* :class:`TemporalResnetBlock`: diffusers' ``TemporalResnetBlock`` (GroupNorm over frames × pixels per group);
* :class:`AlphaBlender`: diffusers' ``AlphaBlender`` mixing spatial and temporal features with a learned
  ``mix_factor`` (a video, never an image batch: ``image_only_indicator`` is all zeros in SVD);
* :class:`SpatioTemporalResBlock`: a 2-D resnet per frame, then the temporal resnet, blended.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from perflow_jax.models.layers import GroupNorm, ResnetBlock2D

Dtype = Any
MergeStrategy = Literal["learned", "learned_with_images"]

__all__ = ["AlphaBlender", "SpatioTemporalResBlock", "TemporalResnetBlock", "frames_view", "temporal_conv"]


def frames_view(x: jax.Array, num_frames: int) -> jax.Array:
    """``(B·F, ...)`` → ``(B, F, ...)`` (frames of one video are consecutive, as in diffusers)."""
    if x.shape[0] % num_frames:
        raise ValueError(f"A batch of {x.shape[0]} frames is not a whole number of {num_frames}-frame videos.")
    return x.reshape(x.shape[0] // num_frames, num_frames, *x.shape[1:])


def temporal_conv(features: int, kernel: int, dtype: Dtype, name: str) -> nn.Conv:
    """diffusers' ``Conv3d(kernel_size=(k, 1, 1), padding=(k // 2, 0, 0))`` on ``(B, F, H, W, C)``."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, 1, 1), padding=((pad, pad), (0, 0), (0, 0)), dtype=dtype, name=name)


class TemporalResnetBlock(nn.Module):
    """diffusers ``TemporalResnetBlock`` on ``(B, F, H, W, C)``: a ResnetBlock with (3, 1, 1) convolutions.

    ``out = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(silu(temb)))))``, the
    GroupNorms (32 groups) over all frames and pixels of each group, ``temb`` ``(B, F, T)`` per frame.
    """

    out_channels: int
    eps: float = 1e-6
    use_time_emb: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.silu(GroupNorm(32, self.eps, name="norm1")(x))
        h = temporal_conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if self.use_time_emb:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, :, None, None, :]
        h = nn.silu(GroupNorm(32, self.eps, name="norm2")(h))
        h = temporal_conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = temporal_conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x.astype(h.dtype) + h


class AlphaBlender(nn.Module):
    """``α·spatial + (1 − α)·temporal`` with ``α = sigmoid(mix_factor)`` (param ``mix_factor`` ``(1,)``).

    ``switch`` (the temporal VAE decoder) uses ``1 − α`` instead. Both diffusers strategies used by SVD,
    ``learned`` and ``learned_with_images`` (a video: every frame is a video frame), give this α.
    """

    switch: bool = False
    init_alpha: float = 0.5

    @nn.compact
    def __call__(self, spatial: jax.Array, temporal: jax.Array) -> jax.Array:
        mix = self.param("mix_factor", nn.initializers.constant(self.init_alpha), (1,), jnp.float32)
        alpha = jax.nn.sigmoid(mix.astype(jnp.float32))
        if self.switch:
            alpha = 1.0 - alpha
        alpha = alpha.astype(spatial.dtype)
        return alpha * spatial + (1.0 - alpha) * temporal.astype(spatial.dtype)


class SpatioTemporalResBlock(nn.Module):
    """diffusers ``SpatioTemporalResBlock`` on ``(B·F, H, W, C)``: ``spatial_res_block`` (a 2-D resnet per
    frame), ``temporal_res_block`` across frames, blended by ``time_mixer``.

    ``temb`` is ``(B·F, T)`` (the UNet) or None (the VAE decoder: no time projections at all).
    """

    out_channels: int
    num_frames: int
    eps: float = 1e-6
    temporal_eps: float | None = None
    switch_mix: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        use_temb = temb is not None
        x = ResnetBlock2D(self.out_channels, 32, self.eps, use_time_emb=use_temb, dtype=self.dtype,
                          name="spatial_res_block")(x, temb)
        video = frames_view(x, self.num_frames)
        t = frames_view(temb, self.num_frames) if use_temb else None
        eps = self.eps if self.temporal_eps is None else self.temporal_eps
        h = TemporalResnetBlock(self.out_channels, eps, use_temb, self.dtype, name="temporal_res_block")(video, t)
        mixed = AlphaBlender(self.switch_mix, 0.0 if self.switch_mix else 0.5, name="time_mixer")(video, h)
        return mixed.reshape(x.shape)
