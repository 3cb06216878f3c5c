"""The conditioning image of Stable Video Diffusion: checks, and its two views (CLIP pixels, VAE pixels).

diffusers' ``StableVideoDiffusionPipeline`` does not use CLIP's usual preprocessing for the image embedding: it
blurs the [-1, 1] image with a Gaussian (σ = (scale − 1)/2 per axis, reflect padding: an anti-aliasing
filter), resizes it to 224×224 bicubically with ``align_corners=True`` (PyTorch's kernel, a = −0.75, clamped
borders), maps it back to [0, 1] and normalises with the feature extractor's mean/std (no crop, no clip to
[0, 1]). Both filters are separable linear maps, built here once per image size as float32 matrices (host
side, from PyTorch's float32 formulas) and applied inside the jitted program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_image", "clip_pixels", "resize_matrices", "vae_pixels"]

_A = np.float32(-0.75)  # PyTorch's bicubic coefficient


def check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    """An RGB ``(H, W, 3)`` uint8 (or float in [0, 1]) image with H and W multiples of 8, as float32 [0, 1].

    Raises one-line ``ValueError`` s naming `what` for another mode (gray, RGBA), a size the VAE cannot
    encode, or non-finite values."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{what} must be an RGB image (H, W, 3), got shape {image.shape}; convert it to RGB.")
    h, w = image.shape[:2]
    if h < 8 or w < 8 or h % 8 or w % 8:
        raise ValueError(f"{what} is {w}×{h}; SVD needs a width and height that are multiples of 8 "
                         "(e.g. 1024×576): resize or crop it.")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"{what} must be uint8 or float in [0, 1], got dtype {image.dtype}.")
    if not np.isfinite(image).all():
        raise ValueError(f"{what} has NaN or infinite values.")
    return image.astype(np.float32)


def _gaussian_matrix(n: int, sigma: float, size: int) -> np.ndarray:
    """``(n, n)`` matrix of a 1-D Gaussian blur of window `size` with reflect padding (kornia's filter2d)."""
    x = np.arange(size, dtype=np.float32) - np.float32(size // 2)
    if size % 2 == 0:
        x = x + np.float32(0.5)
    g = np.exp(-(x * x) / (np.float32(2.0) * np.float32(sigma) ** 2)).astype(np.float32)
    g = g / g.sum(dtype=np.float32)
    front = (size - 1) // 2
    m = np.zeros((n, n), np.float32)
    for i in range(n):
        for k in range(size):
            j = i + k - front
            j = -j if j < 0 else (2 * (n - 1) - j if j > n - 1 else j)  # reflect (no edge repeat)
            m[i, j] += g[k]
    return m


def _cubic_weights(t: np.float32) -> list[np.float32]:
    def near(x: np.float32) -> np.float32:  # |x| ≤ 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x: np.float32) -> np.float32:  # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    one = np.float32(1.0)
    return [far(t + one), near(t), near(one - t), far(np.float32(2.0) - t)]


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix of PyTorch's bicubic resize with ``align_corners=True`` along one axis."""
    scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0.0)
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        real = scale * np.float32(i)
        x0 = int(np.floor(real))
        for k, w in enumerate(_cubic_weights(np.float32(real - np.float32(x0)))):
            m[i, min(max(x0 - 1 + k, 0), n_in - 1)] += w
    return m


@functools.lru_cache(maxsize=16)
def resize_matrices(height: int, width: int, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """(rows ``(size, height)``, columns ``(size, width)``): diffusers' ``_resize_with_antialiasing`` to
    ``size``×``size`` (Gaussian blur, then bicubic) as two matrices."""
    mats = []
    for n in (height, width):
        sigma = max((n / size - 1.0) / 2.0, 0.001)
        k = int(max(2.0 * 2 * sigma, 3))
        k += 1 - k % 2  # odd window
        mats.append(_bicubic_matrix(n, size) @ _gaussian_matrix(n, float(np.float32(sigma)), k))
    return mats[0], mats[1]


def clip_pixels(image: jax.Array, mean: tuple[float, ...], std: tuple[float, ...], size: int = 224) -> jax.Array:
    """``(B, H, W, 3)`` [0, 1] images → the image encoder's ``(B, 3, size, size)`` pixel values (float32)."""
    rows, cols = resize_matrices(image.shape[1], image.shape[2], size)
    x = image.astype(jnp.float32) * 2.0 - 1.0
    x = jnp.einsum("ph,bhwc->bpwc", rows, x, precision="highest")
    x = jnp.einsum("qw,bpwc->bpqc", cols, x, precision="highest")
    x = (x + 1.0) / 2.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return jnp.transpose(x, (0, 3, 1, 2))


def vae_pixels(image: jax.Array) -> jax.Array:
    """``(B, H, W, 3)`` [0, 1] images → the VAE's ``(B, 3, H, W)`` [-1, 1] input."""
    return jnp.transpose(image.astype(jnp.float32) * 2.0 - 1.0, (0, 3, 1, 2))
