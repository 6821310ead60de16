#!/usr/bin/env bash
# TPU VM lifecycle with gcloud: create (on-demand, spot or reserved) or queue a slice, install
# moss_jax on every worker, copy or mount data, run a command on every worker, delete.
#
#   tpu_setup/tpu.sh [--dry_run] COMMAND --name=NAME --zone=ZONE [options]
#
#   create     --topology=v5p:4x4x4 | --accelerator_type=v5p-128  [--version=RUNTIME]
#              [--spot | --reserved] [--network=NET] [--subnetwork=SUBNET]
#   queue      like create, plus [--valid_until_duration=24h]; a queued resource named NAME
#              whose single node is NAME (gcloud compute tpus queued-resources create)
#   install    [--src=DIR (default: this repository)] [--extras=tpu]: git archive of HEAD,
#              copied to every worker, unpacked into ~/moss_jax, venv built by setup_env.sh
#   copy_data  --src=gs://BUCKET/PATH --dest=/mnt/moss_data: gcloud storage rsync on every worker
#   mount      --bucket=BUCKET --dest=/mnt/moss_data: gcsfuse on every worker (must be installed)
#   run        [--log=FILE] -- COMMAND...: in ~/moss_jax with the venv, on every worker at once
#   status     describe the TPU VM (or, with --queued, the queued resource)
#   delete     [--queued]: delete the TPU VM, or the queued resource and its node
#
# Every command takes --project=PROJECT (default: gcloud's configured project).
# --dry_run or DRY_RUN=1 prints each gcloud/git command, shell-quoted, instead of running it.
set -euo pipefail

die() {
  echo "error: $*" >&2
  exit 2
}

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

DRY_RUN="${DRY_RUN:-0}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Shell-quotes words the way Python's shlex.join does (single quotes unless all safe characters).
quote() {
  local out="" word sq="'" esc="'\"'\"'"
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+="$word "
    else
      out+="'${word//$sq/$esc}' "
    fi
  done
  echo "${out% }"
}

# Prints the command (shell-quoted, one line) in dry-run mode; runs it otherwise.
run_cmd() {
  if [ "$DRY_RUN" = 1 ]; then
    quote "$@"
  else
    "$@"
  fi
}

# Runtime images per generation (cloud.google.com/tpu/docs/runtimes).
default_version() {
  case "$1" in
    v4*) echo "tpu-ubuntu2204-base" ;;
    v5p*) echo "v2-alpha-tpuv5" ;;
    v5litepod* | v5e*) echo "v2-alpha-tpuv5-lite" ;;
    v6e*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default runtime version for '$1'; pass --version" ;;
  esac
}

# v5p:4x4x4 -> --type=v5p --topology=4x4x4 (gcloud names v5e 'v5litepod'). The rules are
# tpu_setup/topology.py's: v4 and v5p are 3-D tori (AxBxC), v5e and v6e 2-D (AxB), no zero sides.
topology_flags() {
  local gen="${1%%:*}" shape="${1#*:}" dims size sizes
  [[ "$1" == *:* && "$shape" =~ ^[0-9]+(x[0-9]+)+$ ]] || die "bad --topology '$1'; expected e.g. v5p:4x4x4, v4:4x4x4, v5e:16x16"
  case "$gen" in
    v4 | v5p) dims=3 ;;
    v6e) dims=2 ;;
    v5e | v5litepod) gen="v5litepod" dims=2 ;;
    *) die "unknown TPU generation '$gen' in --topology '$1'; known: v4, v5p, v5e, v6e" ;;
  esac
  IFS=x read -r -a sizes <<<"$shape"
  [ "${#sizes[@]}" = "$dims" ] ||
    die "bad --topology '$1': ${1%%:*} topologies have $dims dimensions (e.g. $([ "$dims" = 3 ] && echo 4x4x4 || echo 16x16)), got ${#sizes[@]}"
  for size in "${sizes[@]}"; do
    ((10#$size >= 1)) || die "bad --topology '$1': every dimension must be at least 1"
  done
  echo "--type=$gen --topology=$shape"
}

[ $# -gt 0 ] || usage
if [ "$1" = "--dry_run" ]; then
  DRY_RUN=1
  shift
fi
[ $# -gt 0 ] || usage
COMMAND="$1"
shift
case "$COMMAND" in
  -h | --help | help) usage 0 ;;
  create | queue | install | copy_data | mount | run | status | delete) ;;
  *) die "unknown command '$COMMAND'; one of: create queue install copy_data mount run status delete" ;;
esac

NAME="" ZONE="" PROJECT="" TOPOLOGY="" ACCEL="" VERSION="" CAPACITY="" NETWORK="" SUBNETWORK=""
VALID_UNTIL="" SRC="" DEST="" BUCKET="" EXTRAS="tpu" LOG="" QUEUED=0
REMOTE=()
while [ $# -gt 0 ]; do
  arg="$1"
  shift
  case "$arg" in
    --) REMOTE=("$@") && break ;;
    --dry_run) DRY_RUN=1 && continue ;;
    --spot | --reserved)
      [ -z "$CAPACITY" ] || [ "$CAPACITY" = "$arg" ] || die "give --spot or --reserved, not both"
      CAPACITY="$arg" && continue
      ;;
    --queued) QUEUED=1 && continue ;;
    --*=*) key="${arg%%=*}" value="${arg#*=}" ;;
    --*)
      [ $# -gt 0 ] || die "$arg needs a value"
      key="$arg" value="$1"
      shift
      ;;
    *) die "unexpected argument '$arg' (options are --key=value; the remote command goes after --)" ;;
  esac
  case "$key" in
    --name) NAME="$value" ;;
    --zone) ZONE="$value" ;;
    --project) PROJECT="$value" ;;
    --topology) TOPOLOGY="$value" ;;
    --accelerator_type) ACCEL="$value" ;;
    --version) VERSION="$value" ;;
    --network) NETWORK="$value" ;;
    --subnetwork) SUBNETWORK="$value" ;;
    --valid_until_duration) VALID_UNTIL="$value" ;;
    --src) SRC="$value" ;;
    --dest) DEST="$value" ;;
    --bucket) BUCKET="$value" ;;
    --extras) EXTRAS="$value" ;;
    --log) LOG="$value" ;;
    *) die "unknown option '$key' for '$COMMAND'" ;;
  esac
done

[ -n "$NAME" ] || die "--name is required"
[ -n "$ZONE" ] || die "--zone is required"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME': lowercase letters, digits and '-', starting with a letter"
GLOBAL=(--zone="$ZONE")
[ -z "$PROJECT" ] || GLOBAL+=(--project="$PROJECT")
SSH_ALL=(gcloud compute tpus tpu-vm ssh "$NAME" "${GLOBAL[@]}" --worker=all)

slice_flags() {
  if [ -n "$TOPOLOGY" ] && [ -n "$ACCEL" ]; then
    die "give --topology or --accelerator_type, not both"
  elif [ -n "$TOPOLOGY" ]; then
    # shellcheck disable=SC2207  # two words, no globs
    SLICE=($(topology_flags "$TOPOLOGY"))
    VERSION="${VERSION:-$(default_version "${TOPOLOGY%%:*}")}"
  elif [ -n "$ACCEL" ]; then
    [[ "$ACCEL" =~ ^(v4|v5p|v5litepod|v6e)-[0-9]+$ ]] || die "bad --accelerator_type '$ACCEL'; e.g. v5p-128, v4-128, v5litepod-256"
    SLICE=(--accelerator-type="$ACCEL")
    VERSION="${VERSION:-$(default_version "$ACCEL")}"
  else
    die "$COMMAND needs --topology (e.g. v5p:4x4x4) or --accelerator_type (e.g. v5p-128)"
  fi
  EXTRA=()
  [ -z "$CAPACITY" ] || EXTRA+=("$CAPACITY")
  [ -z "$NETWORK" ] || EXTRA+=(--network="$NETWORK")
  [ -z "$SUBNETWORK" ] || EXTRA+=(--subnetwork="$SUBNETWORK")
}

case "$COMMAND" in
  create)
    slice_flags
    run_cmd gcloud compute tpus tpu-vm create "$NAME" "${GLOBAL[@]}" "${SLICE[@]}" --version="$VERSION" "${EXTRA[@]}"
    ;;
  queue)
    slice_flags
    [ -z "$VALID_UNTIL" ] || EXTRA+=(--valid-until-duration="$VALID_UNTIL")
    run_cmd gcloud compute tpus queued-resources create "$NAME" "${GLOBAL[@]}" --node-id="$NAME" "${SLICE[@]}" \
      --runtime-version="$VERSION" "${EXTRA[@]}"
    ;;
  install)
    SRC="${SRC:-$REPO_ROOT}"
    [ -d "$SRC" ] || die "--src '$SRC' is not a directory"
    tarball="/tmp/moss_jax-$NAME.tar.gz"
    run_cmd git -C "$SRC" archive --format=tar.gz --output="$tarball" HEAD
    run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$NAME:moss_jax.tar.gz" "${GLOBAL[@]}" --worker=all
    run_cmd "${SSH_ALL[@]}" --command="set -e; (python3.11 --version || (sudo apt-get update -qq && \
sudo apt-get install -y -qq python3.11 python3.11-venv)) >/dev/null; mkdir -p ~/moss_jax && \
tar -xzf ~/moss_jax.tar.gz -C ~/moss_jax && cd ~/moss_jax && source scripts/setup_env.sh $EXTRAS"
    ;;
  copy_data)
    [[ "$SRC" == gs://* ]] || die "copy_data needs --src=gs://BUCKET/PATH"
    [[ "$DEST" == /* ]] || die "copy_data needs an absolute --dest, e.g. /mnt/moss_data"
    run_cmd "${SSH_ALL[@]}" --command="set -e; sudo mkdir -p $DEST && sudo chown \$(id -u):\$(id -g) $DEST && \
gcloud storage rsync --recursive $SRC $DEST"
    ;;
  mount)
    [ -n "$BUCKET" ] || die "mount needs --bucket=BUCKET (a name, no gs://)"
    [[ "$BUCKET" != gs://* ]] || die "--bucket takes the bucket name without gs://"
    [[ "$DEST" == /* ]] || die "mount needs an absolute --dest, e.g. /mnt/moss_data"
    run_cmd "${SSH_ALL[@]}" --command="set -e; command -v gcsfuse >/dev/null || { echo 'gcsfuse is not \
installed on this worker' >&2; exit 1; }; sudo mkdir -p $DEST && sudo chown \$(id -u):\$(id -g) $DEST && \
gcsfuse --implicit-dirs $BUCKET $DEST"
    ;;
  run)
    [ ${#REMOTE[@]} -gt 0 ] || die "run needs the command after --, e.g. run --name=x --zone=z -- python -m moss_jax.main ..."
    remote="cd ~/moss_jax && source scripts/setup_env.sh $EXTRAS && $(quote "${REMOTE[@]}")"
    [ -z "$LOG" ] || remote="$remote > $LOG 2>&1"
    run_cmd "${SSH_ALL[@]}" --command="$remote"
    ;;
  status)
    if [ "$QUEUED" = 1 ]; then
      run_cmd gcloud compute tpus queued-resources describe "$NAME" "${GLOBAL[@]}"
    else
      run_cmd gcloud compute tpus tpu-vm describe "$NAME" "${GLOBAL[@]}"
    fi
    ;;
  delete)
    if [ "$QUEUED" = 1 ]; then
      run_cmd gcloud compute tpus queued-resources delete "$NAME" "${GLOBAL[@]}" --force --quiet
    else
      run_cmd gcloud compute tpus tpu-vm delete "$NAME" "${GLOBAL[@]}" --quiet
    fi
    ;;
esac
