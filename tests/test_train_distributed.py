"""Training on many processes: two processes on 127.0.0.1 (a real ``jax.distributed`` group, gloo CPU
collectives, 2 host devices each) train a tiny UNet 10 steps to the same params as one process with four
devices, with replicated params, with FSDP over all four devices, and on a 2-D data x fsdp mesh (2 x 2); the
checkpoints of every run are written by both processes through orbax.

Not here yet: kill-and-resume under FSDP on two processes (``train_check.py ... resume``): the resumed
``train()`` call in the same two processes hung in a collective in the one try so far; to be investigated.

The processes start once for the module (tests/support/train_check.py runs every case in them). Tolerances:
across process layouts the reductions (batch mean, gradient all-reduce) may be summed in another order, so
≤ 1e-5 relative (atol 1e-6 for entries near zero; measured: max |diff| 1.3e-6, per-leaf relative norm ≤ 6.1e-6).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from perflow_jax import sharding
from tests.support.train_check import LAYOUTS
from tests.test_sharding import ENV_KEYS, ROOT, _free_port

pytestmark = pytest.mark.slow(reason="three processes each compile the train step for every layout (~1-2 min)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch the 2-process group and the 1-process 4-device run together; their output folders."""
    group, single = tmp_path_factory.mktemp("group"), tmp_path_factory.mktemp("single")
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    base["JAX_PLATFORMS"] = "cpu"
    procs = []
    for i in range(2):
        env = {**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               sharding.ENV_COORDINATOR: f"127.0.0.1:{port}", sharding.ENV_NUM_PROCESSES: "2",
               sharding.ENV_PROCESS_ID: str(i)}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.support.train_check", str(group)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    env = {**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs.append(subprocess.Popen([sys.executable, "-m", "tests.support.train_check", str(single)], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        for p in procs:
            log, _ = p.communicate(timeout=600)
            assert p.returncode == 0, log[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert (group / "done").read_text() == "2x2" and (single / "done").read_text() == "1x4"
    return group, single


def _params(folder, name):
    with np.load(folder / f"{name}.npz") as z:
        return [z[k] for k in z.files]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_processes_equal_one_with_four_devices(runs, layout):
    group, single = runs
    got, want = _params(group, layout), _params(single, layout)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The runs trained: the params moved away from the teacher they started from.
    assert any(not np.allclose(a, t, atol=1e-4) for a, t in zip(got, _params(group, "teacher"), strict=True))
