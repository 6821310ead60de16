"""The FFI int8 dot (moss_jax/kernels/int8_cpu.py): bit-exact against XLA's int8 x int8 -> int32 dot."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax.kernels import int8_cpu

pytestmark = [
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU kernel"),
    pytest.mark.skipif(not int8_cpu.registered(), reason="no C++ compiler to build the int8 CPU kernel"),
]

PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(not int8_cpu.available(), reason="no AVX512-VNNI"))]


def xla_dot(x_MxK, w_NxK):
    return jax.lax.dot_general(x_MxK, w_NxK, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


@pytest.mark.parametrize("use_vnni", PATHS)
@pytest.mark.parametrize(
    "m, n, k",
    # rows 1..9 cover every row block (1-4 row by row, 5-8 side by side, 9 = 8 + 1); n and k
    # cover partial weight-row blocks and partial 64-byte tails.
    [(1, 7, 5), (2, 4, 64), (3, 13, 130), (4, 9, 768), (5, 70, 200), (6, 3, 64), (7, 8, 65), (8, 66, 192), (9, 5, 63)]
    + [(16, 130, 96), (1, 1, 1)],
)
def test_equals_the_xla_int8_dot(m, n, k, use_vnni):
    rng = np.random.RandomState(m * 1000 + n + k)
    x = jnp.asarray(rng.randint(-128, 128, (m, k)), jnp.int8)
    w = jnp.asarray(rng.randint(-128, 128, (n, k)), jnp.int8)
    got = jax.jit(lambda x, w: int8_cpu.int8_dot_nt(x, w, use_vnni=use_vnni))(x, w)
    assert got.dtype == jnp.int32 and got.shape == (m, n)
    np.testing.assert_array_equal(got, xla_dot(x, w))


@pytest.mark.parametrize("use_vnni", PATHS)
def test_extreme_values(use_vnni):
    """All -128 (the offset's worst case) and all 127, with a contraction long enough to sum to ~2^30."""
    k = 1 << 16
    for a, b in [(-128, -128), (-128, 127), (127, -128), (127, 127)]:
        x = jnp.full((2, k), a, jnp.int8)
        w = jnp.full((3, k), b, jnp.int8)
        np.testing.assert_array_equal(int8_cpu.int8_dot_nt(x, w, use_vnni=use_vnni), xla_dot(x, w))


def test_inside_a_loop_over_stacked_weights():
    """As the decoder calls it: per-layer slices of a stacked weight inside a compiled loop."""
    rng = np.random.RandomState(1)
    w_YxNxK = jnp.asarray(rng.randint(-127, 128, (3, 40, 96)), jnp.int8)
    x = jnp.asarray(rng.randint(-127, 128, (2, 96)), jnp.int8)

    def run(dot):
        def body(i, acc):
            return acc + dot(x, w_YxNxK[i])

        return jax.jit(lambda: jax.lax.fori_loop(0, 3, body, jnp.zeros((2, 40), jnp.int32)))()

    np.testing.assert_array_equal(run(int8_cpu.int8_dot_nt), run(xla_dot))


def test_rejects_bad_operands():
    with pytest.raises(ValueError, match="int8"):
        int8_cpu.int8_dot_nt(jnp.zeros((2, 8), jnp.float32), jnp.zeros((4, 8), jnp.int8))
    with pytest.raises(ValueError, match="contraction"):
        int8_cpu.int8_dot_nt(jnp.zeros((2, 8), jnp.int8), jnp.zeros((4, 9), jnp.int8))


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv("MOSS_JAX_INT8_KERNEL", "0")
    assert not int8_cpu.available()


def test_build_without_a_compiler_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ / c++ on it
    monkeypatch.setenv("MOSS_JAX_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        int8_cpu.build()


def test_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("MOSS_JAX_CACHE", str(tmp_path))
    path = int8_cpu.build()
    assert path.parent == tmp_path / "ffi" and path.exists()
    mtime = path.stat().st_mtime_ns
    assert int8_cpu.build() == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left


# Run in a child process: a trapped overflow kills the process (SIGILL).
_UBSAN_SCRIPT = """
import functools
import jax, jax.numpy as jnp, numpy as np
from moss_jax.kernels import int8_cpu
int8_cpu.build = functools.partial(int8_cpu.build, extra_flags=(
    "-fsanitize=signed-integer-overflow", "-fsanitize-undefined-trap-on-error"))
assert int8_cpu.registered()
k = (1 << 17) + 64  # 16384 * k > 2^31: the int32 sum wraps
for a, b in [(-128, -128), (-128, 127), (127, 127)]:
    x, w = jnp.full((2, k), a, jnp.int8), jnp.full((3, k), b, jnp.int8)
    want = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    for use_vnni in [False] + [True] * int8_cpu.available():
        np.testing.assert_array_equal(int8_cpu.int8_dot_nt(x, w, use_vnni=use_vnni), want)
print("ok")
"""


def test_wrapping_sums_are_defined_behaviour(tmp_path):
    """Sums past int32 wrap as XLA's do without signed overflow (undefined behaviour in C++): built
    with a trapping signed-overflow sanitizer, the kernel still returns XLA's bits on both paths."""
    env = os.environ | {"MOSS_JAX_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    root = pathlib.Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", _UBSAN_SCRIPT], capture_output=True, text=True, env=env, cwd=root, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"exit {proc.returncode} (-4 = SIGILL: a signed overflow trapped)\n{proc.stderr[-3000:]}"
    )
