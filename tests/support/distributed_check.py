"""Run by tests/test_sharding.py: one process of a real ``jax.distributed`` group (or a lone process).

    PERFLOW_JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT PERFLOW_JAX_NUM_PROCESSES=2 PERFLOW_JAX_PROCESS_ID=I \
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m tests.support.distributed_check OUT.json

Starts the group with :func:`perflow_jax.sharding.initialize_distributed` (settings from the environment),
builds the global ("data",) mesh, assembles a global batch from this process's rows only, runs a jitted
per-row computation plus a cross-device reduction on it, gathers the result to every host and writes it.
"""

from __future__ import annotations

import json
import sys


def main(out: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from perflow_jax import sharding

    started = sharding.initialize_distributed()
    again = sharding.initialize_distributed()  # idempotent
    import jax.numpy as jnp
    import numpy as np

    mesh = sharding.data_mesh()
    n = sharding.padded_size(7, mesh)
    full = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    rows = sharding.local_rows(n, mesh)
    batch = sharding.global_array_from_local(full[rows], mesh)
    same = sharding.global_array(full, sharding.batch_sharded(mesh))
    weights = sharding.global_array(np.array([1.0, -2.0, 0.5], np.float32), sharding.replicated(mesh))

    @jax.jit
    def compute(x, w):
        y = jnp.tanh(x / 10.0) * w
        return y, jnp.sum(y)

    y, total = compute(batch, weights)
    y2, _ = compute(same, weights)
    result = {
        "started": started, "again": again, "process_count": jax.process_count(),
        "process_index": jax.process_index(), "devices": len(jax.devices()), "rows": [rows.start, rows.stop],
        "y": sharding.to_host(y).tolist(), "y_from_full": sharding.to_host(y2).tolist(),
        "total": float(sharding.to_host(total)),
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
