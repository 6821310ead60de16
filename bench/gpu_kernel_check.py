"""The Pallas GPU kernels, compiled for the device, against the XLA reference: max |error| per case.

    python bench/gpu_kernel_check.py [--smoke] [--dtypes bfloat16,float32] [--head_dims 64,128,256]
                                     [--checks flash,causal,offset,decode]

Flash attention (`kernels/flash_gpu.py` with its default tiles: causal, packed segments with
padding ("flash") or no segment ids ("causal": the blocks below the diagonal skip the mask), a
length that is not a multiple of the tiles, and a prompt written at an offset of a longer cache
without segment ids ("offset")) forward and dq/dk/dv, bf16 and fp32, head_dim 64 / 128 / 256; the decode kernel
(`kernels/decode_gpu.py`) over a KV cache with per-row lengths, left padding and segments. The
reference is `xla_attention` in fp32 at full matmul precision (XLA uses TF32 for fp32 matmuls on
recent GPUs otherwise) on the same bf16-rounded inputs. One JSON line per case:

    {"check": "flash", "variant", "dtype", "head_dim", ..., "out_err", "dq_err", "dk_err", "dv_err",
     "ref_max", "rel_err", "ok", "triton", "mosaic"}

"*_err" is the max |kernel - reference|, "rel_err" the largest of them over the reference's max
|value|, "ok" compares it with 2e-2 (bf16: a few ulps) or 1e-5 (fp32). "triton" says whether the
compiled program launches the Triton kernel (False: the Pallas interpreter ran, as on a CPU).
The bf16 flash cases run three times by default (`--variants triton,mosaic_fwd,mosaic`): Triton,
then the Hopper forward of `kernels/flash_mgpu.py` with the Triton backward, then both Hopper
kernels (`flash_mgpu_bwd.py`); "mosaic" counts the Mosaic GPU kernels that ran (0 on a CPU or a
non-Hopper GPU, which take the Triton kernels instead).
`--smoke` uses small shapes (a CPU dry run); `--dtypes`, `--head_dims` and `--checks` keep only those
cases ("offset" is at head_dim 128 whatever --head_dims says). Exits 1 when a case is not ok or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

REL_TOL = {"bfloat16": 2e-2, "float32": 1e-5}
# Flash kernels checked: Triton forward and backward; the Hopper (Mosaic GPU) forward with the
# Triton backward; both Hopper kernels (the backward where head_dim <= 128).
VARIANTS = {
    "triton": {},
    "mosaic_fwd": {"forward": "mosaic"},
    "mosaic": {"forward": "mosaic", "backward": "mosaic"},
}


def _segments(rng, batch: int, length: int, count: int):
    """`count` packed segments of random lengths per row, then padding (id 0)."""
    import numpy as np

    ids = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length - 2), count, replace=False))
        for seg, (start, end) in enumerate(zip([0, *cuts[:-1]], cuts, strict=True), start=1):
            ids[b, start:end] = seg
    return ids


def _compile(fn, *args):
    """(compiled, whether it launches a Triton kernel, how many Mosaic GPU ones, compile seconds)."""
    import jax

    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    text = lowered.as_text()
    triton, mosaic = "__gpu$xla.gpu.triton" in text, common.mosaic_gpu_kernels(text)
    return lowered.compile(), triton, mosaic, round(time.perf_counter() - start, 2)


def _errors(got, want) -> tuple[dict, float]:
    import numpy as np

    errs, rel = {}, 0.0
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=False):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        err = float(np.max(np.abs(g - w))) if np.all(np.isfinite(g)) else float("inf")
        errs[f"{name}_err"] = float(f"{err:.3g}")
        rel = max(rel, err / max(float(np.max(np.abs(w))), 1e-30))
    return errs, rel


def check_flash(
    dtype: str,
    head_dim: int,
    *,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    q_offset: int,
    segments=3,
    seed=0,
    variant: str = "triton",
    mgpu_bwd: str | None = None,
):
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from moss_jax.attention import xla_attention
    from moss_jax.kernels import flash_gpu

    rng = np.random.RandomState(seed)
    dt = jnp.dtype(dtype)
    q, ct = (jnp.asarray(rng.randn(batch, q_len, heads, head_dim), dt) for _ in range(2))
    k, v = (jnp.asarray(rng.randn(batch, kv_len, heads, head_dim), dt) for _ in range(2))
    # No segment ids (segments=0): one sequence per row; a prompt at `q_offset` of a cache sees the
    # keys before it, those past it hidden by causality.
    seg_q = seg_kv = _segments(rng, batch, q_len, segments) if segments else None

    def run(attn):
        def fn(q, k, v, ct, seg_q, seg_kv):
            kw = dict(q_segment_ids=seg_q, kv_segment_ids=seg_kv, causal=True, q_offset=q_offset)
            out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, **kw), q, k, v)
            return (out, *vjp(ct))

        return fn

    args = (q, k, v, ct, seg_q, seg_kv)
    kernel = functools.partial(flash_gpu.flash_attention_gpu, **VARIANTS[variant])
    if mgpu_bwd is not None:  # the Hopper backward's schedule (flash_mgpu_bwd.Variant)
        from moss_jax.kernels.flash_mgpu_bwd import Variant

        kernel = functools.partial(kernel, mosaic_bwd=Variant.parse(mgpu_bwd))
    compiled, triton, mosaic, compile_s = _compile(run(kernel), *args)
    got = compiled(*args)
    with jax.default_matmul_precision("highest"):
        f32 = [x.astype(jnp.float32) for x in args[:4]]
        want = jax.jit(run(xla_attention))(*f32, seg_q, seg_kv)
    errs, rel = _errors(got, want)
    return {
        "check": "flash",
        "variant": variant,
        **({"mgpu_bwd": mgpu_bwd} if mgpu_bwd is not None else {}),
        "dtype": dtype,
        "head_dim": head_dim,
        "batch": batch,
        "heads": heads,
        "q_len": q_len,
        "kv_len": kv_len,
        "q_offset": q_offset,
        "segments": segments,
        **errs,
        "ref_max": round(float(max(np.max(np.abs(np.asarray(w))) for w in want)), 3),
        "rel_err": float(f"{rel:.3g}"),
        "ok": rel <= REL_TOL[dtype],
        "triton": triton,
        "mosaic": mosaic,
        "compile_s": compile_s,
    }


def check_decode(dtype: str, head_dim: int, *, batch: int, heads: int, kv_len: int, seed=0):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moss_jax.attention import xla_attention
    from moss_jax.kernels import decode_gpu

    rng = np.random.RandomState(seed)
    dt = jnp.dtype(dtype)
    q = jnp.asarray(rng.randn(batch, heads, head_dim), dt)
    k, v = (jnp.asarray(rng.randn(batch, kv_len, heads, head_dim), dt) for _ in range(2))
    lengths = np.linspace(1, kv_len, batch).astype(np.int32)
    kv_seg = np.ones((batch, kv_len), np.int32)
    kv_seg[0, : kv_len // 8] = 0  # row 0 left-padded (its length 1: it sees no key, output 0)
    if batch > 2:
        # Row 1 as the Decoder lays rows out: left padding, then the prompt and generated keys,
        # all before its length (slot-based), so the kernel must mask the padding inside it.
        kv_seg[1, : max(int(lengths[1]) // 3, 1)] = 0
    kv_seg[-1, kv_len // 2 :] = 2  # the last row holds a second segment; its query is in it
    q_seg = np.ones(batch, np.int32)
    q_seg[-1] = 2
    args = (q, k, v, lengths, q_seg, kv_seg)

    def kernel(q, k, v, lengths, q_seg, kv_seg):
        return decode_gpu.decode_attention_gpu(q, k, v, lengths, q_segment_ids_B=q_seg, kv_segment_ids_BxS=kv_seg)

    def reference(q, k, v, lengths, q_seg, kv_seg):
        valid = jnp.arange(kv_len)[None, :] < lengths[:, None]  # keys past the length: a segment no query has
        out = xla_attention(
            q[:, None], k, v, q_segment_ids=q_seg[:, None], kv_segment_ids=jnp.where(valid, kv_seg, -1), causal=False
        )
        return out[:, 0]

    compiled, triton, _, compile_s = _compile(kernel, *args)
    got = compiled(*args)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(reference)(*(x.astype(jnp.float32) for x in args[:3]), *args[3:])
    errs, rel = _errors([got], [want])
    return {
        "check": "decode",
        "dtype": dtype,
        "head_dim": head_dim,
        "batch": batch,
        "heads": heads,
        "kv_len": kv_len,
        "lengths": lengths.tolist(),
        **errs,
        "ref_max": round(float(np.max(np.abs(np.asarray(want)))), 3),
        "rel_err": float(f"{rel:.3g}"),
        "ok": rel <= REL_TOL[dtype],
        "triton": triton,
        "compile_s": compile_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small shapes: a CPU dry run in the interpreter")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--head_dims", default="64,128,256")
    parser.add_argument("--checks", default="flash,causal,offset,decode")
    parser.add_argument(
        "--variants",
        default="triton,mosaic_fwd,mosaic",
        help="flash kernels: triton, mosaic_fwd (Hopper forward), mosaic (Hopper forward and backward); mosaic*: bf16",
    )
    parser.add_argument(
        "--mgpu_bwd",
        default="",
        help="the mosaic variant once per Hopper backward schedule, comma-separated ('base' or options "
        "joined by '+', kernels/flash_mgpu_bwd.py Variant); empty: its default",
    )
    args = parser.parse_args(argv)
    head_dims = {int(k) for k in args.head_dims.split(",")}
    kinds = set(args.checks.split(","))
    common.set_threads(common.default_threads(), args.device)

    if args.smoke:
        flash = dict(batch=1, heads=2, q_len=100, kv_len=100, q_offset=0)
        offset = dict(batch=1, heads=2, q_len=20, kv_len=130, q_offset=100)
        decode = dict(batch=3, heads=2, kv_len=100)
    else:
        flash = dict(batch=2, heads=4, q_len=1000, kv_len=1000, q_offset=0)
        offset = dict(batch=2, heads=4, q_len=200, kv_len=1300, q_offset=1000)
        decode = dict(batch=4, heads=8, kv_len=2048)
    # bf16 (what training runs) first: fp32 tiles are the likeliest to hit Triton's resource limits.
    # The Triton kernels' cases first, then the Hopper variants (bf16 only): a Hopper kernel that
    # hangs on its first run must not keep the established kernels' checks from reporting.
    dtypes = [d for d in ("bfloat16", "float32") if d in args.dtypes.split(",")]
    variants = args.variants.split(",")

    def flash_cases(dtype: str, variant: str) -> list:
        f = {"variant": variant}
        cases = [(check_flash, dtype, k, flash | f) for k in (64, 128, 256) if "flash" in kinds and k in head_dims]
        cases += [
            (check_flash, dtype, k, flash | f | {"segments": 0})
            for k in (128, 256)
            if "causal" in kinds and k in head_dims
        ]
        return cases

    checks = []
    for dtype in dtypes:
        checks += flash_cases(dtype, "triton") if "triton" in variants else []
        checks += [(check_flash, dtype, 128, offset | {"segments": 0})] if "offset" in kinds else []
        decode_dims = (128, 256) if dtype == "bfloat16" else (128,)
        checks += [(check_decode, dtype, k, decode) for k in decode_dims if "decode" in kinds and k in head_dims]
    for variant in (v for v in variants if v != "triton"):
        schedules = args.mgpu_bwd.split(",") if args.mgpu_bwd and variant == "mosaic" else [None]
        cases = flash_cases("bfloat16", variant) if "bfloat16" in dtypes else []
        for schedule in schedules:
            checks += [(fn, dtype, k, kw | ({"mgpu_bwd": schedule} if schedule else {})) for fn, dtype, k, kw in cases]
    failed = 0
    for fn, dtype, head_dim, kw in checks:
        try:
            row = fn(dtype, head_dim, **kw)
        except Exception as e:  # report and go on: one failing case must not hide the others
            row = {"check": fn.__name__.removeprefix("check_"), "dtype": dtype, "head_dim": head_dim, **kw}
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:800]}")
        failed += not row["ok"]
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
