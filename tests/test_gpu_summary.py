"""bench/gpu_summary.py: the one-line summaries and the ours/cuDNN ratios of a GPU suite run."""

import importlib.util
import os

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
_spec = importlib.util.spec_from_file_location("gpu_summary", os.path.join(BENCH, "gpu_summary.py"))
gpu_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_summary)


def _attention(impl, fwd, fwd_bwd=None, **kw):
    row = {"bench": "attention", "impl": impl, "seq_len": 4096, "segments": 0, "gpu_blocks": None}
    row |= {"fwd_ms": fwd, "fwd_tflops": 1.0, "fwd_temp_mib": 0.0}
    if fwd_bwd is not None:  # jax_mgpu rows are forward only
        row |= {"fwd_bwd_ms": fwd_bwd, "fwd_bwd_tflops": 1.0, "fwd_bwd_temp_mib": 0.0}
    return row | kw


def test_ratios_for_both_gpu_forwards_and_best_tiles():
    rows = [
        _attention("pallas_gpu", 0.8, 3.2),
        _attention("pallas_mgpu_fwd", 0.6, 3.0),
        _attention("pallas_mgpu", 0.6, 2.2),
        _attention("cudnn", 0.5, 2.0),
        _attention("jax_mgpu", 0.55),
        _attention("pallas_mgpu", 0.52, 2.9, gpu_blocks="128,3"),
    ]
    lines = gpu_summary.ratios(rows)
    assert "ours/cudnn L=4096: fwd 1.60, fwd_bwd 1.60 (goal <= 1.10)" in lines
    assert "ours (Hopper fwd)/cudnn L=4096: fwd 1.20, fwd_bwd 1.50 (goal <= 1.10)" in lines
    assert "ours (Hopper fwd+bwd)/cudnn L=4096: fwd 1.20, fwd_bwd 1.10 (goal <= 1.10)" in lines
    assert "best tiles for fwd L=4096: pallas_mgpu 128,3, ours/cudnn 1.04" in lines
    assert all(gpu_summary._line(r).startswith("attention ") for r in rows)
    assert "fwd+bwd - ms" in gpu_summary._line(rows[4])  # jax_mgpu: forward only


def test_kernel_check_line_names_the_forward():
    row = {"check": "flash", "variant": "mosaic", "mosaic": 2, "dtype": "bfloat16", "head_dim": 128}
    row |= {"q_len": 1000, "kv_len": 1000, "q_offset": 0, "segments": 3, "out_err": 0.01, "rel_err": 0.004}
    row |= {"ok": True, "triton": True, "compile_s": 3.0}
    assert "variant=mosaic mosaic=2" in gpu_summary._line(row)
    old = {k: v for k, v in row.items() if k not in ("variant", "mosaic")}  # a run before the Hopper kernels
    assert "variant=" not in gpu_summary._line(old)


def test_pytest_lines_name_their_files():
    row = {"bench": "pytest_gpu", "files": "tests/kernels/test_flash_mgpu.py", "summary": "44 passed in 9s"}
    assert gpu_summary._line(row) == "pytest tests/kernels/test_flash_mgpu.py: 44 passed in 9s"
    assert gpu_summary._line({"bench": "pytest_gpu", "summary": "1 passed"}) == "pytest tests/kernels: 1 passed"


def test_help_and_a_missing_file_print_the_usage(capsys, tmp_path):
    assert gpu_summary.main(["--help"]) == 0
    assert "python bench/gpu_summary.py" in capsys.readouterr().err
    assert gpu_summary.main([str(tmp_path / "nope.jsonl")]) == 2
    assert "is not a file" in capsys.readouterr().err
