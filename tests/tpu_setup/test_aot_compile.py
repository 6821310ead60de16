"""Ahead-of-time compilation of an experiment's train step for a TPU topology, on this CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("libtpu", reason='libtpu is not installed (pip install "jax[tpu]==0.10.2")')

ROOT = Path(__file__).resolve().parents[2]
GIN = "experiments/debug/pretrain_tiny_cpu_bytes.gin"


def _run(*args):
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_WORKER_HOSTNAMES="localhost")
    env.pop("JAX_PLATFORMS", None)
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "tpu_setup.aot_compile", f"--gin_file={GIN}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_tiny_experiment_fits_on_v5p_with_a_3d_mesh():
    proc = _run("--topology=v5p:2x2x2", "--mesh", "data=2,fsdp=2,tensor=2,sequence=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["fits"] and report["chips"] == 8
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    assert 0 < report["per_chip_bytes"] < report["hbm_bytes"] and report["flops"] > 0


def test_16b_model_on_four_v5e_chips_does_not_fit_and_exits_1():
    proc = _run(
        "--topology=v5e:2x2",
        "--gin_bindings=moss_jax.config.get_config.name = 'moss-moon-003'",
        "--gin_bindings=moss_jax.config.get_config.dtype = 'bfloat16'",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["fits"] is False and "HBM" in report["compiler"]


def test_bad_mesh_is_a_configuration_error():
    proc = _run("--topology=v5p:2x2x2", "--mesh", "data=3,fsdp=-1")
    assert proc.returncode == 2 and "cannot be split" in proc.stderr
