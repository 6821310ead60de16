#!/usr/bin/env bash
# The GPU kernels' tests on the JAX the lent GPU machines run (0.11.2, which needs Python >= 3.12),
# on a CPU host: the Triton and Mosaic GPU lowerings for CUDA, the CPU-interpreted kernels, and no
# use of an API that JAX deprecates (DeprecationWarning is an error here, except the deprecation
# of Pallas's Triton backend itself, which `pallas_gpu` still rests on). The project pins jax
# 0.10.2 on Python 3.11; the default suite runs only the interpreter tests this way
# (tests/kernels/test_flash_mgpu_interpret.py), where a Python >= 3.12 is installed. Run all of
# tests/kernels with it before a GPU session.
#
#   bash scripts/test_kernels_jax_next.sh [pytest args]
#   bash scripts/test_kernels_jax_next.sh --find-python   # prints the Python it would use; exit 3: none
#
# Env: JAX_NEXT (default 0.11.2), PYTHON_NEXT (a Python >= 3.12; default: python3.12 on PATH or
# pyenv's), VENV_NEXT (default .venv-jax-next), JAX_NEXT_TESTS (default tests/kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
JAX_NEXT="${JAX_NEXT:-0.11.2}"
VENV_NEXT="${VENV_NEXT:-.venv-jax-next}"
if [ -z "${PYTHON_NEXT:-}" ]; then
  for candidate in python3.13 python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python "$HOME"/.pyenv/versions/3.13*/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      PYTHON_NEXT="$candidate"
      break
    fi
  done
fi
if [ -z "${PYTHON_NEXT:-}" ]; then
  echo "error: jax $JAX_NEXT needs Python >= 3.12 and none was found; set PYTHON_NEXT=/path/to/python3.12" >&2
  [ "${1:-}" = --find-python ] && exit 3
  exit 1
fi
if ! "$PYTHON_NEXT" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
  echo "error: PYTHON_NEXT=$PYTHON_NEXT is not a Python >= 3.12, which jax $JAX_NEXT needs" >&2
  exit 1
fi
if [ "${1:-}" = --find-python ]; then
  echo "$PYTHON_NEXT"
  exit 0
fi
if [ ! -x "$VENV_NEXT/bin/python" ] || ! "$VENV_NEXT/bin/python" -c "import jax, sys; sys.exit(jax.__version__ != '$JAX_NEXT')" 2>/dev/null; then
  echo "[jax-next] creating $VENV_NEXT with $("$PYTHON_NEXT" --version) and jax $JAX_NEXT"
  rm -rf "$VENV_NEXT"
  "$PYTHON_NEXT" -m venv "$VENV_NEXT"
  # What moss_jax.kernels and tests/kernels import (the GPU machines carry the same flax/optax/gin).
  "$VENV_NEXT/bin/pip" install -q "jax==$JAX_NEXT" "jaxlib==$JAX_NEXT" flax==0.12.8 optax==0.2.8 \
    gin-config==0.5.0 "numpy>=2.0" "ml_dtypes>=0.5" "pytest>=8" "pytest-xdist>=3.5"
fi
export JAX_PLATFORMS=cpu TPU_WORKER_HOSTNAMES=localhost
# shellcheck disable=SC2086 # JAX_NEXT_TESTS is a list of paths
exec "$VENV_NEXT/bin/python" -m pytest -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" -rs \
  -W error::DeprecationWarning -W "ignore:The Pallas Triton backend is deprecated:DeprecationWarning" \
  ${JAX_NEXT_TESTS:-tests/kernels} "$@"
