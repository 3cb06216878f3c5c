"""Meshes, global arrays and multi-process start-up, shared by pipelines, generation jobs and training.

Everything here works the same in one process and in many: a 1-D ``("data",)`` mesh spans every device of
every host; batches are split over it; parameters are replicated (or, for training, FSDP-sharded). Training
may use a 2-D ``("data", "fsdp")`` mesh (:func:`train_mesh`): the batch is split over both axes (every device
gets its own rows), params, gradients and optimizer state are split over ``"fsdp"`` and replicated over
``"data"``.
:func:`initialize_distributed` starts ``jax.distributed`` when a job runs on several processes and does
nothing in a single one, so the same script runs on a laptop and on a pod.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"

# Environment variables read by :func:`initialize_distributed` when no argument is given.
ENV_COORDINATOR = "PERFLOW_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "PERFLOW_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "PERFLOW_JAX_PROCESS_ID"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
                           auto_detect: bool = True) -> bool:
    """Start ``jax.distributed`` for a multi-process job; a no-op in a single process.

    The settings come from the arguments, else from ``PERFLOW_JAX_COORDINATOR_ADDRESS``,
    ``PERFLOW_JAX_NUM_PROCESSES`` and ``PERFLOW_JAX_PROCESS_ID``, else (with `auto_detect`) from JAX's own
    cluster detection (Slurm, Open MPI, Cloud TPU, ...). Call it before anything touches a device. Calling it
    again after a successful start does nothing.

    Returns:
      True when this process is part of a multi-process group (started now or before), False otherwise.
    """
    if _distributed_started():
        return True
    address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    count = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    explicit = (address, count, pid)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError(
                "A multi-process start needs all of coordinator_address, num_processes and process_id (or "
                f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got "
                f"coordinator_address={address!r}, num_processes={count!r}, process_id={pid!r}.")
        if count < 1 or not 0 <= pid < count:
            raise ValueError(f"Need num_processes >= 1 and 0 <= process_id < num_processes, got "
                             f"num_processes={count}, process_id={pid}.")
        if count == 1:
            return False
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=pid,
                                   local_device_ids=local_device_ids)
        return True
    if auto_detect and _cluster_detected():
        jax.distributed.initialize(local_device_ids=local_device_ids)
        return jax.process_count() > 1
    return False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer.") from None


def _distributed_started() -> bool:
    """Whether ``jax.distributed.initialize`` already ran in this process."""
    is_init = getattr(jax.distributed, "is_initialized", None)
    if is_init is not None:
        return bool(is_init())
    from jax._src import distributed  # older JAX: no public query

    return distributed.global_state.client is not None


def _cluster_detected() -> bool:
    """Whether JAX's cluster detection finds a multi-process environment (Slurm, MPI, TPU pod, ...)."""
    try:
        from jax._src import clusters
    except ImportError:  # pragma: no cover - layout of JAX internals changed
        return False
    for env in getattr(clusters.ClusterEnv, "_cluster_types", ()):
        try:
            if env.is_env_present() and not getattr(env, "opt_in_only_method", False):
                return True
        except Exception:  # noqa: BLE001 - a detector probing an absent service must not break start-up
            continue
    return False


# ----------------------------------------------------------------------------------------------------------
# Meshes and shardings
# ----------------------------------------------------------------------------------------------------------


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D ``("data",)`` mesh over `devices` (default: every device of every process)."""
    return Mesh(np.asarray(jax.devices() if devices is None else list(devices)), (DATA_AXIS,))


def train_mesh(mode: str = "replicated", fsdp_size: int | None = None,
               devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The training mesh over `devices` (default: all of every process).

    ``"replicated"``: the 1-D ``("data",)`` mesh of :func:`data_mesh`. ``"fsdp"``: a 2-D ``("data", "fsdp")``
    mesh of shape (n / fsdp_size, fsdp_size), `fsdp_size` defaulting to every device (pure FSDP); devices are
    laid out row-major, so the ``fsdp`` groups are runs of consecutive devices (on one host when they fit).
    """
    devs = list(jax.devices() if devices is None else devices)
    if mode == "replicated":
        return data_mesh(devs)
    if mode != "fsdp":
        raise ValueError(f"Unknown parameter sharding mode {mode!r}; expected 'replicated' or 'fsdp'.")
    f = len(devs) if fsdp_size is None else fsdp_size
    if f < 1 or len(devs) % f:
        raise ValueError(f"train.fsdp_size={fsdp_size} must divide the {len(devs)} devices.")
    return Mesh(np.asarray(devs).reshape(len(devs) // f, f), (DATA_AXIS, FSDP_AXIS))


def _batch_axes(mesh: Mesh) -> str | tuple[str, ...]:
    """The mesh axes a batch is split over: ``"data"``, and ``"fsdp"`` too on a training mesh."""
    return (DATA_AXIS, FSDP_AXIS) if FSDP_AXIS in mesh.axis_names else DATA_AXIS


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Split `axis` (the batch) over the mesh's batch axes (data, and fsdp when present), other axes whole."""
    return NamedSharding(mesh, P(*([None] * axis), _batch_axes(mesh)))


def num_data_shards(mesh: Mesh) -> int:
    """How many ways a batch is split over `mesh` (every device of a training mesh)."""
    return int(np.prod([mesh.shape[a] for a in np.atleast_1d(_batch_axes(mesh))]))


def padded_size(n: int, mesh: Mesh) -> int:
    """`n` rounded up to a multiple of the data-shard count (a batch must divide over the devices)."""
    d = num_data_shards(mesh)
    return -(-n // d) * d


def param_sharding(mesh: Mesh, tree: Any, mode: str = "replicated") -> Any:
    """A sharding per leaf of `tree`: replicated, or (``"fsdp"``) each leaf split along its largest axis that
    divides evenly over the mesh's ``"fsdp"`` axis (the ``"data"`` axis of a 1-D mesh), replicated over the
    other mesh axis; leaves with no such axis stay replicated."""
    if mode not in ("replicated", "fsdp"):
        raise ValueError(f"Unknown parameter sharding mode {mode!r}; expected 'replicated' or 'fsdp'.")
    axis = FSDP_AXIS if FSDP_AXIS in mesh.axis_names else DATA_AXIS
    n = int(mesh.shape[axis])

    def one(leaf: Any) -> NamedSharding:
        shape = np.shape(leaf)
        if mode == "fsdp" and n > 1:
            axes = sorted((d for d in range(len(shape)) if shape[d] % n == 0 and shape[d] >= n),
                          key=lambda d: -shape[d])
            if axes:
                spec: list[str | None] = [None] * len(shape)
                spec[axes[0]] = axis
                return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map(one, tree)


# ----------------------------------------------------------------------------------------------------------
# Global arrays
# ----------------------------------------------------------------------------------------------------------


def global_array(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global ``jax.Array`` from host data that every process holds in full (one or many hosts)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def global_tree(tree: Any, sharding: NamedSharding | Any) -> Any:
    """:func:`global_array` over a pytree, with one sharding or a matching tree of shardings."""
    if isinstance(sharding, NamedSharding):
        return jax.tree_util.tree_map(lambda a: global_array(a, sharding), tree)
    return jax.tree_util.tree_map(global_array, tree, sharding)


def global_array_from_local(local: Any, mesh: Mesh, axis: int = 0) -> jax.Array:
    """A global array whose `axis` is split over the mesh, from this process's own slice of that axis.

    Each process passes only the rows its devices hold (``jax.process_index()``'s contiguous block); in a
    single process this is the whole array.
    """
    local = np.asarray(local)
    return jax.make_array_from_process_local_data(batch_sharded(mesh, axis), local)


def local_rows(n: int, mesh: Mesh) -> slice:
    """The rows of an `n`-row batch sharded over `mesh` whose data lives on this process's devices.

    `n` must divide over the mesh (see :func:`padded_size`); the block is contiguous, as
    :func:`global_array_from_local` expects.
    """
    shards = num_data_shards(mesh)
    if n % shards:
        raise ValueError(f"A batch of {n} does not divide over {shards} devices; pad it to {padded_size(n, mesh)}.")
    per = n // shards
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if not mine:
        return slice(0, 0)
    lo, hi = min(mine), max(mine) + 1
    if hi - lo != len(mine):
        raise ValueError("This process's devices are not contiguous on the mesh; build it with data_mesh().")
    return slice(lo * per, hi * per)


def to_host(x: jax.Array) -> np.ndarray:
    """Gather a (possibly multi-host) sharded array into a NumPy array on every host."""
    if jax.process_count() > 1 and not getattr(x, "is_fully_addressable", True):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


__all__ = ["DATA_AXIS", "FSDP_AXIS", "batch_sharded", "data_mesh", "global_array", "global_array_from_local",
           "global_tree", "initialize_distributed", "local_rows", "num_data_shards", "padded_size", "param_sharding",
           "replicated", "to_host", "train_mesh"]
