#!/usr/bin/env bash
# Quick start, command 2: set up and run the lint and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test,tpu
ruff check .
exec python -m pytest -n "${PYTEST_WORKERS:-2}" tests "$@"
