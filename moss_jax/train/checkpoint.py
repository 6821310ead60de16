"""Training checkpoints with orbax CheckpointManager.

Each step directory holds three items: `state` (TrainState, sharded arrays), `data` (the data
iterator position, JSON) and `model` (the MossConfig, JSON). Saves are asynchronous; orbax
writes into a temporary directory and renames it only when complete, so an interrupted save
leaves the previous checkpoints untouched and `latest_step()` never points at a partial one.
Retention: the latest `keep` checkpoints plus the best one by a metric (lowest loss).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from moss_jax.config import MossConfig

log = logging.getLogger(__name__)

# Fields that fix parameter shapes/layout; a checkpoint is only compatible if they match.
ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim", "rotary_dim", "scan_layers")


class CheckpointMismatchError(ValueError):
    """A checkpoint directory belongs to a different model than the run."""


class Checkpointer:
    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep: int = 3,
        best_metric: str = "loss",
        async_save: bool = True,
    ):
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        policy = pp.AnyPreservationPolicy(
            [
                pp.LatestN(n=keep),
                pp.BestN(get_metric_fn=lambda m: m[best_metric], reverse=True, n=1),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "model"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_model(self, config: MossConfig, step: int | None = None) -> None:
        """Raises CheckpointMismatchError if the checkpoint at `step` was written for another model."""
        step = self.latest_step() if step is None else step
        if step is None:
            return
        saved = self.manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]
        diffs = {f: (saved.get(f), getattr(config, f)) for f in ARCH_FIELDS if saved.get(f) != getattr(config, f)}
        if diffs:
            shown = ", ".join(f"{k}: checkpoint {a} vs run {b}" for k, (a, b) in diffs.items())
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} was written for a different model ({shown}); "
                "use another --workdir or the matching model gin"
            )

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(self, step: int, state: Any, data_state: dict, config: MossConfig, metrics: dict, force=False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                model=ocp.args.JsonSave(dataclasses.asdict(config)),
            ),
            metrics={self.best_metric: float(metrics[self.best_metric])},
            force=force,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """Restores (step, state, data_state); `abstract_state` carries the target shardings,
        so a checkpoint written on one mesh restores onto another."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return step, restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
