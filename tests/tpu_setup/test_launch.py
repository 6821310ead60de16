"""The launcher: a gin file plus a sweep becomes work units; --dry_run prints exact commands."""

import subprocess
import sys
from pathlib import Path

import pytest

from tpu_setup import launch

ROOT = Path(__file__).resolve().parents[2]
GIN = "experiments/debug/pretrain_tiny_cpu.gin"
SWEEP = "moss_jax.train.TrainConfig.steps=[10,20,30]"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _dry_run(capsys, *args):
    rc = launch.main(
        ["--gin_file", GIN, "--sweep", SWEEP, "--experiment_name=sweep", "--dry_run", "--novalidate", *args]
    )
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_local_three_point_sweep_prints_exact_commands(capsys):
    rc, out, _ = _dry_run(capsys)
    py = sys.executable
    expected = f"""# experiment sweep: 3 work unit(s), target local
# work unit 1: moss_jax.train.TrainConfig.steps=10; workdir runs/sweep/1
{py} -m moss_jax.main --gin_file={GIN} '--gin_bindings=moss_jax.train.TrainConfig.steps = 10' '--gin_bindings=moss_jax.train.TrainConfig.workdir = "runs/sweep/1"'
# work unit 2: moss_jax.train.TrainConfig.steps=20; workdir runs/sweep/2
{py} -m moss_jax.main --gin_file={GIN} '--gin_bindings=moss_jax.train.TrainConfig.steps = 20' '--gin_bindings=moss_jax.train.TrainConfig.workdir = "runs/sweep/2"'
# work unit 3: moss_jax.train.TrainConfig.steps=30; workdir runs/sweep/3
{py} -m moss_jax.main --gin_file={GIN} '--gin_bindings=moss_jax.train.TrainConfig.steps = 30' '--gin_bindings=moss_jax.train.TrainConfig.workdir = "runs/sweep/3"'
"""  # noqa: E501
    assert rc == 0 and out == expected


def test_tpu_three_point_sweep_prints_exact_gcloud_commands(capsys):
    rc, out, _ = _dry_run(capsys, "--target=tpu", "--tpu_name=moss-a,moss-b", "--zone=us-east5-a", "--project=p1")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 7
    assert lines[0] == "# experiment sweep: 3 work unit(s), target tpu"
    assert lines[1] == "# work unit 1 on moss-a: moss_jax.train.TrainConfig.steps=10; workdir /mnt/moss_runs/sweep/1"
    assert lines[3].startswith("# work unit 2 on moss-b:") and lines[5].startswith("# work unit 3 on moss-a:")
    q = "'\"'\"'"  # a single quote inside the single-quoted --command
    assert lines[2] == (
        "gcloud compute tpus tpu-vm ssh moss-a --zone=us-east5-a --project=p1 --worker=all "
        "'--command=cd ~/moss_jax && source scripts/setup_env.sh tpu && python -m moss_jax.main "
        f"--gin_file={GIN} {q}--gin_bindings=moss_jax.train.TrainConfig.steps = 10{q} "
        f'{q}--gin_bindings=moss_jax.train.TrainConfig.workdir = "/mnt/moss_runs/sweep/1"{q} --distributed\''
    )
    assert "ssh moss-b " in lines[4] and "steps = 20" in lines[4] and "sweep/2" in lines[4]


def test_tpu_command_is_what_tpu_sh_run_builds(capsys):
    _, out, _ = _dry_run(capsys, "--target=tpu", "--tpu_name=moss-a", "--zone=us-east5-a")
    unit = launch.build_work_units(
        launch.argparse.Namespace(
            gin_file=[GIN],
            gin_bindings=[],
            sweep=[SWEEP],
            target="tpu",
            tpu_name="moss-a",
            zone="us-east5-a",
            project=None,
            workdir_root=None,
            experiment_name="sweep",
        )
    )[0]
    remote = list(launch.shlex.split(unit.command[-1].removeprefix("--command=").split(" && ", 2)[2]))
    sh = subprocess.run(
        ["bash", "tpu_setup/tpu.sh", "--dry_run", "run", "--name=moss-a", "--zone=us-east5-a", "--", *remote],
        capture_output=True,
        text=True,
        check=True,
    )
    assert sh.stdout.strip() == out.splitlines()[2]


def test_sweeps_multiply_first_flag_slowest(capsys):
    rc = launch.main(
        [
            f"--gin_file={GIN}",
            "--sweep=moss_jax.train.TrainConfig.steps=[1, 2]",
            "--sweep=moss_jax.train.OptimizerConfig.learning_rate=[0.1, 0.2, 0.3]",
            "--experiment_name=x",
            "--dry_run",
            "--novalidate",
        ]
    )
    comments = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# work unit")]
    assert rc == 0 and len(comments) == 6
    assert "steps=1, moss_jax.train.OptimizerConfig.learning_rate=0.3" in comments[2]
    assert "steps=2, moss_jax.train.OptimizerConfig.learning_rate=0.1" in comments[3]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gin_file=experiments/nope.gin"], "gin file experiments/nope.gin does not exist"),
        ([f"--gin_file={GIN}", "--sweep=steps"], "expected NAME=[v1, v2, ...]"),
        ([f"--gin_file={GIN}", "--sweep=a.b=[1,"], "not a Python literal list"),
        ([f"--gin_file={GIN}", "--sweep=a.b=[]"], "must be a non-empty list"),
        ([f"--gin_file={GIN}", "--sweep=a.b=[1]", "--sweep=a.b=[2]"], "swept twice"),
        ([f"--gin_file={GIN}", "--target=tpu", "--tpu_name=x"], "needs --tpu_name=NAME[,NAME...] and --zone"),
        ([f"--gin_file={GIN}", "--sweep=moss_jax.train.TrainConfig.workdir=['a']"], "set per work unit"),
    ],
)
def test_bad_input_is_a_clear_error(capsys, args, message):
    assert launch.main([*args, "--dry_run", "--novalidate", "--experiment_name=x"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_validation_catches_an_unknown_binding_before_launching(capsys):
    import gin

    try:
        rc = launch.main(
            [f"--gin_file={GIN}", "--sweep=moss_jax.train.TrainConfig.stepz=[1,2]", "--experiment_name=x", "--dry_run"]
        )
    finally:
        gin.clear_config()
    assert rc == 2
    assert "work unit 1 {'moss_jax.train.TrainConfig.stepz': 1}: gin configuration" in capsys.readouterr().err


def _units(tmp_path, codes):
    """Work units whose command appends its index to the file of its TPU VM, then exits with `code`."""
    units = []
    for i, (tpu, code) in enumerate(codes, start=1):
        script = f"open({str(tmp_path / tpu)!r}, 'a').write('{i} '); exit({code})"
        units.append(launch.WorkUnit(i, {}, f"w/{i}", tpu, (sys.executable, "-c", script)))
    return units


def test_builtin_runner_runs_each_tpu_queue_in_order_and_reports_failures(tmp_path, capsys):
    rc = launch.run_builtin(_units(tmp_path, [("a", 0), ("b", 0), ("a", 3), ("b", 0), ("a", 0)]))
    assert rc == 1 and "failed work units: [3]" in capsys.readouterr().err
    assert (tmp_path / "a").read_text() == "1 3 5 " and (tmp_path / "b").read_text() == "2 4 "


def test_xmanager_runner_is_one_experiment_with_a_work_unit_per_point(tmp_path, monkeypatch, capsys):
    pytest.importorskip("xmanager", reason='the launch extra is not installed (pip install -e ".[launch]")')
    monkeypatch.setenv("HOME", str(tmp_path))  # xm_local keeps its experiment database under ~/.xmanager
    rc = launch.run_xmanager("test", _units(tmp_path, [("a", 0), ("b", 0), ("a", 3), ("b", 0)]))
    out, err = capsys.readouterr()
    assert rc == 1 and "failed work units: [3]" in err and "xmanager experiment id" in out
    assert (tmp_path / "a").read_text() == "1 3 " and (tmp_path / "b").read_text() == "2 4 "


def test_builtin_runner_reruns_a_preempted_unit(tmp_path, capsys):
    # Exits 75 (preempted) on its first two runs, then 0; the counter file survives the reruns.
    count = tmp_path / "count"
    script = (
        f"import pathlib; p = pathlib.Path({str(count)!r}); n = len(p.read_text()) if p.exists() else 0; "
        "p.write_text('x' * (n + 1)); exit(75 if n < 2 else 0)"
    )
    unit = launch.WorkUnit(1, {}, "w/1", None, (sys.executable, "-c", script))
    assert launch.run_builtin([unit], preemption_retries=3) == 0
    assert count.read_text() == "xxx"
    assert "retry 2/3" in capsys.readouterr().out
    count.unlink()
    assert launch.run_builtin([unit], preemption_retries=1) == 1  # still preempted after one retry
    assert count.read_text() == "xx" and "failed work units: [1]" in capsys.readouterr().err
    assert launch.EXIT_PREEMPTED == 75


def test_launcher_exit_code_matches_main():
    import moss_jax.main

    assert launch.EXIT_PREEMPTED == moss_jax.main.EXIT_PREEMPTED
