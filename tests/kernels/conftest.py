"""Kernel-test setup (runs after tests/conftest.py, before any test module imports jax's TPU plugin)."""

import os

# Compiling for a TPU topology loads libtpu, which by default takes an exclusive lock
# (/tmp/libtpu_lockfile) meant for real TPU hosts; on a shared CPU host another process that
# merely imported jax with libtpu installed may hold it. Compile-only use needs no exclusivity.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
