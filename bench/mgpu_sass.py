"""What ptxas made of the Hopper (Mosaic GPU) flash kernels: registers, spills, wgmma serialisation.

ptxas serialises a kernel's `wgmma.mma_async` instructions (waits after each one) when it cannot
prove the asynchronous register operands safe, and says so in a warning (C7515, "Potential
Performance Loss"); a serialised backward loses the overlap its schedule was written for, and
nothing in a timing says why. This tool compiles the forward and each backward schedule
(`flash_mgpu_bwd.Variant`) once, with Mosaic GPU's dump switches on (`MOSAIC_GPU_DUMP_PTXAS`,
`MOSAIC_GPU_DUMP_SASS`: the CUDA toolkit's ptxas and nvdisasm, which print to the process's C
stdout), each in a child process, and prints one JSON line per kernel:

    {"bench": "mgpu_sass", "kernel": "bwd", "variant": "overlap+shared_dq", "registers": 168,
     "spill_stores": 0, "spill_loads": 0, "warnings": [...], "hgmma": 96, "depbar": {"gsb0, 0x0": 12},
     "sass_lines": 9000, ...}

`hgmma` counts the SASS wgmma instructions, `depbar` the `WARPGROUP.DEPBAR.LE` waits by their
argument (one wait per wgmma in a loop body = serialised). With `--out DIR` the raw ptxas output and
SASS are written there, one file per kernel. Needs a Hopper GPU (the kernels compile at first run).

    python bench/mgpu_sass.py --variants base overlap+shared_dq --out /tmp/sass
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import re
import subprocess
import sys
import time

_MARK = "MGPU_SASS_CHILD_DONE"


def _child(kernel: str, variant: str, seq_len: int, head_dim: int) -> None:
    """Runs one kernel once (compiling it, which prints the dumps), then the marker line."""
    import jax
    import jax.numpy as jnp

    from moss_jax.kernels import flash_gpu, flash_mgpu_bwd

    keys = jax.random.split(jax.random.key(0), 6)
    shape = (1, seq_len, 1, head_dim)
    q, k, v, do = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys[:4])
    if kernel == "fwd":
        fn = jax.jit(lambda q, k, v: flash_gpu.flash_attention_gpu(q, k, v, forward="mosaic"))
        out = fn(q, k, v)
    else:  # the backward kernel alone (its inputs' values do not matter to the compiler)
        lse, delta = (jax.random.normal(key, (1, 1, seq_len), jnp.float32) for key in keys[4:])
        bwd = functools.partial(
            flash_mgpu_bwd.flash_backward_hopper,
            causal=True,
            scale=head_dim**-0.5,
            variant=flash_mgpu_bwd.Variant.parse(variant),
        )
        out = jax.jit(bwd)(q, k, v, None, None, lse, delta, do)
    jax.block_until_ready(out)
    sys.stdout.flush()
    print(_MARK, flush=True)


def summarize(text: str) -> dict:
    """The figures of one child's output (ptxas -v lines and nvdisasm SASS)."""
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", text)]
    spill_st = [int(m) for m in re.findall(r"(\d+) bytes spill stores", text)]
    spill_ld = [int(m) for m in re.findall(r"(\d+) bytes spill loads", text)]
    warnings = sorted({line.strip() for line in text.splitlines() if "ptxas" in line and "warning" in line.lower()})
    sass = [line for line in text.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", line)]
    depbar = collections.Counter()
    for line in sass:
        m = re.search(r"WARPGROUP\.DEPBAR\.LE\s+([^;]*);", line)
        if m:
            depbar[m.group(1).strip()] += 1
    return {
        "registers": max(regs) if regs else None,
        "spill_stores": max(spill_st) if spill_st else None,
        "spill_loads": max(spill_ld) if spill_ld else None,
        "warnings": warnings,
        "hgmma": sum("HGMMA" in line for line in sass),
        "depbar": dict(depbar),
        "warpgroup_arrive": sum("WARPGROUP.ARRIVE" in line for line in sass),
        "local_loads": sum(bool(re.search(r"\bLDL\b", line)) for line in sass),
        "local_stores": sum(bool(re.search(r"\bSTL\b", line)) for line in sass),
        "sass_lines": len(sass),
        "tool_errors": sorted({line.strip() for line in text.splitlines() if "invocation failed" in line}),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", default=["base", "overlap+shared_dq+wide_regs"], help="backward schedules")
    ap.add_argument("--no_fwd", action="store_true", help="skip the forward kernel")
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--head_dim", type=int, default=128)
    ap.add_argument("--out", default=None, help="directory for the raw ptxas output and SASS")
    ap.add_argument("--timeout_s", type=float, default=120)
    ap.add_argument("--child", nargs=2, metavar=("KERNEL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], args.seq_len, args.head_dim)
        return 0
    jobs = ([] if args.no_fwd else [("fwd", "-")]) + [("bwd", v) for v in args.variants]
    env = dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_SASS="1")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    failed = 0
    for kernel, variant in jobs:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", kernel, variant]
        cmd += ["--seq_len", str(args.seq_len), "--head_dim", str(args.head_dim)]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s)
            text, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout or b""
            text, rc = out.decode(errors="replace") if isinstance(out, bytes) else out, 124
        row = {"bench": "mgpu_sass", "kernel": kernel, "variant": variant, "seq_len": args.seq_len}
        row.update(head_dim=args.head_dim, rc=rc, ok=rc == 0 and _MARK in text, seconds=round(time.time() - t0, 1))
        row.update(summarize(text))
        if not row["ok"]:
            failed += 1
            row["tail"] = text[-1500:]
        if args.out:
            name = f"{kernel}_{variant.replace('+', '_')}.txt"
            with open(os.path.join(args.out, name), "w") as f:
                f.write(text)
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
