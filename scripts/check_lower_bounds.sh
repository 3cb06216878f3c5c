#!/usr/bin/env bash
# Check that pyproject.toml's lower bounds are true: install the oldest allowed runtime dependencies (with the
# pinned test references beside them) into .venv-oldest and run the fast, dependency-sensitive part of the suite.
# Usage: bash scripts/check_lower_bounds.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${PERFLOW_JAX_OLDEST_VENV:-.venv-oldest}
# The oldest version each runtime lower bound in pyproject.toml allows.
OLDEST=(jax==0.10.0 jaxlib==0.10.0 flax==0.12.0 optax==0.2.4 chex==0.1.88 numpy==2.0.2 safetensors==0.4.5
        transformers==5.0.0 orbax-checkpoint==0.11.20 pyyaml==6.0.1 tqdm==4.66.0 pillow==10.4.0 grain==0.2.18
        array-record==0.8.6)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The test references stay pinned, except the runtime dependencies under test and what must move with them
# (diffusers 0.42 needs safetensors >= 0.8 and a newer huggingface_hub, so the resolver picks an older one).
names=$(printf '%s\n' "${OLDEST[@]}" | sed 's/==.*//' | tr '\n' '|' | sed 's/|$//')
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
grep -viE "^(${names}|tokenizers|huggingface.hub|hf.xet|ml.dtypes|tensorstore|diffusers|accelerate)==" constraints/test.txt > "$constraints"
"$VENV/bin/python" -m pip install -q -c "$constraints" "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -c "$constraints" "${OLDEST[@]}" -e . pytest diffusers scikit-learn scipy
"$VENV/bin/python" -m pip list --format=freeze | grep -iE "^($names)==" | tr '\n' ' '; echo
export JAX_PLATFORMS=cpu
exec "$VENV/bin/python" -m pytest -q -m "not slow" tests/test_perflow_scheduler.py tests/test_layers.py \
  tests/test_unet.py tests/test_vae.py tests/test_clip.py tests/test_delta_convert.py tests/test_digits.py \
  tests/test_training.py "$@"
