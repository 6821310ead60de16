"""Attention implementations on this host: time and XLA scratch memory per sequence length.

    python bench/attention.py [--seq_lens 512,1024,2048,4096,8192] [--impls xla,blockwise]
                              [--blocks 512] [--batch 1] [--heads 4] [--head_dim 128]
                              [--segments 4] [--device cpu|gpu] [--gpu_blocks 128,64,64,64,8,2 ...]

One JSON line per (impl, block, seq_len): {"bench": "attention", "impl", "seq_len", ...} with
the median wall time of the forward ("fwd_ms") and of forward+backward ("fwd_bwd_ms") after a
warm-up call, and the scratch XLA allocates for each compiled program ("*_temp_mib", from
`compiled.memory_analysis()`, known before anything runs). Inputs are causal packed rows
(`--segments` per row, 4 by default as in pre-training; 0 = no segment ids). The reference is
only compiled, not run, above --max_ref_len (its fp32 score matrix alone is 4 * H * L^2 bytes).
Pallas impls off their platform run in the interpreter; their times there measure the
interpreter, not the kernel.

On a GPU (`--device gpu`) two more choices: `cudnn` is `jax.nn.dot_product_attention(...,
implementation="cudnn")` (causal; it takes no segment ids, so only with `--segments 0`; with
segments its rows are errors saying so), and `pallas_mgpu_fwd` is the Hopper forward with the
Triton backward (`pallas_mgpu` has both Hopper kernels); `jax_mgpu` is JAX's own Hopper example
kernel (float16, forward only): how close a Pallas Mosaic GPU forward gets to cuDNN.
`--gpu_blocks` times `pallas_gpu` once per tile setting "block_q,block_k,block_q_bwd,block_k_bwd
[,num_warps[,num_stages]]" (the kernel's defaults when not given), `--mgpu_tiles` times
`pallas_mgpu` (the Hopper forward of kernels/flash_mgpu.py with the Hopper backward) once per
"block_kv,stages", and `--mgpu_bwd` once per schedule of the Hopper backward
(kernels/flash_mgpu_bwd.py `Variant`: "base", or option names joined by "+", e.g.
"overlap+shared_dq"). Rows of GPU kernels count the Mosaic GPU kernels each program launches
("fwd_mosaic", "fwd_bwd_mosaic": 0 means a Hopper setting fell back to Triton). Each row also
has the attention TFLOP/s of the causal half (4 B H L^2 K / 2 forward, 2.5 times that backward).

A setting that fails (compile error, out of memory, unknown impl) is a row with an "error" field
and the sweep goes on; the exit status is 1 when every row failed, else 0.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def _time_ms(fn, args, repeats: int, inner: int = 1) -> float:
    """Median over `repeats` of the time per call of `inner` back-to-back calls, after a warm-up."""
    import jax

    jax.block_until_ready(fn(*args))  # warm-up (compile cache, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) * 1e3 / inner)
    return statistics.median(times)


def parse_gpu_blocks(spec: str) -> dict:
    """A tile setting `bq,bk,bq_bwd,bk_bwd[,warps[,stages]]` as flash_attention_gpu keyword arguments."""
    from moss_jax.kernels.common import BlockSizes

    values = [int(x) for x in spec.split(",")]
    if len(values) not in (4, 5, 6):
        raise ValueError(f"--gpu_blocks entry {spec!r}: expected 4 to 6 comma-separated ints")
    kw = {"block_sizes": BlockSizes(*values[:4])}
    if len(values) > 4:
        kw["num_warps"] = values[4]
    if len(values) > 5:
        kw["num_stages"] = values[5]
    return kw


def parse_mgpu_tiles(spec: str):
    """A Hopper-forward tile setting `block_kv,stages` (flash_mgpu.Tiles; block_q is 64)."""
    from moss_jax.kernels.flash_mgpu import Tiles

    values = [int(x) for x in spec.split(",")]
    if len(values) != 2:
        raise ValueError(f"--mgpu_tiles entry {spec!r}: expected block_kv,stages")
    return Tiles(block_q=64, block_kv=values[0], stages=values[1])


def _jax_mgpu_forward(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal=True):
    """JAX's own Hopper example kernel (`jax.experimental.pallas.ops.gpu.attention_mgpu`), forward
    only: a yardstick for what a Pallas Mosaic GPU forward reaches next to cuDNN. It takes float16
    and no softmax scale (q is pre-scaled here) nor segment ids."""
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    if q_segment_ids is not None:
        raise ValueError("jax_mgpu takes no segment ids: use --segments 0")
    head_dim = q.shape[-1]
    config = attention_mgpu.TuningConfig(
        block_q=64, block_kv=128 if head_dim <= 128 else 64, max_concurrent_steps=2, causal=causal
    )
    f16 = [x.astype(jnp.float16) for x in (q * head_dim**-0.5, k, v)]
    return attention_mgpu.attention(*f16, config).astype(q.dtype)


def _attention_fn(impl: str, block: int | None, gpu_blocks: str | None, mgpu_bwd: str | None = None):
    import jax

    from moss_jax.attention import attention
    from moss_jax.kernels import flash_gpu
    from moss_jax.kernels.blockwise import blockwise_attention

    if impl == "blockwise" and block:
        return functools.partial(blockwise_attention, block_q=block, block_k=block)
    if impl == "pallas_gpu" and gpu_blocks:
        return functools.partial(flash_gpu.flash_attention_gpu, **parse_gpu_blocks(gpu_blocks))
    if impl == "pallas_mgpu" and (gpu_blocks or mgpu_bwd):
        from moss_jax.kernels.flash_mgpu_bwd import Variant

        return functools.partial(
            flash_gpu.flash_attention_gpu,
            forward="mosaic",
            backward="mosaic",
            mosaic_tiles=parse_mgpu_tiles(gpu_blocks) if gpu_blocks else None,
            mosaic_bwd=Variant.parse(mgpu_bwd) if mgpu_bwd else None,
        )
    if impl == "jax_mgpu":
        return _jax_mgpu_forward
    if impl == "pallas_mgpu_fwd":  # the Hopper forward with the Triton backward
        return functools.partial(flash_gpu.flash_attention_gpu, forward="mosaic")
    if impl == "cudnn":

        def cudnn(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal=True):
            if q_segment_ids is not None:
                raise ValueError("cudnn takes no segment ids here: use --segments 0")
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

        return cudnn
    return functools.partial(attention, impl=impl)


def bench_one(
    impl: str,
    block: int | None,
    seq_len: int,
    args: argparse.Namespace,
    gpu_blocks: str | None = None,
    mgpu_bwd: str | None = None,
):
    import jax
    import jax.numpy as jnp
    import numpy as np

    attn = _attention_fn(impl, block, gpu_blocks, mgpu_bwd)
    dtype = jnp.dtype(args.dtype)
    shape = (args.batch, seq_len, args.heads, args.head_dim)
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(*shape), dtype) for _ in range(3))
    ids = np.repeat(np.arange(1, args.segments + 1), -(-seq_len // args.segments))[:seq_len] if args.segments else 0
    seg = jnp.asarray(np.broadcast_to(ids, (args.batch, seq_len)), jnp.int32)  # unused with --segments 0

    def fwd(q, k, v, seg):
        return attn(q, k, v, causal=True, **(dict(q_segment_ids=seg, kv_segment_ids=seg) if args.segments else {}))

    def fwd_bwd(q, k, v, seg):
        return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v, seg).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    row = {
        "bench": "attention",
        "impl": impl,
        "block": block if impl == "blockwise" else None,
        "gpu_blocks": gpu_blocks if impl in ("pallas_gpu", "pallas_mgpu") else None,
        "mgpu_bwd": mgpu_bwd if impl == "pallas_mgpu" else None,
        "seq_len": seq_len,
        "batch": args.batch,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "segments": args.segments,
        "dtype": args.dtype,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "threads": args.threads,
        "cpu_affinity": common.cpu_affinity(),
    }
    fwd_flop = 4 * args.batch * args.heads * seq_len**2 * args.head_dim / 2  # causal half
    run = impl != "xla" or seq_len <= args.max_ref_len
    for name, fn, flop in (("fwd", fwd, fwd_flop), ("fwd_bwd", fwd_bwd, 3.5 * fwd_flop)):
        if impl == "jax_mgpu" and name == "fwd_bwd":
            continue  # its backward has no causal mask
        start = time.perf_counter()
        lowered = jax.jit(fn).lower(q, k, v, seg)
        if args.device == "gpu":
            row[f"{name}_mosaic"] = common.mosaic_gpu_kernels(lowered.as_text())
        compiled = lowered.compile()
        row[f"{name}_compile_s"] = round(time.perf_counter() - start, 1)
        mem = compiled.memory_analysis()
        row[f"{name}_temp_mib"] = None if mem is None else round(mem.temp_size_in_bytes / 2**20, 1)
        ms = _time_ms(compiled, (q, k, v, seg), args.repeats, args.inner) if run else None
        row[f"{name}_ms"] = None if ms is None else round(ms, 3 if ms < 10 else 1)
        row[f"{name}_tflops"] = None if ms is None else round(flop / ms / 1e9, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_lens", default="512,1024,2048,4096,8192")
    parser.add_argument("--impls", default="xla,blockwise")
    parser.add_argument("--blocks", default="512", help="blockwise block sizes (block_q = block_k) to compare")
    parser.add_argument(
        "--gpu_blocks", nargs="*", default=[], help="pallas_gpu tiles: bq,bk,bq_bwd,bk_bwd[,warps[,stages]] each"
    )
    parser.add_argument(
        "--mgpu_tiles", nargs="*", default=[], help="pallas_mgpu forward tiles: block_kv,stages each (block_q 64)"
    )
    parser.add_argument(
        "--mgpu_bwd", nargs="*", default=[], help="pallas_mgpu backward schedules: 'base' or options joined by '+'"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--segments", type=int, default=4, help="packed segments per row; 0 = no segment ids")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inner", type=int, default=1, help="back-to-back calls per timing (GPU: hides dispatch)")
    parser.add_argument("--max_ref_len", type=int, default=4096, help="compile-only for the reference above this")
    parser.add_argument("--threads", type=int, default=common.default_threads())
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    args = parser.parse_args(argv)
    common.set_threads(args.threads, args.device)

    rows = failed = 0
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        for impl in args.impls.split(","):
            if impl == "cudnn" and args.segments:  # no segment ids through jax.nn.dot_product_attention
                error = f"cudnn takes no segment ids: run it with --segments 0 (got --segments {args.segments})"
                print(json.dumps({"bench": "attention", "impl": impl, "seq_len": seq_len, "error": error}), flush=True)
                rows, failed = rows + 1, failed + 1
                continue
            blocks = [int(b) for b in args.blocks.split(",")] if impl == "blockwise" else [None]
            tiles = {"pallas_gpu": args.gpu_blocks, "pallas_mgpu": args.mgpu_tiles}.get(impl) or [None]
            schedules = (args.mgpu_bwd if impl == "pallas_mgpu" else None) or [None]
            for block, tile, schedule in itertools.product(blocks, tiles, schedules):
                try:
                    row = bench_one(impl, block, seq_len, args, tile, schedule)
                except Exception as e:  # one failing setting (compile error, OOM) must not end the sweep
                    row = {"bench": "attention", "impl": impl, "gpu_blocks": tile, "seq_len": seq_len}
                    row.update({"mgpu_bwd": schedule} if schedule else {})
                    row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                print(json.dumps(row), flush=True)
                rows, failed = rows + 1, failed + ("error" in row)
    if rows and failed == rows:
        print(f'error: all {rows} attention rows failed (see their "error" fields)', file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
