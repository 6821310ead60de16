"""Multi-host start-up helpers: two real local processes join one JAX runtime on CPU."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moss_jax import distributed

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import logging, sys
from moss_jax import distributed
info = distributed.initialize("localhost:{port}", 2, int(sys.argv[1]), timeout_s=60)
distributed.configure_logging()
logging.getLogger("child").info("info line")
logging.getLogger("child").warning("warning line")
print("INFO", info.index, info.count, info.is_chief, distributed.is_chief(), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_join_and_only_process_0_is_chief():
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    code = CHILD.format(port=_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()[-2000:]
    lines = [out.decode().strip().splitlines()[-1] for out, _ in outs]
    assert lines == ["INFO 0 2 True True", "INFO 1 2 False False"]
    err0, err1 = (err.decode() for _, err in outs)
    assert "[p0/2] INFO child: info line" in err0 and "[p0/2] WARNING child: warning line" in err0
    assert "info line" not in err1 and "[p1/2] WARNING child: warning line" in err1


def test_partial_settings_are_a_clear_error(monkeypatch):
    for name in distributed.ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(distributed.DistributedInitError, match="give all of coordinator address"):
        distributed.initialize("localhost:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(distributed.DistributedInitError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        distributed.initialize()
    with pytest.raises(distributed.DistributedInitError, match=r"process id 3 is outside \[0, 2\)"):
        distributed.initialize("localhost:1234", 2, 3)


def test_main_distributed_reports_a_bad_setting_and_exits_2():
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env |= {"JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "moss_jax.main", "--gin_file=experiments/debug/pretrain_tiny_cpu.gin", "--distributed"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: give all of coordinator address, process count and process id" in proc.stderr
