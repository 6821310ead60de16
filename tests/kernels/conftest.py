"""Kernel-test setup (runs after tests/conftest.py, before any test module imports jax's TPU plugin)."""

import os

# Compiling for a TPU topology loads libtpu, which by default takes an exclusive lock
# (/tmp/libtpu_lockfile) meant for real TPU hosts; on a shared CPU host another process that
# merely imported jax with libtpu installed may hold it. Compile-only use needs no exclusivity.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# MOSS_KERNEL_TEST_BACKEND=gpu (bench/gpu_suite.sh, on a CUDA machine): the GPU kernels run compiled
# by Triton instead of in the Pallas interpreter (tests/kernels/cases.py: GPU_INTERPRET). XLA's fp32
# matmuls, the reference's included, would use TF32 there; the kernels' fp32 dots are full precision.
if os.environ.get("MOSS_KERNEL_TEST_BACKEND") == "gpu":
    os.environ["JAX_PLATFORMS"] = "cuda"  # tests/conftest.py defaults it to cpu
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
