"""The benchmarks' output format (tiny sizes; the numbers themselves are not checked)."""

import importlib
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture(scope="module")
def bench(hf_reference):
    sys.path.insert(0, BENCH)
    yield lambda name: importlib.import_module(name)
    sys.path.remove(BENCH)


@pytest.fixture(autouse=True)
def _keep_cpu_affinity():
    """`--threads N` pins the process (common.set_threads); give the test worker its CPUs back."""
    cpus = os.sched_getaffinity(0)
    yield
    os.sched_setaffinity(0, cpus)


def _rows(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_train_step_and_decode_print_ratio_lines(bench, capsys):
    argv = ["--configs", "debug", "--seq_len", "16", "--batch", "2", "--repeats", "1", "--target_s", "0"]
    assert bench("train_step").main(argv + ["--threads", "1"]) == 0
    (train,) = _rows(capsys)
    assert train["bench"] == "train_step" and train["config"] == "debug"
    assert train["ratio"] > 0 and train["ours_tokens_per_s"] > 0 and train["peer_tokens_per_s"] > 0
    assert train["loss_diff_first_step"] < 1e-4  # same weights, same batch, same loss

    argv = ["--config", "debug", "--batches", "1", "--new_tokens", "3", "--repeats", "1", "--threads", "1"]
    assert bench("decode").main(argv + ["--weights", "float32", "int8", "int8_dynamic"]) == 0
    rows = _rows(capsys)
    assert [r["weights"] for r in rows] == ["float32", "int8", "int8_dynamic"]
    assert rows[0]["tokens_match"] is True and rows[1]["weight_mib"] < rows[0]["weight_mib"]
    assert rows[2]["weight_mib"] == rows[1]["weight_mib"]

    table = bench("run_all").markdown([train, *rows[:2]])
    assert "| train_step | debug |" in table and "int8 weights" in table
    assert ", xla attention |" in table  # ours_setup ends "attention=xla head_chunk_tokens=..."
    assert train["cpu_affinity"] == rows[0]["cpu_affinity"] and len(train["cpu_affinity"]) == 1


def test_threads_flag_sizes_the_xla_cpu_pool():
    """XLA takes its CPU pool size from the affinity, not from a flag: --threads 1 must pin."""
    import subprocess

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    code = (
        f"import os, sys; sys.path.insert(0, {BENCH!r}); import common; common.set_threads(1)\n"
        "import jax, jax.numpy as jnp\n"
        "a = jnp.ones((512, 512)); jax.jit(lambda a: a @ a)(a).block_until_ready()\n"
        "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
        "print(sum(n.startswith('tf_XLAEigen') for n in names), common.cpu_affinity())"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    pool, cpus = out.stdout.split(maxsplit=1)
    assert pool == "1" and len(json.loads(cpus)) == 1


def test_quant_quality_greedy_agreement(bench):
    qq = bench("quant_quality")
    windows = {"en": [[1, 2, 3, 4], [5, 6]], "code": [[7, 8, 9]]}
    assert qq.greedy_prompts(windows, 5, 3) == [[1, 2, 3], [7, 8, 9]]
    match, prefix = qq.greedy_agreement([[1, 2, 3, 4], [1, 9, 3, 4]], [[1, 2, 3, 4], [1, 2, 3, 4]])
    assert match == 7 / 8 and prefix == (4 + 1) / 8
