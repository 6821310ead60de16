"""bench/gpu_suite.sh's plumbing on a CPU host (GPU_SUITE_DRY=1): which Python it runs, and that
its exit status reports failed parts."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"


def _suite(tmp_path, parts, **env):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    failing = fake_bin / "python3"  # what PATH offers as python3: a Python that always fails
    failing.write_text("#!/bin/sh\necho 'not the venv python' >&2\nexit 1\n")
    failing.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "XLA_FLAGS") and not k.startswith("GPU_SUITE")}
    base["PATH"] = f"{fake_bin}:/usr/bin:/bin"
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SUITE)],
        cwd=ROOT,
        env=base | {"OUT": str(out), "GPU_SUITE_DRY": "1", "GPU_SUITE_PARTS": parts} | env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = (out / "gpu_results.jsonl").read_text().splitlines()
    statuses = [json.loads(line) for line in lines if line.startswith('{"part"')]
    return proc, statuses, (out / "gpu_log.txt").read_text()


def test_dry_run_uses_the_venv_python_not_path_python3(tmp_path):
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv in this checkout (scripts/test.sh makes it)")
    proc, statuses, log = _suite(tmp_path, "env")
    assert statuses == [{"part": "env", "rc": 0, "seconds": statuses[0]["seconds"], "timed_out": False}], log
    assert re.search(r"=== env \(limit 60s, at \d+s\): " + re.escape(f"{ROOT}/.venv/bin/python bench/gpu_env.py"), log)
    assert proc.returncode == 0, log


def test_a_failed_part_makes_the_exit_status_1(tmp_path):
    proc, statuses, log = _suite(tmp_path, "env kernel_check", PYTHON=str(tmp_path / "bin" / "python3"))
    assert [(s["part"], s["rc"]) for s in statuses] == [("env", 1), ("kernel_check", 1)]  # both parts still ran
    assert proc.returncode == 1
    assert log.rstrip().splitlines()[-1] == "gpu_suite: 2 part(s) failed: env (rc 1), kernel_check (rc 1)"


def test_dry_run_expects_the_cudnn_and_ptxas_parts_to_fail(tmp_path):
    name = "mfu_big_cudnn_dots_no_batch_attention"  # the default remat policy's part
    parts = f"{name} env mgpu_sass"
    proc, statuses, log = _suite(tmp_path, parts, PYTHON=str(tmp_path / "bin" / "python3"))
    assert [(s["part"], s["rc"]) for s in statuses] == [("env", 1), ("mgpu_sass", 1), (name, 1)]
    assert f"{name} failed as expected in a dry run (cuDNN needs a GPU)" in log
    assert "mgpu_sass failed as expected in a dry run (the Hopper backward compiles on a GPU only)" in log
    assert log.rstrip().splitlines()[-1] == "gpu_suite: 1 part(s) failed: env (rc 1)"
    assert proc.returncode == 1
