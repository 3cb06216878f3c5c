"""Param-tree shapes per model config, cached in memory and on disk beside JAX's compilation cache.

A loader needs the params tree a config builds (paths, shapes, dtypes) before it reads any weight; tracing
``model.init`` under ``jax.eval_shape`` costs seconds for SD's UNet and VAE (1.5 s and 1.0 s on a 2-core CPU).
:func:`cached_param_shapes` traces once per config and process, and, when the persistent compilation cache is on
(:func:`perflow_jax.enable_compilation_cache`), keeps the result as a small JSON file in a ``<cache>-param-shapes``
folder beside it, so the next process reads it instead of tracing. The key covers the model kind, the config,
the JAX/Flax versions and the source of the modules that define the models, so an edited model is traced again.
An unreadable or foreign cache file is ignored (and replaced); the cache never turns a good load into an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import traverse_util

from perflow_jax.compilation_cache import beside_compilation_cache, source_hash
from perflow_jax.io import write_json

__all__ = ["SHAPES_FOLDER", "cache_folder", "cached_param_shapes", "clear_memory_cache"]

SHAPES_FOLDER = "param-shapes"  # <compilation cache>-param-shapes
_MODEL_SOURCES = ("models/layers.py", "models/unet.py", "models/vae.py", "models/clip.py")
_MEMORY: dict[str, dict] = {}


def cache_folder() -> str | None:
    """``<compilation cache>-param-shapes``, or None while the persistent compilation cache is off."""
    return beside_compilation_cache(SHAPES_FOLDER)


def clear_memory_cache() -> None:
    """Forget the in-process results (the disk cache stays)."""
    _MEMORY.clear()


def _key(kind: str, config: Any) -> str:
    text = json.dumps([kind, repr(config), jax.__version__, flax.__version__, source_hash(_MODEL_SOURCES)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _encode(tree: dict) -> list[list[Any]]:
    return [[list(path), list(leaf.shape), jnp.dtype(leaf.dtype).name]
            for path, leaf in traverse_util.flatten_dict(tree).items()]


def _decode(rows: Any) -> dict:
    """The nested ``ShapeDtypeStruct`` tree of :func:`_encode`'s rows; ValueError when they are not such rows."""
    if not isinstance(rows, list) or not rows:
        raise ValueError("not a list of rows")
    flat = {}
    for path, shape, dtype in rows:
        if not (isinstance(path, list) and path and all(isinstance(p, str) for p in path)
                and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError("bad row")
        flat[tuple(path)] = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
    return traverse_util.unflatten_dict(flat)


def _read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return _decode(json.load(f)["params"])
    except (OSError, ValueError, TypeError, KeyError):  # absent, torn or foreign: trace again
        return None


def cached_param_shapes(kind: str, config: Any, trace: Callable[[], dict]) -> dict:
    """``trace()`` (a params tree of ``ShapeDtypeStruct`` leaves for `config`), cached by (`kind`, `config`).

    Args:
      kind: the model class (with any option that changes the tree, e.g. ``"clip+projection"``).
      config: a frozen dataclass config; its ``repr`` is part of the key.
      trace: computes the tree (``jax.eval_shape`` of the model's init) on a miss.

    Returns a fresh nested dict on every call (callers may change it freely).
    """
    key = _key(kind, config)
    rows = _MEMORY.get(key)
    if rows is None:
        folder = cache_folder()
        path = os.path.join(folder, f"{kind}-{key}.json") if folder else None
        tree = _read(path) if path else None
        if tree is None:
            tree = trace()
            if path:
                try:
                    write_json(path, {"kind": kind, "config": repr(config), "params": _encode(tree)}, indent=None)
                except OSError:  # a read-only or full cache folder only costs the next process a trace
                    pass
        rows = _MEMORY[key] = _encode(tree)
    return _decode(rows)
