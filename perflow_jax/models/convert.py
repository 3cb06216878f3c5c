"""Weights → Flax params (and back), strictly: the one loader the UNet, VAE and CLIP share.

:func:`load_params` is the whole path of a component folder into a params tree:

1. :func:`perflow_jax.models.weights_io.read_weights` reads the folder's weights lazily (PyTorch safetensors,
   an opt-in pickle, or a converted Flax msgpack);
2. :class:`perflow_jax.models.keymap.TorchKeyIndex` and :func:`~perflow_jax.models.keymap.to_flax_layout` turn
   each PyTorch key and layout into its Flax path and layout;
3. every PyTorch key must be consumed and every Flax param filled with the right shape, or one
   :class:`~perflow_jax.models.mismatch.ConversionError` lists what is missing, unexpected and mis-shaped: for
   safetensors this is checked from the header alone, before any tensor is read;
4. each param is read once into a 64-byte-aligned host buffer (:mod:`perflow_jax.models.host_memory`), by
   :data:`LOAD_THREADS` threads.

:func:`torch_state_dict` / :func:`flax_to_torch` go the other way, with the same strict accounting.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from perflow_jax.models.host_memory import aligned_empty, host_array
from perflow_jax.models.keymap import TorchKeyIndex, to_flax_layout, to_torch_layout, torch_key, torch_layout_shape
from perflow_jax.models.mismatch import ConversionError, KeyMismatch, compare_shapes
from perflow_jax.models.weights_io import SafetensorsStateDict, Weights, read_flax_checkpoint, read_weights

__all__ = [
    "ConversionError",
    "check_flax_params",
    "flax_to_torch",
    "load_flax_checkpoint",
    "load_params",
    "param_shapes",
    "torch_state_dict",
    "torch_to_flax",
    "weights_to_params",
]

Path = tuple[str, ...]
Rename = Callable[[str], str]
_TORCH_LABELS = ("missing (Flax params with no PyTorch key)", "unexpected (PyTorch keys with no Flax param)",
                 "mis-shaped")


def param_shapes(target: Any) -> dict[Path, tuple[int, ...]]:
    """Flat ``path → shape`` of a (nested) params dict of arrays or ``ShapeDtypeStruct`` leaves."""
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(target)).items()}


# ----------------------------------------------------------------------------------------------------------
# PyTorch → Flax
# ----------------------------------------------------------------------------------------------------------


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    target: Any,
    *,
    rename: Rename | None = None,
    ignore: Iterable[str] = (),
    dtype: Any = None,
    what: str = "model",
) -> dict:
    """Map a PyTorch state dict onto the Flax param tree whose shapes `target` gives (e.g. from ``eval_shape``).

    Every key, path and shape is checked first (from the file header alone for a
    :class:`~perflow_jax.models.weights_io.SafetensorsStateDict`); only then are the tensors read, each once,
    by :data:`LOAD_THREADS` threads, straight into its 64-byte-aligned host buffer (a tensor whose layout or
    dtype changes goes through one reusable per-thread scratch buffer).

    Args:
      state_dict: PyTorch key → NumPy array (a lazy mapping is read one tensor at a time).
      target: a (nested) params dict of arrays or ``ShapeDtypeStruct`` — the structure to fill.
      rename: optional model-specific PyTorch-key rewrite applied before generic matching.
      ignore: regexes of PyTorch keys that are not parameters (buffers such as ``position_ids``).
      dtype: cast every array to this dtype (default: keep the file's dtype).
      what: model name used in error messages.

    Returns:
      The nested Flax params dict (64-byte-aligned NumPy arrays).
    """
    ignore_re = [re.compile(p) for p in ignore]
    shapes = param_shapes(target)
    index = TorchKeyIndex(shapes, rename)
    lazy = state_dict if isinstance(state_dict, SafetensorsStateDict) else None
    plan: dict[Path, str] = {}
    report = KeyMismatch()
    for key in state_dict:
        if any(r.search(key) for r in ignore_re):
            continue
        shape = lazy.info(key).shape if lazy is not None else tuple(np.shape(state_dict[key]))
        path = index.flax_path(key)
        if path is None:
            report.unexpected.append(f"{key} {shape}")
            continue
        want = shapes[path]
        if _layout_shape(shape, path[-1], want) != want:
            report.misshaped.append(f"{key}: file {shape} → expected Flax {'/'.join(path)} {want}")
            continue
        if path in plan:
            report.unexpected.append(f"{key} (duplicate of an already filled {'/'.join(path)})")
            continue
        plan[path] = key
    report.missing = [f"{'/'.join(p)} {shapes[p]}" for p in shapes if p not in plan]
    report.raise_if_any(f"The weights do not match the {what} architecture built from its config:",
                        labels=_TORCH_LABELS,
                        hint="Check that config.json belongs to these weights (same model family and sizes).")
    if lazy is None:
        return traverse_util.unflatten_dict(
            {p: host_array(to_flax_layout(np.asarray(state_dict[k]), p[-1], shapes[p]), dtype)
             for p, k in plan.items()})
    scratch = threading.local()

    def read(path: Path, key: str) -> np.ndarray:
        return _read_param(lazy, key, path[-1], shapes[path], dtype, scratch)

    with ThreadPoolExecutor(max(1, min(LOAD_THREADS, len(plan)))) as pool:
        arrays = list(pool.map(read, plan, plan.values()))  # largest tensors interleave; order kept
    return traverse_util.unflatten_dict(dict(zip(plan, arrays, strict=True)))


LOAD_THREADS = min(4, os.cpu_count() or 1)  # readers: the reads and copies release the GIL


def _layout_shape(shape: tuple[int, ...], leaf: str, want: tuple[int, ...]) -> tuple[int, ...]:
    """The shape :func:`to_flax_layout` gives a tensor of `shape`, computed on a zero-byte view."""
    return tuple(to_flax_layout(np.broadcast_to(np.empty((), np.uint8), shape), leaf, want).shape)


def _read_param(sd: SafetensorsStateDict, key: str, leaf: str, want: tuple[int, ...], dtype: Any,
                scratch: threading.local) -> np.ndarray:
    """One tensor of `sd` as the Flax leaf `leaf` of shape `want`: read straight into its aligned buffer when
    neither layout nor dtype changes, else into this thread's scratch buffer and re-laid / cast from there."""
    info = sd.info(key)
    if info.dtype is None:  # a dtype only safetensors' own reader knows
        return host_array(to_flax_layout(sd[key], leaf, want), dtype)
    probe = np.broadcast_to(np.empty((), info.dtype), info.shape)
    same_layout = to_flax_layout(probe, leaf, want) is probe
    if same_layout and (dtype is None or np.dtype(dtype) == info.dtype):
        return sd.read_into(key, aligned_empty(info.shape, info.dtype))
    nbytes = info.stop - info.start
    buf = getattr(scratch, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = scratch.buf = np.empty(nbytes, np.uint8)
    raw = sd.read_into(key, buf[:nbytes].view(info.dtype).reshape(info.shape))
    return host_array(to_flax_layout(raw, leaf, want), dtype)


# ----------------------------------------------------------------------------------------------------------
# Flax checkpoints (already in Flax layout)
# ----------------------------------------------------------------------------------------------------------


def check_flax_params(tree: Mapping, target: Any, dtype: Any = None, what: str = "model") -> dict:
    """`tree` (e.g. a restored msgpack checkpoint) checked against `target`'s paths and shapes, each leaf stored
    as a 64-byte-aligned host array cast to `dtype`."""
    got = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}
    compare_shapes({k: v.shape for k, v in got.items()}, param_shapes(target)).raise_if_any(
        f"The Flax checkpoint does not match the {what} architecture built from its config:")
    return traverse_util.unflatten_dict({k: host_array(v, dtype) for k, v in got.items()})


def load_flax_checkpoint(path: str | os.PathLike, target: Any, dtype: Any = None, what: str = "model") -> dict:
    """Read a Flax msgpack checkpoint and check it against `target`'s structure and shapes (strict)."""
    return check_flax_params(read_flax_checkpoint(path), target, dtype, what)


# ----------------------------------------------------------------------------------------------------------
# A component folder → params
# ----------------------------------------------------------------------------------------------------------


def weights_to_params(weights: Weights, target: Any, *, rename: Rename | None = None, ignore: Iterable[str] = (),
                      dtype: Any = None, what: str = "model") -> dict:
    """Turn :func:`~perflow_jax.models.weights_io.read_weights`' result into params for `target`, strictly.

    `ignore` regexes drop PyTorch keys; in a Flax checkpoint they drop the params whose PyTorch name
    (:func:`~perflow_jax.models.keymap.torch_key`) they match.
    """
    if weights.kind == "torch":
        return torch_to_flax(weights.tensors, target, rename=rename, ignore=ignore, dtype=dtype, what=what)
    tree = weights.tensors
    ignore_re = [re.compile(p) for p in ignore]
    if ignore_re:
        flat = traverse_util.flatten_dict(dict(tree))
        tree = traverse_util.unflatten_dict(
            {p: v for p, v in flat.items() if not any(r.search(torch_key(p)) for r in ignore_re)})
    return check_flax_params(tree, target, dtype, what)


def load_params(
    folder: str | os.PathLike,
    stem: str,
    target: Any | Callable[[Collection[str]], Any],
    *,
    variant: str | None = None,
    allow_pickle: bool = False,
    rename: Rename | None = None,
    ignore: Iterable[str] = (),
    dtype: Any = None,
    what: str = "model",
) -> dict:
    """Load the params of one model folder: ``flax_model[.variant].msgpack`` if present, else
    ``<stem>[.variant].safetensors`` (or a sharded index; a ``.bin`` only with `allow_pickle`).

    Args:
      folder: the model's folder (e.g. ``<pipeline>/unet``).
      stem: the weights file stem: ``diffusion_pytorch_model`` (diffusers) or ``model`` (transformers).
      target: the params tree to fill (arrays or ``ShapeDtypeStruct`` leaves), or a function of the file's
        top-level names returning it, for models whose exact tree depends on the file (CLIP with or without
        ``text_projection``).
      variant: weights variant such as ``"fp16"``.
      allow_pickle: allow a PyTorch pickle (needs torch; trusted files only).
      rename, ignore, dtype, what: as in :func:`torch_to_flax`.

    Raises:
      FileNotFoundError: no weights file; ConversionError: unreadable weights, a pickle without
        `allow_pickle`, or weights that do not fit `target` (all mismatches listed at once).
    """
    weights = read_weights(folder, stem, variant, allow_pickle)
    if callable(target):
        target = target(weights.tensors.keys())
    return weights_to_params(weights, target, rename=rename, ignore=ignore, dtype=dtype, what=what)


# ----------------------------------------------------------------------------------------------------------
# Flax → PyTorch
# ----------------------------------------------------------------------------------------------------------


def flax_to_torch(
    params: Mapping,
    torch_keys: Mapping[str, tuple[int, ...]],
    *,
    rename: Rename | None = None,
    what: str = "model",
) -> dict[str, np.ndarray]:
    """Inverse of :func:`torch_to_flax`: Flax params → PyTorch-layout arrays under `torch_keys`' names.

    `torch_keys` maps each PyTorch key to its shape (e.g. from a reference state dict or file header).
    """
    flat = traverse_util.flatten_dict(dict(params))
    index = TorchKeyIndex(flat, rename)
    out: dict[str, np.ndarray] = {}
    used: set[Path] = set()
    report = KeyMismatch()
    for key, tshape in torch_keys.items():
        path = index.flax_path(key)
        if path is None:
            report.missing.append(key)
            continue
        used.add(path)
        arr = to_torch_layout(np.asarray(flat[path]), path[-1], tuple(tshape))
        if tuple(arr.shape) != tuple(tshape):
            report.misshaped.append(f"{key}: Flax {'/'.join(path)} gives {arr.shape}, PyTorch wants {tuple(tshape)}")
            continue
        out[key] = arr
    report.unexpected = ["/".join(p) for p in flat if p not in used]
    report.raise_if_any(f"Flax {what} params do not map one-to-one onto the PyTorch keys:",
                        labels=("PyTorch keys with no Flax param", "Flax params with no PyTorch key", "mis-shaped"))
    return out


def torch_state_dict(params: Mapping, *, key: Rename = lambda k: k, rename: Rename | None = None, dtype: Any = None,
                     what: str = "model") -> dict[str, np.ndarray]:
    """Flax params → PyTorch-layout arrays named ``key(torch_key(path))``; `rename` maps a PyTorch key back to
    the Flax naming for :func:`flax_to_torch`'s strict matching (e.g. the VAE's ``to_q`` → ``query``)."""
    flat = traverse_util.flatten_dict(jax.device_get(dict(params)))
    keys = {key(torch_key(p)): torch_layout_shape(p[-1], np.shape(v)) for p, v in flat.items()}
    sd = flax_to_torch(traverse_util.unflatten_dict(flat), keys, rename=rename, what=what)
    return {k: np.ascontiguousarray(v.astype(dtype) if dtype is not None else v) for k, v in sd.items()}
