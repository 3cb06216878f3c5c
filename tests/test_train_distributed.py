"""Training on many processes: two processes on 127.0.0.1 (a real ``jax.distributed`` group, gloo CPU
collectives, 2 host devices each) train a tiny UNet 10 steps to the same params as one process with four
devices, with replicated params, with FSDP over all four devices, and on a 2-D data x fsdp mesh (2 x 2); the
checkpoints of every run are written by both processes through orbax. Then the two processes start the FSDP
run again and SIGKILL themselves after step 6; two new processes resume it from the step-5 checkpoint and end
equal to the uninterrupted run (after checking that a process that refuses to resume stops its peer too).

The processes start once for the module (tests/support/train_check.py runs every case in them; the resume
needs new processes by definition). Tolerances:
across process layouts the reductions (batch mean, gradient all-reduce) may be summed in another order, so
≤ 1e-5 relative per leaf in norm (measured: ≤ 6.1e-6), and entry by entry within 1e-4 relative or 1e-5 of
the leaf's largest magnitude (measured: max |diff| 1.1e-6; a bias entry of 1.06e-3 differed by 8e-8).
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


def _launch(args: list[str], env: dict[str, str], out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.support.train_check", str(out), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _group_env(base: dict[str, str], port: int, i: int) -> dict[str, str]:
    return {**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            sharding.ENV_COORDINATOR: f"127.0.0.1:{port}", sharding.ENV_NUM_PROCESSES: "2",
            sharding.ENV_PROCESS_ID: str(i)}


def _wait(procs: list[subprocess.Popen], killed: int = 0) -> None:
    """Wait for `procs`; the first `killed` ones are expected to die (SIGKILL, or aborted when their peer died)."""
    try:
        for i, p in enumerate(procs):
            log, _ = p.communicate(timeout=600)
            assert (p.returncode != 0) if i < killed else (p.returncode == 0), log[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process group (killed in its last run) and the 1-process 4-device run, side by side; then two new
    processes resume the killed run. Their output folders."""
    group, single = tmp_path_factory.mktemp("group"), tmp_path_factory.mktemp("single")
    base = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    base["JAX_PLATFORMS"] = "cpu"
    port = _free_port()
    procs = [_launch(["kill"], _group_env(base, port, i), group) for i in range(2)]
    procs.append(_launch([], {**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, single))
    _wait(procs, killed=2)
    assert (group / "done").read_text() == "2x2" and (single / "done").read_text() == "1x4"
    port = _free_port()
    _wait([_launch(["resume"], _group_env(base, port, i), group) for i in range(2)])
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
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)  # each leaf, relative in norm
        # and entry by entry, with a looser bound: an entry near zero ends ten steps of differently ordered
        # sums, so it is judged against its leaf's scale
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))
    # The runs trained: the params moved away from the teacher they started from.
    assert any(not np.allclose(a, t, atol=1e-4) for a, t in zip(got, _params(group, "teacher"), strict=True))


def test_kill_and_resume_under_fsdp_equals_uninterrupted(runs):
    group, _ = runs
    got, want = _params(group, "fsdp_resumed"), _params(group, "fsdp")
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):  # the same layout and the exact restored state: identical
        np.testing.assert_array_equal(a, b)
