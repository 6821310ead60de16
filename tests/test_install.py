"""Packaging checks: pins match what is installed, and the launch extra's protobuf resolution."""

import json
import os
import re
import subprocess
import venv
from importlib.metadata import requires, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _requirements(extra=None):
    out = []
    for req in requires("moss_jax") or []:
        marker = re.search(r'extra\s*==\s*"([^"]+)"', req)
        if (marker.group(1) if marker else None) == extra:
            out.append(req.split(";")[0].strip())
    return out


def test_core_pins_match_installed_versions():
    pins = [r for r in _requirements() if "==" in r]
    assert any(r.startswith("jax==") for r in pins)
    for req in pins:
        name, pinned = req.split("==")
        assert version(name) == pinned, f"{name}: setup.py pins {pinned}, {version(name)} is installed"


def test_extras_declared():
    for extra in ("test", "tpu", "launch", "notebook"):
        assert _requirements(extra), extra
    assert "torch==2.13.0" in _requirements("test")


def test_sentencepiece_proto_loads_with_installed_protobuf():
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.trainer_spec.vocab_size = 8
    assert proto.SerializeToString()


@pytest.mark.slow
def test_launch_extra_resolves_and_imports(tmp_path):
    """In a fresh venv: pip resolves moss_jax[launch] to protobuf<7 with a sentencepiece whose
    generated proto loads, and xmanager + sentencepiece_model_pb2 import together."""
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    py = str(env / "bin" / "python")
    report = subprocess.run(
        [py, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", f"{ROOT}[launch]"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    resolved = {
        item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(report.stdout)["install"]
    }
    assert int(resolved["protobuf"].split(".")[0]) < 7
    assert resolved["sentencepiece"] == "0.2.1"
    assert "xmanager" in resolved and "tensorflow" in resolved
    launch = _requirements("launch")
    install = subprocess.run(
        [py, "-m", "pip", "install", "--quiet", *launch], capture_output=True, text=True, timeout=900
    )
    assert install.returncode == 0, install.stderr[-3000:]
    check = subprocess.run(
        [
            py,
            "-c",
            "from sentencepiece import sentencepiece_model_pb2; import xmanager; "
            "import google.protobuf as p; print(p.__version__)",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    assert int(check.stdout.strip().split(".")[0]) < 7


def test_jax_next_script_refuses_a_python_older_than_312(tmp_path):
    """scripts/test_kernels_jax_next.sh (the kernel tests on the GPU machines' jax 0.11) names the
    Python it needs instead of failing inside pip, and creates nothing."""
    import sys

    if sys.version_info >= (3, 12):
        pytest.skip("this Python is new enough: the script would build its venv")
    venv_dir = tmp_path / "venv-next"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON_NEXT": sys.executable, "VENV_NEXT": str(venv_dir)}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "test_kernels_jax_next.sh")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert f"PYTHON_NEXT={sys.executable} is not a Python >= 3.12" in proc.stderr
    assert not venv_dir.exists()


@pytest.mark.parametrize("tpu_vm", [False, True], ids=["cpu_host", "tpu_vm"])
def test_setup_env_leaves_tpu_worker_settings_alone_on_a_tpu_vm(tmp_path, tpu_vm):
    """TPU_WORKER_HOSTNAMES=localhost quiets libtpu on a CPU host but would make every worker of a
    multi-host slice think it is alone; setup_env.sh sets it only where no TPU chip is present."""
    chip = tmp_path / "accel0"
    if tpu_vm:
        chip.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_WORKER_HOSTNAMES", "ALLOW_MULTIPLE_LIBTPU_LOAD")}
    env["MOSS_TPU_DEVICE_GLOB"] = str(tmp_path / "accel*")
    script = "source scripts/setup_env.sh test,tpu && "
    script += 'echo "[${TPU_WORKER_HOSTNAMES-unset}] [${ALLOW_MULTIPLE_LIBTPU_LOAD-unset}]"'
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == ("[unset] [unset]" if tpu_vm else "[localhost] [1]")
