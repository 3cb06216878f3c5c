"""PeRFlow ΔW (delta weights): load, merge into a UNet, extract from a merged UNet, export to PyTorch layout.

A released PeRFlow model is ΔW = W_perflow − W_base over a Stable Diffusion UNet, stored in PyTorch layout
with diffusers key names, either as ``delta_weights.safetensors`` or as a UNet-format folder
(``config.json`` + ``diffusion_pytorch_model[.variant].safetensors`` holding ΔW, optionally under ``unet/``).
Here ΔW lives as a Flax param tree shaped exactly like the UNet's params; key sets must match one-to-one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from perflow_jax.io import atomic_file
from perflow_jax.models.convert import torch_state_dict, torch_to_flax
from perflow_jax.models.mismatch import ConversionError, compare_shapes
from perflow_jax.models.weights_io import find_weights_file, load_state_dict
from perflow_jax.values import check_finite_arrays, check_float, check_float_tensor

DELTA_FILE = "delta_weights.safetensors"


def resolve_delta_file(path: str | os.PathLike, variant: str | None = None) -> str:
    """The safetensors file holding ΔW at `path` (a file, a folder with ``delta_weights.safetensors``, or a
    UNet-format folder, possibly with a ``unet/`` subfolder)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"ΔW path {path!r} does not exist.")
    if os.path.isfile(os.path.join(path, DELTA_FILE)):
        return os.path.join(path, DELTA_FILE)
    for folder in (path, os.path.join(path, "unet")):
        if os.path.isdir(folder):
            try:
                return find_weights_file(folder, "diffusion_pytorch_model", variant)
            except FileNotFoundError:
                pass
    raise FileNotFoundError(
        f"{path!r} holds no PeRFlow ΔW: expected {DELTA_FILE} or a UNet-format folder with "
        f"diffusion_pytorch_model{'.' + variant if variant else ''}.safetensors (optionally under unet/)."
    )


def load_delta(path: str | os.PathLike, unet_params: Mapping, variant: str | None = None,
               dtype: Any = None) -> dict:
    """Read ΔW (PyTorch layout) into a Flax tree shaped like `unet_params`; strict key accounting.

    Args:
      path: ``delta_weights.safetensors``, its folder, or a UNet-format ΔW folder.
      unet_params: the UNet's params (arrays or ShapeDtypeStructs): the structure ΔW must match.
      variant: weights variant of a UNet-format folder (e.g. ``"fp16"``).
      dtype: cast ΔW to this dtype (default: keep the file's).

    Raises:
      ConversionError (a ValueError): a file that cannot be read (truncated, not safetensors), or a ΔW whose
        keys and shapes do not fit this UNet (another model family). ValueError: a tensor that is not floating
        point (a bool ΔW would add 1 to every weight) or holds NaN/inf, also after the float32 cast.
    """
    file = resolve_delta_file(path, variant)
    state_dict = load_state_dict(file)  # an unreadable file is its own error, not a family mismatch
    for key, value in state_dict.items():
        check_float_tensor(value, file, key)
    try:
        return torch_to_flax(state_dict, unet_params, dtype=dtype, what="UNet (PeRFlow ΔW)")
    except ConversionError as e:
        raise ConversionError(f"The ΔW in {file!r} does not match this UNet; is it for this model family "
                              f"(SD1.5 / SD2.1 / SDXL)?\n{e}") from e


def _check_same_tree(a: Mapping, b: Mapping, what: str) -> None:
    """Raise one :class:`ConversionError` (a ValueError) listing every path and shape where `b` differs from `a`."""
    shapes = [{k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(t)).items()} for t in (a, b)]
    compare_shapes(shapes[1], shapes[0]).raise_if_any(
        f"{what}: parameter trees differ:", labels=("only in the first", "only in the second", "other shapes"))


def merge(unet_params: Mapping, delta: Mapping, scale: float = 1.0) -> dict:
    """W + scale·ΔW, added in float32 and cast back to each param's dtype.

    Raises ValueError for a non-finite `scale` and for a merge whose result is not finite (float32 overflow, or
    overflow of the params' own dtype, e.g. fp16).
    """
    scale = check_float("the ΔW scale", scale)
    _check_same_tree(unet_params, delta, "merge(unet_params, delta)")
    merged = jax.tree_util.tree_map(
        lambda w, d: (jnp.asarray(w, jnp.float32) + scale * jnp.asarray(d, jnp.float32)).astype(jnp.asarray(w).dtype),
        dict(unet_params), dict(delta))
    flat = traverse_util.flatten_dict(merged)
    check_finite_arrays((("/".join(p), v) for p, v in flat.items()), f"Merging ΔW (scale {scale}) into the UNet")
    return merged


def merger(path: str | os.PathLike, scale: float = 1.0) -> Callable[[Mapping], dict]:
    """``params -> params + scale·ΔW`` for the ΔW at `path`, read against the params it is given (for
    ``models.components.convert_to_flax(unet_transform=...)``)."""

    scale = check_float("the ΔW scale", scale)

    def apply(unet_params: Mapping) -> dict:
        return merge(unet_params, load_delta(path, unet_params), scale)

    return apply


def extract(merged: Mapping, base: Mapping) -> dict:
    """ΔW = merged − base in float32 (e.g. from a released merged PeRFlow UNet and its base model)."""
    _check_same_tree(merged, base, "extract(merged, base)")
    return jax.tree_util.tree_map(lambda m, b: jnp.asarray(m, jnp.float32) - jnp.asarray(b, jnp.float32),
                                  dict(merged), dict(base))


def torch_unet_state_dict(params: Mapping, dtype: Any = None) -> dict[str, np.ndarray]:
    """Flax UNet-shaped params (or ΔW) → a PyTorch-layout state dict with diffusers key names."""
    return torch_state_dict(params, dtype=dtype, what="UNet")


def export(delta: Mapping, path: str | os.PathLike, dtype: Any = None,
           metadata: dict[str, str] | None = None) -> str:
    """Write ΔW as PyTorch-layout safetensors with diffusers key names (atomic: temp file + rename).

    `path` is a ``.safetensors`` file or a folder (then ``<folder>/delta_weights.safetensors``). The file is
    what the PyTorch PeRFlow code's ``load_delta_weights_into_unet`` reads. Returns the file written.
    """
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, DELTA_FILE)
    sd = torch_unet_state_dict(jax.device_get(dict(delta)), dtype=dtype)
    with atomic_file(path) as tmp:
        save_file(sd, tmp, metadata={"format": "pt", **(metadata or {})})
    return path
