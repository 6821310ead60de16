"""Training entry point: an experiment is a gin file (model gin + run gin + overrides).

    python -m moss_jax.main --gin_file=experiments/debug/pretrain_tiny_cpu.gin \\
        [--gin_bindings="moss_jax.train.TrainConfig.steps = 100"] [--distributed]

On TPU pods every host runs this same command with --distributed (jax.distributed.initialize
picks the coordinator from the TPU environment); process 0 writes logs and metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # quiet TensorFlow (TensorBoard writer) start-up

STAGES = ("pretrain",)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moss_jax.main", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gin_file", action="append", default=[], required=True)
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--gin_search_path", action="append", default=["."])
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import jax

    if args.distributed:  # before anything touches a device; process 0 owns logs and metrics
        from moss_jax import distributed

        try:
            distributed.initialize()
        except distributed.DistributedInitError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        distributed.configure_logging(logging.WARNING)
    from moss_jax import configurables
    from moss_jax.train.trainer import train

    try:
        configurables.parse(args.gin_file, args.gin_bindings, args.gin_search_path)
        exp = configurables.experiment()
    except (ValueError, TypeError, OSError) as e:
        print(f"error: gin configuration: {e}", file=sys.stderr)
        return 2
    if exp["stage"] not in STAGES:
        print(f"error: stage {exp['stage']!r} is not one of {STAGES}", file=sys.stderr)
        return 2
    print(
        f"[main] process {jax.process_index()}/{jax.process_count()}, {jax.device_count()} devices "
        f"({jax.devices()[0].device_kind}); stage {exp['stage']}"
    )
    try:
        summary = train(exp["model"], exp["optimizer"], exp["train"], exp["data"], exp["mesh"])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(
            json.dumps(
                {
                    "stage": exp["stage"],
                    "start_step": summary["start_step"],
                    "end_step": summary["end_step"],
                    "first_loss": summary["first_loss"],
                    "last_loss": summary["last_loss"],
                    "loss_drop": summary["loss_drop"],
                    "tokens_per_s": summary["tokens_per_s"],
                    "workdir": exp["train"].workdir,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
