"""Checkpoint schedule, retention across restarts, and the errors for checkpoints that do not fit."""

import dataclasses
import json
from pathlib import Path

import jax
import pytest

from moss_jax.train.checkpoint import Checkpointer, CheckpointMismatchError
from moss_jax.train.trainer import train
from tests.train.common import CFG, DATA, ONE, OPT, train_config


def _saved_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in Path(workdir, "checkpoints").iterdir() if p.name.isdigit())


def _losses(workdir) -> dict[int, float]:
    out = {}
    for line in Path(workdir, "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out[m["step"]] = m["loss"]
    return out


def test_saves_at_multiples_of_checkpoint_every_and_at_the_end(tmp_path):
    # No checkpoint at step 1 (orbax's default InitialSavePolicy), none between the multiples.
    train(CFG, OPT, train_config(tmp_path, steps=7, checkpoint_every=3, keep_checkpoints=10), DATA, ONE)
    assert _saved_steps(tmp_path) == [3, 6, 7]
    resumed = train(CFG, OPT, train_config(tmp_path, steps=10, checkpoint_every=3, keep_checkpoints=10), DATA, ONE)
    assert resumed["start_step"] == 7
    assert _saved_steps(tmp_path) == [3, 6, 7, 9, 10]


def test_retention_holds_across_restarts(tmp_path):
    """Each restart must still delete the earlier processes' checkpoints: keep the latest and the
    lowest-loss one, ranked by the loss stored with every checkpoint."""
    saved = set()
    for steps, every, keep in ((6, 5, 3), (12, 2, 1), (18, 2, 1)):
        train(CFG, OPT, train_config(tmp_path, steps=steps, checkpoint_every=every, keep_checkpoints=keep), DATA, ONE)
        saved |= {s for s in range(every, steps + 1, every)} | {steps}
        losses = _losses(tmp_path)
        best = min((s for s in saved if s in losses), key=losses.__getitem__)
        assert _saved_steps(tmp_path) == sorted(set(sorted(saved)[-keep:]) | {best}), (steps, best)
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=2)
    assert all(ckpt.manager.metrics(s) is not None for s in ckpt.all_steps())
    ckpt.close()


def test_workdir_beyond_steps_is_an_error_and_at_steps_trains_nothing(tmp_path, capsys):
    train(CFG, OPT, train_config(tmp_path, steps=4, checkpoint_every=2), DATA, ONE)
    with pytest.raises(ValueError, match=r"checkpoint at step 4, beyond TrainConfig.steps=3: nothing to train"):
        train(CFG, OPT, train_config(tmp_path, steps=3), DATA, ONE)
    again = train(CFG, OPT, train_config(tmp_path, steps=4), DATA, ONE)
    assert again["start_step"] == again["end_step"] == 4 and again["losses"] == []
    assert "already at TrainConfig.steps=4: nothing to train" in capsys.readouterr().out


def test_tie_embeddings_mismatch_is_refused_on_resume_and_init_from(tmp_path):
    from moss_jax.convert.checkpoint_io import save_params
    from moss_jax.model import init_params

    tied = CFG.replace(tie_embeddings=True)
    train(tied, OPT, train_config(tmp_path / "run", steps=1), DATA, ONE)
    with pytest.raises(CheckpointMismatchError, match="tie_embeddings: checkpoint True vs run False"):
        train(CFG, OPT, train_config(tmp_path / "run", steps=2), DATA, ONE)
    save_params(tmp_path / "tied_params", init_params(tied, jax.random.PRNGKey(1)), tied)
    with pytest.raises(CheckpointMismatchError, match="tie_embeddings: checkpoint True vs run False"):
        train(CFG, OPT, train_config(tmp_path / "init", steps=1, init_from=str(tmp_path / "tied_params")), DATA, ONE)


def test_changed_optimiser_chain_is_refused_naming_the_cause(tmp_path):
    train(CFG, OPT, train_config(tmp_path, steps=1), DATA, ONE)
    unclipped = dataclasses.replace(OPT, clip_norm=None)
    with pytest.raises(CheckpointMismatchError, match=r"optax chain changed .*clip_norm") as err:
        train(CFG, unclipped, train_config(tmp_path, steps=2), DATA, ONE)
    assert "opt_state/1/0/mu/embedding" in str(err.value)  # names leaves of the saved state
    # A param_dtype change is not a mismatch: restore casts.
    resumed = train(CFG.replace(param_dtype="bfloat16"), OPT, train_config(tmp_path, steps=2), DATA, ONE)
    assert resumed["start_step"] == 1 and resumed["state"].params["embedding"].dtype == "bfloat16"


def test_checkpointer_validates_its_counts(tmp_path):
    with pytest.raises(ValueError, match="save_every=0"):
        Checkpointer(tmp_path, save_every=0)
