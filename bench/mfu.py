"""Model FLOP utilisation of the train step against this machine's measured matmul peak (fp32 on CPU).

    python bench/mfu.py [--config 125m] [--seq_len 512] [--batch 2] [--repeats 3] [--matmul 2048]
                        [--device gpu --dtype bfloat16 --matmul 8192 --matmul_iters 10 --nominal_tflops 989.4]

Model FLOPs per step = tokens x `MossConfig.flops_per_token(seq_len)` (6 x non-embedding
parameters, the head included, plus 12 x layers x d_model x seq_len for attention: nanoGPT's
count). The peak is a large `--dtype` matmul (`--matmul` square, jitted) timed in the same process;
the two are timed alternately (matmul, step, matmul, step, ...) so machine load hits both
alike, and the medians are compared. On a GPU, `--dtype bfloat16` gives the tensor-core peak,
`--matmul_iters` back-to-back calls per timing hide the launch, and `--nominal_tflops`
(the datasheet's dense peak, e.g. 989.4 for an H100 SXM or H200 in bf16) adds "mfu_nominal".
Prints one JSON line:

    {"bench": "mfu", "config": "125m", "achieved_gflops": ..., "peak_gflops": ..., "mfu": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="125m")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul", type=int, default=2048, help="side of the square matmul for the peak")
    parser.add_argument("--matmul_iters", type=int, default=1, help="matmuls per peak timing")
    parser.add_argument("--nominal_tflops", type=float, default=None, help="datasheet peak for mfu_nominal")
    parser.add_argument("--threads", type=int, default=common.default_threads())
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--remat", default="none")
    parser.add_argument(
        "--micro_batches",
        type=int,
        default=1,
        help="gradient accumulation: the batch runs as this many slices, then one optimizer update",
    )
    parser.add_argument("--attention_impl", default="xla")
    parser.add_argument(
        "--segment_ids",
        choices=("ones", "none"),
        default="ones",
        help="the batch's decoder_segment_ids: one segment per row (as training passes them), or none (no mask"
        " work in the kernels; what cuDNN's fast path needs: 'cudnn' turns segment ids into a bias)",
    )
    args = parser.parse_args(argv)
    common.set_threads(args.threads, args.device)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import train_step as ts

    from moss_jax.config import get_config
    from moss_jax.model import init_params

    config = get_config(args.config, dtype=args.dtype)
    params = init_params(config, jax.random.PRNGKey(0))
    state, step = ts.our_step(
        config,
        params,
        args.batch,
        args.seq_len,
        remat=args.remat,
        scan=True,
        attention_impl=args.attention_impl,
        micro_batches=args.micro_batches,
    )
    del params
    inputs, targets = ts.make_batch(config, args.batch, args.seq_len)
    batch = ts.our_batch(inputs, targets)
    if args.segment_ids == "none":
        batch["decoder_segment_ids"] = None  # the model then attends causally without segment masks
    batch = jax.device_put(batch)
    box = {"state": state}

    def train():
        box["state"], metrics = step(box["state"], batch)
        jax.block_until_ready(metrics)

    n = args.matmul
    mm_dtype = jnp.dtype(args.dtype)
    a = jnp.asarray(np.random.RandomState(0).randn(n, n), mm_dtype)
    b = jnp.asarray(np.random.RandomState(1).randn(n, n), mm_dtype)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))

    def peak():
        for _ in range(args.matmul_iters):
            out = matmul(a, b)
        jax.block_until_ready(out)

    times = common.alternate({"matmul": peak, "train": train}, args.repeats, warmup=2)
    matmul_flop = 2 * n**3 * args.matmul_iters
    peak_flops = matmul_flop / common.median(times["matmul"])
    step_flops = config.flops_per_token(args.seq_len) * args.batch * args.seq_len
    step_s = common.median(times["train"])
    achieved = step_flops / step_s
    row = {
        "bench": "mfu",
        "config": args.config,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "dtype": args.dtype,
        "achieved_gflops": round(achieved / 1e9, 1),
        "peak_gflops": round(peak_flops / 1e9, 1),
        "mfu": round(achieved / peak_flops, 3),
        "best_matmul_gflops": round(matmul_flop / min(times["matmul"]) / 1e9, 1),
        "step_s": round(step_s, 4),
        "tokens_per_s": round(args.batch * args.seq_len / step_s, 1),
        "model_gflop_per_step": round(step_flops / 1e9, 1),
        "params": config.num_params,
        "remat": args.remat,
        "micro_batches": args.micro_batches,
        "attention_impl": args.attention_impl,
        "segment_ids": args.segment_ids,
        "matmul": n,
        "matmul_dtype": args.dtype,
        "device": jax.devices()[0].device_kind,
        "threads": args.threads,
        "cpu_affinity": common.cpu_affinity(),
    }
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        row["peak_mem_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 1)
    if args.nominal_tflops:
        row["nominal_peak_gflops"] = args.nominal_tflops * 1e3
        row["mfu_nominal"] = round(achieved / (args.nominal_tflops * 1e12), 3)
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
