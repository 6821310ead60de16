"""Hostile model output: rejected with ToolError, fast, with no file written and no process left."""

import os
import tempfile
import time

import pytest

from moss_jax.tools import Command, ToolError, ToolRegistry, calculate, search, solve, text2image
from moss_jax.tools.config import ToolsConfig
from tests.tools.conftest import child_pids

HOSTILE = [
    # Code execution through names, attributes and calls.
    "__import__('os').system('touch pwned')",
    "__import__",
    "().__class__.__bases__[0].__subclasses__()",
    "(1).real",
    "x.__class__",
    "open('pwned', 'w')",
    "exec(1)",
    "eval(1)",
    "getattr(1, 2)",
    "globals()",
    "breakpoint()",
    "compile(1, 2, 3)",
    "sqrt.__globals__",
    "sqrt(x=4)",
    "max(*[1, 2])",
    # Other syntax that is not arithmetic.
    "lambda: 1",
    "(lambda x: x)(1)",
    "[x for x in range(10)]",
    "{x: 1 for x in (1, 2)}",
    "sum(x for x in range(10**9))",
    "[1, 2]",
    "1 if 1 else 2",
    "1 < 2",
    "1 and 2",
    "~1",
    "1 << 100000",
    "x[0]",
    "a := 1",
    "True",
    "f'{1}'",
    # Denial of service by size.
    "9**9**9",
    "10**10**10",
    "2**2**2**2**2**2",
    "factorial(100000)",
    "factorial(factorial(20))",
    "(1+" * 150 + "1" + ")" * 150,
    "(" * 100_000 + "1" + ")" * 100_000,
    "-" * 900 + "1",
    "1" * 1_000_000,
    "1+" * 500_000 + "1",
    # NUL bytes and Unicode look-alikes (full-width and mathematical letters, Cyrillic, zero-width).
    "1+1\x00",
    "\x00",
    "ｅｖａｌ(1)",
    "ｓｑｒｔ(4)",
    "𝐬𝐪𝐫𝐭(4)",
    "__𝗶𝗺𝗽𝗼𝗿𝘁__('os')",
    "ѕqrt(4)",
    "sqrt\u200b(4)",
    "2 \u2044 3",
    "١+١",
]
# The same attacks dressed as equations for Solve.
HOSTILE_EQUATIONS = [f"x + {h} = 1" if len(h) < 1000 else h for h in HOSTILE] + [
    "x**(10**9) = 1",
    "x**9**9**9 = 1",
    "x**(2**64) = 1",
    "9**9**9 * x = 1",
    "x.__class__ = 1",
    "__import__('os') = x",
    "x = 1;" * 100_000,
    # Each power is small, the degree is not: nested powers multiply, products add.
    "(x**64)**64 = 2",
    "((x**64)**64)**64 = 1",
    "x**32 * x**33 = 1",
    "sqrt(x**200) = 1",
    "perm(x, 10000) = 1",
    "2**(x**65) = 8",
    "x**16 + y = 1; y**16 + x = 3",  # a system: the degrees multiply (Bezout)
]


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """Empty working and temp directories; the test checks both stay empty."""
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    before = child_pids()
    yield
    assert os.listdir(work) == [] and os.listdir(tmp) == [], "a hostile input created a file"
    assert child_pids() == before, "a hostile input left a process behind"


# Rejection takes about a millisecond; the inputs above would run for hours if evaluated. The
# bound is a hang guard with room for a loaded CI machine (a 2-worker run once took 1.27 s on a
# 1 ms rejection), not a speed target.
HANG_GUARD_S = 5.0


def _assert_rejected_fast(fn, text):
    start = time.perf_counter()
    with pytest.raises(ToolError):
        fn(text)
    elapsed = time.perf_counter() - start
    assert elapsed < HANG_GUARD_S, f"took {elapsed:.2f}s to reject {text[:60]!r}"


@pytest.mark.parametrize("text", HOSTILE, ids=lambda t: repr(t[:40]))
def test_calculate_rejects(sandbox, text):
    _assert_rejected_fast(calculate, text)


@pytest.mark.parametrize("text", HOSTILE_EQUATIONS, ids=lambda t: repr(t[:40]))
def test_solve_rejects_before_starting_a_worker(sandbox, text, monkeypatch):
    from moss_jax.tools import solver

    def no_worker(*args, **kwargs):
        raise AssertionError(f"a solver worker was started for {text[:60]!r}")

    monkeypatch.setattr(solver, "_worker_call", no_worker)
    _assert_rejected_fast(solve, text)


@pytest.mark.parametrize("text", ["a\x00b", "x" * 1_000_000, "\x1b[2J", "   "], ids=["nul", "1MB", "escape", "blank"])
def test_free_text_tools_reject(sandbox, text):
    _assert_rejected_fast(lambda t: search(t, config=ToolsConfig(search_index_dir="unused")), text)
    _assert_rejected_fast(lambda t: text2image(t, config=ToolsConfig(txt2img_url="http://127.0.0.1:9")), text)


def test_registry_answers_no_result(sandbox):
    registry = ToolRegistry()
    for text in HOSTILE:
        commands = f"{Command('Calculate', text).render()}, {Command('Solve', 'x = ' + text).render()}"
        start = time.perf_counter()
        results = registry.run_commands(commands)
        assert time.perf_counter() - start < HANG_GUARD_S
        assert results.endswith("'No result.'") or results == "No result.", results[:200]
