"""Training checkpoints with orbax CheckpointManager.

Each step directory holds three items: `state` (TrainState, sharded arrays), `data` (the data
iterator position, JSON) and `model` (the MossConfig, JSON). Saves are asynchronous; orbax
writes into a temporary directory and renames it only when complete, so an interrupted save
leaves the previous checkpoints untouched and `latest_step()` never points at a partial one.

Saves: at every multiple of `save_every`, at a preemption sync point, and whenever the trainer
forces one (the end of a run); no checkpoint at the first step. Retention: the latest `keep`
checkpoints plus the best one by a metric (lowest loss). Each checkpoint stores its metric, so
the ranking holds across restarts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as sdp

from moss_jax.config import MossConfig

log = logging.getLogger(__name__)

# Fields that fix the parameter tree (names, shapes, layout), plus rotary_dim (what the weights
# mean); a checkpoint is only compatible if they match. Other fields (dtypes, remat, attention
# kernel, dropout) may change between runs: a param_dtype change is cast on restore.
ARCH_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "mlp_dim",
    "rotary_dim",
    "scan_layers",
    "tie_embeddings",
)


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to a different model (or optimiser chain) than the run."""


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
        if save_every < 1 or keep < 1:
            raise ValueError(f"Checkpointer: save_every={save_every} and keep={keep} must both be >= 1")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric

        def metric(m: dict) -> float:
            return m[best_metric]

        policy = pp.AnyPreservationPolicy(
            [
                pp.LatestN(n=keep),
                # reverse=True sorts descending and BestN keeps the tail: the lowest metric.
                # Checkpoints without a stored metric (written before metrics were) are not
                # "best" forever; LatestN still keeps the newest of them.
                pp.BestN(get_metric_fn=metric, reverse=True, n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            # Not orbax's default (which adds InitialSavePolicy, a checkpoint at the first step).
            save_decision_policy=sdp.AnySavePolicy(
                [sdp.FixedIntervalPolicy(save_every), sdp.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=policy,
            # best_fn makes orbax write each step's metrics next to it; without them a restarted
            # manager sees metrics=None on every older checkpoint and BestN keeps them all forever.
            best_fn=metric,
            best_mode="min",
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "model": ocp.JsonCheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_model(self, config: MossConfig, step: int | None = None) -> None:
        """Raises CheckpointMismatchError if the checkpoint at `step` was written for another model."""
        step = self.latest_step() if step is None else step
        if step is None:
            return
        saved = self.manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]
        # A field missing from an older checkpoint's JSON had its default value then.
        defaults = {f.name: f.default for f in dataclasses.fields(MossConfig)}
        saved = {f: saved.get(f, defaults[f]) for f in ARCH_FIELDS}
        diffs = {f: (saved[f], getattr(config, f)) for f in ARCH_FIELDS if saved[f] != getattr(config, f)}
        if diffs:
            shown = ", ".join(f"{k}: checkpoint {a} vs run {b}" for k, (a, b) in diffs.items())
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} was written for a different model ({shown}); "
                "use another --workdir or the matching model gin"
            )

    def check_state(self, abstract_state: Any, step: int | None = None) -> None:
        """Raises CheckpointMismatchError naming the leaves where the saved TrainState's tree (paths,
        shapes) differs from `abstract_state`'s; dtypes may differ (restore casts)."""
        step = self.latest_step() if step is None else step
        if step is None:
            return
        saved = _flat_shapes(self.manager.item_metadata(step)["state"])
        run = _flat_shapes(abstract_state)
        only_saved = sorted(set(saved) - set(run))
        only_run = sorted(set(run) - set(saved))
        reshaped = sorted(k for k in set(saved) & set(run) if saved[k] != run[k])
        if not (only_saved or only_run or reshaped):
            return
        parts = []
        for label, keys in (("only in the checkpoint", only_saved), ("only in this run", only_run)):
            if keys:
                parts.append(f"{label}: {_show(keys)}")
        if reshaped:
            parts.append("shape differs: " + _show([f"{k} {saved[k]} vs {run[k]}" for k in reshaped]))
        if all(k.startswith("opt_state") for k in only_saved + only_run + reshaped):
            cause = (
                "the optimiser state differs, so the optax chain changed since the checkpoint was written "
                "(e.g. OptimizerConfig.clip_norm set in one run and None in the other); resume with the "
                "original optimiser settings or use another --workdir"
            )
        else:
            cause = "the trained module differs (another objective or model); use another --workdir"
        raise CheckpointMismatchError(
            f"checkpoint {self.directory / str(step)} holds a TrainState that does not fit this run ("
            + "; ".join(parts)
            + f"): {cause}"
        )

    def reached_preemption(self, step: int) -> bool:
        """True at a preemption sync point (multi-host runs with `jax.distributed`; every host
        agrees on the step)."""
        return self.manager.reached_preemption(step)

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
        self.check_state(abstract_state, step)
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


def _key_name(key: Any) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"opt_state/1/0/mu/embedding": shape} for every array leaf of a TrainState, or of its orbax
    metadata (saved as nested dicts and lists with the same keys; empty optimiser states vanish)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in flat if leaf is not None}


def _show(items: list[str], limit: int = 4) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
