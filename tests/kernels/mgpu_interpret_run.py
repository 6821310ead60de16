"""Runs attention cases through the Hopper kernels in JAX's Mosaic GPU interpreter and prints a
JSON line per case: `python -m tests.kernels.mgpu_interpret_run CASE [CASE ...]`.

A subprocess of `test_flash_mgpu_interpret.py`: the interpreter needs JAX's CPU dispatch
synchronous from the process's first computation, and a kernel that fails inside it can leave
the other warpgroups blocked on barriers: a case still running after `--case_timeout_s` dumps
every thread's stack to stderr and exits.

Each case runs `flash_attention_gpu(forward="mosaic", backward=...)` under jit, value and VJP,
against the XLA reference (`cases.assert_matches_reference`), and counts the Hopper kernels'
calls, so a case that silently took the Triton path fails.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from moss_jax.kernels import flash_gpu, flash_mgpu, flash_mgpu_bwd, mgpu_interpret
from tests.kernels import cases
from tests.kernels.cases import Case, assert_matches_reference

# name -> (case, backward, Mosaic forward tiles)
CASES = {
    c[0].name: c
    for c in [
        # whole tiles: the blocks below the diagonal skip the mask; several programs per head
        (Case("causal", 256, 256, 128, causal=True, segments=0, dtype=jnp.bfloat16, batch=1), "mosaic", None),
        # ragged: padded keys masked, packed rows
        (Case("packed_ragged", 300, 300, 128, causal=True, segments=3, dtype=jnp.bfloat16, batch=1), "mosaic", None),
        # fp16, bidirectional, ragged, head_dim 64
        (Case("f16_bidirectional", 200, 200, 64, causal=False, segments=0, dtype=jnp.float16, batch=1), "mosaic", None),
        # random segment ids: some rows see no key at all (output 0); head_dim 80 padded to 128
        (Case("d80_random_ids", 256, 256, 80, causal=True, segments=-1, dtype=jnp.bfloat16, batch=1), "mosaic", None),
        # one key block: one K/V slot
        (Case("one_block", 70, 70, 64, causal=True, segments=2, dtype=jnp.bfloat16, batch=1), "mosaic", None),
        # a ring of three 64-key slots, reused several times
        (
            Case("three_slots", 448, 448, 64, causal=False, segments=0, dtype=jnp.bfloat16, batch=1, heads=1),
            "mosaic",
            flash_mgpu.Tiles(block_q=64, block_kv=64, stages=3),
        ),
        # MOSS 16B's head_dim: the Hopper forward, then the Triton backward (in the interpreter too)
        (
            Case("d256_triton_bwd", 192, 192, 256, causal=True, segments=0, dtype=jnp.bfloat16, batch=1, heads=1),
            "triton",
            None,
        ),
    ]
}


def _counting(module, name, counts):
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def _outputs_and_grads_op_by_op(fn, inputs: dict):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **inputs["kwargs"]), inputs["q"], inputs["k"], inputs["v"])
    return out, vjp(inputs["cotangent"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", choices=sorted(CASES))
    parser.add_argument("--detect_races", action="store_true", help="the interpreter's race detector on")
    parser.add_argument(
        "--case_timeout_s",
        type=float,
        default=180.0,
        help="a case still running after this long has hung (a warpgroup that raised leaves the others "
        "waiting on barriers): dump every thread's stack and exit",
    )
    args = parser.parse_args(argv)
    # Before the first computation: the CPU client reads it once (see mgpu_interpret's docstring).
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    # Op by op, not under one jit: XLA:CPU runs a jitted program's callbacks on its intra-op pool
    # (one thread per core), where the interpreter's blocking warpgroups starve each other.
    cases.outputs_and_grads = _outputs_and_grads_op_by_op
    counts: dict[str, int] = {}
    _counting(flash_mgpu, "flash_forward_hopper", counts)
    _counting(flash_mgpu_bwd, "flash_backward_hopper", counts)
    failed = 0
    for name in args.cases:
        case, backward, tiles = CASES[name]
        print(json.dumps({"case": name, "status": "start"}), flush=True)
        faulthandler.dump_traceback_later(args.case_timeout_s, exit=True)
        counts.clear()
        start = time.perf_counter()
        record = {"case": name}
        try:
            with mgpu_interpret.hopper_interpret(detect_races=args.detect_races):
                attn = functools.partial(
                    flash_gpu.flash_attention_gpu, forward="mosaic", backward=backward, mosaic_tiles=tiles
                )
                errors = assert_matches_reference(attn, case)
            want = {"flash_forward_hopper": 1, "flash_backward_hopper": int(backward == "mosaic")}
            got = {k: counts.get(k, 0) for k in want}
            if got != want:
                raise AssertionError(f"Hopper kernel calls {got}, expected {want}")
            if args.detect_races and mgpu_interpret.races_found():
                raise AssertionError("the interpreter's race detector found a race")
            record.update(status="pass", max_abs_error={k: float(f"{v:.3g}") for k, v in errors.items()})
        except Exception:  # noqa: BLE001 - reported per case, then the exit status
            failed += 1
            record.update(status="fail", error=traceback.format_exc(limit=-4))
        faulthandler.cancel_dump_traceback_later()
        record["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
