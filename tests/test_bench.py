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


def test_quant_quality_greedy_agreement(bench):
    qq = bench("quant_quality")
    windows = {"en": [[1, 2, 3, 4], [5, 6]], "code": [[7, 8, 9]]}
    assert qq.greedy_prompts(windows, 5, 3) == [[1, 2, 3], [7, 8, 9]]
    match, prefix = qq.greedy_agreement([[1, 2, 3, 4], [1, 9, 3, 4]], [[1, 2, 3, 4], [1, 2, 3, 4]])
    assert match == 7 / 8 and prefix == (4 + 1) / 8
