"""JAX's persistent compilation cache, turned on by an explicit call (the CLI, notebooks and tests make it).

With it, a second process with the same shapes starts from cached executables instead of recompiling. Nothing
in perflow-jax turns it on as a side effect: building a pipeline leaves ``jax.config`` alone.
``PERFLOW_JAX_CACHE_DIR`` overrides the folder; setting it to ``off`` (or ``enable=False``) switches it off.
"""

from __future__ import annotations

import os

import jax

_DEFAULT = os.path.join(os.path.expanduser("~"), ".cache", "perflow-jax", "jax-compilation-cache")


def enable_compilation_cache(path: str | None = None, enable: bool = True) -> str | None:
    """Turn on the persistent cache at `path` (default: ``PERFLOW_JAX_CACHE_DIR`` or a user cache folder).

    Sets ``jax_compilation_cache_dir`` and caches every program that takes ≥ 0.5 s to compile. Returns the
    folder, or None when switched off (``enable=False`` or ``PERFLOW_JAX_CACHE_DIR=off`` without a `path`).
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
