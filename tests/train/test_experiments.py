import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_cpu_pretraining_loss_falls(tmp_path):
    """The README's main experiment: loss falls >= 30% within its default step budget."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moss_jax.main",
            "--gin_file=experiments/debug/pretrain_tiny_cpu.gin",
            f"--gin_bindings=moss_jax.train.TrainConfig.workdir = '{tmp_path}'",
            "--gin_bindings=moss_jax.train.TrainConfig.progress = False",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["start_step"] == 0 and result["end_step"] == 300
    assert result["loss_drop"] >= 0.30, result
    assert (tmp_path / "checkpoints" / "300").is_dir() and (tmp_path / "metrics.jsonl").is_file()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
