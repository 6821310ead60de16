"""The Hopper kernels' numbers on this CPU: `flash_mgpu`'s forward and `flash_mgpu_bwd`'s backward
run in JAX's Mosaic GPU interpreter (`moss_jax/kernels/mgpu_interpret.py`), every warpgroup a
thread, barriers blocking, with the race detector on, against the XLA reference (values and
dq/dk/dv within the dtype's tolerance).

Each group of cases runs in a subprocess (`tests/kernels/mgpu_interpret_run.py`): the interpreter
needs JAX's CPU dispatch synchronous from the process's start, and a kernel that fails inside it
leaves the other warpgroups waiting on barriers, which the timeout turns into a failure naming
the case. Speed, registers and anything asynchronous on the hardware still need an H100
(`test_flash_mgpu.py::test_matches_reference_on_hopper`, bench/gpu_kernel_check.py).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import pytest

from moss_jax.kernels import mgpu_interpret
from tests.kernels import mgpu_interpret_run

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Two groups of about the same time (~50 s each here), for pytest -n 2.
GROUPS = {
    "causal_ragged_d256_base_pipeline": [
        "causal",
        "packed_ragged",
        "one_block",
        "d256_triton_bwd",
        "base_ragged",
        "pipeline_packed",
    ],
    "f16_random_ids_slots_registry_overlap_pipeline": [
        "f16_bidirectional",
        "d80_random_ids",
        "three_slots",
        "registry",
        "overlap_d80",
        "pipeline_d64",
    ],
}
TIMEOUT_S = 600  # the whole group; a hung case ends sooner (mgpu_interpret_run --case_timeout_s)


def test_groups_cover_every_case():
    listed = [name for names in GROUPS.values() for name in names]
    assert sorted(listed) == sorted(mgpu_interpret_run.CASES)


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


needs_supported_jax = pytest.mark.skipif(
    mgpu_interpret.unsupported() is not None, reason=str(mgpu_interpret.unsupported())
)
_JAX_NEXT = ROOT / "scripts" / "test_kernels_jax_next.sh"


@functools.cache
def _jax_next_runs_them() -> bool:
    """Whether `test_the_async_checks_run_on_jax_011_too` runs this file on jax 0.11 in this suite:
    on JAX 0.10 where a Python >= 3.12 is installed. Its interpreter checks everything the 0.10 one
    does, TMA copies and proxy fences besides, in a third of the time, so the 0.10 runs of the cases
    and planted bugs below are skipped there (about 4 minutes of the suite); without a Python >= 3.12
    they run here."""
    if mgpu_interpret.models_async_proxy():
        return False  # this is the jax 0.11 run (or a newer JAX): run everything
    found = subprocess.run(["bash", str(_JAX_NEXT), "--find-python"], capture_output=True, text=True)
    return found.returncode == 0


def _skip_if_jax_next_runs_them():
    if os.environ.get("MOSS_MGPU_INTERPRET_ON_PINNED_JAX") != "1" and _jax_next_runs_them():
        pytest.skip(
            "run on jax 0.11 by test_the_async_checks_run_on_jax_011_too, whose interpreter checks more "
            "(MOSS_MGPU_INTERPRET_ON_PINNED_JAX=1 runs them on this JAX too)"
        )


@needs_supported_jax
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_hopper_kernels_match_reference_in_the_interpreter(group):
    _skip_if_jax_next_runs_them()
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_WORKER_HOSTNAMES="localhost")
    cmd = [sys.executable, "-m", "tests.kernels.mgpu_interpret_run", "--detect_races", *GROUPS[group]]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        started = [r["case"] for r in _records(out) if r["status"] == "start"]
        pytest.fail(f"the interpreter hung (> {TIMEOUT_S} s) in case {started[-1] if started else '?'}:\n{out}")
    lines = _records(proc.stdout)
    records = {r["case"]: r for r in lines if r["status"] != "start"}
    started = [r["case"] for r in lines if r["status"] == "start"]
    if started and started[-1] not in records:
        pytest.fail(f"the interpreter hung in case {started[-1]}; its threads:\n{proc.stderr[-6000:]}")
    failures = {name: r.get("error", "") for name, r in records.items() if r["status"] != "pass"}
    assert not failures, "\n\n".join(f"{name}:\n{err}" for name, err in failures.items())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(records) == sorted(GROUPS[group]), proc.stdout


@needs_supported_jax
def test_hopper_interpret_refuses_asynchronous_dispatch():
    """This pytest process keeps JAX's default asynchronous CPU dispatch, under which the
    interpreter's warpgroups would deadlock on a 2-core machine: refused with the fix named."""
    with pytest.raises(RuntimeError, match=r"jax_cpu_enable_async_dispatch', False\) before"):
        with mgpu_interpret.hopper_interpret():
            pass


def test_the_interpreter_runs_on_the_pinned_jax_and_refuses_others(monkeypatch):
    """The pinned JAX (setup.py) is the one the patches target, so CI runs the cases above; on
    another JAX, `unsupported()` names the version instead of failing deep inside the interpreter."""
    pinned = re.search(r'"jax==([0-9.]+)"', (ROOT / "setup.py").read_text()).group(1)
    if jax.__version__ == pinned:
        assert mgpu_interpret.unsupported() is None
    monkeypatch.setattr(jax, "__version__", "0.12.0")
    monkeypatch.setattr(jax, "__version_info__", (0, 12, 0))
    assert "JAX 0.12.0 may have changed" in mgpu_interpret.unsupported()


# Planted bugs, one per run, each in a copy of the kernels: the interpreter must fail the case
# with the error named. JAX 0.10's interpreter completes TMA copies at issue and ignores proxy
# fences; JAX 0.11's models both (async copies with their own clocks, `commit_smem` as the
# generic-to-async proxy fence), so the `_ASYNC` ones are caught there only
# (`test_the_async_checks_run_on_jax_011_too` runs them there).
_SYNC, _ASYNC = "any JAX", "JAX 0.11"
_RACE = "race detector found a race"
MUTANTS = {
    # name: (file, text, replacement, case, which JAX catches it, errors that count as caught)
    "v_block_used_before_its_barrier": (
        "flash_mgpu.py",
        "                plgpu.barrier_wait(v_loaded.at[slot])\n",
        "",
        "causal",
        _SYNC,
        # or wrong numbers: 0.11 may read the slot before the TMA warpgroup filled it (NaN)
        (_RACE, "non-finite values", "Not equal to tolerance"),
    ),
    "k_slot_released_before_its_wgmma_read_it": (
        "flash_mgpu.py",
        "            s = pl.run_scoped(scores, plgpu.ACC((bq, bkv), jnp.float32))\n"
        "            plgpu.barrier_arrive(k_consumed.at[slot])\n",
        "            plgpu.barrier_arrive(k_consumed.at[slot])\n"
        "            s = pl.run_scoped(scores, plgpu.ACC((bq, bkv), jnp.float32))\n",
        "packed_ragged",  # enough key blocks that the slot is refilled
        _SYNC,
        (_RACE,),
    ),
    "ds_store_not_fenced_before_wgmma": (
        "flash_mgpu_bwd.py",
        '            smem["ds"].at[buf, wg][...] = ds_t\n            plgpu.commit_smem()',
        '            smem["ds"].at[buf, wg][...] = ds_t\n            pass',
        "causal",
        _ASYNC,
        (_RACE,),
    ),
    "per_warpgroup_ds_store_not_fenced_before_wgmma": (  # the base schedule's dS^T
        "flash_mgpu_bwd.py",
        "                ds_smem[...] = ds_t\n                plgpu.commit_smem()\n",
        "                ds_smem[...] = ds_t\n",
        "base_ragged",
        _ASYNC,
        (_RACE,),
    ),
    "dq_buffer_rewritten_before_its_tma_store_read_it": (
        "flash_mgpu_bwd.py",
        "                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous part has left dq_smem\n",
        "",
        "causal",
        _ASYNC,
        (_RACE,),
    ),
    "ds_read_before_the_other_warpgroup_stored_it": (  # no exchange barrier at all
        "flash_mgpu_bwd.py",
        '            plgpu.barrier_arrive(bars["ds_ready"].at[buf])\n'
        '            plgpu.barrier_wait(bars["ds_ready"].at[buf])\n',
        "",
        "causal",
        _SYNC,
        (_RACE, "Not equal to tolerance", "non-finite values"),  # the other's buffer read unwritten
    ),
    "k_overwritten_by_dk_before_the_other_warpgroup_read_it": (
        "flash_mgpu_bwd.py",
        '            plgpu.barrier_arrive(bars["k_free"].at[0])\n'
        '            plgpu.barrier_wait(bars["k_free"].at[0])\n',
        "            pass\n",
        "causal",
        _SYNC,
        (_RACE, "Not equal to tolerance", "non-finite values"),
    ),
    "slot_refilled_without_a_proxy_fence": (
        "flash_mgpu_bwd.py",
        "            plgpu.commit_smem()\n            fetch(i, slot)\n",
        "            fetch(i, slot)\n",
        "causal",
        _ASYNC,
        (_RACE,),
    ),
}


@needs_supported_jax
@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_the_interpreter_catches_planted_bugs(name, tmp_path):
    file, old, new, case, needs, caught_by = MUTANTS[name]
    _skip_if_jax_next_runs_them()
    if needs == _ASYNC and not mgpu_interpret.models_async_proxy():
        pytest.skip(f"JAX {jax.__version__}'s interpreter completes TMA copies at issue and ignores proxy fences")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "moss_jax", tmp_path / "moss_jax", ignore=ignore)
    shutil.copytree(ROOT / "tests", tmp_path / "tests", ignore=ignore)
    kernel = tmp_path / "moss_jax" / "kernels" / file
    source = kernel.read_text()
    assert source.count(old) == 1, f"the text planted over is gone from {file}: update MUTANTS[{name!r}]"
    kernel.write_text(source.replace(old, new))
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_WORKER_HOSTNAMES="localhost")
    env.pop("PYTHONSAFEPATH", None)  # the copy is imported from the working directory
    cmd = [sys.executable, "-m", "tests.kernels.mgpu_interpret_run", "--detect_races", case]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    records = _records(proc.stdout)
    starts = [r for r in records if r["status"] == "start"]
    assert starts and pathlib.Path(starts[0]["kernels"]).is_relative_to(tmp_path), (
        f"the copy's kernels did not run:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    )
    ends = [r for r in records if r["status"] != "start"]
    assert ends, f"{case} did not finish (a hang is not what this bug should cause):\n{proc.stderr[-3000:]}"
    assert ends[0]["status"] == "fail", f"{name} went unnoticed: {ends[0]}"
    raced = _RACE in caught_by and ends[0].get("races")  # reported even where the numbers failed first
    assert raced or any(text in ends[0]["error"] for text in caught_by), ends[0]["error"]


def test_the_async_checks_run_on_jax_011_too():
    """What only JAX 0.11's interpreter checks (TMA copies as asynchronous tasks, proxy fences; the
    `_ASYNC` planted bugs above), in the default suite as well: scripts/test_kernels_jax_next.sh
    builds its own venv with the GPU machines' jax 0.11.2 (Python >= 3.12) and runs this file's
    tests there. Skipped where no Python >= 3.12 is installed."""
    if mgpu_interpret.models_async_proxy():
        pytest.skip(f"JAX {jax.__version__} runs them itself (the tests above)")
    script = _JAX_NEXT
    found = subprocess.run(["bash", str(script), "--find-python"], capture_output=True, text=True)
    if found.returncode == 3:
        pytest.skip(found.stderr.strip())
    assert found.returncode == 0, found.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "JAX_", "XLA_"))}
    env["PYTEST_WORKERS"] = "1"  # beside this suite's own workers
    env["JAX_NEXT_TESTS"] = "tests/kernels/test_flash_mgpu_interpret.py"
    cmd = ["bash", str(script)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed == len(GROUPS) + len(MUTANTS) + 3, summary  # + dispatch, version and coverage tests
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 1 and "runs them itself" in skips[0], skips  # only this test, there
