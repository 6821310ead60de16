"""Ahead-of-time compilation of an experiment's train step (and the server's decode step) for a
TPU topology, on this CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tpu_setup import aot_compile
from tpu_setup.aot_compile import COLLECTIVES

pytest.importorskip("libtpu", reason='libtpu is not installed (pip install "jax[tpu]==0.10.2")')

ROOT = Path(__file__).resolve().parents[2]
GIN = "experiments/debug/pretrain_tiny_cpu_bytes.gin"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _run(*args, gin=GIN):
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_WORKER_HOSTNAMES="localhost")
    env.pop("JAX_PLATFORMS", None)
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "tpu_setup.aot_compile", f"--gin_file={gin}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _report(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tiny_sft_stage_fits_on_v5p_with_a_3d_mesh():
    # SFT and preference-aware training compile the same LM train step as pre-training.
    stage = "--gin_bindings=moss_jax.experiment.stage = 'sft'"
    proc = _run("--topology=v5p:2x2x2", "--mesh", "data=2,fsdp=2,tensor=2,sequence=1", stage)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _report(proc)
    assert report["stage"] == "sft" and report["step"] == "train"
    assert report["fits"] and report["chips"] == 8 and report["accelerator_type"] == "v5p-16"
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    assert 0 < report["per_chip_bytes"] < report["hbm_bytes"] and report["flops"] > 0
    # 6N + attention FLOPs per token times the 8 x 128 tokens, and the step time at 60% MFU on 8 chips.
    n = 8192 * 256 + 4 * (4 * 256 * 256 + 2 * 256 * 1024 + 1024 + 256 + 2 * 256) + 2 * 256 + 256 * 8192 + 8192
    flops = (6 * (n - 8192 * 256) + 12 * 4 * 256 * 128) * 8 * 128
    assert report["model_flops"] == pytest.approx(flops)
    assert report["step_time_s"] == pytest.approx(flops / (8 * 459e12 * 0.6))
    lines = proc.stdout.splitlines()
    assert lines[-2].startswith(
        "| pretrain_tiny_cpu_bytes | sft | v5p:2x2x2 (v5p-16) | 8 | (2, 2, 2, 1) | 8 x 128 | 0.1 / 95 (0%) |"
    )
    # Collective traffic per chip, loop bodies counted by trip count (no loop of unknown shape here).
    coll = report["collectives"]
    assert coll["loops_unknown"] == 0
    assert coll["moved_total_bytes"] == pytest.approx(sum(coll["moved_bytes"].values()), abs=len(COLLECTIVES))
    assert coll["moved_bytes"]["all-gather"] > 0 and coll["moved_bytes"]["all-reduce"] > 0
    assert any(line.startswith("[aot]   collectives, GiB moved per chip per step") for line in lines)


def test_decode_step_compiles_for_v4_megacore_chips_with_tensor_parallelism():
    proc = _run("--topology=v4:2x2x1", "--step=decode", "--decode_batch=4", "--decode_len=256", "--decode_chunk=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _report(proc)
    # One JAX device per v4 chip (megacore), as on the TPU VMs; the server shards over `tensor`.
    assert report["chips"] == 4 and report["accelerator_type"] == "v4-8"
    assert report["mesh"] == {"data": 1, "fsdp": 1, "tensor": 4, "sequence": 1}
    assert report["fits"] and report["step"] == "decode" and report["global_batch"] == 4
    # Parameters (bf16, sharded 4 ways) and the KV cache are arguments; the donated state aliases its output.
    kv_cache = 2 * 4 * 4 * 256 * 8 * 32 * 2 // 4  # k and v: layers x batch x slots x heads x head_dim, bf16
    assert report["memory"]["argument_size_in_bytes"] > kv_cache
    assert report["memory"]["alias_size_in_bytes"] >= kv_cache


def test_16b_model_on_four_v5e_chips_does_not_fit_and_exits_1():
    proc = _run(
        "--topology=v5e:2x2",
        "--gin_bindings=moss_jax.config.get_config.name = 'moss-moon-003'",
        "--gin_bindings=moss_jax.config.get_config.dtype = 'bfloat16'",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = _report(proc)
    assert report["fits"] is False and "HBM" in report["compiler"]


def test_mesh_that_does_not_divide_the_chips_is_a_configuration_error():
    proc = _run("--topology=v5p:2x2x2", "--mesh", "data=3,fsdp=-1")
    assert proc.returncode == 2 and "8 devices cannot be split into mesh sizes" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--topology=v9:2x2"], "unknown TPU topology 'v9:2x2'"),
        (["--topology=v5p-128"], "unknown TPU topology 'v5p-128'"),
        (["--topology=v5p:4x4"], "v5p topologies have 3 dimensions, got 2"),
        (["--topology=v5e:2xq"], "bad shape '2xq'"),
        (["--topology=v5p:2x2x2", "--mesh", "data=2,pipeline=2"], "--mesh: bad entry 'pipeline=2'"),
        (["--topology=v5p:2x2x2", "--max_hbm_fraction=1.5"], "--max_hbm_fraction must be in (0, 1]"),
    ],
)
def test_bad_topology_and_flags_are_configuration_errors(capsys, args, message):
    assert aot_compile.main([f"--gin_file={GIN}", *args]) == 2
    assert message in capsys.readouterr().err


def test_stage_with_another_step_is_a_configuration_error(capsys):
    args = [f"--gin_file={GIN}", "--topology=v5p:2x2x2", "--gin_bindings=moss_jax.experiment.stage = 'dpo'"]
    assert aot_compile.main(args) == 2
    assert "stage 'dpo' does not use the LM train step" in capsys.readouterr().err


def test_missing_gin_file_is_a_configuration_error(capsys):
    assert aot_compile.main(["--gin_file=experiments/pretrain/nope.gin", "--topology=v5p:4x4x4"]) == 2
    assert "gin file experiments/pretrain/nope.gin does not exist" in capsys.readouterr().err


def test_no_memory_analysis_is_not_a_fit():
    """A backend without memory analysis leaves the verdict unknown (exit 3), never "fits"."""
    assert aot_compile.fits_in_hbm({"flops": 1.0}, 95 << 30, 0.9) is None
    assert aot_compile.fits_in_hbm({"total_bytes": 10 << 30}, 95 << 30, 0.9) is True
    assert aot_compile.fits_in_hbm({"total_bytes": 90 << 30}, 95 << 30, 0.9) is False
