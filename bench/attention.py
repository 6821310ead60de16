"""Attention implementations on this host: time and XLA scratch memory per sequence length.

    python bench/attention.py [--seq_lens 512,1024,2048,4096,8192] [--impls xla,blockwise]
                              [--blocks 512] [--batch 1] [--heads 4] [--head_dim 128]

One JSON line per (impl, block, seq_len): {"bench": "attention", "impl", "seq_len", ...} with
the median wall time of the forward ("fwd_ms") and of forward+backward ("fwd_bwd_ms") after a
warm-up call, and the scratch XLA allocates for each compiled program ("*_temp_mib", from
`compiled.memory_analysis()`, known before anything runs). Inputs are causal packed rows
(4 segments per row) as in pre-training. The reference is only compiled, not run, above
--max_ref_len (its fp32 score matrix alone is 4 * H * L^2 bytes). Pallas impls off their
platform run in the interpreter; their times there measure the interpreter, not the kernel.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def _time_ms(fn, args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # warm-up (compile cache, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_one(impl: str, block: int | None, seq_len: int, args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moss_jax.attention import attention
    from moss_jax.kernels.blockwise import blockwise_attention

    if impl == "blockwise" and block:
        attn = functools.partial(blockwise_attention, block_q=block, block_k=block)
    else:
        attn = functools.partial(attention, impl=impl)
    dtype = jnp.dtype(args.dtype)
    shape = (args.batch, seq_len, args.heads, args.head_dim)
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(*shape), dtype) for _ in range(3))
    seg = jnp.asarray(np.repeat(np.arange(1, 5), -(-seq_len // 4))[:seq_len][None].repeat(args.batch, 0), jnp.int32)

    def fwd(q, k, v, seg):
        return attn(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True)

    def fwd_bwd(q, k, v, seg):
        return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v, seg).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    row = {
        "bench": "attention",
        "impl": impl,
        "block": block if impl == "blockwise" else None,
        "seq_len": seq_len,
        "batch": args.batch,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "dtype": args.dtype,
        "backend": jax.default_backend(),
        "threads": args.threads,
    }
    run = impl != "xla" or seq_len <= args.max_ref_len
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        compiled = jax.jit(fn).lower(q, k, v, seg).compile()
        mem = compiled.memory_analysis()
        row[f"{name}_temp_mib"] = None if mem is None else round(mem.temp_size_in_bytes / 2**20, 1)
        row[f"{name}_ms"] = round(_time_ms(compiled, (q, k, v, seg), args.repeats), 1) if run else None
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_lens", default="512,1024,2048,4096,8192")
    parser.add_argument("--impls", default="xla,blockwise")
    parser.add_argument("--blocks", default="512", help="blockwise block sizes (block_q = block_k) to compare")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_ref_len", type=int, default=4096, help="compile-only for the reference above this")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    common.set_threads(args.threads)

    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        for impl in args.impls.split(","):
            blocks = [int(b) for b in args.blocks.split(",")] if impl == "blockwise" else [None]
            for block in blocks:
                print(json.dumps(bench_one(impl, block, seq_len, args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
