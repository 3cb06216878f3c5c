"""PeRFlow-Refiner: upscale generated images with a Tile ControlNet (the reference's ``scripts/sd15_controlnet.py``).

As the reference does it: the images are resized with a Lanczos-4 filter (OpenCV's ``INTER_LANCZOS4``, what
``controlnet_aux.util.resize_image`` uses when enlarging) so their short side is ``scale`` times larger, both
sides rounded to multiples of 64; the result is both the init image and the control image of a ControlNet
img2img run at strength 1.0 (the whole schedule) with the ΔW-merged UNet and the Tile ControlNet, at diffusers'
img2img default conditioning scale 0.8 (the reference passes none). Large outputs
fit in memory with the pipeline's ``vae_tile_size`` (tiled VAE encode/decode, :mod:`perflow_jax.models.vae_tiling`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from perflow_jax import values

if TYPE_CHECKING:
    from perflow_jax.pipelines.controlnet import StableDiffusionControlNetPipeline

__all__ = ["DEFAULT_STRENGTH", "lanczos_resize", "refine", "refine_size"]

DEFAULT_STRENGTH = 1.0  # the reference refines from pure noise under the Tile ControlNet
SIZE_MULTIPLE = 64  # controlnet_aux rounds both sides to multiples of 64


def refine_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The refined (height, width): short side × `scale`, both sides scaled alike and rounded to multiples of 64
    (``controlnet_aux.util.resize_image`` with ``resolution = scale · min(H, W)``)."""
    h, w = (int(np.round(v * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE for v in (height, width))
    if h < SIZE_MULTIPLE or w < SIZE_MULTIPLE:
        raise ValueError(f"Refining {height}×{width} by {scale} gives a side under {SIZE_MULTIPLE} pixels; raise "
                         "the scale.")
    return h, w


def _lanczos4_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) float64 resampling weights along one axis: OpenCV's pixel-centre mapping
    ``x_src = (x_dst + 0.5)·src/dst − 0.5``, 8 taps ``sinc(d)·sinc(d/4)`` normalised to sum 1, edges replicated."""
    pos = (np.arange(dst) + 0.5) * (src / dst) - 0.5
    left = np.floor(pos).astype(int)
    taps = left[:, None] + np.arange(-3, 5)[None, :]
    d = pos[:, None] - taps
    w = np.sinc(d) * np.sinc(d / 4)
    w /= w.sum(axis=1, keepdims=True)
    m = np.zeros((dst, src))
    np.add.at(m, (np.repeat(np.arange(dst), 8), np.clip(taps, 0, src - 1).ravel()), w.ravel())
    return m


def lanczos_resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize NHWC (or HWC) images to `height` × `width` with the Lanczos-4 filter (float64 math); uint8 stays
    uint8 (rounded, saturated), floats are clipped to [0, 1]."""
    arr = np.asarray(images)
    out = np.einsum("yh,...hwc,xw->...yxc", _lanczos4_matrix(arr.shape[-3], height), arr.astype(np.float64),
                    _lanczos4_matrix(arr.shape[-2], width))
    if arr.dtype == np.uint8:
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def refine(pipe: StableDiffusionControlNetPipeline, images: np.ndarray, prompt: str | Sequence[str],
           negative_prompt: str | Sequence[str] | None = None, *, scale: float = 2, strength: float = DEFAULT_STRENGTH,
           **kwargs: Any) -> np.ndarray:
    """Upscale `images` (NHWC uint8 or float in [0, 1]) by `scale` with `pipe`'s (Tile) ControlNet: Lanczos-4
    resize to :func:`refine_size`, then :meth:`~StableDiffusionControlNetPipeline.img2img` with the resized images
    as init and control images at `strength`. Other arguments as ``img2img``."""
    scale = values.check_float("scale", scale, min_value=1.0)
    arr = np.asarray(images)
    if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ValueError(f"refine images must be (H, W, 3) or (B, H, W, 3) RGB, got shape {arr.shape}.")
    height, width = refine_size(arr.shape[-3], arr.shape[-2], scale)
    up = lanczos_resize(arr, height, width)
    return pipe.img2img(prompt, up, up, strength=strength, negative_prompt=negative_prompt, **kwargs)
