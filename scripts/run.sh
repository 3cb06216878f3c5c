#!/usr/bin/env bash
# Main job: set up .venv (perflow-jax on CPU JAX) and sample the built-in PeRFlow digits model in 4 steps,
# writing PNGs and grid.png to out/digits. Extra arguments go to `perflow-jax sample`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${PERFLOW_JAX_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e .
exec "$VENV/bin/perflow-jax" sample --model digits --prompt 0 1 2 3 4 5 6 7 8 9 --num-images 4 --steps 4 \
    --out out/digits "$@"
