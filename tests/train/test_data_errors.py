"""Bad training data through the engine: a malformed line, a task with no examples, a vocabulary
the model cannot embed. Each is one clear error (exit status 2 from `python -m moss_jax.main`),
and the process ends promptly."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import moss_jax.main as main_mod
from data_pipelines.vocab import train_sentencepiece
from moss_jax import configurables
from tests.data.test_conversation import RECORD

ROOT = Path(__file__).resolve().parents[2]
# A clean exit takes well under a minute here (import, a debug-model compile, one batch); the
# hang this guards against lasted until killed.
EXIT_WITHIN_S = 150


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A 512-piece SentencePiece vocabulary (the debug model's vocab_size), a tiny pre-training
    corpus and a conversation file."""
    out = tmp_path_factory.mktemp("data")
    words = "the quick brown fox jumps over lazy dogs while seven wizards read old books".split()
    docs = [" ".join(words[i % 7 :] + words[: i % 7]) * 3 for i in range(60)] + ["北京今天晴，气温三到十二度。"] * 20
    docs += [json.dumps(RECORD, ensure_ascii=False)] * 5
    train_sentencepiece(docs, out / "sp", vocab_size=512)
    corpus = out / "corpus"
    corpus.mkdir()
    for lang, text in (("en", "a fox jumps over the dog"), ("zh", "北京今天晴"), ("code", "def f(x):\n    return x")):
        (corpus / f"{lang}.jsonl").write_text("".join(json.dumps({"text": f"{text} {i}"}) + "\n" for i in range(20)))
    (out / "sft.jsonl").write_text((json.dumps(RECORD, ensure_ascii=False) + "\n") * 20, encoding="utf-8")
    short = {"chat": {"turn_1": {"Human": "<|Human|>: hi<eoh>\n", "MOSS": "<|MOSS|>: hello<eom>\n"}}}
    (out / "short.jsonl").write_text((json.dumps(short) + "\n") * 10)
    return out


def _gin(tmp_path, data_dir, stage, data_lines, workdir="run", seq_len=64):
    path = tmp_path / f"{workdir}.gin"
    factory = "embedded_pretrain_data" if stage == "pretrain" else "sft_data"
    path.write_text(
        f'include "experiments/models/debug.gin"\ninclude "experiments/runs/{stage}.gin"\n'
        f"moss_jax.experiment.data = @data_pipelines.seqio_input.{factory}()\n"
        f'data_pipelines.seqio_input.{factory}.vocab_path = "{data_dir / "sp.model"}"\n'
        + "".join(f"data_pipelines.seqio_input.{factory}.{line}\n" for line in data_lines)
        + "moss_jax.train.OptimizerConfig.learning_rate = 1e-3\n"
        "moss_jax.train.OptimizerConfig.warmup_steps = 1\nmoss_jax.train.OptimizerConfig.total_steps = 2\n"
        f'moss_jax.train.TrainConfig.workdir = "{tmp_path / workdir}"\n'
        "moss_jax.train.TrainConfig.steps = 2\nmoss_jax.train.TrainConfig.batch_size = 2\n"
        f"moss_jax.train.TrainConfig.seq_len = {seq_len}\nmoss_jax.train.TrainConfig.log_every = 1\n"
        "moss_jax.train.TrainConfig.checkpoint_every = 1\nmoss_jax.train.TrainConfig.progress = False\n"
        "moss_jax.train.MeshConfig.num_devices = 1\nmoss_jax.train.MeshConfig.fsdp = 1\n"
    )
    return path


def _run_main_subprocess(gin_file):
    env = dict(os.environ, TPU_WORKER_HOSTNAMES="localhost", JAX_PLATFORMS="cpu")
    # As a user runs it: main quiets TensorFlow's C++ log unless asked otherwise (importing jax
    # in this process set TF_CPP_MIN_LOG_LEVEL=1, under which TF also logs the failed py_func).
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env.pop("XLA_FLAGS", None)  # this host's one CPU device, not the suite's 8 (conftest): faster
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "moss_jax.main", f"--gin_file={gin_file}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=EXIT_WITHIN_S,
    )
    return proc, time.monotonic() - t0


@pytest.fixture
def run_main(capsys):
    """Runs `moss_jax.main.main` in this process on a gin file; returns (status, stderr)."""

    def run(gin_file):
        configurables.clear()
        try:
            code = main_mod.main([f"--gin_file={gin_file}"])
        finally:
            configurables.clear()
        return code, capsys.readouterr().err

    return run


def test_bad_sft_line_exits_2_naming_file_and_line(tmp_path, data_dir):
    bad = tmp_path / "bad.jsonl"
    no_reply = RECORD | {"chat": {"turn_1": {"Human": RECORD["chat"]["turn_1"]["Human"]}}, "num_turns": 1}
    bad.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in (RECORD, RECORD, no_reply)))
    gin = _gin(tmp_path, data_dir, "sft", [f'sft_files = ("{bad}",)'])
    proc, _ = _run_main_subprocess(gin)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-1] == f"error: {bad}:3 turn_1: missing field 'MOSS'"
    assert "Traceback" not in proc.stderr and "InvalidArgumentError" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints" / "1").exists()


def test_bad_pretraining_line_exits_2_naming_file_and_line(tmp_path, data_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in (data_dir / "corpus").iterdir():
        (corpus / f.name).write_text(f.read_text())
    with open(corpus / "en.jsonl", "a") as f:
        f.write(json.dumps({"txt": "oops"}) + "\n")
    gin = _gin(tmp_path, data_dir, "pretrain", [f'corpus_dir = "{corpus}"', "build_if_missing = False"])
    proc, _ = _run_main_subprocess(gin)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-1] == f"error: {corpus / 'en.jsonl'}:21: no string field 'text'"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_task_with_no_examples_is_a_clear_error(tmp_path, data_dir, run_main):
    # Every plugin conversation is longer than seq_len; the SFT ones fit.
    lines = [f'sft_files = ("{data_dir / "short.jsonl"}",)', f'plugin_files = ("{data_dir / "sft.jsonl"}",)']
    gin = _gin(tmp_path, data_dir, "sft", lines + ['mixture = "moss_sft_and_plugin"'], seq_len=64)
    code, err = run_main(gin)
    assert code == 2, err[-3000:]
    message = err.rstrip().splitlines()[-1]
    assert message.startswith("error: moss_sft_and_plugin (train split, seq_len 64): no examples"), message
    assert f"task moss_sft_plugin ({data_dir / 'sft.jsonl'}) kept none" in message
    assert "20 dropped (longer than max_len" in message


def test_vocabulary_larger_than_the_model_is_refused_before_compiling(tmp_path, data_dir, run_main):
    gin = _gin(tmp_path, data_dir, "sft", [f'sft_files = ("{data_dir / "short.jsonl"}",)'])
    small = tmp_path / "small.gin"
    small.write_text(f'include "{gin}"\nmoss_jax.config.get_config.vocab_size = 300\n')
    code, err = run_main(small)
    assert code == 2, err[-3000:]
    assert (
        err.rstrip()
        .splitlines()[-1]
        .startswith(
            f"error: the data's vocabulary {data_dir / 'sp.model'} has 512 pieces, more than the model's vocab_size 300"
        )
    )
    assert not (tmp_path / "run" / "compile_report.json").exists()
