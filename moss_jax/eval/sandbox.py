"""Runs untrusted code (model-written programs) in a locked-down subprocess.

    result = run_program("def f(): ...\\nassert f() == 1\\n", SandboxLimits(timeout_s=5))
    result.passed, result.status, result.stderr, result.layers

Each program runs in a fresh interpreter (`python -I`) whose working directory is a new
temporary directory, removed afterwards. What is enforced (docs/eval.md has the details):

- kernel, always: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), size of any file written
  (RLIMIT_FSIZE), no core dumps, 64 open files; a wall-clock timeout after which the parent
  kills the process (SIGKILL);
- kernel, where available (Linux >= 5.13 with Landlock, seccomp; both work unprivileged):
  writes only beneath the temporary directory, no TCP bind/connect, no signals to outside
  processes (Landlock), no socket() of any family, no new processes, no io_uring (seccomp);
- Python audit hook, always: refuses sockets, subprocesses, os.system, and writes outside the
  directory. It can be bypassed (ctypes), so it is a last layer, not the boundary.

`result.layers` says which layers were active; `require_kernel_isolation=True` refuses to run
a program when Landlock or seccomp is missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHILD = Path(__file__).with_name("_sandbox_child.py")
OUTPUT_LIMIT = 10_000  # characters of stdout/stderr kept per program


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not a failure of the program)."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    require_kernel_isolation: bool = False
    python_guard: bool = True  # the audit hook; off only to test the kernel layers alone
    landlock: bool = True  # off only to test seccomp alone (as on a kernel without Landlock)


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    status: str  # passed | failed | timeout | killed | refused
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    layers: dict

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _rmtree(path: Path) -> None:
    def onerror(func, p, _exc):
        os.chmod(p, 0o700)
        func(p)

    shutil.rmtree(path, onexc=onerror) if sys.version_info >= (3, 12) else shutil.rmtree(path, onerror=onerror)


def run_program(program: str, limits: SandboxLimits = SandboxLimits(), *, tmp_root: str | None = None) -> SandboxResult:
    """Runs `program` (Python source) in the sandbox; passed only if it runs to its end."""
    workdir = Path(tempfile.mkdtemp(prefix="moss_sandbox_", dir=tmp_root))
    try:
        # The program and the bookkeeping files live in a sibling directory the child cannot write.
        meta = Path(tempfile.mkdtemp(prefix="moss_sandbox_meta_", dir=tmp_root))
        try:
            return _run(program, limits, workdir, meta)
        finally:
            _rmtree(meta)
    finally:
        _rmtree(workdir)


def _run(program: str, limits: SandboxLimits, workdir: Path, meta: Path) -> SandboxResult:
    prog = meta / "program.py"
    prog.write_text(program, encoding="utf-8")
    layers_read, layers_write = os.pipe()
    cfg = {
        "workdir": str(workdir),
        "program": str(prog),
        "layers_fd": layers_write,
        "cpu_seconds": max(1, int(limits.cpu_seconds)),
        "memory_bytes": int(limits.memory_bytes),
        "file_bytes": int(limits.file_bytes),
        "require_kernel_isolation": limits.require_kernel_isolation,
        "python_guard": limits.python_guard,
        "landlock": limits.landlock,
    }
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    token = secrets.token_hex(16)
    out_path, err_path = meta / "stdout", meta / "stderr"
    start = time.perf_counter()
    with open(out_path, "wb") as out, open(err_path, "wb") as err, os.fdopen(layers_read, "rb") as layers_pipe:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", str(CHILD), json.dumps(cfg)],
                cwd=workdir,
                env=env,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                start_new_session=True,
                pass_fds=(layers_write,),
            )
        except OSError as e:
            raise SandboxError(f"could not start the sandbox interpreter {sys.executable}: {e}") from e
        finally:
            os.close(layers_write)
        timed_out = False
        try:
            proc.stdin.write((token + "\n").encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # The whole session: seccomp already forbids new processes, this covers its absence.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        try:
            layers = json.loads(layers_pipe.read())  # the child is gone: no blocking
        except ValueError:
            layers = {}  # the child died before reporting
    seconds = time.perf_counter() - start
    stdout = out_path.read_bytes()[-4 * OUTPUT_LIMIT :].decode("utf-8", "replace")
    stderr = err_path.read_bytes()[-4 * OUTPUT_LIMIT :].decode("utf-8", "replace")
    rc = proc.returncode
    finished = stdout.rstrip().endswith(token)
    if finished:
        stdout = stdout.rstrip()[: -len(token)].rstrip("\n")
    if timed_out:
        status = "timeout"
    elif rc == 3 and limits.require_kernel_isolation and "kernel isolation unavailable" in stderr:
        status = "refused"
    elif rc is not None and rc < 0:
        status = "killed"  # a signal: CPU limit (SIGXCPU/SIGKILL), or the memory limit's abort
    elif rc == 0 and finished:
        status = "passed"
    else:
        status = "failed"
    return SandboxResult(status, rc, stdout[-OUTPUT_LIMIT:], stderr[-OUTPUT_LIMIT:], seconds, layers)


def run_programs(
    programs: list[str], limits: SandboxLimits = SandboxLimits(), workers: int = 2, tmp_root: str | None = None
) -> list[SandboxResult]:
    """Runs many programs, `workers` at a time; results in input order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_program(p, limits, tmp_root=tmp_root), programs))


def isolation_layers() -> dict:
    """Which layers this machine enforces, probed with a trivial program."""
    result = run_program("pass\n", SandboxLimits(timeout_s=30))
    if not result.passed:
        raise SandboxError(f"the sandbox cannot run a trivial program: {result.status}\n{result.stderr}")
    return result.layers
