"""Compile an experiment's train step (or the server's decode step) for a TPU topology on this
(CPU) host and report whether it fits, before any TPU time is spent.

    python -m tpu_setup.aot_compile --gin_file=experiments/pretrain/moss_16b_v5p128.gin --topology=v5p:4x4x4
    python -m tpu_setup.aot_compile --gin_file=experiments/debug/pretrain_tiny_cpu.gin \\
        --topology=v5p:2x2x2 [--gin_bindings=...] [--mesh data=1,fsdp=-1,tensor=1,sequence=1]
    python -m tpu_setup.aot_compile --gin_file=... --topology=v5e:2x2 --step=decode \\
        --decode_batch=8 --decode_len=2048

Needs libtpu (`pip install -e ".[tpu]"`); `jax.experimental.topologies` describes the target
chips and XLA compiles for them without hardware. The data pipeline is never built. Prints
per-chip memory (arguments, outputs, temporaries, total against the chip's HBM), FLOPs per step
and the step time at 60% MFU, the bytes each chip moves in collectives per step (loop bodies
counted as often as they run; `collective_bytes`), a markdown table row, then one JSON line. Exit status: 0 fits,
1 does not fit (total above --max_hbm_fraction of HBM, or the TPU compiler's own
RESOURCE_EXHAUSTED verdict), 2 configuration errors (unknown topology, missing gin file, a mesh
that does not divide the chips, a batch that does not split over the mesh, ...), 3 the compiler
reported no memory analysis (whether it fits is unknown).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import gin  # noqa: E402

from tpu_setup.topology import GENERATIONS, parse_topology, topology_devices  # noqa: E402

# Stages whose step is the LM train step (loss weights come from the feature converter).
TRAIN_STEP_STAGES = ("pretrain", "sft", "preference_aware")
MESH_AXES = ("data", "fsdp", "tensor", "sequence")
MFU = 0.6
GIB = 2**30
TABLE_HEADER = (
    "| experiment | stage | topology | chips | mesh | global batch | per-chip GiB / HBM | model FLOPs/step "
    "| XLA FLOPs/step (loops once) | step time at 60% MFU (decode: HBM-bound chunk) |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def hbm_bytes(topology: str) -> int:
    """Per-chip HBM of the topology's TPU generation."""
    return parse_topology(topology).generation.hbm_bytes


class ConfigurationError(ValueError):
    """Something in the command line or the experiment is wrong (exit status 2)."""


def _mesh_sizes(text: str) -> dict[str, int]:
    sizes = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in MESH_AXES or not value.strip().lstrip("-").isdigit():
            raise ConfigurationError(f"--mesh: bad entry {part!r}; use e.g. data=1,fsdp=-1,tensor=1,sequence=1")
        sizes[name.strip()] = int(value)
    return sizes


@gin.configurable(module="tpu_setup.aot_compile")
def no_data(**kwargs):
    """Bound in place of the experiment's data factory: compiling never reads data."""
    raise RuntimeError("tpu_setup.aot_compile compiles the step only; it has no data")


def _find_gin_file(path: str, search_paths: list[str]) -> None:
    if os.path.isabs(path):
        if not os.path.isfile(path):
            raise ConfigurationError(f"gin file {path} does not exist")
        return
    if not any(os.path.isfile(os.path.join(p, path)) for p in search_paths):
        raise ConfigurationError(f"gin file {path} does not exist (searched {search_paths})")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tpu_setup.aot_compile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gin_file", action="append", required=True)
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--gin_search_path", action="append", default=["."])
    parser.add_argument("--topology", required=True, help=f"GENERATION:AxB[xC], GENERATION in {sorted(GENERATIONS)}")
    parser.add_argument("--mesh", default=None, help="override the experiment's mesh sizes, e.g. data=1,fsdp=-1")
    parser.add_argument("--step", choices=("train", "decode"), default="train")
    parser.add_argument("--decode_batch", type=int, default=8, help="decode: batch slots of the server")
    parser.add_argument("--decode_len", type=int, default=2048, help="decode: KV-cache slots (prompt + new tokens)")
    parser.add_argument("--decode_chunk", type=int, default=16, help="decode: tokens per device call")
    parser.add_argument("--decode_dtype", default="bfloat16", help="decode: parameter and compute dtype")
    parser.add_argument(
        "--max_hbm_fraction",
        type=float,
        default=0.9,
        help="fits when the per-chip total is at most this fraction of HBM (headroom for runtime buffers)",
    )
    return parser.parse_args(argv)


def _setup(args: argparse.Namespace):
    """Parses gin (data factory unbound: the data is never built) and lays the mesh on the topology."""
    topology = parse_topology(args.topology)
    for f in args.gin_file:
        _find_gin_file(f, args.gin_search_path)
    if not 0 < args.max_hbm_fraction <= 1:
        raise ConfigurationError(f"--max_hbm_fraction must be in (0, 1], got {args.max_hbm_fraction}")
    mesh_override = _mesh_sizes(args.mesh) if args.mesh else {}
    from moss_jax import configurables
    from moss_jax.sharding import make_mesh

    # A later binding wins: the experiment's data factory is never built, so gins whose data is
    # not on this host (pods read mounted corpora) still compile.
    no_data_binding = "moss_jax.experiment.data = @tpu_setup.aot_compile.no_data"
    gin.clear_config()
    configurables.parse(args.gin_file, [*args.gin_bindings, no_data_binding], args.gin_search_path)
    exp = configurables.experiment()
    if args.step == "train" and exp["stage"] not in TRAIN_STEP_STAGES:
        raise ConfigurationError(
            f"stage {exp['stage']!r} does not use the LM train step; aot_compile compiles the stages "
            f"{TRAIN_STEP_STAGES} (or --step=decode)"
        )
    m = exp["mesh"]
    if args.step == "decode":  # the server shards parameters and the KV cache over `tensor` only
        sizes = {"data": 1, "fsdp": 1, "tensor": -1, "sequence": 1}
    else:
        sizes = {"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor, "sequence": m.sequence}
        if m.dcn_data != 1:
            raise ConfigurationError(
                f"MeshConfig.dcn_data={m.dcn_data}: multi-slice meshes are not compiled here; compile one slice"
            )
    sizes |= mesh_override
    devices = topology_devices(topology)
    mesh = make_mesh(**sizes, devices=devices)
    return topology, exp, mesh


def _compile_train(exp: dict, mesh) -> tuple[dict, dict]:
    from moss_jax.train.objectives import lm_objective
    from moss_jax.train.optimizer import make_optimizer
    from moss_jax.train.state import abstract_state
    from moss_jax.train.step import check_batch_shape, compile_train_step, make_train_step

    train, model_config = exp["train"], exp["model"]
    check_batch_shape(train.batch_size, train.seq_len, mesh, train.micro_batches)
    if train.seq_len > model_config.max_len:
        raise ConfigurationError(f"seq_len {train.seq_len} exceeds the model's max_len {model_config.max_len}")
    tx, schedule = make_optimizer(exp["optimizer"])
    abstract = abstract_state(model_config, tx, mesh)
    # The stage's objective where the experiment names one (the LM loss for these stages).
    objective = {"objective": exp["objective"]} if exp.get("objective") is not None else {}
    step = make_train_step(
        model_config, tx, schedule, micro_batches=train.micro_batches, z_loss=train.z_loss, **objective
    )
    info = {
        "global_batch": train.batch_size,
        "seq_len": train.seq_len,
        "micro_batches": train.micro_batches,
        # The objective's own accounting (pairs run 2 rows per example; DPO adds a reference forward).
        "model_flops": (exp.get("objective") or lm_objective()).flops_per_step(
            model_config, train.batch_size, train.seq_len
        ),
    }
    compiled, report = compile_train_step(step, abstract, train.batch_size, train.seq_len, mesh)
    return info, report | _collectives_of(compiled)


def _compile_decode(exp: dict, mesh, args: argparse.Namespace) -> tuple[dict, dict]:
    import flax.linen as nn
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from moss_jax.inference.decoder import Decoder
    from moss_jax.model import abstract_params, param_shardings
    from moss_jax.train.step import compiled_report

    config = exp["model"].replace(dtype=args.decode_dtype, param_dtype=args.decode_dtype)
    if args.decode_len > config.max_len:
        raise ConfigurationError(f"--decode_len {args.decode_len} exceeds the model's max_len {config.max_len}")
    sizes = {"batch_size": args.decode_batch, "cache_len": args.decode_len, "chunk_size": args.decode_chunk}
    decoder = Decoder(config, **sizes, mesh=mesh)
    unsharded = Decoder(config, **sizes)
    params = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(abstract_params(config)),
        param_shardings(config, mesh),
    )
    state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(unsharded.init_state),
        decoder._state_shardings,  # the shardings the server's decoder places its state with
    )
    finish = jax.ShapeDtypeStruct((args.decode_batch,), bool, sharding=NamedSharding(mesh, PartitionSpec()))
    with decoder.context():
        compiled = decoder._chunk_fn.lower(params, state, finish).compile()
    info = {
        "global_batch": args.decode_batch,
        "seq_len": args.decode_len,
        "chunk": args.decode_chunk,
        # Forward only, one token per row per step: 2 FLOPs per parameter (no lookup) + attention over the cache.
        "model_flops": args.decode_chunk
        * args.decode_batch
        * (2.0 * config.num_non_embedding_params + 4.0 * config.n_layers * config.d_model * args.decode_len),
    }
    return info, compiled_report(compiled) | _collectives_of(compiled)


_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_LOOP = re.compile(r"condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_CALLS = re.compile(r"(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_INT_CONSTANT = re.compile(r"%([\w.\-]+) = [su]32\[\]\S* constant\((\d+)\)")
_INT_ELEMENT = re.compile(r"%([\w.\-]+) = [su]32\[\]\S* get-tuple-element\([^)]*\), index=(\d+)")
_INT_ADD = re.compile(r"%([\w.\-]+) = [su]32\[\]\S* add\(%([\w.\-]+), %([\w.\-]+)\)")


def _trip_count(condition: list[str], body: list[str]) -> int | None:
    """Iterations of a loop whose condition is `counter < constant` and whose body adds a constant
    to the counter (lax.scan: 1; XLA's windowed einsums unrolled by 2: 2); the counter is taken to
    start at 0. None for any other shape."""
    cond = "\n".join(condition)
    bounds = dict(_INT_CONSTANT.findall(cond))
    counters = dict(_INT_ELEMENT.findall(cond))
    if len(bounds) != 1 or len(counters) != 1 or "direction=LT" not in cond:
        return None
    bound, index = int(next(iter(bounds.values()))), next(iter(counters.values()))
    text = "\n".join(body)
    root = next((line for line in body if "ROOT" in line and " tuple(" in line), "")
    operands = [o.strip().lstrip("%") for o in re.sub(r"/\*[^*]*\*/", "", root.partition(" tuple(")[2]).split(",")]
    if not root or int(index) >= len(operands):
        return None
    updated = operands[int(index)].rstrip(")")
    elements = {name for name, i in _INT_ELEMENT.findall(text) if i == index}
    copies = re.findall(r"%([\w.\-]+) = [su]32\[\]\S* (?:copy|bitcast)\(%([\w.\-]+)\)", text)
    for _ in copies:  # the counter as read, through copies
        elements |= {name for name, source in copies if source in elements}
    constants = {name: int(v) for name, v in _INT_CONSTANT.findall(text)}
    for name, a, b in _INT_ADD.findall(text):
        if name == updated and {a, b} & elements and (step := constants.get(b, constants.get(a))):
            return -(-bound // step)
    return None


def _array_bytes(text: str) -> list[int]:
    return [math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dt] for dt, dims in _ARRAY.findall(text)]


def _group_size(line: str) -> int | None:
    """Chips per replica group of a collective, from any of XLA's three spellings."""
    if m := re.search(r"replica_groups=\{\{([0-9,]*)\}", line):
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=\[\d+,(\d+)\]<=", line):
        return int(m.group(1))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line):  # may name device_ids between
        sizes = {k.strip(" '"): int(v) for k, v in (p.split("=") for p in m.group(1).split(","))}
        return math.prod(sizes[a] for a in re.findall(r"'([^']+)'", m.group(2)))
    return None


def collective_bytes(hlo_text: str, largest: int = 3) -> dict:
    """Per-chip bytes of the collectives of an optimized HLO module (a compiled program's
    `as_text()`), each counted as often as it runs: a loop body as many times as its loop.

    XLA's cost analysis counts every loop body once; here a loop's trip count is read from its
    condition and counter update (`_trip_count`: lax.scan and XLA's windowed einsums). A loop of
    any other shape counts once and is counted in "loops_unknown". Per op: its result size (an async
    `-start` op's largest array) and the bytes a ring algorithm moves per chip within a group of
    n chips: all-gather S (n-1)/n, reduce-scatter S (n-1), all-reduce 2 S (n-1)/n, others S.
    """
    computations: dict[str, list[str]] = {}
    entry = name = None
    for line in hlo_text.splitlines():
        if name is None:
            m = _COMPUTATION.match(line)
            if m and not line.startswith(" "):
                name = m.group(2)
                computations[name] = []
                entry = name if m.group(1) else entry
        elif line.startswith("}"):
            name = None
        else:
            computations[name].append(line)
    callees: dict[str, list[tuple[str, int]]] = {}
    unknown = 0
    for caller, lines in computations.items():
        for line in lines:
            if loop := _LOOP.search(line):
                trips = _trip_count(computations.get(loop.group(1), []), computations.get(loop.group(2), []))
                unknown += trips is None
                callees.setdefault(caller, []).append((loop.group(2), trips or 1))
            callees.setdefault(caller, []).extend((c, 1) for c in _CALLS.findall(line))
    runs: dict[str, int] = {}

    def visit(computation: str, times: int) -> None:
        runs[computation] = runs.get(computation, 0) + times
        for callee, trips in callees.get(computation, []):
            visit(callee, times * trips)

    if entry is None:
        return {}
    visit(entry, 1)
    result = dict.fromkeys(COLLECTIVES, 0)
    moved = dict.fromkeys(COLLECTIVES, 0.0)
    ops = []
    for computation, times in runs.items():
        for line in computations.get(computation, []):
            if not (op := _COLLECTIVE.search(line)):
                continue
            kind, arrays = op.group(2), _array_bytes(op.group(1))
            size = (max(arrays) if op.group(3) else sum(arrays)) if arrays else 0
            group = _group_size(line)  # None for a collective-permute (chip-to-chip pairs)
            n = group or 1
            per_run = {
                "all-gather": size * (n - 1) / n,
                "reduce-scatter": size * (n - 1),
                "all-reduce": 2 * size * (n - 1) / n,
            }.get(kind, size)
            result[kind] += size * times
            moved[kind] += per_run * times
            where = re.search(r'op_name="([^"]*)"', line)
            ops.append((per_run * times, kind, times, group, where.group(1) if where else ""))
    ops.sort(key=lambda o: -o[0])
    return {
        "result_bytes": {k: v for k, v in result.items() if v},
        "moved_bytes": {k: round(v) for k, v in moved.items() if v},
        "moved_total_bytes": round(sum(moved.values())),
        "loops_unknown": unknown,
        "largest": [
            {"kind": k, "runs": t, "group": n, "moved_bytes": round(b), "op_name": w} for b, k, t, n, w in ops[:largest]
        ],
    }


def _collectives_of(compiled) -> dict:
    """{"collectives": collective_bytes(...)} of a compiled program, or {} where it has no HLO text."""
    try:
        text = compiled.as_text()
    except Exception:  # backends that cannot print the optimized module
        return {}
    found = collective_bytes(text) if text else {}
    return {"collectives": found} if found else {}


def fits_in_hbm(report: dict, hbm_bytes: int, max_fraction: float) -> bool | None:
    """Whether the per-chip total is within `max_fraction` of HBM; None when not reported."""
    if "total_bytes" not in report:
        return None
    return report["total_bytes"] <= max_fraction * hbm_bytes


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        topology, exp, mesh = _setup(args)
        chips = len(mesh.devices.flat)
        import jax

        try:
            info, report = _compile_train(exp, mesh) if args.step == "train" else _compile_decode(exp, mesh, args)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            # The TPU compiler itself refuses programs that cannot fit; report its verdict.
            verdict = str(e).splitlines()[0]
            print(f"[aot] {args.topology} mesh {dict(mesh.shape)}: DOES NOT FIT: {verdict}")
            out = {"topology": topology.name, "step": args.step, "chips": chips, "mesh": dict(mesh.shape)}
            print(json.dumps(out | {"hbm_bytes": topology.generation.hbm_bytes, "fits": False, "compiler": verdict}))
            return 1
    except (ValueError, TypeError, KeyError, OSError) as e:  # ConfigurationError, TopologyError, gin, mesh
        print(f"error: {e}", file=sys.stderr)
        return 2

    gen = topology.generation
    fits = fits_in_hbm(report, gen.hbm_bytes, args.max_hbm_fraction)
    if fits is None:
        print(
            f"error: the compiler gave no memory analysis for {topology.name}, so whether the program "
            "fits cannot be told",
            file=sys.stderr,
        )
        return 3
    total = report["total_bytes"]
    if args.step == "train":
        step_time = info["model_flops"] / (chips * gen.peak_flops * MFU)
        time_note = f"step time at {MFU:.0%} MFU ({gen.peak_flops / 1e12:.0f} TFLOP/s per chip)"
    else:  # decoding is bound by reading the parameters and the KV cache from HBM once per token
        step_time = args.decode_chunk * report.get("argument_size_in_bytes", 0) / gen.hbm_bandwidth
        time_note = f"HBM-bound time per {args.decode_chunk}-token chunk ({gen.hbm_bandwidth / 1e9:.0f} GB/s per chip)"
    model_config = exp["model"]
    mib = 2**20
    print(
        f"[aot] {topology.name} ({topology.accelerator_type}): {chips} chips, mesh {dict(mesh.shape)}, "
        f"{model_config.num_params / 1e9:.2f}B params, {args.step} step, "
        f"batch {info['global_batch']} x {info['seq_len']}"
    )
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes"):
        print(f"[aot]   {key.replace('_size_in_bytes', ''):9s} {report.get(key, 0) / mib:12.1f} MiB per chip")
    print(
        f"[aot]   total     {total / mib:12.1f} MiB of {gen.hbm_bytes / mib:.0f} MiB HBM "
        f"({100 * total / gen.hbm_bytes:.1f}%; limit {100 * args.max_hbm_fraction:.0f}%) -> "
        f"{'fits' if fits else 'DOES NOT FIT'}"
    )
    xla_flops = report["flops"] * chips if "flops" in report else None
    print(
        f"[aot]   model FLOPs per step {info['model_flops']:.3e}; XLA cost analysis "
        f"{'n/a' if xla_flops is None else f'{xla_flops:.3e}'} (all chips; loops counted once)"
    )
    print(f"[aot]   {time_note}: {step_time:.4g} s")
    if args.step == "decode":
        print(f"[aot]   about {args.decode_batch * args.decode_chunk / step_time:.0f} tokens/s for the batch")
    coll = report.get("collectives")
    if coll:
        kinds = ", ".join(f"{k} {v / GIB:.1f}" for k, v in coll["moved_bytes"].items()) or "none"
        unknown = (
            f"; {coll['loops_unknown']} loop(s) of unknown trip count counted once" if coll["loops_unknown"] else ""
        )
        print(
            f"[aot]   collectives, GiB moved per chip per step (ring estimate, loops x trip count): "
            f"{coll['moved_total_bytes'] / GIB:.1f} ({kinds}){unknown}"
        )
        for op in coll["largest"][:1]:
            group = f"over {op['group']} chips" if op["group"] else "between chip pairs"
            print(
                f"[aot]   largest: {op['kind']} {group} run {op['runs']} times, "
                f"{op['moved_bytes'] / GIB:.1f} GiB ({op['op_name'] or 'no op name'})"
            )
    experiment = " ".join(Path(f).stem for f in args.gin_file)
    mesh_text = "(" + ", ".join(str(mesh.shape[a]) for a in MESH_AXES) + ")"
    print(TABLE_HEADER)
    micro = info.get("micro_batches", 1)
    batch = f"{info['global_batch']} x {info['seq_len']}" + (f" ({micro} micro)" if micro > 1 else "")
    stage = exp["stage"] if args.step == "train" else "decode"
    print(
        f"| {experiment} | {stage} | {topology.name} ({topology.accelerator_type}) | {chips} | {mesh_text} | {batch} "
        f"| {total / GIB:.1f} / {gen.hbm_bytes / GIB:.0f} ({100 * total / gen.hbm_bytes:.0f}%) "
        f"| {info['model_flops']:.3g} | {'n/a' if xla_flops is None else f'{xla_flops:.3g}'} | {step_time:.3g} s |"
    )
    print(
        json.dumps(
            {
                "experiment": experiment,
                "step": args.step,
                "stage": exp["stage"],
                "topology": topology.name,
                "accelerator_type": topology.accelerator_type,
                "chips": chips,
                "mesh": dict(mesh.shape),
                **info,
                "per_chip_bytes": total,
                "hbm_bytes": gen.hbm_bytes,
                "hbm_fraction": total / gen.hbm_bytes,
                "fits": fits,
                "memory": {k: v for k, v in report.items() if k.endswith("bytes")},
                "collectives": report.get("collectives"),  # per chip, loops x trip count (collective_bytes)
                "flops": report.get("flops"),  # XLA, per chip
                # train: at 60% MFU; decode: a chunk's HBM-bound time (parameters and cache read per token)
                "step_time_s": step_time,
            }
        )
    )
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
