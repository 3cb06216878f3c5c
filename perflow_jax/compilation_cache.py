"""JAX's persistent compilation cache, on by default for the CLI and pipelines.

A second process with the same shapes then starts from cached executables instead of recompiling.
``PERFLOW_JAX_CACHE_DIR`` overrides the folder; setting it to ``off`` (or ``enable=False``) switches it off.
"""

from __future__ import annotations

import os

import jax

_DEFAULT = os.path.join(os.path.expanduser("~"), ".cache", "perflow-jax", "jax-compilation-cache")


def enable_compilation_cache(path: str | None = None, enable: bool = True) -> str | None:
    """Turn on the persistent cache at `path` (default: env or a user cache folder); returns the folder."""
    env = os.environ.get("PERFLOW_JAX_CACHE_DIR")
    if not enable or (path is None and env is not None and env.lower() in ("off", "0", "none", "")):
        return None
    folder = path or env or _DEFAULT
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
