"""Training entry point: an experiment is a gin file (model gin + run gin + overrides).

    python -m moss_jax.main --gin_file=experiments/debug/pretrain_tiny_cpu.gin \\
        [--gin_bindings="moss_jax.train.TrainConfig.steps = 100"] [--distributed]

On TPU pods every host runs this same command with --distributed (jax.distributed.initialize
picks the coordinator from the TPU environment); process 0 writes logs and metrics.

Exit status: 0 when the stage finished; 2 for a bad configuration or bad input, printed as one
line `error: <message>` (a malformed data line as `error: <file>:<line>: ...`, a task left with
no examples, a vocabulary larger than the model's); 75 when preempted after a checkpoint
(rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # quiet TensorFlow (TensorBoard writer) start-up

# Exit status of a run stopped by a preemption after its checkpoint was written (EX_TEMPFAIL:
# rerun the same command to resume).
EXIT_PREEMPTED = 75


def run_stage(exp: dict) -> dict:
    """Runs one parsed experiment (see `configurables.experiment`); returns its JSON summary.

    A training stage ends by exporting its final params to `<workdir>/params` (a moss_jax
    params checkpoint the next stage's `init_from` reads), plus the preference tags file for a
    preference-aware run.
    """
    import jax

    from moss_jax.stages.tagging import PREFERENCE_TAGS_FILE, tag_stage
    from moss_jax.train.trainer import train

    if exp["stage"] == "tag":
        return {"stage": "tag", **tag_stage(exp["tag"])}
    cfg = exp["train"]
    summary = train(exp["model"], exp["optimizer"], cfg, exp["data"], exp["mesh"], objective=exp["objective"])
    params_dir = Path(cfg.workdir) / "params"
    from moss_jax.convert.checkpoint_io import save_params

    # Every process takes part in writing sharded params (orbax); process 0 adds the small files.
    save_params(params_dir, summary["state"].params, exp["model"], overwrite=True)
    if jax.process_index() == 0 and exp.get("preference_tags"):
        shutil.copy(exp["preference_tags"], params_dir / PREFERENCE_TAGS_FILE)
    last = summary["history"][-1] if summary.get("history") else {}
    return {
        "stage": exp["stage"],
        "objective": exp["objective"].name,
        "start_step": summary["start_step"],
        "end_step": summary["end_step"],
        "first_loss": summary["first_loss"],
        "last_loss": summary["last_loss"],
        "loss_drop": summary["loss_drop"],
        "tokens_per_s": summary["tokens_per_s"],
        "last_metrics": {k: v for k, v in last.items() if isinstance(v, float)},
        "workdir": cfg.workdir,
        "params": str(params_dir),
    }


def run_experiment(gin_files: list[str], bindings: list[str] = (), search_paths: list[str] = (".",)) -> dict:
    """Parses the gin files (clearing earlier bindings) and runs the stage they describe."""
    from moss_jax import configurables

    configurables.clear()
    configurables.parse(gin_files, bindings, search_paths)
    return run_stage(configurables.experiment())


def build_parser() -> argparse.ArgumentParser:
    """The command line: gin files, gin bindings (one `--gin_bindings` per binding), search paths."""
    parser = argparse.ArgumentParser(
        prog="python -m moss_jax.main", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gin_file", action="append", default=[], required=True)
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--gin_search_path", action="append", default=["."])
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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

    try:
        configurables.parse(args.gin_file, args.gin_bindings, args.gin_search_path)
        exp = configurables.experiment()
    except (ValueError, TypeError, OSError) as e:
        print(f"error: gin configuration: {e}", file=sys.stderr)
        return 2
    print(
        f"[main] process {jax.process_index()}/{jax.process_count()}, {jax.device_count()} devices "
        f"({jax.devices()[0].device_kind}); stage {exp['stage']}"
    )
    from moss_jax.train.trainer import Preempted

    try:
        summary = run_stage(exp)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"[main] {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    if jax.process_index() == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
