"""bench/mgpu_sass.py: reading ptxas's and nvdisasm's output, and its report when no GPU compiles."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED = os.path.join(ROOT, "bench", "results", "sass_h100_2026-11-27")


def _module():
    spec = importlib.util.spec_from_file_location("mgpu_sass", os.path.join(ROOT, "bench", "mgpu_sass.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reads_the_ptxas_report_of_an_h100_run():
    """The output a GPU run saved (the backward with wide_regs, 2026-11-27)."""
    with open(os.path.join(SAVED, "run4_bwd_overlap_shared_dq_wide_regs.txt")) as f:
        row = _module().summarize(f.read())
    assert (row["registers"], row["spill_stores"], row["spill_loads"]) == (168, 384, 396)
    assert len(row["warnings"]) == 1 and "spilled" in row["warnings"][0]
    assert row["tool_errors"] and "nvdisasm" in row["tool_errors"][0]  # that machine had no nvdisasm
    assert row["hgmma"] == 0 and row["sass_lines"] == 0
    with open(os.path.join(SAVED, "run5_fwd_-.txt")) as f:
        fwd = _module().summarize(f.read())
    assert (fwd["spill_stores"], fwd["warnings"]) == (0, [])


def test_counts_wgmma_and_its_waits_in_sass():
    # nvdisasm -c lines: offset comment, instruction, encoding comment
    sass = """
        /*0a40*/                   WARPGROUP.ARRIVE ;                                  /* 0x000000000000 */
        /*0a50*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ; /* 0x000000000000 */
        /*0a60*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ; /* 0x0000000000 */
        /*0a70*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;                     /* 0x000000000000 */
        /*0a80*/                   STL.64 [R1+0x10], R24 ;                             /* 0x000000000000 */
        /*0a90*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;                     /* 0x000000000000 */
        /*0aa0*/                   LDL.64 R24, [R1+0x10] ;                             /* 0x000000000000 */
    """
    row = _module().summarize(sass)
    assert row["hgmma"] == 2 and row["warpgroup_arrive"] == 1
    assert row["depbar"] == {"gsb0, 0x1": 1, "gsb0, 0x0": 1}
    assert (row["local_stores"], row["local_loads"], row["sass_lines"]) == (1, 1, 7)


def test_a_kernel_that_does_not_compile_is_reported_not_dropped(tmp_path):
    """On a CPU the Hopper backward cannot compile: the row says so (rc, tail) and the exit is 1."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "mgpu_sass.py"), "--no_fwd", "--variants", "base"]
    proc = subprocess.run(cmd + ["--seq_len", "128", "--out", str(tmp_path)], env=env, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    (row,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert (row["kernel"], row["variant"], row["ok"]) == ("bwd", "base", False)
    assert row["rc"] != 0 and "interpret" in row["tail"]
    assert (tmp_path / "bwd_base.txt").read_text().endswith(row["tail"])
