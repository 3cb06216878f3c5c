"""Execute the notebooks with nbclient so they never rot; the quickstart runs against a tiny SD1-style model.

The kernel is this test process's own interpreter (``sys.executable``, whatever virtual environment runs
pytest): a kernelspec for it is written to a temporary ``JUPYTER_PATH``, so no globally installed
``python3`` kernel (possibly another Python) is picked up. Each cell is time-boxed.
"""

from __future__ import annotations

import json
import os
import re
import sys

import jax
import nbformat
import pytest
import torch

from tests.support.tiny_sd import make_tiny_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
KERNEL = "perflow-jax-test"
CELL_TIMEOUT = 240  # seconds per cell (the tiny model compiles in ~10–20 s on 2 shared cores)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = str(tmp_path_factory.mktemp("nb_model") / "tiny_sd15")
    make_tiny_pipeline(folder, "sd15")
    torch.set_num_threads(threads)
    return folder


@pytest.fixture
def kernel_env(tmp_path, monkeypatch) -> None:
    """A kernelspec for ``sys.executable`` under a temporary JUPYTER_PATH, and the environment the kernel
    inherits: CPU JAX and, as ``PERFLOW_JAX_CACHE_DIR``, the tests' persistent compilation cache (which a
    notebook's explicit ``perflow_jax.enable_compilation_cache()`` then uses)."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"perflow-jax tests ({sys.executable})", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PERFLOW_JAX_CACHE_DIR", jax.config.jax_compilation_cache_dir or "off")
    for name in ("PERFLOW_JAX_MODEL", "PERFLOW_JAX_DELTA", "PERFLOW_JAX_DELTA_VARIANT", "PERFLOW_JAX_SOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the suite never reaches the Hub (conftest.py sets it too)
    # The kernel imports this checkout's perflow_jax, whatever copy the environment has installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))


def _run(name: str) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=KERNEL,
                            resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()  # raises CellExecutionError with the cell's traceback on any error
    return nb


def _stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def _num_images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "pure_functions.ipynb"])
def test_committed_notebook_has_no_outputs(name: str) -> None:
    """The committed notebooks are stored with outputs and execution counts cleared (small, clean diffs)."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_quickstart_installs_from_perflow_jax_source() -> None:
    """The first code cell installs with pip from PERFLOW_JAX_SOURCE (default: the package name), on Colab or
    where perflow_jax is not importable; no placeholder URL is left."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, "quickstart.ipynb"), as_version=4)
    first = next(c.source for c in nb.cells if c.cell_type == "code")
    assert 'PERFLOW_JAX_SOURCE = os.environ.get("PERFLOW_JAX_SOURCE", "perflow-jax")' in first
    assert '"pip", "install", "-q", PERFLOW_JAX_SOURCE]' in first
    assert "OWNER" not in "".join(c.source for c in nb.cells)


@pytest.mark.slow(reason="executes the quickstart in a fresh kernel: JAX import and the digits sampler's compile")
def test_quickstart_offline_runs_on_builtin_model(kernel_env) -> None:
    """Offline and with no PERFLOW_JAX_MODEL, every cell runs on the built-in digits model."""
    nb = _run("quickstart.ipynb")
    out = _stdout(nb)
    assert f"perflow-jax: {os.path.join(ROOT, 'perflow_jax', '__init__.py')}" in out
    assert "online: False | model: digits" in out
    assert "(8, 8, 8) uint8" in out
    assert "img2img needs a Stable Diffusion model" in out
    assert _num_images(nb) == 2  # the two generated grids


def test_quickstart_runs_on_tiny_model(tiny_model: str, kernel_env, monkeypatch) -> None:
    """The quickstart turns on the persistent compilation cache explicitly (the tests' folder, from
    ``PERFLOW_JAX_CACHE_DIR``), loads the model from ``PERFLOW_JAX_MODEL`` (here the tiny SD1-style model),
    generates 4 images in 4 PeRFlow steps and shows them; the second generation does not recompile; img2img
    runs. The install cell is skipped outside Colab (perflow_jax is importable)."""
    monkeypatch.setenv("PERFLOW_JAX_MODEL", tiny_model)
    nb = _run("quickstart.ipynb")
    out = _stdout(nb)
    assert f"compilation cache: {jax.config.jax_compilation_cache_dir or None}" in out
    assert f"model: {tiny_model}" in out
    assert "(4, 32, 32, 3) uint8" in out
    assert "recompiled: False" in out
    assert _num_images(nb) == 3  # two text-to-image grids and the img2img grid


def test_pure_functions_notebook_runs(kernel_env) -> None:
    """The pure-function notebook: one trace for three seeds/guidance scales under jit, one more for the
    vmapped sweep (reused for new scales) matching single runs, and a hand-written loop matching
    ``sampling.sample``."""
    nb = _run("pure_functions.ipynb")
    out = _stdout(nb)
    assert "traces: 1 | compiled programs: 1" in out
    assert "new traces for the sweep: 1 | compiled programs: 1" in out
    assert "compiled programs of generate_jit: 1" in out
    diffs = [float(x) for x in re.findall(r"max \|[^|]+\| = ([0-9.eE+-]+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-5, out
