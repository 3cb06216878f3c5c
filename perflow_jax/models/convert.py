"""PyTorch (diffusers / transformers) state dicts → Flax params, with strict key accounting.

Weights are read with ``safetensors.numpy`` (no torch). Names are matched generically: a PyTorch key
``down_blocks.0.resnets.1.conv1.weight`` and a Flax path ``down_blocks_0/resnets_1/conv1/kernel`` (or
transformers' ``layers/0/...``) normalise to the same string, so one rule covers UNet, VAE and CLIP.
Layouts: conv kernels OIHW → HWIO, linear weights (out, in) → (in, out), norm ``weight`` → ``scale``,
embedding ``weight`` → ``embedding``. Every PyTorch key must be consumed and every Flax param filled with
the right shape, or :class:`ConversionError` lists what is missing, unexpected and mis-shaped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

_NUMBERED = re.compile(r"_(\d+)(?=\.|$)")
_LIST_SUFFIX = re.compile(r"^(?!linear_)(.+)_(\d+)$")  # down_blocks_0 → down_blocks.0; linear_1 stays
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")
_LIST_LIMIT = 20


class ConversionError(ValueError):
    """Raised when a PyTorch state dict does not map one-to-one onto a Flax parameter tree."""


# ----------------------------------------------------------------------------------------------------------
# Reading weights
# ----------------------------------------------------------------------------------------------------------


def _unreadable(path: str, e: Exception) -> ConversionError:
    return ConversionError(
        f"Could not read {path!r} as safetensors ({type(e).__name__}: {e}). The file may be truncated or "
        "not a safetensors file; download it again or re-export it with save_pretrained."
    )


_REMAP_BYTES = 256 * 2**20


def _open_safetensors(path: str) -> Any:
    """safetensors' NumPy reader for `path`; a truncated or foreign file raises :class:`ConversionError`."""
    from safetensors import safe_open

    try:  # safetensors raises its own error types for truncated/corrupt headers
        return safe_open(path, framework="numpy")
    except Exception as e:
        raise _unreadable(path, e) from e


class SafetensorsStateDict(Mapping):
    """The tensors of one or more ``.safetensors`` files as a read-only mapping, each read on access with
    safetensors' NumPy API. A conversion that walks it holds one PyTorch tensor at a time next to the
    converted params, not a whole second copy of the model (SD1.5's UNet: 3.3 GiB)."""

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self._files: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        self._mapped: dict[str, int] = {}
        for path in map(os.fspath, paths):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Weights file {path!r} does not exist.")
            self._files[path] = handle = _open_safetensors(path)
            self._where.update(dict.fromkeys(handle.keys(), path))

    def __getitem__(self, key: str) -> np.ndarray:
        path = self._where[key]
        try:
            value = self._files[path].get_tensor(key)
        except Exception as e:
            raise _unreadable(path, e) from e
        # The file is memory-mapped and every page read stays resident (counted in RSS) until it is unmapped:
        # reopen now and then so a whole-model walk keeps at most ~_REMAP_BYTES of it mapped.
        self._mapped[path] = self._mapped.get(path, 0) + value.nbytes
        if self._mapped[path] > _REMAP_BYTES:
            self._files[path], self._mapped[path] = _open_safetensors(path), 0
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read one ``.safetensors`` file into NumPy arrays (fp16/bf16 kept as stored)."""
    return dict(SafetensorsStateDict([path]))


def _read_pickle(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    if not allow_pickle:
        raise ConversionError(
            f"{path!r} is a PyTorch pickle (.bin). Pickles can run arbitrary code when loaded and need torch; "
            "pass allow_pickle=True (with torch installed) if you trust the file, or convert it to "
            "safetensors first."
        )
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"Reading {path!r} needs torch, which is not installed.") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()) for k, v in sd.items()}


def find_weights_file(folder: str, stem: str, variant: str | None = None) -> str:
    """Locate ``stem[.variant].safetensors`` (or its sharded ``.index.json``, or a ``.bin``) in `folder`."""
    v = f".{variant}" if variant else ""
    candidates = [
        f"{stem}{v}.safetensors",
        f"{stem}.safetensors{'.index' + v if v else '.index'}.json",
        f"{stem}{v}.safetensors.index.json",
        f"{stem}.safetensors.index{v}.json",
        f"{stem}{v}.bin",
    ]
    for name in candidates:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    raise FileNotFoundError(
        f"No weights named {stem}{v}.safetensors (or a sharded index / .bin) in {folder!r}; found {present}. "
        + ("Check the variant name, or omit variant to use the full-precision file." if variant else "")
    )


def load_state_dict(path: str | os.PathLike, allow_pickle: bool = False,
                    lazy: bool = False) -> Mapping[str, np.ndarray]:
    """Read a state dict from a ``.safetensors`` file, a sharded ``*.index.json``, or (opt-in) a ``.bin``.

    ``lazy=True`` returns a :class:`SafetensorsStateDict` for safetensors (tensors read on access), else a
    dict of NumPy arrays.
    """
    path = os.fspath(path)
    if path.endswith(".bin") or path.endswith(".pt") or path.endswith(".ckpt"):
        return _read_pickle(path, allow_pickle)
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        if "weight_map" not in index:
            raise ConversionError(f"{path!r} has no 'weight_map'; it is not a sharded safetensors index.")
        folder = os.path.dirname(path)
        files = [os.path.join(folder, shard) for shard in sorted(set(index["weight_map"].values()))]
        out = SafetensorsStateDict(files)
        missing = sorted(set(index["weight_map"]) - set(out))
        if missing:
            raise ConversionError(f"Shards listed in {path!r} lack {len(missing)} keys, e.g. {missing[:5]}.")
    else:
        out = SafetensorsStateDict([path])
    return out if lazy else dict(out)


# ----------------------------------------------------------------------------------------------------------
# Matching names and layouts
# ----------------------------------------------------------------------------------------------------------


def normalize_key(key: str) -> str:
    """``down_blocks_0.resnets_1`` and ``down_blocks.0.resnets.1`` both → ``down_blocks.0.resnets.1``."""
    return _NUMBERED.sub(r".\1", key)


def to_flax_layout(value: np.ndarray, leaf: str, shape: tuple[int, ...]) -> np.ndarray:
    """Re-lay a PyTorch tensor for the Flax leaf `leaf` of shape `shape` (returns value unchanged if unknown)."""
    if leaf == "kernel":
        if value.ndim == 4:  # conv OIHW → HWIO
            value = value.transpose(2, 3, 1, 0)
            if len(shape) == 2 and value.shape[:2] == (1, 1):  # 1×1 conv → linear
                value = value[0, 0]
        elif value.ndim == 2:  # linear (out, in) → (in, out)
            value = value.T
            if len(shape) == 4:  # linear → 1×1 conv
                value = value[None, None]
    return value


def _to_torch_layout(value: np.ndarray, leaf: str, torch_shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
            if len(torch_shape) == 2:
                value = value[:, :, 0, 0]
        elif value.ndim == 2:
            value = value.T
            if len(torch_shape) == 4:
                value = value[:, :, None, None]
    return value


def format_key_list(title: str, items: list[str]) -> str:
    shown = "\n    ".join(items[:_LIST_LIMIT])
    more = f"\n    ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


_ALIGN = 64  # bytes: XLA:CPU adopts 64-byte-aligned, C-contiguous host buffers in place (device_put copies nothing)
_COPY_BAND = 64  # last-axis band width when re-laying a transposed tensor


def host_array(value: np.ndarray, dtype: Any = None) -> np.ndarray:
    """A C-contiguous, 64-byte-aligned copy of `value` (cast to `dtype` if given).

    Converted params are stored this way so that placing them on a CPU device reuses the buffer instead of
    copying the whole model again (about 10 s and a second copy of the weights for SD1.5).
    """
    value = np.asarray(value)
    dtype = value.dtype if dtype is None else np.dtype(dtype)
    nbytes = value.size * dtype.itemsize
    buf = np.empty(nbytes + _ALIGN, np.uint8)
    start = -buf.ctypes.data % _ALIGN
    out = buf[start:start + nbytes].view(dtype).reshape(value.shape)
    if value.flags.c_contiguous or value.ndim == 0:
        np.copyto(out, value, casting="unsafe")
    else:  # a transposed PyTorch layout: bands of the last axis read whole source rows (~4× faster for linears)
        for j in range(0, value.shape[-1], _COPY_BAND):
            np.copyto(out[..., j:j + _COPY_BAND], value[..., j:j + _COPY_BAND], casting="unsafe")
    return out


def _flatten_shapes(target: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], Any]]:
    flat = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda x: x, dict(target)))
    return {k: (tuple(v.shape), v.dtype) for k, v in flat.items()}


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    target: Any,
    *,
    rename: Callable[[str], str] | None = None,
    ignore: Iterable[str] = (),
    dtype: Any = None,
    what: str = "model",
) -> dict:
    """Map a PyTorch state dict onto the Flax param tree whose shapes `target` gives (e.g. from ``eval_shape``).

    Args:
      state_dict: PyTorch key → NumPy array.
      target: a (nested) params dict of arrays or ``ShapeDtypeStruct`` — the structure to fill.
      rename: optional model-specific PyTorch-key rewrite applied before generic matching.
      ignore: regexes of PyTorch keys that are not parameters (buffers such as ``position_ids``).
      dtype: cast every array to this dtype (default: keep the file's dtype).
      what: model name used in error messages.

    Returns:
      The nested Flax params dict (NumPy arrays).
    """
    ignore_re = [re.compile(p) for p in ignore]
    shapes = _flatten_shapes(target)
    # normalised "a.0.b.kernel" → flax path
    by_norm: dict[str, tuple[str, ...]] = {normalize_key(".".join(p)): p for p in shapes}

    filled: dict[tuple[str, ...], np.ndarray] = {}
    unexpected: list[str] = []
    misshaped: list[str] = []
    for key, value in state_dict.items():
        if any(r.search(key) for r in ignore_re):
            continue
        k = rename(key) if rename else key
        stem, _, leaf = k.rpartition(".")
        leaves = _WEIGHT_LEAVES if leaf == "weight" else (leaf,)
        path = None
        for cand in leaves:
            path = by_norm.get(normalize_key(f"{stem}.{cand}"))
            if path is not None:
                break
        if path is None:
            unexpected.append(f"{key} {tuple(value.shape)}")
            continue
        want_shape, _ = shapes[path]
        arr = to_flax_layout(np.asarray(value), path[-1], want_shape)
        if tuple(arr.shape) != want_shape:
            misshaped.append(f"{key}: file {tuple(value.shape)} → expected Flax {'/'.join(path)} {want_shape}")
            continue
        if path in filled:
            unexpected.append(f"{key} (duplicate of an already filled {'/'.join(path)})")
            continue
        filled[path] = host_array(arr, dtype)

    missing = [f"{'/'.join(p)} {shapes[p][0]}" for p in shapes if p not in filled]
    if missing or unexpected or misshaped:
        parts = [f"The weights do not match the {what} architecture built from its config:"]
        if missing:
            parts.append(format_key_list("missing (Flax params with no PyTorch key)", missing))
        if unexpected:
            parts.append(format_key_list("unexpected (PyTorch keys with no Flax param)", unexpected))
        if misshaped:
            parts.append(format_key_list("mis-shaped", misshaped))
        parts.append("Check that config.json belongs to these weights (same model family and sizes).")
        raise ConversionError("\n".join(parts))
    return traverse_util.unflatten_dict(filled)


def flax_to_torch(
    params: Mapping,
    torch_keys: Mapping[str, tuple[int, ...]],
    *,
    rename: Callable[[str], str] | None = None,
    what: str = "model",
) -> dict[str, np.ndarray]:
    """Inverse of :func:`torch_to_flax`: Flax params → PyTorch-layout arrays under `torch_keys`' names.

    `torch_keys` maps each PyTorch key to its shape (e.g. from a reference state dict or file header).
    """
    flat = traverse_util.flatten_dict(dict(params))
    by_norm = {normalize_key(".".join(p)): p for p in flat}
    out: dict[str, np.ndarray] = {}
    missing: list[str] = []
    used: set[tuple[str, ...]] = set()
    for key, tshape in torch_keys.items():
        k = rename(key) if rename else key
        stem, _, leaf = k.rpartition(".")
        leaves = _WEIGHT_LEAVES if leaf == "weight" else (leaf,)
        path = next((by_norm[n] for c in leaves if (n := normalize_key(f"{stem}.{c}")) in by_norm), None)
        if path is None:
            missing.append(key)
            continue
        arr = _to_torch_layout(np.asarray(flat[path]), path[-1], tuple(tshape))
        if tuple(arr.shape) != tuple(tshape):
            raise ConversionError(f"{what}: {'/'.join(path)} has shape {arr.shape}, PyTorch {key} wants {tshape}.")
        out[key] = arr
        used.add(path)
    extra = ["/".join(p) for p in flat if p not in used]
    if missing or extra:
        parts = [f"Flax {what} params do not map one-to-one onto the PyTorch keys:"]
        if missing:
            parts.append(format_key_list("PyTorch keys with no Flax param", missing))
        if extra:
            parts.append(format_key_list("Flax params with no PyTorch key", extra))
        raise ConversionError("\n".join(parts))
    return out



def torch_key(path: tuple[str, ...]) -> str:
    """The diffusers PyTorch key of a Flax param path: ``down_blocks_0/.../kernel`` → ``down_blocks.0....weight``.

    Numbered module lists (``name_N``) become ``name.N``, except diffusers' ``linear_1``/``linear_2`` layers.
    """
    *mods, leaf = path
    parts = [m if (mm := _LIST_SUFFIX.match(m)) is None else f"{mm.group(1)}.{mm.group(2)}" for m in mods]
    return ".".join(parts + ["weight" if leaf in _WEIGHT_LEAVES else leaf])


def torch_layout_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a Flax leaf: conv HWIO → OIHW, linear (in, out) → (out, in), others unchanged."""
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def torch_state_dict(params: Mapping, *, key: Callable[[str], str] = lambda k: k,
                     rename: Callable[[str], str] | None = None, dtype: Any = None,
                     what: str = "model") -> dict[str, np.ndarray]:
    """Flax params → PyTorch-layout arrays named ``key(torch_key(path))``; `rename` maps a PyTorch key back to
    the Flax naming for :func:`flax_to_torch`'s strict matching (e.g. the VAE's ``to_q`` → ``query``)."""
    flat = traverse_util.flatten_dict(jax.device_get(dict(params)))
    keys = {key(torch_key(p)): torch_layout_shape(p[-1], np.shape(v)) for p, v in flat.items()}
    sd = flax_to_torch(traverse_util.unflatten_dict(flat), keys, rename=rename, what=what)
    return {k: np.ascontiguousarray(v.astype(dtype) if dtype is not None else v) for k, v in sd.items()}

# ----------------------------------------------------------------------------------------------------------
# Converted Flax checkpoints (msgpack) and the one entry point the model loaders use
# ----------------------------------------------------------------------------------------------------------

FLAX_WEIGHTS = "flax_model.msgpack"


def flax_weights_name(variant: str | None = None) -> str:
    return f"flax_model.{variant}.msgpack" if variant else FLAX_WEIGHTS


def save_flax_checkpoint(params: Mapping, path: str | os.PathLike) -> str:
    """Write params as Flax msgpack (the former diffusers ``flax_model.msgpack`` format), atomically."""
    from flax import serialization

    from perflow_jax.io import atomic_file

    path = os.fspath(path)
    data = serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, dict(params)))
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def _restore_msgpack(path: str) -> dict:
    from flax import serialization

    with open(path, "rb") as f:
        try:
            restored = serialization.msgpack_restore(f.read())
        except Exception as e:
            raise ConversionError(f"Could not read {path!r} as a Flax msgpack checkpoint ({e}); it may be "
                                  "truncated. Re-create it with `perflow-jax convert`.") from e
    if not isinstance(restored, Mapping):
        raise ConversionError(f"{path!r} is not a Flax params checkpoint (top level is {type(restored).__name__}).")
    return dict(restored["params"]) if set(restored) == {"params"} else dict(restored)


def _check_flax_tree(tree: Mapping, target: Any, dtype: Any, what: str) -> dict:
    got = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}
    want = _flatten_shapes(target)
    missing = [f"{'/'.join(p)} {want[p][0]}" for p in want if p not in got]
    unexpected = [f"{'/'.join(p)} {got[p].shape}" for p in got if p not in want]
    misshaped = [f"{'/'.join(p)}: file {got[p].shape}, expected {want[p][0]}" for p in want
                 if p in got and tuple(got[p].shape) != want[p][0]]
    if missing or unexpected or misshaped:
        parts = [f"The Flax checkpoint does not match the {what} architecture built from its config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                parts.append(format_key_list(title, items))
        raise ConversionError("\n".join(parts))
    return traverse_util.unflatten_dict({k: host_array(v, dtype) for k, v in got.items()})


def load_flax_checkpoint(path: str | os.PathLike, target: Any, dtype: Any = None, what: str = "model") -> dict:
    """Read a Flax msgpack checkpoint and check it against `target`'s structure and shapes (strict)."""
    return _check_flax_tree(_restore_msgpack(os.fspath(path)), target, dtype, what)


def read_weights(folder: str | os.PathLike, stem: str, variant: str | None = None,
                 allow_pickle: bool = False) -> tuple[str, Mapping]:
    """A component folder's weights: ``("flax", params)`` from ``flax_model[.variant].msgpack`` when present
    (already in Flax layout), else ``("torch", state_dict)`` from ``<stem>[.variant].safetensors``."""
    folder = os.fspath(folder)
    flax_path = os.path.join(folder, flax_weights_name(variant))
    if os.path.isfile(flax_path):
        return "flax", _restore_msgpack(flax_path)
    return "torch", load_state_dict(find_weights_file(folder, stem, variant), allow_pickle, lazy=True)


def weights_to_params(kind: str, weights: dict, target: Any, *, rename: Callable[[str], str] | None = None,
                      ignore: Iterable[str] = (), dtype: Any = None, what: str = "model") -> dict:
    """Turn :func:`read_weights`' result into params for `target`, with strict accounting either way."""
    if kind == "torch":
        return torch_to_flax(weights, target, rename=rename, ignore=ignore, dtype=dtype, what=what)
    return _check_flax_tree(weights, target, dtype, what)
