#!/usr/bin/env bash
# Quick start, command 1: set up and run the main job on the embedded default (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# Eight virtual CPU devices so the demo also exercises the sharded path.
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
exec python -m moss_jax.demo "$@"
