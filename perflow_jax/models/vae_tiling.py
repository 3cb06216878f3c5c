"""Tiled VAE encode and decode with blended tiles, so 1024² and 2048² images fit in memory.

The latent grid is cut into equal square tiles of ``tile`` latents that overlap by at least ``overlap`` latents
(the tile starts are spread evenly, so every tile has the same shape and one compiled body serves all of them
through ``lax.map``: memory is one tile's activations, not the image's). Each tile is encoded or decoded alone;
its output is weighted by a separable ramp that rises linearly across the overlap on every side shared with
another tile (weight 1 elsewhere), and the weighted tiles are summed and divided by the summed weights. The
result is a smooth cross-fade between neighbours, so tile seams do not show.

Tiled and untiled results differ where the VAE looks beyond a tile: its GroupNorms use per-tile statistics and
its mid-block attention sees one tile (as in diffusers' ``enable_tiling``); see docs/pipelines.md for the
measured difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.models.vae import AutoencoderKL, LatentDistribution

__all__ = ["blend_tiles", "tile_starts", "tiled_decode", "tiled_encode"]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of equal tiles of `tile` covering ``[0, size)`` with neighbours overlapping ≥ `overlap`."""
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return sorted({int(round(s)) for s in np.linspace(0, size - tile, n)})


def _ramp(length: int, ramp: int, rise: bool, fall: bool) -> np.ndarray:
    """A 1-D weight: linear from ~0 to 1 over the first `ramp` samples if `rise`, back down over the last
    `ramp` if `fall`, 1 in between (never 0, so every output pixel has weight)."""
    w = np.ones(length, np.float32)
    up = (np.arange(ramp, dtype=np.float32) + 0.5) / ramp
    if rise:
        w[:ramp] = np.minimum(w[:ramp], up)
    if fall:
        w[length - ramp:] = np.minimum(w[length - ramp:], up[::-1])
    return w


def blend_tiles(fn: Callable[[jax.Array], jax.Array], x: jax.Array, tile: int, overlap: int, in_scale: int,
                out_scale: int) -> jax.Array:
    """Apply `fn` tile by tile and blend: `x` (B, C, h·in_scale, w·in_scale) → (B, C', h·out_scale, w·out_scale),
    with tiles of `tile` × `tile` latents (h, w) overlapping by ≥ `overlap` latents.

    `fn` maps (B, C, tile·in_scale, tile·in_scale) to (B, C', tile·out_scale, tile·out_scale) and runs once per
    tile, sequentially (``lax.map``).
    """
    b, _, hh, ww = x.shape
    h, w = hh // in_scale, ww // in_scale
    tile_h, tile_w = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, tile_h, overlap), tile_starts(w, tile_w, overlap)
    corners = [(y, xx) for y in ys for xx in xs]
    tiles = jnp.stack([x[:, :, y * in_scale:(y + tile_h) * in_scale, xx * in_scale:(xx + tile_w) * in_scale]
                       for y, xx in corners])
    outs = jax.lax.map(fn, tiles)
    ramp = overlap * out_scale
    out = jnp.zeros((b, outs.shape[2], h * out_scale, w * out_scale), jnp.float32)
    total = np.zeros((h * out_scale, w * out_scale), np.float32)
    for k, (y, xx) in enumerate(corners):
        wy = _ramp(tile_h * out_scale, ramp, y > 0, y + tile_h < h)
        wx = _ramp(tile_w * out_scale, ramp, xx > 0, xx + tile_w < w)
        weight = np.outer(wy, wx)
        sy, sx = slice(y * out_scale, (y + tile_h) * out_scale), slice(xx * out_scale, (xx + tile_w) * out_scale)
        out = out.at[:, :, sy, sx].add(outs[k].astype(jnp.float32) * weight)
        total[sy, sx] += weight
    return (out / total).astype(outs.dtype)


def tiled_decode(vae: AutoencoderKL, params: dict, latents: jax.Array, tile: int, overlap: int) -> jax.Array:
    """:meth:`AutoencoderKL.decode` of unscaled latents (B, C, h, w), `tile` latents at a time, blended."""
    f = vae.config.downscale_factor

    def decode(z: jax.Array) -> jax.Array:
        return vae.apply({"params": params}, z, method=AutoencoderKL.decode)

    return blend_tiles(decode, latents, tile, overlap, 1, f)


def tiled_encode(vae: AutoencoderKL, params: dict, images: jax.Array, tile: int, overlap: int
                 ) -> LatentDistribution:
    """:meth:`AutoencoderKL.encode` of images (B, C, H, W) in [-1, 1], in tiles of `tile` latents; the posterior
    mean and log-variance are blended."""
    f = vae.config.downscale_factor

    def encode(x: jax.Array) -> jax.Array:
        dist = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
        return jnp.concatenate([dist.mean, dist.logvar], axis=1)

    moments = blend_tiles(encode, images, tile, overlap, f, 1)
    mean, logvar = jnp.split(moments, 2, axis=1)
    return LatentDistribution(mean, logvar)
