"""End-to-end checks of the training loop (in-process and as a killed/resumed subprocess)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from moss_jax.train.checkpoint import CheckpointMismatchError
from moss_jax.train.objectives import PAIR_FEATURES, reward_objective
from moss_jax.train.trainer import (
    KILL_DURING_SAVE_ENV,
    MeshConfig,
    NonFiniteError,
    model_flops_utilization,
    train,
)
from tests.train.common import CFG, DATA, ONE, OPT, train_config

ROOT = Path(__file__).resolve().parents[2]
MESH_222 = MeshConfig(data=2, fsdp=2, tensor=2)


def _assert_trees_close(a, b, atol):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol), a, b)


def test_sharded_run_equals_single_device(tmp_path):
    one = train(CFG, OPT, train_config(tmp_path / "one"), DATA, ONE)
    eight = train(CFG, OPT, train_config(tmp_path / "eight"), DATA, MESH_222)
    np.testing.assert_allclose(eight["losses"], one["losses"], atol=1e-5, rtol=0)
    _assert_trees_close(eight["state"].params, one["state"].params, atol=1e-5)
    assert eight["state"].params["layers"]["attn"]["query"].sharding.spec[2] == "tensor"


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = train(CFG, OPT, train_config(tmp_path / "full", steps=10, checkpoint_every=5), DATA, ONE)
    part = train(CFG, OPT, train_config(tmp_path / "part", steps=5, checkpoint_every=5), DATA, ONE)
    resumed = train(CFG, OPT, train_config(tmp_path / "part", steps=10, checkpoint_every=5), DATA, ONE)
    assert resumed["start_step"] == 5
    np.testing.assert_allclose(part["losses"], full["losses"][:5], atol=1e-6, rtol=0)
    np.testing.assert_allclose(resumed["losses"], full["losses"][5:], atol=1e-6, rtol=0)
    _assert_trees_close(resumed["state"].params, full["state"].params, atol=1e-6)


def test_restore_onto_a_different_mesh(tmp_path):
    full = train(CFG, OPT, train_config(tmp_path / "full", steps=6, checkpoint_every=3), DATA, MESH_222)
    train(CFG, OPT, train_config(tmp_path / "re", steps=3, checkpoint_every=3, async_checkpoint=True), DATA, MESH_222)
    moved = train(CFG, OPT, train_config(tmp_path / "re", steps=6, checkpoint_every=3), DATA, MeshConfig(fsdp=8))
    assert moved["start_step"] == 3
    assert dict(moved["state"].params["embedding"].sharding.mesh.shape)["fsdp"] == 8
    np.testing.assert_allclose(moved["losses"], full["losses"][3:], atol=1e-5, rtol=0)


def test_init_from_converted_checkpoint(tmp_path):
    from moss_jax.convert.checkpoint_io import save_params
    from moss_jax.model import init_params

    params = init_params(CFG, jax.random.PRNGKey(123))
    save_params(tmp_path / "converted", params, CFG)
    run = train(CFG, OPT, train_config(tmp_path / "run", steps=1, init_from=str(tmp_path / "converted")), DATA, ONE)
    scratch = train(CFG, OPT, train_config(tmp_path / "scratch", steps=1), DATA, ONE)
    assert run["first_loss"] != scratch["first_loss"]
    # The first step's loss is computed on the converted params.
    from moss_jax.model import MossLM
    from moss_jax.train.loss import normalizer, weighted_cross_entropy

    batch = next(DATA(seq_len=32, batch_size=8, seed=0))
    logits = MossLM(CFG).apply(
        {"params": params},
        batch["decoder_input_tokens"],
        positions_BxL=batch["decoder_positions"],
        segment_ids_BxL=batch["decoder_segment_ids"],
    )
    ce, _ = weighted_cross_entropy(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])
    np.testing.assert_allclose(run["first_loss"], float(ce / normalizer(batch["decoder_loss_weights"])), rtol=1e-5)
    with pytest.raises(CheckpointMismatchError, match="d_model"):
        bad = train_config(tmp_path / "bad", init_from=str(tmp_path / "converted"))
        train(CFG.replace(d_model=32), OPT, bad, DATA, ONE)


def test_bad_input_fails_before_compute(tmp_path):
    with pytest.raises(ValueError, match="cannot be split"):
        train(CFG, OPT, train_config(tmp_path / "a"), DATA, MeshConfig(data=3))
    with pytest.raises(ValueError, match="data axes"):
        train(CFG, OPT, train_config(tmp_path / "b", batch_size=6), DATA, MESH_222)
    train(CFG, OPT, train_config(tmp_path / "c", steps=1), DATA, ONE)
    with pytest.raises(CheckpointMismatchError, match="n_layers: checkpoint 2 vs run 3"):
        train(CFG.replace(n_layers=3), OPT, train_config(tmp_path / "c", steps=2), DATA, ONE)


def test_nan_stops_with_step_and_last_checkpoint(tmp_path):
    def poisoned(**kw):
        pipeline = DATA(**kw)

        class Poison:
            get_state, set_state = pipeline.get_state, pipeline.set_state

            def __next__(self):
                batch = next(pipeline)
                if pipeline.rows_consumed > 3 * kw["batch_size"]:
                    batch["decoder_input_tokens"][0, 0] = CFG.vocab_size + 5  # NaN under jit
                return batch

        return Poison()

    with pytest.raises(NonFiniteError, match=r"step 4: loss=nan .* last good checkpoint: step 2"):
        train(CFG, OPT, train_config(tmp_path / "nan", steps=6, checkpoint_every=2), poisoned, ONE)


def _run_main(gin_file, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "moss_jax.main", f"--gin_file={gin_file}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _per_step_losses(workdir):
    out = {}
    for line in Path(workdir, "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out[m["step"]] = m["loss"]  # a resumed run rewrites steps after its checkpoint
    return out


def test_kill_during_async_save_then_resume(tmp_path):
    def gin(workdir):
        path = tmp_path / f"{workdir}.gin"
        path.write_text(
            'include "experiments/models/debug.gin"\ninclude "experiments/runs/pretrain.gin"\n'
            "moss_jax.experiment.data = @data_pipelines.byte_text.stdlib_byte_text\n"
            "data_pipelines.byte_text.stdlib_byte_text.max_bytes = 300000\n"
            "moss_jax.train.OptimizerConfig.learning_rate = 1e-3\n"
            "moss_jax.train.OptimizerConfig.warmup_steps = 2\nmoss_jax.train.OptimizerConfig.total_steps = 20\n"
            f'moss_jax.train.TrainConfig.workdir = "{tmp_path / workdir}"\n'
            "moss_jax.train.TrainConfig.steps = 15\nmoss_jax.train.TrainConfig.batch_size = 4\n"
            "moss_jax.train.TrainConfig.seq_len = 32\nmoss_jax.train.TrainConfig.log_every = 1\n"
            "moss_jax.train.TrainConfig.checkpoint_every = 5\nmoss_jax.train.TrainConfig.progress = False\n"
            "moss_jax.train.MeshConfig.num_devices = 1\nmoss_jax.train.MeshConfig.fsdp = 1\n"
        )
        return path

    ref = _run_main(gin("ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = _run_main(gin("run"), {KILL_DURING_SAVE_ENV: "10"})
    assert killed.returncode == -signal.SIGKILL
    ckpts = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts and ckpts[-1] in (5, 10)  # the step-10 save may or may not have finished before the kill
    resumed = _run_main(gin("run"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["start_step"] == ckpts[-1]
    ref_losses, run_losses = _per_step_losses(tmp_path / "ref"), _per_step_losses(tmp_path / "run")
    for step in range(11, 16):
        assert abs(run_losses[step] - ref_losses[step]) <= 1e-6, step
    # The rows the killed run wrote after its last checkpoint were replaced, not repeated.
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in rows] == list(range(1, 16))


def test_restart_removes_metrics_rows_past_the_checkpoint(tmp_path, capsys):
    train(CFG, OPT, train_config(tmp_path / "run", steps=2), DATA, ONE)
    metrics = tmp_path / "run" / "metrics.jsonl"
    first = metrics.read_text().splitlines()
    # What a run killed after step 4 (its checkpoint at step 2) leaves: rows 3 and 4 and a cut row.
    with open(metrics, "a") as f:
        f.write(
            json.dumps({"step": 3, "loss": 9.0}) + "\n" + json.dumps({"step": 4, "loss": 9.0}) + '\n{"step": 5, "lo'
        )
    capsys.readouterr()
    train(CFG, OPT, train_config(tmp_path / "run", steps=4), DATA, ONE)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert metrics.read_text().splitlines()[:2] == first and rows[2]["loss"] != 9.0
    assert "removed 2 row(s) of steps after 2 (trained again now) and unreadable line(s) [5]" in capsys.readouterr().out
    assert not metrics.with_name("metrics.jsonl.tmp").exists()


def test_unknown_gin_binding_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moss_jax.main",
            "--gin_file=experiments/debug/pretrain_tiny_cpu.gin",
            "--gin_bindings=moss_jax.train.TrainConfig.stepz = 3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "stepz" in proc.stderr and "error: gin configuration" in proc.stderr


def test_export_run_params_for_chat_and_serve(tmp_path):
    from moss_jax.convert.__main__ import main as convert_main
    from moss_jax.convert.checkpoint_io import load_params

    run = train(CFG, OPT, train_config(tmp_path / "run", steps=2), DATA, ONE)
    assert convert_main(["export", "--run_dir", str(tmp_path / "run"), "--out_dir", str(tmp_path / "ckpt")]) == 0
    config, params = load_params(tmp_path / "ckpt")
    assert config == CFG
    _assert_trees_close(params, run["state"].params, atol=0)
    assert (
        convert_main(["export", "--run_dir", str(tmp_path / "run"), "--out_dir", str(tmp_path / "x"), "--step", "7"])
        == 2
    )


@pytest.mark.parametrize(
    "field", ["steps", "batch_size", "seq_len", "micro_batches", "log_every", "checkpoint_every", "keep_checkpoints"]
)
def test_train_config_rejects_non_positive_counts(tmp_path, field):
    # 0 used to pass and crash after compiling and running a step (ZeroDivisionError).
    with pytest.raises(ValueError, match=f"TrainConfig.{field} must be an int >= 1, got 0"):
        train_config(tmp_path, **{field: 0})


def test_mfu_divides_by_the_mesh_devices():
    assert model_flops_utilization(8e12, 2.0, 1e12, 2) == pytest.approx(2.0)


def _random_pairs(seq_len, batch_size, seed, **_):
    """Preference pairs of random tokens (both sides fully real, reply = last half)."""
    rng = np.random.RandomState(seed)

    class Pairs:
        rows = 0

        def get_state(self):
            return {"rows": self.rows}

        def set_state(self, state):
            self.rows = state["rows"]

        def __next__(self):
            self.rows += batch_size
            out = {}
            for side in ("chosen", "rejected"):
                ids = rng.randint(1, CFG.vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
                weights = np.zeros((batch_size, seq_len), np.float32)
                weights[:, seq_len // 2 :] = 1.0
                out[f"{side}_decoder_input_tokens"] = ids[:, :-1]
                out[f"{side}_decoder_target_tokens"] = ids[:, 1:]
                out[f"{side}_decoder_segment_ids"] = np.ones((batch_size, seq_len), np.int32)
                out[f"{side}_decoder_positions"] = np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1))
                out[f"{side}_decoder_loss_weights"] = weights
            assert set(out) == set(PAIR_FEATURES)
            return out

    return Pairs()


def test_throughput_counts_the_objective_and_the_mesh(tmp_path):
    """A pair objective on 2 of the 8 devices: tokens are 2*B*L per step, MFU is over 2 chips."""
    assert jax.device_count() == 8
    peak = 1e12
    objective = reward_objective()
    run = train(
        CFG,
        OPT,
        train_config(tmp_path, steps=3, peak_flops_per_device=peak),
        _random_pairs,
        MeshConfig(fsdp=2, num_devices=2),
        objective=objective,
    )
    assert run["tokens_per_step"] == 2 * 8 * 32
    assert run["flops_per_step"] == objective.flops_per_step(CFG, 8, 32)
    for m in run["history"]:
        # mfu * peak * devices / tokens_per_s = FLOPs per token, whatever the step took.
        per_token = m["mfu"] * peak * 2 / m["tokens_per_s"]
        assert per_token == pytest.approx(run["flops_per_step"] / run["tokens_per_step"], rel=1e-9)


class _SigtermAtBatch:
    """Wraps a data iterator; sends this process SIGTERM while producing batch `n` (1-based)."""

    def __init__(self, inner, n):
        self.inner, self.n, self.count = inner, n, 0

    def __next__(self):
        self.count += 1
        if self.count == self.n:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def test_sigterm_checkpoints_the_step_and_stops_then_resume_reproduces(tmp_path):
    import threading

    from moss_jax.train.trainer import Preempted

    if threading.current_thread() is not threading.main_thread():
        pytest.fail("the trainer catches SIGTERM only in the main thread; this test must run there")
    full = train(CFG, OPT, train_config(tmp_path / "full", steps=8), DATA, ONE)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="step 3") as info:
        train(CFG, OPT, train_config(tmp_path / "run", steps=8), lambda **kw: _SigtermAtBatch(DATA(**kw), 3), ONE)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is removed again
    assert info.value.step == 3
    ckpts = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == [3]  # checkpoint_every=100: only the preemption saved
    assert not (tmp_path / "run" / "params").exists()
    resumed = train(CFG, OPT, train_config(tmp_path / "run", steps=8), DATA, ONE)
    assert resumed["start_step"] == 3
    np.testing.assert_allclose(resumed["losses"], full["losses"][3:], atol=1e-6, rtol=0)


def test_preemption_sync_point_stops_after_saving(tmp_path, monkeypatch):
    from moss_jax.train.checkpoint import Checkpointer
    from moss_jax.train.trainer import Preempted

    monkeypatch.setattr(Checkpointer, "reached_preemption", lambda self, step: step == 2)
    with pytest.raises(Preempted) as info:
        train(CFG, OPT, train_config(tmp_path / "run", steps=5), DATA, ONE)
    assert info.value.step == 2
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    # At the last step a preemption is an ordinary end: the run is complete.
    monkeypatch.setattr(Checkpointer, "reached_preemption", lambda self, step: step == 5)
    assert train(CFG, OPT, train_config(tmp_path / "run", steps=5), DATA, ONE)["start_step"] == 2


def test_main_exits_75_when_preempted(tmp_path, monkeypatch, capsys):
    import moss_jax.main as main_mod
    from moss_jax.train.trainer import Preempted

    def preempted(exp):
        raise Preempted(4, tmp_path / "checkpoints")

    monkeypatch.setattr(main_mod, "run_stage", preempted)
    code = main_mod.main(
        [
            "--gin_file=experiments/debug/pretrain_tiny_cpu.gin",
            f"--gin_bindings=moss_jax.train.TrainConfig.workdir = '{tmp_path}'",
        ]
    )
    assert code == main_mod.EXIT_PREEMPTED == 75
    assert "rerun the same command to resume" in capsys.readouterr().err
