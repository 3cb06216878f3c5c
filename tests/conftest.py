"""Test-wide settings: JAX's persistent compilation cache (saves compile time across runs) and CPU only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

_CACHE = os.environ.get("PERFLOW_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "perflow-jax",
                                                                "jax-test-cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
