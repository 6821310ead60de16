#!/usr/bin/env bash
# Creates ./.venv with Python 3.11 and installs moss_jax (editable) with the given extras.
# Re-running is cheap: the install is skipped while setup.py is unchanged.
#   usage: source scripts/setup_env.sh [extras]     e.g. extras = "test"
set -euo pipefail
_moss_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_moss_extras="${1:-}"
_moss_python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if ! "$_moss_python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "error: moss_jax needs Python 3.11; $_moss_python is $("$_moss_python" --version 2>&1)" >&2
  exit 1
fi
if [ ! -x "$_moss_root/.venv/bin/python" ]; then
  echo "[setup] creating $_moss_root/.venv"
  "$_moss_python" -m venv "$_moss_root/.venv"
  "$_moss_root/.venv/bin/python" -m pip install -q --upgrade pip
fi
_moss_hash="$(cat "$_moss_root/setup.py" | sha1sum | cut -c1-12)"
_moss_stamp="$_moss_root/.venv/.installed-${_moss_extras:-core}-$_moss_hash"
if [ ! -f "$_moss_stamp" ]; then
  echo "[setup] installing moss_jax${_moss_extras:+[$_moss_extras]} (first run takes a few minutes)"
  # The test,tpu install is about 5.6 GB in .venv plus pip's unpacked wheels in the temp folder;
  # a full disk otherwise surfaces as a bare "No space left on device" deep in pip's log.
  _moss_need_kb=$(( ${MOSS_SETUP_MIN_FREE_GB:-7} * 1024 * 1024 ))
  for _moss_dir in "$_moss_root" "${TMPDIR:-/tmp}"; do
    _moss_free_kb="$(df -Pk "$_moss_dir" | awk 'NR==2 {print $4}')"
    if [ -n "$_moss_free_kb" ] && [ "$_moss_free_kb" -lt "$_moss_need_kb" ]; then
      echo "error: $_moss_dir has $(( _moss_free_kb / 1024 )) MB free; installing moss_jax${_moss_extras:+[$_moss_extras]} needs about ${MOSS_SETUP_MIN_FREE_GB:-7} GB (set MOSS_SETUP_MIN_FREE_GB to override)" >&2
      exit 1
    fi
  done
  _moss_spec="$_moss_root"
  [ -n "$_moss_extras" ] && _moss_spec="${_moss_root}[${_moss_extras}]"
  if ! "$_moss_root/.venv/bin/python" -m pip install --no-cache-dir -e "$_moss_spec" > "$_moss_root/.venv/install.log" 2>&1; then
    tail -n 40 "$_moss_root/.venv/install.log" >&2
    echo "error: pip install failed; full log in $_moss_root/.venv/install.log" >&2
    exit 1
  fi
  touch "$_moss_stamp"
fi
export PATH="$_moss_root/.venv/bin:$PATH"
# On a host without TPU chips, libtpu (the `tpu` extra) only compiles for TPU: skip its probe of
# the VM's workers and its exclusive lock. On a TPU VM neither is set: a multi-host slice reads its
# workers from TPU_WORKER_HOSTNAMES (or the VM's metadata), and "localhost" would cut it to one.
_moss_tpu_chips=0
for _moss_dev in ${MOSS_TPU_DEVICE_GLOB:-/dev/accel* /dev/vfio/[0-9]*}; do
  [ -e "$_moss_dev" ] && _moss_tpu_chips=1
done
if [ "$_moss_tpu_chips" = 0 ]; then
  export TPU_WORKER_HOSTNAMES="${TPU_WORKER_HOSTNAMES:-localhost}"
  export ALLOW_MULTIPLE_LIBTPU_LOAD="${ALLOW_MULTIPLE_LIBTPU_LOAD:-1}"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
