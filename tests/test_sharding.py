"""perflow_jax.sharding: multi-process start-up, meshes and global arrays.

The multi-process check is real: two processes on 127.0.0.1 form a ``jax.distributed`` group (CPU
collectives over gloo, 2 forced host devices each, so a 4-device mesh), each contributes only its own rows of
a global batch, and the gathered result must equal one process computing the whole batch. Same float32 ops
per row on either side, so the comparison is exact.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from perflow_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_KEYS = (sharding.ENV_COORDINATOR, sharding.ENV_NUM_PROCESSES, sharding.ENV_PROCESS_ID)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(tmp_path, num_processes: int) -> list[dict]:
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs, outs = [], []
    for i in range(num_processes):
        env = dict(base)
        if num_processes > 1:
            env.update({sharding.ENV_COORDINATOR: f"127.0.0.1:{port}", sharding.ENV_NUM_PROCESSES: str(num_processes),
                        sharding.ENV_PROCESS_ID: str(i)})
        out = str(tmp_path / f"p{num_processes}_{i}.json")
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.support.distributed_check", out], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        try:
            log, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, log[-3000:]
    results = []
    for out in outs:
        with open(out, encoding="utf-8") as f:
            results.append(json.load(f))
    return results


def test_two_processes_equal_one(tmp_path) -> None:
    group = _run_group(tmp_path, 2)
    (single,) = _run_group(tmp_path, 1)
    assert single["started"] is False and single["process_count"] == 1 and single["devices"] == 2
    for i, r in enumerate(group):
        assert r["started"] is True and r["again"] is True
        assert r["process_count"] == 2 and r["process_index"] == i and r["devices"] == 4
    # 7 rows pad to 8 over 4 devices; each process feeds its own contiguous half.
    assert [r["rows"] for r in group] == [[0, 4], [4, 8]]
    for r in group:
        assert r["y"] == single["y"] == r["y_from_full"]
        assert r["total"] == pytest.approx(single["total"], rel=1e-6)  # a cross-device sum: order may differ


def test_single_process_is_a_no_op(monkeypatch) -> None:
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    assert sharding.initialize_distributed(auto_detect=False) is False
    assert sharding.initialize_distributed(num_processes=1, process_id=0,
                                           coordinator_address="127.0.0.1:1") is False
    assert jax.process_count() == 1


@pytest.mark.parametrize(("env", "match"), [
    ({sharding.ENV_NUM_PROCESSES: "2"}, "needs all of"),
    ({sharding.ENV_NUM_PROCESSES: "two", sharding.ENV_PROCESS_ID: "0"}, "is not an integer"),
    ({sharding.ENV_COORDINATOR: "127.0.0.1:1", sharding.ENV_NUM_PROCESSES: "2", sharding.ENV_PROCESS_ID: "2"},
     "process_id < num_processes"),
])
def test_bad_settings_are_refused(monkeypatch, env: dict, match: str) -> None:
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        sharding.initialize_distributed()


def test_mesh_helpers_one_process() -> None:
    mesh = sharding.data_mesh()
    d = sharding.num_data_shards(mesh)
    assert sharding.padded_size(1, mesh) == d and sharding.padded_size(d + 1, mesh) == 2 * d
    assert sharding.local_rows(2 * d, mesh) == slice(0, 2 * d)
    x = np.arange(2 * d * 3, dtype=np.float32).reshape(2 * d, 3)
    np.testing.assert_array_equal(sharding.to_host(sharding.global_array_from_local(x, mesh)), x)
    tree = sharding.global_tree({"a": x, "b": x[:1]}, sharding.replicated(mesh))
    np.testing.assert_array_equal(sharding.to_host(tree["b"]), x[:1])
    with pytest.raises(ValueError, match="Unknown parameter sharding mode"):
        sharding.param_sharding(mesh, {"w": x}, "zero")
