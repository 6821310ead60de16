"""Runs attention cases through the Hopper kernels in JAX's Mosaic GPU interpreter and prints a
JSON line per case: `python -m tests.kernels.mgpu_interpret_run CASE [CASE ...]`.

A subprocess of `test_flash_mgpu_interpret.py`: the interpreter needs JAX's CPU dispatch
synchronous from the process's first computation, and a kernel that fails inside it can leave
the other warpgroups blocked on barriers: a case still running after `--case_timeout_s` dumps
every thread's stack to stderr and exits.

Each case runs `flash_attention_gpu(forward="mosaic", backward=...)` (or the model's way in,
`attention(impl="pallas_mgpu")`) op by op, value and VJP, against the XLA reference
(`cases.assert_matches_reference`), and counts the Hopper kernels' calls, so a case that silently
took the Triton path fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import functools
import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from moss_jax.attention import attention
from moss_jax.kernels import flash_gpu, flash_mgpu, flash_mgpu_bwd, mgpu_interpret
from tests.kernels import cases
from tests.kernels.cases import Case, assert_matches_reference


@dataclasses.dataclass(frozen=True)
class Run:
    case: Case
    backward: str = "mosaic"  # or "triton"
    tiles: flash_mgpu.Tiles | None = None  # the Mosaic forward's; None: its defaults
    registry: bool = False  # through moss_jax.attention's "pallas_mgpu" instead of flash_attention_gpu
    bwd: flash_mgpu_bwd.Variant | None = None  # the Mosaic backward's schedule; None: its default

    def attention(self):
        if self.registry:
            return functools.partial(attention, impl="pallas_mgpu")
        return functools.partial(
            flash_gpu.flash_attention_gpu,
            forward="mosaic",
            backward=self.backward,
            mosaic_tiles=self.tiles,
            mosaic_bwd=self.bwd,
        )


def _bf16(name, length, head_dim, causal, segments, **kw):
    return Case(name, length, length, head_dim, causal=causal, segments=segments, dtype=jnp.bfloat16, batch=1, **kw)


RUNS = [
    # whole tiles: the blocks below the diagonal skip the mask; several programs per head
    Run(_bf16("causal", 256, 128, True, 0)),
    # ragged: padded keys masked, packed rows
    Run(_bf16("packed_ragged", 300, 128, True, 3)),
    # fp16, bidirectional, ragged, head_dim 64
    Run(Case("f16_bidirectional", 200, 200, 64, causal=False, segments=0, dtype=jnp.float16, batch=1)),
    # random segment ids: some rows see no key at all (output 0); head_dim 80 padded to 128
    Run(_bf16("d80_random_ids", 256, 80, True, -1)),
    # one key block: one K/V slot
    Run(_bf16("one_block", 70, 64, True, 2)),
    # a ring of three 64-key slots, reused several times
    Run(_bf16("three_slots", 448, 64, False, 0, heads=1), tiles=flash_mgpu.Tiles(block_q=64, block_kv=64, stages=3)),
    # MOSS 16B's head_dim: the Hopper forward, then the Triton backward (in the interpreter too)
    Run(_bf16("d256_triton_bwd", 192, 256, True, 0, heads=1), backward="triton"),
    # the backward's other schedules (flash_mgpu_bwd.Variant; the cases above run its default,
    # overlap+shared_dq+wide_regs): all off, and overlap alone (at head_dim 80, padded to 128)
    Run(_bf16("base_ragged", 300, 128, True, 3), bwd=flash_mgpu_bwd.Variant.parse("base")),
    Run(_bf16("overlap_d80", 256, 80, False, -1), bwd=flash_mgpu_bwd.Variant.parse("overlap")),
    # pipeline (with the dS^T exchange at head_dim 128, without it at 64) and wide_regs
    Run(_bf16("pipeline_packed", 300, 128, True, 3), bwd=flash_mgpu_bwd.Variant.parse("overlap+shared_dq+pipeline")),
    Run(_bf16("pipeline_d64", 256, 64, False, -1), bwd=flash_mgpu_bwd.Variant.parse("overlap+pipeline+wide_regs")),
    # the model's way in: attention(impl="pallas_mgpu")
    Run(_bf16("registry", 192, 64, True, 2), registry=True),
]
CASES = {run.case.name: run for run in RUNS}


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
        run = CASES[name]
        # Which kernels ran (the planted-bug tests check that their copy did).
        print(json.dumps({"case": name, "status": "start", "kernels": flash_mgpu.__file__}), flush=True)
        faulthandler.dump_traceback_later(args.case_timeout_s, exit=True)
        counts.clear()
        start = time.perf_counter()
        record = {"case": name}
        try:
            with mgpu_interpret.hopper_interpret(detect_races=args.detect_races):
                errors = assert_matches_reference(run.attention(), run.case)
            want = {"flash_forward_hopper": 1, "flash_backward_hopper": int(run.backward == "mosaic")}
            got = {k: counts.get(k, 0) for k in want}
            if got != want:
                raise AssertionError(f"Hopper kernel calls {got}, expected {want}")
            if args.detect_races and mgpu_interpret.races_found():
                raise AssertionError("the interpreter's race detector found a race")
            record.update(status="pass", max_abs_error={k: float(f"{v:.3g}") for k, v in errors.items()})
        except Exception:  # noqa: BLE001 - reported per case, then the exit status
            failed += 1
            record.update(status="fail", error=traceback.format_exc(limit=-4))
            if args.detect_races:  # also when the numbers failed first
                record["races"] = mgpu_interpret.races_found()
        faulthandler.cancel_dump_traceback_later()
        record["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
