"""Compiled programs kept on disk whole (JAX ahead-of-time serialization), for repeat runs.

JAX's persistent compilation cache (:func:`perflow_jax.enable_compilation_cache`) skips XLA's compile, but a new
process still traces the Python program and lowers it to MLIR to find its cache key: for SD's generation
program that is seconds on a CPU. :func:`load_or_compile` keys a compiled program by what determines it without
tracing it (the caller's description of the program, the avals and shardings of its arguments, the JAX
version and backend, and the source of perflow-jax itself) and stores the serialized executable
(``jax.experimental.serialize_executable``) in a ``<cache>-executables`` folder beside the compilation cache. The next
process loads it with no trace, no lowering and no compile.

A pipeline uses it when built with ``executable_cache=True`` (the CLI's and the benchmark's are) while the
persistent compilation cache is on, and only in a single process. Leave it off when you patch perflow-jax's code
at run time: a stored program is keyed by the source files, not by patches. Like JAX's own
cache, its files are trusted: loading an executable runs it, so the folder must be your own. An unreadable or
stale file is compiled again and replaced; the cache never turns a good call into an error.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import jax

from perflow_jax.compilation_cache import beside_compilation_cache, source_hash
from perflow_jax.io import atomic_file

__all__ = ["EXECUTABLES_FOLDER", "cache_key", "load_or_compile"]

EXECUTABLES_FOLDER = "executables"


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cache_key(description: str, args: Sequence[Any]) -> str:
    """A key for the program `description` names, applied to `args` (their tree, shapes, dtypes and
    shardings), on this JAX version, backend and devices, with this perflow-jax source."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    avals = [(getattr(x, "shape", None), str(getattr(x, "dtype", type(x))), str(getattr(x, "sharding", "")))
             for x in leaves]
    backend = jax.devices()[0].client
    parts = [description, str(tree), repr(avals), jax.__version__, _jaxlib_version(), backend.platform,
             backend.platform_version, repr([d.device_kind for d in jax.devices()]), source_hash()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


def load_or_compile(description: str, args: Sequence[Any], lower: Callable[[], jax.stages.Lowered]
                    ) -> Callable[..., Any]:
    """``lower().compile()``, or the same program loaded from the ``<cache>-executables`` folder when a previous
    process stored it under this key (:func:`cache_key` of `description` and `args`); a new compile is stored
    there. Plain ``lower().compile()`` while the compilation cache is off.

    A loaded program is checked on its first call (run to completion): XLA:CPU executables are not always
    self-contained once serialized (a kernel they call may be missing in the loading process). One that fails
    is compiled afresh for that call, its file is removed and the key is marked ``.unusable`` so no process
    stores or loads it again.
    """
    folder = beside_compilation_cache(EXECUTABLES_FOLDER)
    if folder is None or jax.process_count() > 1:
        return lower().compile()
    from jax.experimental.serialize_executable import deserialize_and_load, serialize

    path = os.path.join(folder, cache_key(description, args) + ".jaxexec")
    unusable = path + ".unusable"
    if os.path.exists(unusable):
        return lower().compile()
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree = pickle.load(f)  # noqa: S301  our own cache folder (trusted)
            return _Checked(deserialize_and_load(payload, in_tree, out_tree), path, lower)
        except Exception:  # torn, foreign or from another jaxlib build: compile again and replace it
            pass
    compiled = lower().compile()
    try:
        data = pickle.dumps(serialize(compiled))
        os.makedirs(folder, exist_ok=True)
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
    except Exception:  # an executable that cannot be serialized, or a full / read-only folder: just run it
        pass
    return compiled


class _Checked:
    """A loaded executable whose first call is run to completion; if it fails, the program is compiled afresh
    (and its stored file retired), so a bad file costs one compile, never a wrong or failed call."""

    def __init__(self, loaded: Any, path: str, lower: Callable[[], jax.stages.Lowered]):
        self._exe, self._path, self._lower, self._checked = loaded, path, lower, False

    def __call__(self, *args: Any) -> Any:
        if self._checked:
            return self._exe(*args)
        try:
            out = jax.block_until_ready(self._exe(*args))
        except jax.errors.JaxRuntimeError:
            self._retire()
            self._exe = self._lower().compile()
            out = self._exe(*args)
        self._checked = True
        return out

    def _retire(self) -> None:
        try:
            with atomic_file(self._path + ".unusable") as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write("a loaded executable failed on its first call; compiled afresh instead\n")
            os.remove(self._path)
        except OSError:
            pass
