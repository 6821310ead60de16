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
and the step time at 60% MFU, a markdown table row, then one JSON line. Exit status: 0 fits,
1 does not fit (total above --max_hbm_fraction of HBM, or the TPU compiler's own
RESOURCE_EXHAUSTED verdict), 2 configuration errors (unknown topology, missing gin file, a mesh
that does not divide the chips, a batch that does not split over the mesh, ...), 3 the compiler
reported no memory analysis (whether it fits is unknown).
"""

from __future__ import annotations

import argparse
import json
import os
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
    _, report = compile_train_step(step, abstract, train.batch_size, train.seq_len, mesh)
    return info, report


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
    return info, compiled_report(compiled)


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
                "flops": report.get("flops"),  # XLA, per chip
                # train: at 60% MFU; decode: a chunk's HBM-bound time (parameters and cache read per token)
                "step_time_s": step_time,
            }
        )
    )
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
