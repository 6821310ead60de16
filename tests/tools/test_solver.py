"""Solve: equations and systems in MOSS's evalf output format, solved in a killable worker."""

import time

import pytest

from moss_jax.tools import ToolError, solve
from moss_jax.tools.solver import prepare, solve_many
from tests.tools.conftest import child_pids

# A polynomial system sympy grinds on for far longer than the test timeouts, though its degree
# (4 * 4 * 4) is within MAX_DEGREE: the worker's timeout is the last fence.
SLOW_SYSTEM = "x**4+y**3*z+w=1;y**4+z*w**2+x=2;z**4+w*x**2+y=3"


@pytest.mark.parametrize(
    "equations, expected",
    [
        # The released data's own example.
        ("2/5*x+3/5*x=130", "x = 130.000000000000"),
        # Integers, fractions, decimals, negatives.
        ("x/3 + x/4 = 14", "x = 24.0000000000000"),
        ("0.5*x=1/3", "x = 0.666666666666667"),
        ("-2*x = 9", "x = -4.50000000000000"),
        ("1.2*x - 0.7 = 0.5", "x = 1.00000000000000"),
        ("2x+3=7", "x = 2.00000000000000"),
        ("3(x-1) = 2(x+1)", "x = 5.00000000000000"),
        ("x - 5", "x = 5.00000000000000"),  # no '=' means "= 0"
        # Polynomials: one line per solution.
        ("x^2-5x+6=0", "x = 2.00000000000000\nx = 3.00000000000000"),
        ("x**2=2", "x = -1.41421356237310\nx = 1.41421356237310"),
        ("x**2 = -4", "x = -2.0*I\nx = 2.0*I"),
        # Functions.
        ("sqrt(x)=3", "x = 9.00000000000000"),
        ("2**x=8", "x = 3.00000000000000"),
        ("log(x, 10) = 2", "x = 100.000000000000"),
        ("exp(x) = 1", "x = 0"),
        # sympy's str() of a Float, as in the docs: a lower-case exponent.
        ("x = 10**20", "x = 1.00000000000000e+20"),
        # Systems: one line per unknown, unknowns in alphabetical order.
        ("x+y=10;x-y=2", "x = 6.00000000000000\ny = 4.00000000000000"),
        ("x+y+z=6; x-y=0; 2z=4", "x = 2.00000000000000\ny = 2.00000000000000\nz = 2.00000000000000"),
        ("x+y=10", "x = 10.0 - y"),  # underdetermined: the free unknown stays symbolic
        # 鸡兔同笼 (chickens and rabbits: 35 heads, 94 legs), as emitted for a Chinese question.
        ("x+y=35;2x+4y=94", "x = 23.0000000000000\ny = 12.0000000000000"),
        # Full-width =, ; and digits from Chinese input.
        ("3a+2b=１２；a-b＝-1", "a = 2.00000000000000\nb = 3.00000000000000"),
        ("２x＋１＝７", "x = 3.00000000000000"),
        # Names are sympy Symbols, never looked up: `os` is just an unknown.
        ("os + 1 = 6", "os = 5.00000000000000"),
    ],
)
def test_table(equations, expected):
    assert solve(equations) == expected


@pytest.mark.parametrize(
    "equations, reason",
    [
        ("x=x", "no solution"),
        ("x+1=x", "no solution"),
        ("0=1", "no unknown"),
        ("x=1=2", "more than one '='"),
        ("x==1", "uses '=='"),
        ("x+1 == 2; y=1", "uses '=='"),
        ("１＋x＝＝２", "uses '=='"),
        ("1/0+1+1+x=5", "division by zero"),  # a chain's constant prefix is evaluated first
        ("x+1+1/0=5", "division by zero"),
        ("x+1+1/(1-1)*x=5", "division by zero"),
        ("1e308*10*x=1", "not finite"),
        ("+".join(["x"] * 201) + "=1", "more than 400 parts"),
        ("x/0=1", "division by zero"),
        ("x/(2-2)=1", "division by zero"),
        ("x**100=1", "degree 100 in its unknowns; the limit is 64"),
        ("(x**64)**64=2", "degree 4096 in its unknowns"),
        ("x**32*x**33=1", "degree 65 in its unknowns"),
        ("x**16+y=1;y**16+x=3", "the system's degree .* is 256"),
        ("round(x)=1", "not supported"),
        (";", "no equation"),
        ("a+b+c+d+e1+f+g+h+i=1", "unknowns"),
        ("x=1;" * 9, "equations"),
        ("ｘ=1", "not allowed"),
    ],
)
def test_rejected_or_unsolvable(equations, reason):
    with pytest.raises(ToolError, match=reason):
        solve(equations)


def test_prepare_builds_plain_data_without_sympy():
    trees, names = prepare("2/5*x+0.6*x=130")
    assert names == ["x"]
    assert trees == [
        (
            "chain",
            (
                "chain",
                ("chain", ("int", 2), (("/", ("int", 5)), ("*", ("var", "x")))),
                (("+", ("chain", ("float", "0.6"), (("*", ("var", "x")),))),),
            ),
            (("-", ("int", 130)),),
        )
    ]


def _json_depth(value) -> int:
    return 1 + max(map(_json_depth, value), default=0) if isinstance(value, list | tuple) else 0


def test_long_chains_are_flat_data_and_solve_end_to_end():
    import sys

    problems = {
        "+".join(["x"] * 41) + "=82": "x = 2.00000000000000",  # 41 terms: refused as "too deep" before
        "+".join(["x"] * 199) + "=1": "x = 0.00502512562814070",  # 397 nodes: the longest that fits
        "x*" + "*".join(["2"] * 198) + "=1": "x = 2.48920611114446e-60",
        "+".join(["1"] * 190) + "+x-" + "-".join(["1"] * 5) + "=0": "x = -185.000000000000",
    }
    # A chain is walked in a loop: preparing it needs a few frames per level, not one per operator.
    old = sys.getrecursionlimit()
    frame, frames = sys._getframe(), 0
    while frame is not None:
        frame, frames = frame.f_back, frames + 1
    sys.setrecursionlimit(frames + 150)
    try:
        prepared = [prepare(text) for text in problems]
    finally:
        sys.setrecursionlimit(old)
    assert all(_json_depth(trees) < 12 for trees, _ in prepared)
    assert solve_many(list(problems), timeout_s=20.0) == list(problems.values())


def test_timeout_kills_the_worker():
    before = child_pids()
    start = time.perf_counter()
    with pytest.raises(ToolError, match="longer than 1 s"):
        solve(SLOW_SYSTEM, timeout_s=1.0)
    assert time.perf_counter() - start < 2.0
    assert child_pids() == before  # killed and reaped: no worker, no zombie


def test_solve_many_gives_solves_answers_in_one_worker():
    # The answers and errors of test_table / test_rejected_or_unsolvable, from one batch.
    problems = {
        "2/5*x+3/5*x=130": "x = 130.000000000000",
        "x+y=10;x-y=2": "x = 6.00000000000000\ny = 4.00000000000000",
        "x**2 = -4": "x = -2.0*I\nx = 2.0*I",
        "3a+2b=１２；a-b＝-1": "a = 2.00000000000000\nb = 3.00000000000000",
        "x=x": ToolError("no solution"),
        "x/(2-2)=1": ToolError("division by zero"),
        "ｘ=1": ToolError("not allowed"),
    }
    answers = solve_many(list(problems), timeout_s=20.0)
    for (problem, expected), answer in zip(problems.items(), answers, strict=True):
        if isinstance(expected, ToolError):
            assert isinstance(answer, ToolError) and str(expected) in str(answer), (problem, answer)
        else:
            assert answer == expected, problem


def test_solve_many_falls_back_to_one_worker_each_when_the_batch_fails(monkeypatch):
    from moss_jax.tools import solver

    real = solver._worker_call

    def batch_dies(request, timeout_s):
        if "batch" in request:
            raise ToolError("solving took longer than the batch budget")
        return real(request, timeout_s)

    monkeypatch.setattr(solver, "_worker_call", batch_dies)
    answers = solve_many(["2x+3=7", "x=x"])
    assert answers[0] == "x = 2.00000000000000"
    assert isinstance(answers[1], ToolError) and "no solution" in str(answers[1])


def test_solve_many_late_batch_kills_its_worker():
    before = child_pids()
    start = time.perf_counter()
    answers = solve_many([SLOW_SYSTEM], timeout_s=1.0)
    assert isinstance(answers[0], ToolError) and "longer than 1 s" in str(answers[0])
    assert time.perf_counter() - start < 4.0  # the batch's 1 s, then its own worker's 1 s
    assert child_pids() == before


def test_registry_presolve_answers_later_commands(monkeypatch):
    from moss_jax.tools import ToolRegistry
    from moss_jax.tools import registry as registry_module

    reg = ToolRegistry()
    expected = reg.execute('Solve("2x+3=7")').text
    assert reg.presolve(["2x+3=7", "x=x"]) == 1

    def no_worker(*a, **k):
        raise AssertionError("a presolved equation started a worker")

    monkeypatch.setattr(registry_module, "solve", no_worker)
    assert reg.execute('Solve("2x+3=7")').text == expected
    with pytest.raises(AssertionError):  # each presolved answer is used once
        reg._run("Solve", registry_module.Command("Solve", "2x+3=7"), 1)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2*x + 1", 1),
        ("x**2 + x**3", 3),
        ("x**2 * y**3", 5),
        ("(x**8)**8", 64),
        ("(x**2 + 1)**3 / x", 7),
        ("x**(1/2)", 1),
        ("x**-3", 3),
        ("x**2.5", 2.5),
        ("2**(x**3)", 3),
        ("x**x", 2),
        ("sin(x**4)", 4),
        ("comb(x**2, 5)", 10),
        ("hypot(x**3, y)", 6),
        ("pi * 7", 0),
        ("*".join(["x"] * 64), 64),
        ("x*x/x//x%x", 5),
        ("+".join(["x**2"] * 60) + "-x", 2),
        ("2*3*x**2", 2),
    ],
)
def test_degree_bounds(text, expected):
    from moss_jax.tools import expression
    from moss_jax.tools.solver import degree

    assert degree(expression.parse(expression.normalize(text), variables=True), time.monotonic() + 1) == expected


def test_high_degrees_are_refused_before_a_worker_starts_and_degree_64_still_solves(monkeypatch):
    from moss_jax.tools import solver

    real_worker = solver._worker_call
    monkeypatch.setattr(solver, "_worker_call", lambda *a, **k: pytest.fail("a worker was started"))
    for text in ("(x**64)**64=2", "x**32*x**33=1", "((x**64)**64)**64=1", "x**16+y=1;y**16+x=3"):
        start = time.perf_counter()
        with pytest.raises(ToolError, match="degree"):
            solve(text)
        assert time.perf_counter() - start < 1.0
    monkeypatch.setattr(solver, "_worker_call", real_worker)
    lines = solve("x**64=2").split("\n")
    assert len(lines) == 16 and lines[:2] == ["x = -1.01088928605170", "x = 1.01088928605170"]  # 16 of 64 roots
    assert solve("(x**8)**8=2").split("\n")[:2] == lines[:2]
