"""Saving generated images: PNG files written atomically, and a grid of a batch."""

from __future__ import annotations

import math
import os

import numpy as np

from perflow_jax.io import atomic_file


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile a batch of uint8 images (B, H, W[, C]) into one image, `ncols` wide (default ≈ √B), separated by
    `pad` pixels of value `fill`."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"make_grid needs a non-empty (B, H, W[, C]) batch, got shape {images.shape}.")
    b, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), fill, dtype=images.dtype)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
    return grid[..., 0] if c == 1 else grid


def save_png(image: np.ndarray, path: str | os.PathLike) -> str:
    """Write one uint8 image (H, W[, C]) as PNG via a temp file + rename, so no half-written file remains."""
    from PIL import Image

    path = os.fspath(path)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8 pixels, got {image.dtype}.")
    with atomic_file(path) as tmp:
        Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image).save(tmp,
                                                                                                       format="PNG")
    return path


def save_batch(images: np.ndarray, out_dir: str | os.PathLike, prefix: str = "image", start: int = 0
               ) -> list[str]:
    """Save each image of a batch as ``<prefix>_<index>.png`` in `out_dir`; returns the paths."""
    return [save_png(img, os.path.join(os.fspath(out_dir), f"{prefix}_{start + i:04d}.png"))
            for i, img in enumerate(np.asarray(images))]
