"""PyTorch ↔ Flax parameter names and layouts, one key at a time (no files, no whole trees).

Names are matched generically: a PyTorch key ``down_blocks.0.resnets.1.conv1.weight`` and a Flax path
``down_blocks_0/resnets_1/conv1/kernel`` (or transformers' ``layers/0/...``) normalise to the same string, so
one rule covers UNet, VAE and CLIP. A PyTorch ``weight`` is a Flax ``kernel`` (Dense, Conv), ``scale`` (norms)
or ``embedding`` (Embed). Layouts: conv kernels OIHW ↔ HWIO (3-D: OIDHW ↔ DHWIO), linear weights (out, in) ↔
(in, out), and 1×1 convs ↔ linears where one side uses the other. Model-specific renames (the VAE attention's
``to_q`` ↔ ``query`` …) are plain ``str → str`` functions applied to PyTorch keys before the generic match.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import numpy as np

from perflow_jax.models.layers import VAE_ATTENTION_NAMES

__all__ = [
    "WEIGHT_LEAVES",
    "TorchKeyIndex",
    "flax_attention_to_torch",
    "normalize_key",
    "rename_torch_attention",
    "to_flax_layout",
    "to_torch_layout",
    "torch_key",
    "torch_layout_shape",
]

Path = tuple[str, ...]
WEIGHT_LEAVES = ("kernel", "scale", "embedding")  # the Flax leaves a PyTorch ``weight`` can be

_NUMBERED = re.compile(r"_(\d+)(?=\.|$)")
_LIST_SUFFIX = re.compile(r"^(?!linear_)(.+)_(\d+)$")  # down_blocks_0 → down_blocks.0; linear_1 stays


# ----------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------


def normalize_key(key: str) -> str:
    """``down_blocks_0.resnets_1`` and ``down_blocks.0.resnets.1`` both → ``down_blocks.0.resnets.1``."""
    return _NUMBERED.sub(r".\1", key)


def torch_key(path: Path) -> str:
    """The diffusers PyTorch key of a Flax param path: ``down_blocks_0/.../kernel`` → ``down_blocks.0....weight``.

    Numbered module lists (``name_N``) become ``name.N``, except diffusers' ``linear_1``/``linear_2`` layers.
    """
    *mods, leaf = path
    parts = [m if (mm := _LIST_SUFFIX.match(m)) is None else f"{mm.group(1)}.{mm.group(2)}" for m in mods]
    return ".".join(parts + ["weight" if leaf in WEIGHT_LEAVES else leaf])


class TorchKeyIndex:
    """Finds the Flax param path a PyTorch key belongs to, among a fixed set of Flax paths.

    `rename` is the model-specific rewrite of PyTorch keys applied before the generic match (e.g.
    :func:`rename_torch_attention` for the VAE); a key with no Flax path gives ``None``.
    """

    def __init__(self, paths: Iterable[Path], rename: Callable[[str], str] | None = None):
        self._by_norm = {normalize_key(".".join(p)): p for p in paths}
        self._rename = rename

    def flax_path(self, key: str) -> Path | None:
        k = self._rename(key) if self._rename else key
        stem, _, leaf = k.rpartition(".")
        for cand in WEIGHT_LEAVES if leaf == "weight" else (leaf,):
            path = self._by_norm.get(normalize_key(f"{stem}.{cand}"))
            if path is not None:
                return path
        return None


# The VAE's mid-block attention keeps the former Flax VAE's names (VAE_ATTENTION_NAMES: query, key, ...).
_ATTN_TO_FLAX = dict(zip(("to_q", "to_k", "to_v", "to_out.0"), VAE_ATTENTION_NAMES, strict=True))
_ATTN_TO_TORCH = {v: k for k, v in _ATTN_TO_FLAX.items()}
_TORCH_ATTN = re.compile(r"\.(" + "|".join(map(re.escape, _ATTN_TO_FLAX)) + r")\.")
_FLAX_ATTN = re.compile(r"\.(" + "|".join(map(re.escape, _ATTN_TO_TORCH)) + r")\.")


def rename_torch_attention(key: str) -> str:
    """PyTorch attention key → the VAE's Flax names: ``...to_q.weight`` → ``...query.weight`` (and
    ``to_k``→``key``, ``to_v``→``value``, ``to_out.0``→``proj_attn``). Pass as ``rename=`` when loading a VAE."""
    return _TORCH_ATTN.sub(lambda m: f".{_ATTN_TO_FLAX[m.group(1)]}.", key)


def flax_attention_to_torch(key: str) -> str:
    """Inverse of :func:`rename_torch_attention`: ``...query.weight`` → ``...to_q.weight`` and so on."""
    return _FLAX_ATTN.sub(lambda m: f".{_ATTN_TO_TORCH[m.group(1)]}.", key)


# ----------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------


def to_flax_layout(value: np.ndarray, leaf: str, shape: tuple[int, ...]) -> np.ndarray:
    """Re-lay a PyTorch tensor for the Flax leaf `leaf` of shape `shape` (a view; unchanged if not a kernel)."""
    if leaf == "kernel":
        if value.ndim == 5:  # conv3d OIDHW → DHWIO
            value = value.transpose(2, 3, 4, 1, 0)
        elif value.ndim == 4:  # conv OIHW → HWIO
            value = value.transpose(2, 3, 1, 0)
            if len(shape) == 2 and value.shape[:2] == (1, 1):  # 1×1 conv → linear
                value = value[0, 0]
        elif value.ndim == 2:  # linear (out, in) → (in, out)
            value = value.T
            if len(shape) == 4:  # linear → 1×1 conv
                value = value[None, None]
    return value


def to_torch_layout(value: np.ndarray, leaf: str, torch_shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`to_flax_layout`: a Flax leaf re-laid for a PyTorch tensor of shape `torch_shape`."""
    if leaf == "kernel":
        if value.ndim == 5:  # conv3d DHWIO → OIDHW
            value = value.transpose(4, 3, 0, 1, 2)
        elif value.ndim == 4:  # conv HWIO → OIHW
            value = value.transpose(3, 2, 0, 1)
            if len(torch_shape) == 2:  # 1×1 conv → linear
                value = value[:, :, 0, 0]
        elif value.ndim == 2:  # linear (in, out) → (out, in)
            value = value.T
            if len(torch_shape) == 4:  # linear → 1×1 conv
                value = value[:, :, None, None]
    return value


def torch_layout_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a Flax leaf: conv HWIO → OIHW, linear (in, out) → (out, in), others unchanged."""
    if leaf == "kernel" and len(shape) == 5:
        return (shape[4], shape[3], shape[0], shape[1], shape[2])
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)
