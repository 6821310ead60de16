"""The sandbox stops and fails programs that loop, write outside their directory, open sockets or fork."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moss_jax.eval import sandbox
from moss_jax.eval.sandbox import SandboxLimits, run_program

FAST = SandboxLimits(timeout_s=3, cpu_seconds=2)


@pytest.fixture(scope="module")
def layers():
    return sandbox.isolation_layers()


def kernel_only(layers):
    """Limits with the Python audit hook off, so the kernel layers alone must stop the program."""
    if not (layers.get("landlock") and layers.get("seccomp")):
        pytest.skip(f"this kernel lacks Landlock or seccomp: {layers}")
    return SandboxLimits(timeout_s=3, cpu_seconds=2, python_guard=False)


def test_a_correct_program_passes_and_its_directory_is_removed(tmp_path):
    result = run_program(
        "x = 2 + 2\nassert x == 4\nprint('four')\nopen('f.txt', 'w').write('ok')\n", FAST, tmp_root=str(tmp_path)
    )
    assert result.passed and result.stdout.strip() == "four", result
    assert list(tmp_path.iterdir()) == []  # work and bookkeeping directories are gone


def test_failures_are_failures():
    assert run_program("assert 1 == 2\n", FAST).status == "failed"
    assert run_program("raise SystemExit(0)\n", FAST).status == "failed"  # exit() is not a pass
    assert run_program("import os\nos._exit(0)\n", FAST).status == "failed"
    assert run_program("def f(:\n", FAST).status == "failed"


def test_infinite_loop_is_stopped(tmp_path):
    busy = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=2, cpu_seconds=30), tmp_root=str(tmp_path))
    assert busy.status == "timeout" and not busy.passed and busy.seconds < 10
    sleeper = run_program("import time\ntime.sleep(60)\n", SandboxLimits(timeout_s=1, cpu_seconds=30))
    assert sleeper.status == "timeout" and sleeper.seconds < 10
    # RLIMIT_CPU stops it long before the wall clock (one CPU second can take a few wall seconds on a busy machine).
    cpu = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=120, cpu_seconds=1))
    assert cpu.status == "killed" and cpu.returncode < 0 and cpu.seconds < 60
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("guard", [True, False], ids=["with_audit_hook", "kernel_only"])
def test_writing_outside_its_directory_fails(tmp_path, layers, guard):
    limits = FAST if guard else kernel_only(layers)
    target = tmp_path / "escaped.txt"
    existing = tmp_path / "existing.txt"
    existing.write_text("keep")
    for code in (
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n",
        f"import os\nos.remove({str(existing)!r})\n",
        f"import os\nos.mkdir({str(tmp_path / 'newdir')!r})\n",
    ):
        result = run_program(code, limits)
        assert result.status == "failed" and "PermissionError" in result.stderr, (code, result)
    assert not target.exists() and existing.read_text() == "keep" and not (tmp_path / "newdir").exists()


@pytest.mark.parametrize("guard", [True, False], ids=["with_audit_hook", "kernel_only"])
def test_network_and_new_processes_fail(layers, guard):
    limits = FAST if guard else kernel_only(layers)
    for code in (
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', 9))\n",
        "import socket\nsocket.socket(socket.AF_UNIX)\n",
        "import socket\nsocket.create_connection(('example.com', 80), timeout=1)\n",
        "import os\nos.fork()\n",
        "import subprocess\nsubprocess.run(['true'], check=True)\n",
    ):
        result = run_program(code, limits)
        assert result.status == "failed", (code, result)
        assert re.search(r"PermissionError|gaierror|OSError", result.stderr), result.stderr


def test_kernel_layers_hold_against_ctypes(layers):
    """ctypes goes around the audit hook; seccomp still refuses the socket() syscall."""
    limits = kernel_only(layers)
    code = "import ctypes\nfd = ctypes.CDLL(None).socket(2, 1, 0)\nassert fd >= 0, fd\n"
    assert run_program(code, limits).status == "failed"


def test_memory_and_file_size_limits():
    small = SandboxLimits(timeout_s=5, cpu_seconds=5, memory_bytes=512 << 20, file_bytes=1 << 20)
    assert run_program("x = bytearray(2 << 30)\n", small).status == "failed"
    big = run_program("open('big', 'wb').write(b'x' * (4 << 20))\n", small)
    assert big.status == "failed" and "File too large" in big.stderr


def test_threads_still_work(layers):
    code = "import threading\nout = []\nt = threading.Thread(target=out.append, args=(1,))\nt.start(); t.join()\n"
    code += "assert out == [1]\n"
    assert run_program(code, FAST).passed


def test_layers_reported(layers):
    assert layers["rlimits"] and layers["audit_hook"]
    if Path("/sys/kernel/security").exists() and os.uname().sysname == "Linux":
        assert "landlock" in layers and "seccomp" in layers


@pytest.fixture
def victim():
    """A process of the same user that a program must not be able to signal or trace."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("landlock", [True, False], ids=["landlock_and_seccomp", "seccomp_only"])
def test_no_signals_or_tracing_of_other_processes(layers, victim, landlock):
    """Landlock scopes signals only from ABI 6 (Linux 6.12); seccomp refuses them on older kernels."""
    limits = dataclasses.replace(kernel_only(layers), landlock=landlock)
    for code in (
        f"import ctypes\nassert ctypes.CDLL(None).kill({victim.pid}, 9) == 0\n",
        "import ctypes, os\nassert ctypes.CDLL(None).kill(os.getppid(), 0) == 0\n",
        f"import ctypes\nassert ctypes.CDLL(None).ptrace(16, {victim.pid}, 0, 0) == 0\n",  # PTRACE_ATTACH
        f"import ctypes\nassert ctypes.CDLL(None).syscall(434, {victim.pid}, 0) >= 0\n",  # pidfd_open
    ):
        result = run_program(code, limits)
        assert result.status == "failed" and "AssertionError" in result.stderr, (code, result)
        assert result.layers["landlock"] == (layers["landlock"] if landlock else 0)
    assert victim.poll() is None  # still running
    # Its own process still takes signals (Python's signal handling, os.abort, threads).
    own = "import os, signal\ngot = []\nsignal.signal(signal.SIGUSR1, lambda *a: got.append(1))\n"
    own += "os.kill(os.getpid(), signal.SIGUSR1)\nsignal.raise_signal(signal.SIGUSR1)\nassert got == [1, 1]\n"
    assert run_program(own, limits).passed


def test_the_program_cannot_rewrite_the_layers_report(layers):
    code = "import json, os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'{}')\n"
    code += "    except OSError:\n        pass\n"
    code += "json.dump({'landlock': 99, 'seccomp': True}, open('.sandbox_layers.json', 'w'))\n"
    result = run_program(code, FAST)
    assert result.passed and result.layers == layers
