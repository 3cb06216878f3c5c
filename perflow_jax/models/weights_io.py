"""Weight files on disk: safetensors (read lazily, one tensor at a time), opt-in PyTorch pickles, Flax msgpack.

Readers return tensors as NumPy arrays under the names stored in the file; they know nothing of models, key
names or layouts (that is :mod:`perflow_jax.models.keymap` and :mod:`perflow_jax.models.convert`). A component
folder holds either a converted ``flax_model[.variant].msgpack`` (Flax layout) or PyTorch weights
``<stem>[.variant].safetensors`` (or a sharded ``*.index.json``, or a ``.bin`` pickle): :func:`read_weights`
picks one and says which kind it is.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from safetensors import safe_open

from perflow_jax.io import atomic_file
from perflow_jax.models.mismatch import ConversionError

__all__ = [
    "FLAX_WEIGHTS",
    "SafetensorsStateDict",
    "TensorInfo",
    "Weights",
    "find_weights_file",
    "weights_variants",
    "flax_weights_name",
    "load_state_dict",
    "read_flax_checkpoint",
    "read_safetensors",
    "read_safetensors_metadata",
    "read_weights",
    "save_flax_checkpoint",
]

FLAX_WEIGHTS = "flax_model.msgpack"
_REMAP_BYTES = 256 * 2**20
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# diffusers pickles its weights under the safetensors stem; transformers as pytorch_model.bin
_PICKLE_STEMS = {"model": ("model", "pytorch_model")}
# safetensors dtype names → NumPy dtypes (the ones safetensors' own NumPy reader returns); others are read by it
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_MAX_READ = 2**30  # bytes per read call (Linux caps one read at just under 2 GiB)


# ----------------------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------------------


def _unreadable(path: str, e: Exception) -> ConversionError:
    return ConversionError(
        f"Could not read {path!r} as safetensors ({type(e).__name__}: {e}). The file may be truncated or "
        "not a safetensors file; download it again or re-export it with save_pretrained."
    )


def _open_safetensors(path: str) -> Any:
    """safetensors' NumPy reader for `path`; a truncated or foreign file raises :class:`ConversionError`."""
    try:  # safetensors raises its own error types for truncated/corrupt headers
        return safe_open(path, framework="numpy")
    except Exception as e:
        raise _unreadable(path, e) from e


class TensorInfo(NamedTuple):
    """Where one tensor lies in a safetensors file: its shape, NumPy dtype (None for a dtype only safetensors'
    reader knows) and byte range."""

    shape: tuple[int, ...]
    dtype: np.dtype | None
    path: str
    start: int
    stop: int


def _read_header(path: str) -> dict[str, TensorInfo]:
    """The tensor table of a safetensors file that :func:`_open_safetensors` has already validated."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    base = 8 + size
    return {k: TensorInfo(tuple(v["shape"]), np.dtype(_DTYPES[v["dtype"]]) if v["dtype"] in _DTYPES else None,
                          path, base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


class SafetensorsStateDict(Mapping):
    """The tensors of one or more ``.safetensors`` files as a read-only mapping, each read on access with
    safetensors' NumPy API. A conversion that walks it holds one PyTorch tensor at a time next to the
    converted params, not a whole second copy of the model (SD1.5's UNet: 3.3 GiB).

    :meth:`info` gives a tensor's shape and dtype from the header alone, and :meth:`read_into` reads its bytes
    straight into a caller's buffer (no memory map, no intermediate copy, safe from threads): the
    fast path of :func:`perflow_jax.models.convert.torch_to_flax`.
    """

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self._files: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        self._mapped: dict[str, int] = {}
        self._info: dict[str, TensorInfo] = {}
        for path in map(os.fspath, paths):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Weights file {path!r} does not exist.")
            self._files[path] = handle = _open_safetensors(path)
            self._where.update(dict.fromkeys(handle.keys(), path))
            try:
                self._info.update(_read_header(path))
            except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
                raise _unreadable(path, e) from e

    def info(self, key: str) -> TensorInfo:
        """`key`'s shape, dtype and place in its file, from the header (reads no tensor data)."""
        return self._info[key]

    def read_into(self, key: str, out: np.ndarray) -> np.ndarray:
        """Read `key`'s bytes into `out` (C-contiguous, exactly the tensor's size) and return `out`.

        Raises ConversionError when the file ends early (it changed after it was opened).
        """
        info = self._info[key]
        view = memoryview(out.reshape(-1).view(np.uint8))
        if len(view) != info.stop - info.start or not out.flags.c_contiguous:
            raise ValueError(f"read_into({key!r}): out must be C-contiguous with {info.stop - info.start} bytes.")
        with open(info.path, "rb", buffering=0) as f:  # one handle per call: threads never share a position
            f.seek(info.start)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:done + _MAX_READ])
                if not n:
                    raise _unreadable(info.path, EOFError(f"the file ends inside tensor {key!r}"))
                done += n
        return out

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


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` header (empty if it has none)."""
    path = os.fspath(path)
    with _open_safetensors(path) as f:
        return dict(f.metadata() or {})


# ----------------------------------------------------------------------------------------------------------
# PyTorch state dicts: safetensors, sharded safetensors, opt-in pickles
# ----------------------------------------------------------------------------------------------------------


def _read_pickle(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    if not allow_pickle:
        raise ConversionError(
            f"{path!r} is a PyTorch pickle (.bin). Pickles can run arbitrary code when loaded and need torch; "
            "pass allow_pickle=True (with torch installed) if you trust the file, or convert it to "
            "safetensors first."
        )
    try:
        import torch  # optional: only this opt-in path needs it
    except ImportError as e:
        raise ConversionError(f"Reading {path!r} needs torch, which is not installed.") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()) for k, v in sd.items()}


def find_weights_file(folder: str | os.PathLike, stem: str, variant: str | None = None) -> str:
    """Locate ``stem[.variant].safetensors`` (or its sharded ``.index.json``, or a ``.bin`` pickle; for
    transformers' ``model`` stem also ``pytorch_model[.variant].bin``) in `folder`."""
    folder = os.fspath(folder)
    v = f".{variant}" if variant else ""
    candidates = [
        f"{stem}{v}.safetensors",
        f"{stem}.safetensors{'.index' + v if v else '.index'}.json",
        f"{stem}{v}.safetensors.index.json",
        f"{stem}.safetensors.index{v}.json",
    ] + [f"{pickle_stem}{v}.bin" for pickle_stem in _PICKLE_STEMS.get(stem, (stem,))]
    for name in candidates:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    raise FileNotFoundError(
        f"No weights named {stem}{v}.safetensors (or a sharded index / .bin) in {folder!r}; found {present}. "
        + ("Check the variant name, or omit variant to use the full-precision file." if variant else "")
    )


def weights_variants(names: Iterable[str], stem: str) -> list[str]:
    """The variants ``v`` of the ``<stem>.<v>.safetensors`` files among `names` (file names, or repo paths
    whose last part is compared), sorted; the plain ``<stem>.safetensors`` is not a variant."""
    found = set()
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base.startswith(stem + ".") and base.endswith(".safetensors"):
            variant = base[len(stem) + 1:-len(".safetensors")]
            if variant and "/" not in variant:
                found.add(variant)
    return sorted(found)


def load_state_dict(path: str | os.PathLike, allow_pickle: bool = False,
                    lazy: bool = False) -> Mapping[str, np.ndarray]:
    """Read a state dict from a ``.safetensors`` file, a sharded ``*.index.json``, or (opt-in) a ``.bin``.

    ``lazy=True`` returns a :class:`SafetensorsStateDict` for safetensors (tensors read on access), else a
    dict of NumPy arrays.
    """
    path = os.fspath(path)
    if path.endswith(_PICKLE_SUFFIXES):
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
# Flax msgpack checkpoints (the former diffusers ``flax_model.msgpack`` format)
# ----------------------------------------------------------------------------------------------------------


def flax_weights_name(variant: str | None = None) -> str:
    """``flax_model[.variant].msgpack``."""
    return f"flax_model.{variant}.msgpack" if variant else FLAX_WEIGHTS


def save_flax_checkpoint(params: Mapping, path: str | os.PathLike) -> str:
    """Write params as Flax msgpack, atomically (temp file + rename). Returns `path`."""
    path = os.fspath(path)
    data = serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, dict(params)))
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def read_flax_checkpoint(path: str | os.PathLike) -> dict:
    """The nested params dict of a Flax msgpack checkpoint (a top-level ``{"params": ...}`` is unwrapped)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            restored = serialization.msgpack_restore(f.read())
        except Exception as e:
            raise ConversionError(f"Could not read {path!r} as a Flax msgpack checkpoint ({e}); it may be "
                                  "truncated. Re-create it with `perflow-jax convert`.") from e
    if not isinstance(restored, Mapping):
        raise ConversionError(f"{path!r} is not a Flax params checkpoint (top level is {type(restored).__name__}).")
    return dict(restored["params"]) if set(restored) == {"params"} else dict(restored)


# ----------------------------------------------------------------------------------------------------------
# A component folder's weights
# ----------------------------------------------------------------------------------------------------------


class Weights(NamedTuple):
    """What a component folder holds: ``kind="flax"`` → a nested params dict already in Flax layout;
    ``kind="torch"`` → a flat PyTorch state dict (names and layouts still PyTorch's), read lazily."""

    kind: Literal["flax", "torch"]
    tensors: Mapping[str, Any]


def read_weights(folder: str | os.PathLike, stem: str, variant: str | None = None,
                 allow_pickle: bool = False) -> Weights:
    """A component folder's weights: ``flax_model[.variant].msgpack`` when present, else
    ``<stem>[.variant].safetensors`` (sharded index, or a ``.bin`` only with `allow_pickle`)."""
    folder = os.fspath(folder)
    flax_path = os.path.join(folder, flax_weights_name(variant))
    if os.path.isfile(flax_path):
        return Weights("flax", read_flax_checkpoint(flax_path))
    return Weights("torch", load_state_dict(find_weights_file(folder, stem, variant), allow_pickle, lazy=True))
