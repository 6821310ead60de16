"""A few-row int8 x int8 -> int32 dot for XLA:CPU (an XLA FFI call into int8_cpu.cc).

    acc_MxN = int8_dot_nt(xq_MxK, w_NxK)       # == lax.dot_general(..., preferred_element_type=int32)

The W8A8 matmuls of decoding (moss_jax/quant.py, "int8_dynamic") multiply one to a few rows by
an [N, K] int8 weight. XLA:CPU hands that dot to YNNPACK, which repacks the whole weight on
every call, so batch-1 decoding ran at a third of the memory bandwidth (docs/performance.md).
int8_cpu.cc reads each weight row once with AVX512-VNNI and returns the same int32 sums,
exactly, on the calling thread. The C++ source is compiled with the host's C++ compiler (`$CXX`, else g++ or c++) on
first use into a cache directory (`$MOSS_JAX_CACHE`, else ~/.cache/moss_jax), keyed by the
source, compiler and jaxlib; `available()` is False, and callers use the XLA dot, when there is
no compiler, the build fails, the CPU lacks AVX512-VNNI, or `MOSS_JAX_INT8_KERNEL=0`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

TARGET = "moss_int8_dot_nt"
SOURCE = Path(__file__).with_name("int8_cpu.cc")
# Rows up to which quant.dense uses the FFI dot. On one thread it still beat YNNPACK at 32 rows
# (docs/performance.md), but it runs on one thread while YNNPACK uses XLA's, and prefill-sized
# dots (hundreds of rows) are packed-GEMM work.
MAX_ROWS = 16

log = logging.getLogger(__name__)


def _cache_dir() -> Path:
    root = os.environ.get("MOSS_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moss_jax")
    return Path(root) / "ffi"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(force: bool = False, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compiles int8_cpu.cc (once per source, compiler, flags and jaxlib) and returns the library path.

    Args:
      extra_flags: more compiler flags (the tests build with a trapping overflow sanitizer).

    Raises:
      RuntimeError: no C++ compiler, or the build failed (the compiler's output attached).
    """
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found ($CXX, g++ or c++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}", *extra_flags]
    key = hashlib.sha256(
        SOURCE.read_bytes() + version.encode() + " ".join(flags).encode() + jax.__version__.encode()
    ).hexdigest()[:16]
    out = _cache_dir() / f"int8_cpu_{key}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build to a temporary name and rename: concurrent first uses never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _load() -> ctypes.CDLL | None:
    """Builds, loads and registers the FFI target once; None (logged) when that is not possible."""
    try:
        lib = ctypes.CDLL(str(build()))
        handler = lib.MossInt8DotNT
    except (RuntimeError, OSError, AttributeError) as e:
        log.warning("int8 CPU kernel unavailable, using the XLA dot: %s", e)
        return None
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    return lib


def registered() -> bool:
    """Whether the FFI target is built and registered (any CPU; the portable path needs no VNNI)."""
    return _load() is not None


def available() -> bool:
    """Whether decoding should use the kernel: built, AVX512-VNNI present, not disabled by the env."""
    if os.environ.get("MOSS_JAX_INT8_KERNEL", "1") == "0":
        return False
    lib = _load()
    return lib is not None and bool(lib.moss_int8_has_vnni())


def int8_dot_nt(x_MxK: jax.Array, w_NxK: jax.Array, use_vnni: bool = True) -> jax.Array:
    """int32 [M, N] = x @ w.T for int8 x [M, K] and w [N, K] on CPU (the kernel must be `registered()`).

    Args:
      use_vnni: False forces the portable loop (tests compare both paths).
    """
    if not registered():
        raise RuntimeError("the int8 CPU kernel could not be built (see the log)")
    if x_MxK.dtype != jnp.int8 or w_NxK.dtype != jnp.int8 or x_MxK.ndim != 2 or w_NxK.ndim != 2:
        raise ValueError(f"need int8 [M, K] and [N, K], got {x_MxK.dtype}{x_MxK.shape}, {w_NxK.dtype}{w_NxK.shape}")
    if x_MxK.shape[1] != w_NxK.shape[1]:
        raise ValueError(f"contraction mismatch: {x_MxK.shape} vs {w_NxK.shape}")
    out = jax.ShapeDtypeStruct((x_MxK.shape[0], w_NxK.shape[0]), jnp.int32)
    return jax.ffi.ffi_call(TARGET, out)(x_MxK, w_NxK, use_vnni=int(use_vnni))
