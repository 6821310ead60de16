"""bench/run_all.py's arguments and where it writes (the benchmarks themselves are faked)."""

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture()
def run_all(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(BENCH)
    sys.modules.pop("run_all", None)
    import run_all

    calls = []

    def fake_run(name, argv):
        calls.append(name)
        return [{"bench": "fake", "name": name}]

    monkeypatch.setattr(run_all, "run", fake_run)
    monkeypatch.setattr(run_all, "RESULTS", str(tmp_path / "results"), raising=False)
    run_all.calls = calls
    yield run_all
    sys.modules.pop("run_all", None)


def _written(tmp_path):
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("latest*"))


@pytest.mark.parametrize(
    "argv,where,quick,only",
    [
        (["--quick"], "results/quick", True, None),
        (["--quick", "--only", "decode"], "results/quick", True, ["decode"]),
        (["--only", "decode", "mfu", "decode"], "results/partial", False, ["decode", "mfu"]),
    ],
)
def test_quick_and_only_runs_leave_the_committed_results_alone(run_all, tmp_path, argv, where, quick, only):
    assert run_all.main(argv) == 0
    assert _written(tmp_path) == [f"{where}/latest.json", f"{where}/latest.md"]
    result = json.loads((tmp_path / where / "latest.json").read_text())
    assert result["quick"] is quick and result["only"] == only
    assert run_all.calls == (only or list(run_all.QUICK))
    md = (tmp_path / where / "latest.md").read_text()
    assert ("numbers are not meaningful" in md) == quick
    assert ("Only decode" in md) == bool(only)


def test_a_full_run_and_an_explicit_out_write_where_asked(run_all, tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "FULL", {"train_step": ["train_step.py"], "mfu": ["mfu.py"]})
    assert run_all.main([]) == 0
    assert _written(tmp_path) == ["results/latest.json", "results/latest.md"]
    result = json.loads((tmp_path / "results" / "latest.json").read_text())
    assert result["quick"] is False and result["only"] is None
    assert run_all.main(["--quick", "--out", str(tmp_path / "mine"), "--threads", "1"]) == 0
    assert "mine/latest_threads1.json" in _written(tmp_path)


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--quick", "--only", "train_step_blockwise"],
            "--only: no benchmark train_step_blockwise in --quick (train_step_blockwise only without --quick); "
            "choose from train_step, mfu, decode, attention",
        ),
        (
            ["--only", "decode", "decoed"],
            "--only: no benchmark decoed in a full run; "
            "choose from train_step, train_step_blockwise, mfu, decode, attention, quant_quality",
        ),
    ],
)
def test_unknown_only_names_are_a_usage_error(run_all, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        run_all.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert run_all.calls == [] and _written(tmp_path) == []


def test_failed_attention_rows_are_shown_in_the_table(run_all):
    rows = [
        {"bench": "attention", "impl": "xla", "seq_len": 64, "fwd_ms": 1.5, "fwd_bwd_ms": 4.0, "fwd_bwd_temp_mib": 2.0},
        {"bench": "attention", "impl": "cudnn", "seq_len": 64, "error": "cudnn takes no segment ids"},
    ]
    table = run_all.markdown(rows)
    assert "| xla | 64 | 1.5 | 4.0 | 2.0 |" in table
    assert "| cudnn | 64 | failed: cudnn takes no segment ids | | |" in table
