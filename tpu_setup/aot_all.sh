#!/usr/bin/env bash
# Compiles every pod experiment gin for the topology its check command names and prints the
# results table (docs/tpu.md). Each 16B compile takes one to several minutes of CPU.
#   bash tpu_setup/aot_all.sh [GIN...]     default: experiments/{pretrain,sft,preference_aware}/moss_16b*.gin
set -euo pipefail
cd "$(dirname "$0")/.."
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
  out="$(python -m tpu_setup.aot_compile --gin_file="$gin" --topology="$topology" 2>/dev/null)" || status=1
  table_head="$(grep -m 2 '^|' <<<"$out" || true)"
  [ -z "$table_head" ] || header="$table_head"
  rows+=("$(grep '^|' <<<"$out" | tail -n 1 || echo "| $(basename "$gin" .gin) | train | $topology | did not compile |")")
done
echo "$header"
printf '%s\n' "${rows[@]}"
exit "$status"
