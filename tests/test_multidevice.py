"""Multi-device generation: a 4-device mesh gives the same images as a 1-device mesh.

JAX fixes its device count when it starts, so the check runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (4 CPU "devices"): ``tests/support/multidevice_check.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from tests.support.tiny_sd import make_tiny_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow(reason="a subprocess with 4 forced devices compiles the pipeline for 4 and for 1 device")
def test_four_devices_equal_one_device(tmp_path) -> None:
    """3 images (seed 0, CFG, PeRFlow 4 steps) on a 4-device ("data",) mesh vs a 1-device mesh.

    The 4-device program pads the batch to 4 (one row per device) and trims it back to 3; the 1-device one
    runs 3 rows on one device. Every image's noise comes from ``fold_in(key(seed), i)`` whatever the split,
    so the images must agree. Tolerance 1e-5 (float images in [0, 1]): the arithmetic per image is the same,
    but XLA may pick different blockings for per-device batch 1 vs 3, which reorders float32 sums (~1e-7
    relative per op); a wrong shard/trim or noise assignment would differ by O(0.1).

    The 4-device program must really shard: every batch input and the output are split over the ("data",)
    axis of all 4 devices (one row each), while params are replicated.
    """
    model = str(tmp_path / "tiny_sd15")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: PyTorch's thread pool only slows building the tiny model
    try:
        make_tiny_pipeline(model, "sd15")
    finally:
        torch.set_num_threads(threads)
    out = str(tmp_path / "images.npz")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PERFLOW_JAX_CACHE_DIR": jax.config.jax_compilation_cache_dir or "off"}
    proc = subprocess.run([sys.executable, "-m", "tests.support.multidevice_check", model, out], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    images = np.load(out)
    four, one = images["four"], images["one"]
    diff = float(np.max(np.abs(four - one)))
    print(f"\n4-device vs 1-device max |diff| = {diff:.2e}")
    assert four.shape == one.shape == (3, 32, 32, 3)
    assert np.std(four) > 0.02
    assert diff <= 1e-5
    assert np.max(np.abs(four[0] - four[1])) > 1e-3  # different prompts/noise per row: not one image repeated

    with open(out + ".json", encoding="utf-8") as f:
        facts = json.load(f)
    assert facts["mesh_devices"] == 4 and facts["single_mesh_devices"] == 1
    assert facts["padded_batch"] == 4
    assert set(facts["inputs"]) == {"ids", "neg_ids", "index"}
    for name, s in facts["inputs"].items():
        assert s["num_devices"] == 4 and s["batch_sharded"] and s["shard_rows"] == 1, (name, s)
    assert facts["output"] == {"num_devices": 4, "batch_sharded": True}
    assert facts["params_replicated"]
