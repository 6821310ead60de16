#!/usr/bin/env bash
# Quick start, command 1: set up, then run the main job on the embedded default (CPU): the three
# MOSS stages end to end (python -m moss_jax.stages.demo, experiments/demo/*.gin): embedded corpus,
# search index, tool conversations and preference pairs, vocabulary; pre-training, SFT with tool
# conversations, the preference model, tagging, preference-aware training, DPO; evaluation and a
# report in runs/demo/report/. Re-running resumes finished stages. Arguments go to the pipeline
# (e.g. --workdir runs/demo2).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec python -m moss_jax.stages.demo "$@"
