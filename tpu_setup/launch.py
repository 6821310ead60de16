"""xmanager-style launcher: an experiment is gin files plus a sweep of gin bindings; every point
of the sweep is a work unit, run as a job on TPU VMs or as a local process (CPU debugging).

    python -m tpu_setup.launch --gin_file=experiments/debug/pretrain_tiny_cpu.gin \\
        --sweep='moss_jax.train.TrainConfig.steps=[10,20,30]' [--sweep=...] [--gin_bindings=...] \\
        --target=local|tpu [--tpu_name=NAME[,NAME...] --zone=ZONE [--project=P]] \\
        [--experiment_name=NAME] [--workdir_root=DIR] [--dry_run]

Several --sweep flags form their cartesian product (the first flag varies slowest). Each work
unit gets its own workdir, `WORKDIR_ROOT/EXPERIMENT_NAME/<unit>`, bound as
`moss_jax.train.TrainConfig.workdir`, so units never resume each other's checkpoints (on TPU
pods the workdir root must be a filesystem every worker shares). On `tpu` a work unit runs
`python -m moss_jax.main ... --distributed` on every worker of its TPU VM through
`gcloud compute tpus tpu-vm ssh --worker=all` (the command `tpu_setup/tpu.sh run` builds); work
units on one TPU VM run one after another, several TPU VMs (--tpu_name=a,b) in parallel.

`--dry_run` prints every command exactly, as a shell script, and runs nothing. Otherwise the
jobs run through xmanager's local API (`xm_local`: one experiment, a work unit per sweep point)
when the `launch` extra is installed, or through subprocesses (`--launcher=builtin`). Every
binding is checked against the gin configurables first unless --novalidate. The builtin
launcher reruns a work unit that exits 75 (`moss_jax.main`: preempted after writing a
checkpoint) up to --preemption_retries times; each rerun resumes from that checkpoint.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import itertools
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moss_jax.main import EXIT_PREEMPTED  # imports no jax

DEFAULT_WORKDIR_ROOT = {"local": "runs", "tpu": "/mnt/moss_runs"}
WORKDIR_BINDING = "moss_jax.train.TrainConfig.workdir"
REMOTE_DIR = "~/moss_jax"


class LaunchError(ValueError):
    """Bad launcher input; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class WorkUnit:
    index: int  # 1-based, as xmanager numbers work units
    sweep: dict[str, Any]
    workdir: str
    tpu_name: str | None
    command: tuple[str, ...]


def gin_value(value: Any) -> str:
    """A Python literal as gin text; strings in double quotes when possible (readable once shell-quoted)."""
    if isinstance(value, str) and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return repr(value)


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """'scope.Name.param=[1, 2, 3]' -> ('scope.Name.param', [1, 2, 3])."""
    name, sep, values_text = text.partition("=")
    name = name.strip()
    if not sep or not name or " " in name:
        raise LaunchError(
            f"--sweep {text!r}: expected NAME=[v1, v2, ...], e.g. moss_jax.train.TrainConfig.steps=[10,20]"
        )
    try:
        values = ast.literal_eval(values_text.strip())
    except (ValueError, SyntaxError) as e:
        raise LaunchError(f"--sweep {text!r}: the values are not a Python literal list ({e})") from None
    if not isinstance(values, (list, tuple)) or not values:
        raise LaunchError(f"--sweep {text!r}: the values must be a non-empty list")
    return name, list(values)


def trainer_command(python: str, gin_files: Sequence[str], bindings: Sequence[str], distributed: bool) -> list[str]:
    cmd = [python, "-m", "moss_jax.main", *(f"--gin_file={f}" for f in gin_files)]
    cmd += [f"--gin_bindings={b}" for b in bindings]
    return cmd + (["--distributed"] if distributed else [])


def tpu_command(name: str, zone: str, project: str | None, remote: Sequence[str], extras: str = "tpu") -> list[str]:
    """`remote` on every worker of TPU VM `name`, in the installed checkout with its venv (as tpu.sh run)."""
    script = f"cd {REMOTE_DIR} && source scripts/setup_env.sh {extras} && {shlex.join(remote)}"
    flags = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, *flags, "--worker=all", f"--command={script}"]


def build_work_units(args: argparse.Namespace) -> list[WorkUnit]:
    sweeps = [parse_sweep(s) for s in args.sweep]
    names = [n for n, _ in sweeps]
    if len(set(names)) != len(names):
        raise LaunchError(f"--sweep: a binding is swept twice: {names}")
    if WORKDIR_BINDING in names or any(b.split("=")[0].strip() == WORKDIR_BINDING for b in args.gin_bindings):
        raise LaunchError(f"{WORKDIR_BINDING} is set per work unit by the launcher; use --workdir_root")
    tpus = [t for t in (args.tpu_name or "").split(",") if t]
    if args.target == "tpu" and (not tpus or not args.zone):
        raise LaunchError("--target=tpu needs --tpu_name=NAME[,NAME...] and --zone=ZONE")
    root = args.workdir_root or DEFAULT_WORKDIR_ROOT[args.target]
    points = list(itertools.product(*(values for _, values in sweeps)))
    units = []
    for i, point in enumerate(points, start=1):
        sweep = dict(zip(names, point, strict=True))
        workdir = f"{root}/{args.experiment_name}/{i}"
        bindings = [*args.gin_bindings, *(f"{n} = {gin_value(v)}" for n, v in sweep.items())]
        bindings.append(f"{WORKDIR_BINDING} = {gin_value(workdir)}")
        if args.target == "local":
            command = trainer_command(sys.executable, args.gin_file, bindings, distributed=False)
            tpu = None
        else:
            tpu = tpus[(i - 1) % len(tpus)]
            command = tpu_command(
                tpu, args.zone, args.project, trainer_command("python", args.gin_file, bindings, True)
            )
        units.append(WorkUnit(i, sweep, workdir, tpu, tuple(command)))
    return units


def validate(gin_files: Sequence[str], units: Sequence[WorkUnit], gin_bindings: Sequence[str]) -> None:
    """Parses every work unit's gin configuration here, so a typo fails before any job starts."""
    import gin

    from moss_jax import configurables

    for unit in units:
        bindings = [*gin_bindings, *(f"{n} = {gin_value(v)}" for n, v in unit.sweep.items())]
        gin.clear_config()
        try:
            configurables.parse(gin_files, bindings, ["."])
        except Exception as e:  # gin raises ValueError, KeyError, SyntaxError, ...
            raise LaunchError(f"work unit {unit.index} {unit.sweep}: gin configuration: {e}") from e
        finally:
            gin.clear_config()


def render(name: str, target: str, units: Sequence[WorkUnit]) -> str:
    """The dry-run text: a shell script with one command per work unit."""
    lines = [f"# experiment {name}: {len(units)} work unit(s), target {target}"]
    for u in units:
        where = f" on {u.tpu_name}" if u.tpu_name else ""
        sweep = ", ".join(f"{k}={v!r}" for k, v in u.sweep.items()) or "no sweep"
        lines.append(f"# work unit {u.index}{where}: {sweep}; workdir {u.workdir}")
        lines.append(shlex.join(u.command))
    return "\n".join(lines) + "\n"


def _queues(units: Sequence[WorkUnit]) -> list[list[WorkUnit]]:
    """Work units grouped by TPU VM (run in order within a group); local units form one group."""
    groups: dict[str | None, list[WorkUnit]] = {}
    for u in units:
        groups.setdefault(u.tpu_name, []).append(u)
    return list(groups.values())


def run_builtin(units: Sequence[WorkUnit], preemption_retries: int = 3) -> int:
    """Runs the work units as subprocesses (one thread per TPU VM queue). A unit that exits with
    `EXIT_PREEMPTED` (its run checkpointed at a preemption) is rerun, resuming from that
    checkpoint, up to `preemption_retries` times."""
    failures: list[int] = []

    def run_queue(queue: list[WorkUnit]) -> None:
        for u in queue:
            print(f"[launch] work unit {u.index}: {shlex.join(u.command)}", flush=True)
            rc = subprocess.run(u.command).returncode
            for retry in range(1, preemption_retries + 1):
                if rc != EXIT_PREEMPTED:
                    break
                print(
                    f"[launch] work unit {u.index} was preempted (exit {rc}); "
                    f"resuming from its checkpoint (retry {retry}/{preemption_retries})",
                    flush=True,
                )
                rc = subprocess.run(u.command).returncode
            if rc != 0:
                failures.append(u.index)

    threads = [threading.Thread(target=run_queue, args=(q,)) for q in _queues(units)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        print(f"[launch] failed work units: {sorted(failures)}", file=sys.stderr)
    return 1 if failures else 0


def run_xmanager(name: str, units: Sequence[WorkUnit]) -> int:
    """One xm_local experiment; each work unit is an xm work unit whose job runs its command locally."""
    import asyncio

    from absl import flags
    from xmanager import xm, xm_local

    if not flags.FLAGS.is_parsed():  # xmanager reads its own absl flags
        flags.FLAGS([sys.argv[0]])
    failures: list[int] = []

    async def main() -> None:
        async with xm_local.create_experiment(experiment_title=name) as experiment:
            programs = sorted({u.command[0] for u in units})
            specs = [xm.binary(executor_spec=xm_local.Local.Spec(), path=p) for p in programs]
            executables = dict(zip(programs, experiment.package(specs), strict=True))

            async def run_queue(queue: list[WorkUnit]) -> None:
                for u in queue:
                    print(f"[launch] xm work unit {u.index}: {shlex.join(u.command)}", flush=True)
                    job = xm.Job(executables[u.command[0]], executor=xm_local.Local(), args=list(u.command[1:]))
                    work_unit = await experiment.add(job)
                    try:
                        await work_unit.wait_until_complete()
                    except xm.ExperimentUnitError as e:
                        print(f"[launch] work unit {u.index} failed: {e}", file=sys.stderr)
                        failures.append(u.index)

            await asyncio.gather(*(run_queue(q) for q in _queues(units)))
            print(f"[launch] xmanager experiment id {experiment.experiment_id}")

    try:
        asyncio.run(main())
    except RuntimeError as e:  # xm_local re-raises a failed local job when the experiment closes
        if not failures:
            raise
        print(f"[launch] {e}", file=sys.stderr)
    if failures:
        print(f"[launch] failed work units: {sorted(failures)}", file=sys.stderr)
    return 1 if failures else 0


def _xmanager_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("xmanager") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tpu_setup.launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gin_file", action="append", required=True)
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--sweep", action="append", default=[], help="NAME=[v1, v2, ...]; repeat for a product")
    parser.add_argument("--target", choices=("local", "tpu"), default="local")
    parser.add_argument("--tpu_name", default=None, help="TPU VM name(s), comma-separated (target tpu)")
    parser.add_argument("--zone", default=None)
    parser.add_argument("--project", default=None)
    parser.add_argument("--experiment_name", default=None, help="default: first gin file's stem and the time")
    parser.add_argument("--workdir_root", default=None, help="default: runs (local), /mnt/moss_runs (tpu)")
    parser.add_argument("--launcher", choices=("auto", "xmanager", "builtin"), default="auto")
    parser.add_argument(
        "--preemption_retries",
        type=int,
        default=3,
        help="builtin launcher: rerun a work unit that exits 75 (preempted after a checkpoint) up to N times",
    )
    parser.add_argument("--dry_run", action="store_true", help="print every command and run nothing")
    parser.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--novalidate", dest="validate", action="store_false", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    try:
        for f in args.gin_file:
            if not Path(f).is_file():
                raise LaunchError(f"gin file {f} does not exist")
        if args.experiment_name is None:
            args.experiment_name = f"{Path(args.gin_file[0]).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not args.experiment_name or "/" in args.experiment_name or " " in args.experiment_name:
            raise LaunchError(f"--experiment_name {args.experiment_name!r}: no spaces or slashes")
        if args.preemption_retries < 0:
            raise LaunchError(f"--preemption_retries {args.preemption_retries}: must be >= 0")
        units = build_work_units(args)
        if args.validate:
            validate(args.gin_file, units, args.gin_bindings)
        launcher = args.launcher
        if launcher == "auto":
            launcher = "xmanager" if _xmanager_available() else "builtin"
        if launcher == "xmanager" and not args.dry_run and not _xmanager_available():
            raise LaunchError('--launcher=xmanager: xmanager is not installed (pip install -e ".[launch]")')
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(render(args.experiment_name, args.target, units))
        return 0
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(f"[launch] {args.experiment_name}: {len(units)} work unit(s) through {launcher}", flush=True)
    if launcher == "xmanager":
        return run_xmanager(args.experiment_name, units)
    return run_builtin(units, preemption_retries=args.preemption_retries)


if __name__ == "__main__":
    sys.exit(main())
