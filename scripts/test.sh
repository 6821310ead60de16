#!/usr/bin/env bash
# Quick start, command 2: set up and run the lint and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test,tpu
# The web UI tests (tests/web) drive Debian's headless Chromium through chromedriver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "[test] installing chromium and chromium-driver (apt) for tests/web"
  if ! { [ "$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }; then
    echo "error: tests/web need Debian's chromium and chromium-driver; install them as root:" >&2
    echo "  apt-get install -y --no-install-recommends chromium chromium-driver" >&2
    exit 1
  fi
fi
ruff check .
exec python -m pytest -n "${PYTEST_WORKERS:-2}" tests "$@"
