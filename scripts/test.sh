#!/usr/bin/env bash
# Install what the tests need into a local venv and run the whole suite.
#
# Usage: bash scripts/test.sh [--latest] [pytest args...]
#
# By default the test references (torch, diffusers, transformers, peft, ...) and everything else are installed
# at the versions pinned in constraints/test.txt, into .venv-test: the same set every time, so a new release on
# the package registry cannot break CI. With --latest they are installed unpinned (newest allowed by
# pyproject.toml) into .venv-test-latest, to see drift before it reaches the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
LATEST=0
if [ "${1:-}" = "--latest" ]; then
  LATEST=1
  shift
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ "$LATEST" -eq 1 ]; then
  VENV=${PERFLOW_JAX_TEST_VENV:-.venv-test-latest}
  PIN=()
else
  VENV=${PERFLOW_JAX_TEST_VENV:-.venv-test}
  PIN=(-c constraints/test.txt)
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch is pinned to the CPU build that installs fast; an unpinned torch pulls GBs of CUDA packages.
"$VENV/bin/python" -m pip install -q "${PIN[@]}" "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "${PIN[@]}" -e ".[test]"
if [ "$LATEST" -eq 1 ]; then
  "$VENV/bin/python" -m pip list --format=freeze 2>/dev/null \
    | grep -iE '^(torch|diffusers|transformers|peft|tokenizers|huggingface.hub|accelerate|jax|jaxlib|flax|optax|orbax-checkpoint)==' \
    | tr '\n' ' ' | sed 's/^/unpinned: /'
  echo
fi
export JAX_PLATFORMS=cpu
set +e
# The 15 slowest tests are listed at the end of every run: the suite's budget is 30 min on CI's 2-core machine.
"$VENV/bin/python" -m pytest --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
