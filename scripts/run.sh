#!/usr/bin/env bash
# Main job. Sets up .venv (perflow-jax, CPU JAX) and runs it.
# Until the built-in digits model and `perflow-jax sample` land, it benchmarks the jitted PeRFlow loop.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${PERFLOW_JAX_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e .
exec "$VENV/bin/python" scripts/bench_scheduler.py "$@"
