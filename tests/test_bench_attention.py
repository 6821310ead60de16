"""bench/attention.py: settings that cannot run are error rows, and a sweep where every row
failed exits non-zero."""

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture()
def attention(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    cpus = os.sched_getaffinity(0)  # --threads pins the process (common.set_threads)
    import attention

    yield attention
    os.sched_setaffinity(0, cpus)
    sys.modules.pop("attention", None)


SMALL = ["--seq_lens", "32", "--heads", "1", "--head_dim", "8", "--repeats", "1", "--threads", "1"]


def _rows(capsys) -> tuple[list[dict], str]:
    out = capsys.readouterr()
    return [json.loads(line) for line in out.out.splitlines() if line.startswith("{")], out.err


def test_cudnn_with_segment_ids_is_an_error_row_and_exit_1(attention, capsys):
    assert attention.main(["--impls", "cudnn", *SMALL]) == 1  # default --segments 4
    rows, err = _rows(capsys)
    assert rows == [
        {
            "bench": "attention",
            "impl": "cudnn",
            "seq_len": 32,
            "error": "cudnn takes no segment ids: run it with --segments 0 (got --segments 4)",
        }
    ]
    assert "all 1 attention rows failed" in err


def test_an_unknown_impl_fails_and_a_mixed_sweep_still_succeeds(attention, capsys):
    assert attention.main(["--impls", "bogus", *SMALL]) == 1
    rows, _ = _rows(capsys)
    assert len(rows) == 1 and rows[0]["impl"] == "bogus" and "error" in rows[0]
    assert attention.main(["--impls", "xla,bogus", *SMALL]) == 0  # one row ran
    rows, _ = _rows(capsys)
    assert [("error" in r) for r in rows] == [False, True] and rows[0]["fwd_ms"] > 0
