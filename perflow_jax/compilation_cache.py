"""JAX's persistent compilation cache, turned on by an explicit call (the CLI, notebooks and tests make it).

With it, a second process with the same shapes starts from cached executables instead of recompiling. Nothing
in perflow-jax turns it on as a side effect: building a pipeline leaves ``jax.config`` alone.
``PERFLOW_JAX_CACHE_DIR`` overrides the folder; setting it to ``off`` (or ``enable=False``) switches it off.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import jax

_DEFAULT = os.path.join(os.path.expanduser("~"), ".cache", "perflow-jax", "jax-compilation-cache")
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_SOURCE_HASHES: dict[tuple[str, ...], str] = {}


def enable_compilation_cache(path: str | None = None, enable: bool = True) -> str | None:
    """Turn on the persistent cache at `path` (default: ``PERFLOW_JAX_CACHE_DIR`` or a user cache folder).

    Sets ``jax_compilation_cache_dir`` and caches every program that takes ≥ 0.5 s to compile. Returns the
    folder, or None when switched off (``enable=False`` or ``PERFLOW_JAX_CACHE_DIR=off`` without a `path`).
    Pipelines built with ``executable_cache=True`` also keep whole compiled programs beside it
    (:mod:`perflow_jax.executable_cache`).
    """
    env = os.environ.get("PERFLOW_JAX_CACHE_DIR")
    if not enable or (path is None and env is not None and env.lower() in ("off", "0", "none", "")):
        return None
    folder = path or env or _DEFAULT
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def beside_compilation_cache(name: str) -> str | None:
    """The folder ``<compilation cache>-<name>`` next to JAX's compilation-cache folder (one per cache folder),
    or None while that cache is off."""
    folder = jax.config.jax_compilation_cache_dir
    return f"{os.path.abspath(folder).rstrip(os.sep)}-{name}" if folder else None


def source_hash(files: Sequence[str] | None = None) -> str:
    """SHA-256 of perflow-jax's source: `files` (paths relative to the package) or every ``.py`` file in it.
    A cached result built from the code must not outlive a change to that code."""
    key = tuple(files) if files is not None else ()
    if key not in _SOURCE_HASHES:
        if files is None:
            files = sorted(os.path.relpath(os.path.join(d, f), _PACKAGE) for d, _, names in os.walk(_PACKAGE)
                           for f in names if f.endswith(".py"))
        h = hashlib.sha256()
        for rel in files:
            h.update(rel.encode() + b"\0")
            with open(os.path.join(_PACKAGE, rel), "rb") as f:
                h.update(f.read())
        _SOURCE_HASHES[key] = h.hexdigest()
    return _SOURCE_HASHES[key]
