#!/usr/bin/env bash
# Quick start, command 1: set up, then run the main job on the embedded default (CPU):
#   1. the model smoke demo (presets, KV-cache decoding, sharded forward on 8 virtual devices);
#   2. the tiny cross-lingual pre-training experiment (experiments/debug/pretrain_tiny_cpu.gin) on
#      the embedded English/Chinese/code mixture, in a fresh run directory under runs/, printing
#      the loss falling. The corpus and vocabulary are built under data/ on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# Eight virtual CPU devices so the demo also exercises the sharded path.
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
python -m moss_jax.demo
workdir="runs/pretrain_tiny_cpu-$(date +%Y%m%d-%H%M%S)"
exec python -m moss_jax.main --gin_file=experiments/debug/pretrain_tiny_cpu.gin \
  --gin_bindings="moss_jax.train.TrainConfig.workdir = '$workdir'" "$@"
