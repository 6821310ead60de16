#!/usr/bin/env bash
# The GPU checks and benchmarks in one run, most important first (docs/performance.md, "GPU suite"):
#
#   1. env            machine, driver, versions (bench/gpu_env.py)
#   2. kernel_check   Pallas/Triton flash fwd+bwd and decode vs the reference, max |error| (bench/gpu_kernel_check.py)
#      pytest         tests/kernels with the GPU kernels compiled (MOSS_KERNEL_TEST_BACKEND=gpu) -> pytest_gpu.txt
#      pytest_mgpu    tests/kernels/test_flash_mgpu.py the same way (the Hopper kernels) -> pytest_mgpu.txt
#   3. attention      pallas_gpu vs cuDNN vs XLA, bf16, B=4, H=16, K=128, causal, seq 2048/4096/8192
#      attention_mgpu the same rows for pallas_mgpu_fwd / pallas_mgpu (Hopper forward / both kernels), in a
#                     part of their own: an untried kernel that hangs on its first run costs only this part
#      attention_mgpu_bwd  pallas_mgpu once per schedule of the Hopper backward (flash_mgpu_bwd.Variant:
#                     base, overlap+shared_dq, +wide_regs = the default, +pipeline; GPU_SUITE_MGPU_BWD picks them) next to
#                     cuDNN, at GPU_SUITE_SEQ_LENS
#      mgpu_sass      ptxas's registers, spills and wgmma-serialisation warnings for the Hopper forward and
#                     those backward schedules, and SASS wait counts (bench/mgpu_sass.py; raw in $OUT/sass)
#   4. mfu_*          train-step MFU, 2b and 350m at seq 2048, bf16 compute, fp32 master weights;
#                     mfu_big_cudnn / mfu_big_noseg: the 2b with cuDNN attention / ours, no segment ids;
#                     mfu_big_mgpu: the 2b with pallas_mgpu;
#                     one pair per remat policy in GPU_SUITE_REMATS (suffix _<policy>)
#      attention_*    pallas_gpu and pallas_mgpu tile settings at seq 4096; JAX's Hopper example kernel
#                     (forward, fp16) next to ours and cuDNN; packed segments
#   5. train_step     350m vs HF PyTorch (bf16 autocast) at seq 2048
#
# Every part runs under its own `timeout`, capped by what is left of GPU_SUITE_BUDGET_S (default
# 400 s), so one hang cannot eat the rest; a part that no longer fits is recorded as skipped.
# Writes to $OUT: gpu_results.jsonl (every JSON line the parts print, plus one {"part": ...} status
# line per part), gpu_log.txt (everything, stderr included), pytest_gpu.txt and gpu_summary.txt
# (bench/gpu_summary.py: one line per result, also printed at the end).
#
#   OUT=/tmp/gpu_out bash bench/gpu_suite.sh                 # on the GPU machine
#   OUT=/tmp/gpu_out GPU_SUITE_DRY=1 bash bench/gpu_suite.sh # CPU dry run: tiny sizes, Pallas interpreter
#
# GPU_SUITE_PARTS="env kernel_check ..." runs only those parts; PYTHON picks the interpreter (default:
# python3 on the GPU machine; in a dry run the repository's .venv/bin/python when there is one).
# Every part runs even when an earlier one failed; the exit status is 1 when a part failed or timed
# out (the last log line lists them), else 0. In a dry run the cuDNN parts (mfu_big_cudnn*) and
# mgpu_sass need a GPU and are expected to fail: they do not count.
# For a shorter run: GPU_SUITE_CHECK_ARGS is appended to kernel_check's arguments (e.g. "--head_dims 256
# --checks flash,causal"); GPU_SUITE_ATT_IMPLS (default pallas_gpu,cudnn,xla) and GPU_SUITE_SEQ_LENS
# (default 2048,4096,8192; not in a dry run) pick the attention part's rows; GPU_SUITE_TILES replaces
# attention_tiles' settings (space-separated), GPU_SUITE_MGPU_TILES attention_mgpu_tiles'; GPU_SUITE_REMATS the 2b's remat policies (space-separated), GPU_SUITE_BIG_BATCH its batch.
set -o pipefail
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
cd "$(dirname "$0")/.." || exit 1

OUT=${OUT:-/tmp/gpu_out}
DRY=${GPU_SUITE_DRY:-0}
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then
    PY=$PWD/.venv/bin/python
else
    PY=python3
fi
BUDGET=${GPU_SUITE_BUDGET_S:-400}
PARTS=${GPU_SUITE_PARTS:-}
mkdir -p "$OUT"
RESULTS=$OUT/gpu_results.jsonl
LOG=$OUT/gpu_log.txt
PYTEST_LOG=$OUT/pytest_gpu.txt
START=$(date +%s)

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    export JAX_PLATFORMS=cpu
else
    DEVICE=gpu
fi

# Datasheet dense bf16 peak (TFLOP/s) for mfu_nominal: H100 SXM and H200 989.4, H100 PCIe 756, NVL 835.
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
case "$GPU_NAME" in
    *PCIe*) NOMINAL=756 ;;
    *NVL*) NOMINAL=835 ;;
    *H100* | *H200*) NOMINAL=989.4 ;;
    *A100*) NOMINAL=312 ;;
    *) NOMINAL= ;;
esac
NOMINAL_ARGS=()
[ -n "$NOMINAL" ] && NOMINAL_ARGS=(--nominal_tflops "$NOMINAL")

log() { echo "$*" | tee -a "$LOG"; }

FAILED=() # "name (rc N)" of every part that failed or timed out and counts (see the header)

# part NAME CAP_SECONDS COMMAND...: runs COMMAND under timeout min(CAP, budget left); its JSON lines
# go to $RESULTS, everything to $LOG; then a status line {"part", "rc", "seconds", "timed_out"}.
part() {
    local name=$1 cap=$2
    shift 2
    if [ -n "$PARTS" ] && [[ " $PARTS " != *" $name "* ]]; then
        return 0
    fi
    local left=$((BUDGET - ($(date +%s) - START)))
    if ((left < 30)); then
        log "=== $name skipped: ${left}s of the budget left"
        echo "{\"part\": \"$name\", \"skipped\": \"budget\", \"left_s\": $left}" >>"$RESULTS"
        return 0
    fi
    local limit=$((cap < left ? cap : left))
    log "=== $name (limit ${limit}s, at $(($(date +%s) - START))s): $*"
    local t0
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>>"$LOG" | tee -a "$LOG" | grep --line-buffered '^{' >>"$RESULTS"
    local rc=${PIPESTATUS[0]}
    local secs=$(($(date +%s) - t0))
    local timed_out=false
    ((rc == 124 || rc == 137)) && timed_out=true
    echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $secs, \"timed_out\": $timed_out}" | tee -a "$LOG" >>"$RESULTS"
    if ((rc != 0)); then
        if [ "$DRY" = 1 ] && [[ "$name" == mfu_big_cudnn* ]]; then
            log "=== $name failed as expected in a dry run (cuDNN needs a GPU)"
        elif [ "$DRY" = 1 ] && [ "$name" = mgpu_sass ]; then
            log "=== $name failed as expected in a dry run (the Hopper backward compiles on a GPU only)"
        else
            FAILED+=("$name (rc $rc)")
        fi
    fi
    return "$rc"
}

pytest_part() {
    # The GPU kernels compiled; the TPU ones (interpreter) and CPU-only tests are deselected by -k.
    # Runs as `bash -c pytest_part` under timeout (exported below), stdout -> $PYTEST_LOG.
    # shellcheck disable=SC2086 # PYTEST_FILES is a list of paths
    MOSS_KERNEL_TEST_BACKEND=$KERNEL_BACKEND XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -m pytest -q \
        -p no:cacheprovider -n "$PYTEST_WORKERS" -k "gpu or auto" -rfE $PYTEST_FILES >"$PYTEST_LOG" 2>&1
    local rc=$?
    echo "{\"bench\": \"pytest_gpu\", \"files\": \"$PYTEST_FILES\", \"summary\": \"$(grep -v "^[[:space:]]*$" "$PYTEST_LOG" | tail -n 1 | tr -d '"=\\' | sed 's/^ *//;s/ *$//')\"}"
    return $rc
}
export -f pytest_part
if [ "$DRY" = 1 ]; then # the plumbing only: lowering tests, no compiled kernels on a CPU
    KERNEL_BACKEND='' PYTEST_WORKERS=0 PYTEST_FILES=tests/kernels/test_gpu_lowering.py
else
    KERNEL_BACKEND=gpu PYTEST_WORKERS=4
    PYTEST_FILES="tests/kernels/test_flash.py tests/kernels/test_decode.py tests/kernels/test_attention_impls.py"
fi
export PY PYTEST_LOG KERNEL_BACKEND PYTEST_WORKERS PYTEST_FILES

log "gpu_suite: $(date -u +%FT%TZ) dry=$DRY gpu='$GPU_NAME' budget=${BUDGET}s commit=$(git rev-parse --short HEAD 2>/dev/null)"
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || log "gpu_suite: working tree has uncommitted changes"

if [ "$DRY" = 1 ]; then
    ATT=(--seq_lens 128 --batch 1 --heads 2 --head_dim 64 --repeats 2 --inner 1)
    ONE_SEQ=128
    # shellcheck disable=SC2054 # each element is one comma-separated tile setting
    TILES=(32,16,16,32 16,16,16,16,4,2)
    MFU=(--seq_len 64 --matmul 256 --matmul_iters 2 --repeats 1)
    BIG=debug SMALL=debug BIG_BATCH=4
    TRAIN=(--configs debug --seq_len 32 --batch 2 --repeats 1 --target_s 0)
    CHECK=(--smoke --device cpu)
else
    ATT=(--seq_lens "${GPU_SUITE_SEQ_LENS:-2048,4096,8192}" --batch 4 --heads 16 --head_dim 128 --repeats 10 --inner 5)
    ONE_SEQ=4096
    # bq,bk,bq_bwd,bk_bwd,warps,stages around the default (64,64,64,64,4,3 at K=128 bf16; the first run's best)
    # shellcheck disable=SC2054
    TILES=(64,64,64,64,4,3 128,64,64,64,4,3 128,64,64,64,8,3 64,64,64,64,4,4 128,64,128,64,8,2 64,128,64,64,4,2)
    MFU=(--seq_len 2048 --matmul 8192 --matmul_iters 10 --repeats 5)
    BIG=2b SMALL=350m BIG_BATCH=${GPU_SUITE_BIG_BATCH:-8}
    TRAIN=(--configs 350m --seq_len 2048 --batch 2 --repeats 3)
    CHECK=(--device gpu)
fi
# shellcheck disable=SC2206 # word splitting of the knobs is intended
CHECK+=($GPU_SUITE_CHECK_ARGS)
# shellcheck disable=SC2206
[ -n "${GPU_SUITE_TILES:-}" ] && TILES=($GPU_SUITE_TILES)
# shellcheck disable=SC2054
MGPU_TILES=(64,2 128,2 128,3 256,2)
# shellcheck disable=SC2206
[ -n "${GPU_SUITE_MGPU_TILES:-}" ] && MGPU_TILES=($GPU_SUITE_MGPU_TILES)
MGPU_BWD=(base overlap+shared_dq overlap+shared_dq+wide_regs overlap+shared_dq+pipeline+wide_regs)
# shellcheck disable=SC2206
[ -n "${GPU_SUITE_MGPU_BWD:-}" ] && MGPU_BWD=($GPU_SUITE_MGPU_BWD)

# 1. environment
part env 60 "$PY" bench/gpu_env.py
[ "$DRY" = 1 ] || nvidia-smi >>"$LOG" 2>&1

# 2. correctness
part kernel_check 150 "$PY" bench/gpu_kernel_check.py "${CHECK[@]}"
part pytest 150 bash -c pytest_part
# The Hopper kernels' tests on their own (an untried kernel that hangs costs only this part).
part pytest_mgpu 120 env PYTEST_FILES=tests/kernels/test_flash_mgpu.py PYTEST_LOG="$OUT/pytest_mgpu.txt" bash -c pytest_part

# 3. attention speed: ours vs cuDNN vs XLA (no segment ids: cuDNN's public API has none)
part attention 150 "$PY" bench/attention.py --device "$DEVICE" --impls "${GPU_SUITE_ATT_IMPLS:-pallas_gpu,cudnn,xla}" \
    --segments 0 --dtype bfloat16 --max_ref_len 4096 "${ATT[@]}"
part attention_mgpu 120 "$PY" bench/attention.py --device "$DEVICE" --impls pallas_mgpu_fwd,pallas_mgpu \
    --segments 0 --dtype bfloat16 --max_ref_len 4096 "${ATT[@]}"
part attention_mgpu_bwd 150 "$PY" bench/attention.py --device "$DEVICE" --impls pallas_mgpu,cudnn --segments 0 \
    --dtype bfloat16 --mgpu_bwd "${MGPU_BWD[@]}" "${ATT[@]}"
# What ptxas made of the Hopper kernels (registers, spills, wgmma serialisation warnings, SASS waits)
part mgpu_sass 120 "$PY" bench/mgpu_sass.py --variants "${MGPU_BWD[@]}" --out "$OUT/sass"

# 4. train-step MFU with our kernel and with cuDNN's, for each remat policy in GPU_SUITE_REMATS (default
# dots_no_batch_attention: weight matmuls plus the attention output and log-sum-exp, so nothing but
# cheap elementwise work is recomputed; dots_no_batch parts keep their old names). A policy that runs
# out of memory is recorded as failed and the next one runs. The 2b runs at batch GPU_SUITE_BIG_BATCH
# (default 8: 68 GiB on an 80 GiB H100 with this policy; `none` runs out of memory at batch 4).
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
REMATS=${GPU_SUITE_REMATS:-dots_no_batch_attention}
for remat in $REMATS; do
    sfx=_$remat
    [ "$remat" = dots_no_batch ] && sfx=
    part "mfu_big$sfx" 200 "$PY" bench/mfu.py --device "$DEVICE" --dtype bfloat16 --config "$BIG" --batch "$BIG_BATCH" \
        --remat "$remat" --attention_impl pallas_gpu "${MFU[@]}" "${NOMINAL_ARGS[@]}"
    # cuDNN's fast path takes no segment ids (they would become a [B, 1, L, L] bias), so this step has
    # none; mfu_big_noseg is ours on the same footing. In the dry run cudnn fails (no GPU): plumbing only.
    part "mfu_big_cudnn$sfx" 200 "$PY" bench/mfu.py --device "$DEVICE" --dtype bfloat16 --config "$BIG" \
        --batch "$BIG_BATCH" --remat "$remat" --attention_impl cudnn --segment_ids none "${MFU[@]}" "${NOMINAL_ARGS[@]}"
done
part mfu_big_noseg 200 "$PY" bench/mfu.py --device "$DEVICE" --dtype bfloat16 --config "$BIG" \
    --batch "$BIG_BATCH" --remat "${REMATS%% *}" --attention_impl pallas_gpu --segment_ids none "${MFU[@]}" "${NOMINAL_ARGS[@]}"
part mfu_big_mgpu 200 "$PY" bench/mfu.py --device "$DEVICE" --dtype bfloat16 --config "$BIG" \
    --batch "$BIG_BATCH" --remat "${REMATS%% *}" --attention_impl pallas_mgpu "${MFU[@]}" "${NOMINAL_ARGS[@]}"
part mfu_small 120 "$PY" bench/mfu.py --device "$DEVICE" --dtype bfloat16 --config "$SMALL" --batch 8 \
    --remat none --attention_impl pallas_gpu "${MFU[@]}" "${NOMINAL_ARGS[@]}"
unset XLA_PYTHON_CLIENT_MEM_FRACTION

# 3b. tile settings at one length; packed segments (what training runs) with the default tiles
part attention_tiles 120 "$PY" bench/attention.py --device "$DEVICE" --impls pallas_gpu --segments 0 \
    --dtype bfloat16 --gpu_blocks "${TILES[@]}" "${ATT[@]}" --seq_lens "$ONE_SEQ"
part attention_jax_mgpu 60 "$PY" bench/attention.py --device "$DEVICE" --impls jax_mgpu,pallas_mgpu,cudnn --segments 0 \
    --dtype bfloat16 "${ATT[@]}" --seq_lens "$ONE_SEQ"
part attention_mgpu_tiles 120 "$PY" bench/attention.py --device "$DEVICE" --impls pallas_mgpu --segments 0 \
    --dtype bfloat16 --mgpu_tiles "${MGPU_TILES[@]}" "${ATT[@]}" --seq_lens "$ONE_SEQ"
part attention_segments 60 "$PY" bench/attention.py --device "$DEVICE" --impls pallas_gpu,xla --segments 4 \
    --dtype bfloat16 "${ATT[@]}" --seq_lens "$ONE_SEQ"

# 4b. the same steps with the XLA reference attention (its [B, H, L, L] scores are rematerialised)
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
part mfu_big_xla 200 "$PY" bench/mfu.py --device "$DEVICE" --dtype bfloat16 --config "$BIG" --batch 4 \
    --remat dots_no_batch --attention_impl xla "${MFU[@]}" "${NOMINAL_ARGS[@]}"
part mfu_small_xla 120 "$PY" bench/mfu.py --device "$DEVICE" --dtype bfloat16 --config "$SMALL" --batch 8 \
    --remat dots_no_batch --attention_impl xla "${MFU[@]}" "${NOMINAL_ARGS[@]}"
unset XLA_PYTHON_CLIENT_MEM_FRACTION

# 5. against HF PyTorch (both in one process: JAX must not preallocate the GPU)
XLA_PYTHON_CLIENT_PREALLOCATE=false part train_step 150 "$PY" bench/train_step.py --device "$DEVICE" \
    --dtype bfloat16 --attention_impl pallas_gpu "${TRAIN[@]}"

log "gpu_suite: done in $(($(date +%s) - START))s"
timeout 60 "$PY" bench/gpu_summary.py "$RESULTS" 2>&1 | tee "$OUT/gpu_summary.txt"
if ((${#FAILED[@]})); then
    log "gpu_suite: ${#FAILED[@]} part(s) failed: $(printf '%s, ' "${FAILED[@]}" | sed 's/, $//')"
    exit 1
fi
exit 0
