"""Runs every benchmark, writes bench/results/latest.json and a Markdown table for the docs.

    python bench/run_all.py [--out DIR] [--only train_step decode ...] [--quick] [--threads N]

Each benchmark runs in its own process (XLA reads its thread flags at start-up) one after the
other; their JSON lines are collected with the date, the machine and the exact commands.
`--quick` runs tiny sizes (a smoke run of the whole harness, numbers not meaningful).

Output: latest[_threadsN].{json,md} in --out. Its default is bench/results (the committed
results) only for a full run of every benchmark; a --quick run defaults to bench/results/quick
and a full run of some benchmarks (--only) to bench/results/partial, both ignored by git, so
neither overwrites the committed results (pass --out bench/results to mean it). The JSON records
"quick" and "only".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

FULL = {
    "train_step": ["train_step.py", "--configs", "tiny", "125m", "--seq_len", "512"],
    # attention_impl "auto" picks this blockwise path on CPU (docs/kernels.md); the default stays "xla".
    "train_step_blockwise": ["train_step.py", "--configs", "125m", "--seq_len", "512", "--attention_impl", "blockwise"],
    "mfu": ["mfu.py", "--config", "125m", "--seq_len", "512"],
    "decode": ["decode.py", "--config", "125m", "--batches", "1", "8", "--weights", "float32", "int8", "bfloat16"],
    "attention": ["attention.py", "--seq_lens", "512,2048"],
    # Needs a trained model: the README's tiny pre-training run (skipped when it is absent).
    "quant_quality": ["quant_quality.py", "--run_dir", "runs/pretrain_tiny_cpu"],
}
QUICK = {
    "train_step": ["train_step.py", "--configs", "debug", "--seq_len", "32", "--repeats", "1", "--target_s", "0"],
    "mfu": ["mfu.py", "--config", "debug", "--seq_len", "32", "--repeats", "1", "--matmul", "256"],
    "decode": [
        "decode.py",
        *("--config", "debug", "--batches", "1", "--new_tokens", "4", "--repeats", "1", "--weights", "float32", "int8"),
    ],
    "attention": ["attention.py", "--seq_lens", "64", "--repeats", "1"],
}


def _fmt(x) -> str:
    return "" if x is None else str(x)


def markdown(rows: list[dict]) -> str:
    """One table per kind of benchmark."""
    out = []
    ratio_rows = [r for r in rows if "ratio" in r and r["bench"] in ("train_step", "decode")]
    if ratio_rows:
        out += [
            "| bench | config | setting | ours tokens/s | peer tokens/s | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for r in ratio_rows:
            if r["bench"] == "train_step":
                # ours_setup: "scan=... remat=... attention=<impl> head_chunk_tokens=<n>"
                attention = (r.get("ours_setup", "").partition("attention=")[2].split() or ["xla"])[0]
                setting = f"seq {r['seq_len']}, batch {r['batch']}, {r['dtype']}, {attention} attention"
            else:
                setting = f"batch {r['batch']}, {r.get('weights', 'float32')} weights"
            out.append(
                f"| {r['bench']} | {r['config']} | {setting} | {r['ours_tokens_per_s']} | "
                f"{r['peer_tokens_per_s']} | {r['ratio']} |"
            )
        out.append("")
    for r in (r for r in rows if r["bench"] == "mfu"):
        out += [
            "| bench | config | setting | achieved GFLOP/s | matmul peak GFLOP/s | MFU |",
            "|---|---|---|---|---|---|",
            f"| mfu | {r['config']} | seq {r['seq_len']}, batch {r['batch']}, {r['dtype']} | "
            f"{r['achieved_gflops']} | {r['peak_gflops']} | {r['mfu']} |",
            "",
        ]
    quality = [r for r in rows if r["bench"] == "quant_quality"]
    if quality:
        out += ["| weights | held-out perplexity | delta vs fp32 | weight MiB |", "|---|---|---|---|"]
        for r in quality:
            out.append(f"| {r['weights']} | {r['ppl']} | {r['ppl_delta_pct']:+.3f}% | {r['weight_mib']} |")
        out.append("")
    att = [r for r in rows if r["bench"] == "attention"]
    if att:
        out += ["| attention impl | seq_len | fwd ms | fwd+bwd ms | fwd+bwd temp MiB |", "|---|---|---|---|---|"]
        for r in att:
            if "error" in r:  # a setting that failed (attention.py keeps going): say so in the row
                out.append(f"| {r['impl']} | {r['seq_len']} | failed: {r['error'][:100]} | | |")
                continue
            out.append(
                f"| {r['impl']} | {r['seq_len']} | {_fmt(r['fwd_ms'])} | {_fmt(r['fwd_bwd_ms'])} | "
                f"{_fmt(r['fwd_bwd_temp_mib'])} |"
            )
        out.append("")
    return "\n".join(out)


def run(name: str, argv: list[str]) -> list[dict]:
    cmd = [sys.executable, os.path.join(HERE, argv[0]), *argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rows.append(json.loads(line))
    if proc.returncode != 0 or not rows:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        default=None,
        help="default: bench/results for a full run of every benchmark, bench/results/quick with --quick, "
        "bench/results/partial with --only",
    )
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every benchmark (default: all)")
    args = parser.parse_args(argv)
    table = QUICK if args.quick else FULL
    if args.only:
        unknown = [n for n in args.only if n not in table]
        if unknown:
            mode = "--quick" if args.quick else "a full run"
            full_only = [n for n in unknown if n in FULL] if args.quick else []
            note = f" ({', '.join(full_only)} only without --quick)" if full_only else ""
            parser.error(f"--only: no benchmark {', '.join(unknown)} in {mode}{note}; choose from {', '.join(table)}")
    if args.threads:
        table = {n: v + ["--threads", str(args.threads)] if n != "quant_quality" else v for n, v in table.items()}
    names = list(dict.fromkeys(args.only)) if args.only else list(table)
    if args.out is None:  # only a full run of every benchmark replaces the committed results
        args.out = os.path.join(RESULTS, "quick" if args.quick else "partial") if args.quick or args.only else RESULTS
    result = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": common.machine(),
        "quick": args.quick,
        "only": names if args.only else None,
        "commands": {n: "python bench/" + " ".join(table[n]) for n in names},
        "rows": [],
    }
    for name in names:
        if name == "quant_quality" and not os.path.isdir(table[name][2]):
            print(f"skipping quant_quality: no trained run at {table[name][2]}", file=sys.stderr)
            continue
        rows = run(name, table[name])
        for row in rows:
            print(json.dumps(row), flush=True)
        result["rows"] += rows
    os.makedirs(args.out, exist_ok=True)
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    suffix = f"_threads{args.threads}" if args.threads else ""
    with open(os.path.join(args.out, f"latest{suffix}.json"), "w") as f:
        json.dump(result, f, indent=1)
    machine = result["machine"]
    header = f"Measured {result['date']} on {machine['cpu']} ({machine['cores']} cores, "
    header += f"load average {machine['load_avg_1m']} at the start, {result['load_avg_1m_at_end']} at the end).\n"
    if args.quick:
        header += "Quick run (--quick): tiny sizes, a smoke test of the harness; the numbers are not meaningful.\n"
    if args.only:
        header += f"Only {', '.join(names)} (--only).\n"
    header += "\n"
    with open(os.path.join(args.out, f"latest{suffix}.md"), "w") as f:
        f.write(header + markdown(result["rows"]))
    print(f"wrote {os.path.join(args.out, f'latest{suffix}.json')} and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
