"""scripts/benchmark.py runs on the tiny preset and writes its report (no timing assertions).

Run as a subprocess: the script points JAX's persistent compilation cache at its own folder, which must not
leak into this test session's JAX config. Smallest grid, no cold/warm probe processes, to stay well under 60 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow(reason="times the tiny preset end to end: both libraries load, compile and run")
def test_benchmark_tiny_writes_report(tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--preset", "tiny", "--steps", "2",
           "--batches", "1", "--resolution", "16", "--repeats", "1", "--warmup", "0", "--torch-threads", "1",
           "--no-probes", "--model-cache", str(tmp_path / "model"), "--out", str(out), "--write-docs",
           "--docs-dir", str(docs), "--name", "cpu-tiny"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    res = json.loads((out / "cpu-tiny.json").read_text())
    assert [(r["steps"], r["batch"]) for r in res["grid"]] == [(2, 1)]
    assert {"jax_ips", "torch_ips", "ratio"} <= set(res["grid"][0])
    assert res["grid"][0]["limit_s"] > 0 and res["grid"][0]["overhead"] > 0
    assert res["recompile_check"]["recompiled"] is False
    assert res["video"]["overhead"] > 0 and res["video"]["diffusers_frames_per_s"] > 0  # the SVD row
    assert [r["views"] for r in res["multiview"]] == [1, 2, 4] and all(r["views_per_s"] > 0 for r in res["multiview"])
    for folder in (out, docs):
        md = (folder / "cpu-tiny.md").read_text()
        assert "## 1. End-to-end images/s" in md and "Not run" in md  # no GPU section on CPU
        assert "Multi-view UNet" in md
        assert "![images/s and time breakdown](cpu-tiny.png)" in md
        assert "Stable Video Diffusion image → video" in md
        assert (folder / "cpu-tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads((folder / "cpu-tiny.json").read_text()) == res
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left behind

    # The JSON alone re-renders the same report.
    rerender = tmp_path / "rerender"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--from-json",
                           str(out / "cpu-tiny.json"), "--out", str(rerender), "--name", "cpu-tiny"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (rerender / "cpu-tiny.md").read_text() == (out / "cpu-tiny.md").read_text()


def _benchmark_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("perflow_benchmark", os.path.join(ROOT, "scripts", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compile_log_attributes_jax_compile_times_to_programs() -> None:
    """CompileLog reads JAX's own compile log of a real jit: the program is named, each phase timed, a second
    call compiles nothing, and the startup section renders the table with ratios against diffusers."""
    import jax
    import jax.numpy as jnp

    bench = _benchmark_module()
    with bench.CompileLog() as log:
        f = jax.jit(lambda x: jnp.tanh(x) * 3)
        f(jnp.ones(7)).block_until_ready()
        f(jnp.ones(7)).block_until_ready()
    assert not jax.config.jax_log_compiles
    rows = {r["program"]: r for r in log.table()}
    assert "<lambda>" in rows
    assert rows["<lambda>"]["compile"] > 0 and rows["<lambda>"]["lower"] > 0
    assert abs(sum(r["share"] for r in rows.values()) - 1) < 1e-9

    probe = {"import_s": 1.0, "load_s": 2.0, "compile_s": 3.0, "first_call_s": 4.0, "process_wall_s": 10.0,
             "programs": log.table()}
    torch_run = {"import_s": 1.0, "load_s": 1.0, "first_call_s": 4.0, "process_wall_s": 8.0}
    st = {"cold": probe, "warm": {**probe, "process_wall_s": 9.0}, "torch": [torch_run, torch_run]}
    st["rows"] = [{"key": "load", "what": "weight loading", "jax_s": 2.0, "torch_s": 1.0, "ratio": 2.0, "goal": 1.5}]
    text = "\n".join(bench.startup_lines(st))
    assert "| weight loading | 2.00 | 1.00 | **2.00** | ≤ 1.5 |" in text
    assert "| `<lambda>` |" in text and "| diffusers run 2 |" in text
