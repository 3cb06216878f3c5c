"""perflow-jax: PeRFlow (piecewise rectified flow) for Stable Diffusion in JAX/Flax.

``import perflow_jax`` stays cheap (no JAX import); :func:`enable_compilation_cache` is loaded on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Lazy top-level exports: ``perflow_jax.enable_compilation_cache`` imports JAX only when first used."""
    if name == "enable_compilation_cache":
        from perflow_jax.compilation_cache import enable_compilation_cache

        return enable_compilation_cache
    raise AttributeError(f"module 'perflow_jax' has no attribute {name!r}")


__all__ = ["__version__", "enable_compilation_cache"]
