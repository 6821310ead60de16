#!/usr/bin/env bash
# Compiles every pod experiment gin for the topology its check command names and prints the
# results table (docs/tpu.md); each gin's collective traffic goes to stderr under its name.
# Each 16B compile takes one to several minutes of CPU.
#   bash tpu_setup/aot_all.sh [GIN...]     default: experiments/{pretrain,sft,preference_aware}/moss_16b*.gin
# Runs the repository's .venv Python (bash scripts/test.sh or scripts/setup_env.sh test,tpu makes
# it, with libtpu), or $PYTHON. A compile that fails prints the end of its log.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python; fi
if ! "$py" -c "import moss_jax, libtpu" 2>/dev/null; then
  echo "error: $py cannot import moss_jax and libtpu; run: bash -c 'source scripts/setup_env.sh test,tpu' (or set PYTHON)" >&2
  exit 2
fi
export TPU_WORKER_HOSTNAMES="${TPU_WORKER_HOSTNAMES:-localhost}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
gins=("$@")
if [ ${#gins[@]} -eq 0 ]; then
  mapfile -t gins < <(grep -l -- "--topology=" experiments/{pretrain,sft,preference_aware}/moss_16b*.gin)
fi
header="" rows=() status=0
for gin in "${gins[@]}"; do
  [ -f "$gin" ] || { echo "error: gin file $gin does not exist" >&2; exit 2; }
  topology="$(grep -o -- "--topology=[^ ]*" "$gin" | head -n 1 | cut -d= -f2)"
  [ -n "$topology" ] || { echo "error: $gin names no --topology in its check command" >&2; exit 2; }
  echo "[aot_all] $gin on $topology" >&2
  if ! out="$("$py" -m tpu_setup.aot_compile --gin_file="$gin" --topology="$topology" 2>"$log")"; then
    status=1
    echo "[aot_all] $gin did not compile; the end of its log:" >&2
    tail -n 15 "$log" >&2
  fi
  grep -E '^\[aot\]   (collectives|largest)' <<<"$out" >&2 || true
  table_head="$(grep -m 2 '^|' <<<"$out" || true)"
  [ -z "$table_head" ] || header="$table_head"
  rows+=("$(grep '^|' <<<"$out" | tail -n 1 || echo "| $(basename "$gin" .gin) | train | $topology | did not compile |")")
done
echo "$header"
printf '%s\n' "${rows[@]}"
exit "$status"
