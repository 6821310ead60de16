"""Compile an experiment's train step for a TPU topology on this (CPU) host and report whether
it fits, before any TPU time is spent.

    python -m tpu_setup.aot_compile --gin_file=experiments/debug/pretrain_tiny_cpu.gin \\
        --topology=v5p:2x2x2 [--gin_bindings=...] [--mesh data=1,fsdp=-1,tensor=1,sequence=1]

Needs libtpu (`pip install -e ".[tpu]"`); `jax.experimental.topologies` describes the target
chips and XLA compiles for them without hardware. Prints per-chip memory (arguments, outputs,
temporaries, total against the chip's HBM) and FLOPs per step, then one JSON line; the exit
status is 1 when the step does not fit in HBM, 2 for configuration errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# HBM per chip (bytes), by topology name prefix.
HBM_BYTES = {"v4": 32 * 2**30, "v5e": 16 * 2**30, "v5litepod": 16 * 2**30, "v5p": 95 * 2**30, "v6e": 32 * 2**30}


def hbm_bytes(topology: str) -> int:
    for prefix in sorted(HBM_BYTES, key=len, reverse=True):
        if topology.startswith(prefix):
            return HBM_BYTES[prefix]
    raise ValueError(f"unknown TPU generation in topology {topology!r}; known: {sorted(HBM_BYTES)}")


def _mesh_sizes(text: str) -> dict[str, int]:
    sizes = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in ("data", "fsdp", "tensor", "sequence") or not value:
            raise ValueError(f"--mesh: bad entry {part!r}; use e.g. data=1,fsdp=-1,tensor=1,sequence=1")
        sizes[name.strip()] = int(value)
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", required=True)
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--topology", required=True, help="e.g. v5p:2x2x2, v4:4x4x4, v5e:4x4")
    parser.add_argument("--mesh", default=None, help="override the experiment's mesh sizes")
    args = parser.parse_args(argv)

    import jax
    from jax.experimental import topologies

    from moss_jax import configurables
    from moss_jax.sharding import make_mesh
    from moss_jax.train.optimizer import make_optimizer
    from moss_jax.train.state import abstract_state
    from moss_jax.train.step import check_batch_shape, compile_train_step, make_train_step

    try:
        configurables.parse(args.gin_file, args.gin_bindings, ["."])
        exp = configurables.experiment()
        hbm = hbm_bytes(args.topology)
        topo = topologies.get_topology_desc(args.topology, "tpu")
        m = exp["mesh"]
        sizes = {"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor, "sequence": m.sequence}
        if args.mesh:
            sizes |= _mesh_sizes(args.mesh)
        mesh = make_mesh(**sizes, devices=topo.devices)
        train = exp["train"]
        check_batch_shape(train.batch_size, train.seq_len, mesh, train.micro_batches)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    model_config = exp["model"]
    tx, schedule = make_optimizer(exp["optimizer"])
    abstract = abstract_state(model_config, tx, mesh)
    step = make_train_step(model_config, tx, schedule, micro_batches=train.micro_batches, z_loss=train.z_loss)
    header = (
        f"[aot] {args.topology}: {len(topo.devices)} chips, mesh {dict(mesh.shape)}, "
        f"{model_config.num_params / 1e9:.3f}B params, batch {train.batch_size} x {train.seq_len}"
    )
    try:
        _, report = compile_train_step(step, abstract, train.batch_size, train.seq_len, mesh)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The TPU compiler itself refuses programs that cannot fit; report its verdict.
        print(header)
        print(f"[aot]   DOES NOT FIT: {str(e).splitlines()[0]}")
        print(
            json.dumps(
                {
                    "topology": args.topology,
                    "chips": len(topo.devices),
                    "mesh": dict(mesh.shape),
                    "hbm_bytes": hbm,
                    "fits": False,
                    "compiler": str(e).splitlines()[0],
                }
            )
        )
        return 1
    total = report.get("total_bytes", 0)
    fits = total <= hbm
    mib = 2**20
    print(header)
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes"):
        print(f"[aot]   {key.replace('_size_in_bytes', ''):9s} {report.get(key, 0) / mib:12.1f} MiB per chip")
    print(
        f"[aot]   total     {total / mib:12.1f} MiB of {hbm / mib:.0f} MiB HBM -> {'fits' if fits else 'DOES NOT FIT'}"
    )
    if "flops" in report:
        print(f"[aot]   {report['flops'] / 1e12:.3f} TFLOP per step per chip (XLA cost analysis)")
    print(
        json.dumps(
            {
                "topology": args.topology,
                "chips": len(topo.devices),
                "mesh": dict(mesh.shape),
                "per_chip_bytes": total,
                "hbm_bytes": hbm,
                "fits": fits,
                "flops": report.get("flops"),
            }
        )
    )
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
