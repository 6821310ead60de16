"""A short plain-text digest of bench/gpu_suite.sh's results, one line per row (fits a terminal tail).

    python bench/gpu_summary.py $OUT/gpu_results.jsonl

Adds, per sequence length, our flash attention's time over cuDNN's (fwd and fwd+bwd, default
tiles, and the best of the tile settings tried; the issue's goal is <= 1.10).
"""

from __future__ import annotations

import json
import os
import sys


def _g(x) -> str:
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def _line(r: dict) -> str:
    kind = r.get("bench") or r.get("check") or ("part" if "part" in r else "?")
    if "error" in r:
        where = ", ".join(f"{k}={r[k]}" for k in ("impl", "gpu_blocks", "seq_len", "dtype", "head_dim") if k in r)
        return f"{kind} ERROR [{where}]: {r['error'][:300]}"
    if kind == "env":
        smi = (r.get("nvidia_smi") or [{}])[0]
        pk = r.get("packages", {})
        return (
            f"env: {r['device_kind']} driver={smi.get('driver_version')} mem={smi.get('memory.total')} "
            f"jax={r['jax']} flax={pk.get('flax')} optax={pk.get('optax')} torch={pk.get('torch')} "
            f"triton={pk.get('triton')} cudnn={r.get('cudnn')} flax_file={r.get('flax_file')}"
        )
    if kind in ("flash", "decode"):
        errs = " ".join(f"{k[:-4]}={_g(r[k])}" for k in ("out_err", "dq_err", "dk_err", "dv_err") if k in r)
        shape = (
            f"L={r['q_len']}/{r['kv_len']} off={r['q_offset']} seg={r.get('segments')}"
            if kind == "flash"
            else f"S={r['kv_len']}"
        )
        return (
            f"check {kind} {r['dtype']} K={r['head_dim']} {shape}: {errs} rel={_g(r['rel_err'])} "
            f"{'ok' if r['ok'] else 'NOT OK'} triton={r['triton']}"
            f"{' variant=' + r['variant'] + ' mosaic=' + str(r.get('mosaic')) if 'variant' in r else ''}"
            f"{' bwd=' + r['mgpu_bwd'] if r.get('mgpu_bwd') else ''} "
            f"compile={r['compile_s']}s"
        )
    if kind == "pytest_gpu":
        return f"pytest {r.get('files', 'tests/kernels')}: {r['summary']}"
    if kind == "attention":
        tile = f" tiles={r['gpu_blocks']}" if r.get("gpu_blocks") else ""
        tile += f" bwd={r['mgpu_bwd']}" if r.get("mgpu_bwd") else ""
        # Mosaic GPU kernels launched by the fwd / fwd+bwd programs (0: the Triton path ran)
        mosaic = f" mosaic={r.get('fwd_mosaic')}/{r.get('fwd_bwd_mosaic')}" if "fwd_mosaic" in r else ""
        return (
            f"attention {r['impl']}{tile}{mosaic} L={r['seq_len']} seg={r['segments']}: fwd {_g(r['fwd_ms'])} ms "
            f"({_g(r['fwd_tflops'])} TF/s), fwd+bwd {_g(r.get('fwd_bwd_ms'))} ms ({_g(r.get('fwd_bwd_tflops'))} TF/s), "
            f"temp {_g(r['fwd_temp_mib'])}/{_g(r.get('fwd_bwd_temp_mib'))} MiB"
        )
    if kind == "mfu":
        return (
            f"mfu {r['config']} B={r['batch']} L={r['seq_len']} remat={r['remat']} attn={r['attention_impl']}"
            f"{' (no segment ids)' if r.get('segment_ids') == 'none' else ''}: "
            f"step {r['step_s']} s, {r['tokens_per_s']} tok/s, {r['achieved_gflops'] / 1e3:.1f} TF/s; "
            f"matmul {r['peak_gflops'] / 1e3:.1f} TF/s -> MFU {r['mfu']}; nominal -> {r.get('mfu_nominal')}; "
            f"peak mem {r.get('peak_mem_gib')} GiB"
        )
    if kind == "train_step":
        return (
            f"train_step {r['config']} L={r['seq_len']} B={r['batch']} {r['dtype']}: ours {r['ours_tokens_per_s']} "
            f"vs HF {r['peer_tokens_per_s']} tok/s, ratio {r['ratio']} {r['ratios']}, "
            f"loss diff {r['loss_diff_first_step']} ({r.get('ours_setup')})"
        )
    if kind == "part":
        if "skipped" in r:
            return f"part {r['part']}: skipped ({r['skipped']}, {r.get('left_s')} s left)"
        return f"part {r['part']}: rc={r['rc']} {r['seconds']} s{' TIMED OUT' if r['timed_out'] else ''}"
    return json.dumps(r)[:300]


def ratios(rows: list[dict]) -> list[str]:
    """Our default-tile flash time over cuDNN's, per sequence length (unpacked rows, as cuDNN runs)."""
    out = []
    for seq in sorted({r["seq_len"] for r in rows if r.get("bench") == "attention"}):
        pick = {
            r["impl"]: r
            for r in rows
            if r.get("bench") == "attention"
            and r["seq_len"] == seq
            and "error" not in r
            and not r.get("segments")
            and not r.get("gpu_blocks")
            and not r.get("mgpu_bwd")
        }
        for impl, label in (
            ("pallas_gpu", "ours"),
            ("pallas_mgpu_fwd", "ours (Hopper fwd)"),
            ("pallas_mgpu", "ours (Hopper fwd+bwd)"),
        ):
            if impl in pick and "cudnn" in pick:
                ours, cudnn = pick[impl], pick["cudnn"]
                parts = [
                    f"{name} {ours[f'{name}_ms'] / cudnn[f'{name}_ms']:.2f}"
                    for name in ("fwd", "fwd_bwd")
                    if ours.get(f"{name}_ms") and cudnn.get(f"{name}_ms")
                ]
                out.append(f"{label}/cudnn L={seq}: {', '.join(parts)} (goal <= 1.10)")
        tiles = [
            r
            for r in rows
            if r.get("bench") == "attention"
            and r["seq_len"] == seq
            and (r.get("gpu_blocks") or r.get("mgpu_bwd"))
            and "error" not in r
        ]
        for name in ("fwd", "fwd_bwd"):
            timed = [r for r in tiles if r.get(f"{name}_ms")]
            if timed and "cudnn" in pick and pick["cudnn"].get(f"{name}_ms"):
                best = min(timed, key=lambda r: r[f"{name}_ms"])
                ratio = best[f"{name}_ms"] / pick["cudnn"][f"{name}_ms"]
                setting = f"{best['impl']} {best.get('gpu_blocks') or ''} {best.get('mgpu_bwd') or ''}".strip()
                out.append(f"best tiles for {name} L={seq}: {setting}, ours/cudnn {ratio:.2f}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help") or not os.path.isfile(argv[0]):
        print(__doc__.strip(), file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: {argv[0]} is not a file", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    rows = []
    with open(argv[0]) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"(unparsed) {line.strip()[:200]}")
    for r in rows:
        try:
            print(_line(r))
        except (KeyError, TypeError) as e:
            print(f"(row without {e}) {json.dumps(r)[:300]}")
    for line in ratios(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
