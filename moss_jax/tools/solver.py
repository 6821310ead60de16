"""Solve("2/5*x+3/5*x=130"): validate in-process, solve with sympy in a killable worker.

sympy has no timeout and its string parsers call `eval`, so:
  - the text is checked here by the calculator's front end (`expression.py`), equation by equation;
  - every constant sub-expression is evaluated by the bounded calculator first, which refuses
    `9**9**9`, `factorial(10**6)` and `1/0` before sympy sees them;
  - the degree in the unknowns is capped at MAX_DEGREE (a degree-10**9 polynomial is a denial of
    service, not an equation): an upper bound computed from the tree (`degree`: nested powers
    multiply, products add, so `(x**64)**64` is 4096), per equation and, for a system, as the
    product of its equations' degrees (Bezout's bound on the number of its solutions);
  - the checked AST is turned into plain tuples and sent (as JSON) to `solve_worker`, which builds
    sympy objects with constructors only, in a child process that is killed at the deadline.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from moss_jax.tools import calculator, expression
from moss_jax.tools.errors import ToolError

MAX_EQUATIONS = 8
MAX_UNKNOWNS = 8
MAX_DEGREE = 64
# Functions whose symbolic meaning differs from the calculator's (gcd of polynomials, ...).
UNSUPPORTED = ("round", "gcd", "lcm")
# The directory that holds the moss_jax package, put first on the worker's import path.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_WORKER_CODE = (
    f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); from moss_jax.tools import solve_worker; solve_worker.main()"
)
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}


def solve(equations: str, *, timeout_s: float = 5.0) -> str:
    """Solves equations separated by `;` for all their unknowns.

    Args:
      equations: e.g. "2/5*x+3/5*x=130" or "x+y=10;x-y=2" (full-width ＝ and ； accepted). An
        equation without `=` means `expression = 0`.
      timeout_s: wall-clock limit of the solving worker.

    Returns:
      One `name = value` line per unknown (per solution, for several), values in sympy's
      15-digit evalf style: "x = 130.000000000000".

    Raises:
      ToolError: rejected input, no solution, worker failure or timeout.
    """
    trees, names = prepare(equations)
    return _run_worker(trees, names, timeout_s)


def solve_many(problems: Sequence[str], *, timeout_s: float = 5.0) -> list[str | ToolError]:
    """`solve` over many independent problems in one worker process (one start-up, not one each).

    Each problem is validated exactly as `solve` validates it and gets the same answer; the item
    is the answer text or the `ToolError` that `solve` would raise. The worker's budget is
    `timeout_s` per problem; if the batch misses it or the worker dies, every problem of the batch
    is solved again in its own worker with `solve`'s own limits.
    """
    out: list[str | ToolError | None] = [None] * len(problems)
    jobs = []
    for i, text in enumerate(problems):
        try:
            jobs.append((i, *prepare(text)))
        except ToolError as e:
            out[i] = e
    if jobs:
        budget = timeout_s * len(jobs)
        request = {"batch": [{"equations": t, "names": n} for _, t, n in jobs], "cpu_seconds": math.ceil(budget) + 1}
        try:
            answers = _worker_call(request, budget)["batch"]
        except (ToolError, KeyError, TypeError):
            answers = [None] * len(jobs)
        for (i, trees, names), answer in zip(jobs, answers, strict=True):
            try:
                out[i] = _run_worker(trees, names, timeout_s) if answer is None else _answer_text(answer)
            except ToolError as e:
                out[i] = e
    return out


def prepare(equations: str) -> tuple[list[tuple], list[str]]:
    """Validates the equations; returns (one `lhs - rhs` tuple tree per equation, sorted unknowns)."""
    text = expression.normalize(equations, allowed="=;")
    parts = [part.strip() for part in text.split(";") if part.strip()]
    if not parts:
        raise ToolError("no equation given")
    if len(parts) > MAX_EQUATIONS:
        raise ToolError(f"{len(parts)} equations; the limit is {MAX_EQUATIONS}")
    deadline = time.monotonic() + 1.0
    trees, names, system_degree = [], set(), 1
    for part in parts:
        if "==" in part:
            raise ToolError(f"equation {part[:60]!r} uses '=='; write an equation with one '=' (x = 1)")
        sides = part.split("=")
        if len(sides) > 2:
            raise ToolError(f"equation {part!r} has more than one '='")
        nodes = [expression.parse(side, variables=True) for side in sides]
        for node in nodes:
            _check_bounds(node, deadline)
            names |= expression.variable_names(node)
        equation_degree = max(degree(node, deadline) for node in nodes)
        if equation_degree > MAX_DEGREE:
            shown = _show(equation_degree)
            raise ToolError(f"equation {part[:60]!r} has degree {shown} in its unknowns; the limit is {MAX_DEGREE}")
        system_degree *= max(1, equation_degree)
        tree = _to_tree(nodes[0])
        trees.append(tree if len(nodes) == 1 else ("chain", tree, (("-", _to_tree(nodes[1])),)))
    if not names:
        raise ToolError("no unknown to solve for")
    if len(names) > MAX_UNKNOWNS:
        raise ToolError(f"{len(names)} unknowns; the limit is {MAX_UNKNOWNS}")
    if system_degree > MAX_DEGREE:
        raise ToolError(
            f"the system's degree (the product of its equations' degrees) is {_show(system_degree)}; "
            f"the limit is {MAX_DEGREE}"
        )
    return trees, sorted(names)


def degree(node: ast.expr, deadline: float) -> int | float:
    """An upper bound on the degree of a validated expression in its unknowns.

    Sums take the larger degree; products and quotients add degrees (clearing a denominator
    multiplies through); a power with a constant exponent multiplies by its size (at least 1, so
    `sqrt(x**64)`, `x**(1/2)` keep the base's degree); a power with unknowns in the exponent
    (`2**x`, `x**x`) adds both sides' degrees; `comb(a, k)` and `perm(a, k)` expand to a product
    of k factors of `a`; `hypot(a, b)` squares; any other function counts its arguments'
    degrees, since solving `sin(x**64) = 0` means solving `x**64 = k*pi`.
    """
    if not _has_unknowns(node):
        return 0
    if isinstance(node, ast.Name):
        return 1
    if isinstance(node, ast.UnaryOp):
        return degree(node.operand, deadline)
    if isinstance(node, ast.BinOp):
        links = expression.chain(node)  # a+b-c...: a loop, not one recursion level per operator
        result = degree(links[0].left, deadline)
        for link in links:
            if isinstance(link.op, ast.Pow) and not _has_unknowns(link.right):
                result *= max(1, abs(calculator.evaluate(link.right, deadline=deadline)))
            elif isinstance(link.op, ast.Add | ast.Sub):
                result = max(result, degree(link.right, deadline))
            else:
                result += degree(link.right, deadline)
        return result
    if isinstance(node, ast.Call):
        args = [degree(arg, deadline) for arg in node.args]
        if node.func.id in ("comb", "perm") and not _has_unknowns(node.args[1]):
            return args[0] * max(1, abs(calculator.evaluate(node.args[1], deadline=deadline)))
        if node.func.id == "hypot":
            return 2 * max(args)
        return sum(args)
    raise ToolError(f"{type(node).__name__} is not allowed")  # unreachable after expression.parse


def _show(value: int | float) -> str:
    return f"{value:.6g}" if value < 1e300 else "over 1e300"


def _has_unknowns(node: ast.expr) -> bool:
    return bool(expression.variable_names(node))


def _check_bounds(node: ast.expr, deadline: float) -> None:
    if not _has_unknowns(node):
        calculator.evaluate(node, deadline=deadline)  # raises on 9**9**9, 1/0, huge factorials
        return
    if isinstance(node, ast.Call) and node.func.id in UNSUPPORTED:
        raise ToolError(f"{node.func.id}() is not supported in equations")
    if isinstance(node, ast.BinOp):
        # A chain a+b-c... in a loop. Its longest prefix without unknowns is a constant
        # sub-expression and is evaluated as one; each later link has unknowns on its left.
        links = expression.chain(node)
        constant = 0  # how many leading links make up that prefix (links[i] is the prefix to i)
        if not _has_unknowns(links[0].left):
            while not _has_unknowns(links[constant].right):  # stops: the whole chain has unknowns
                constant += 1
        if constant:
            calculator.evaluate(links[constant - 1], deadline=deadline)
        else:
            _check_bounds(links[0].left, deadline)
        for link in links[constant:]:
            if isinstance(link.op, ast.Div | ast.FloorDiv | ast.Mod):
                if not _has_unknowns(link.right) and calculator.evaluate(link.right, deadline=deadline) == 0:
                    raise ToolError("division by zero")
            _check_bounds(link.right, deadline)
        return
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.expr) and not (isinstance(node, ast.Call) and child is node.func):
            _check_bounds(child, deadline)


def _to_tree(node: ast.expr) -> tuple:
    if isinstance(node, ast.Constant):
        # repr() of a float is the shortest text that reads back exactly: 0.4 -> "0.4".
        return ("int", node.value) if isinstance(node.value, int) else ("float", repr(node.value))
    if isinstance(node, ast.Name):
        return ("const", node.id) if node.id in expression.CONSTANTS else ("var", node.id)
    if isinstance(node, ast.UnaryOp):
        operand = _to_tree(node.operand)
        return ("neg", operand) if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp):
        # ("chain", first operand, ((op, operand), ...)): a+b-c... stays flat, in JSON and in the worker.
        links = expression.chain(node)
        return ("chain", _to_tree(links[0].left), tuple((_OPS[type(link.op)], _to_tree(link.right)) for link in links))
    if isinstance(node, ast.Call):
        if node.func.id in UNSUPPORTED:
            raise ToolError(f"{node.func.id}() is not supported in equations")
        return ("call", node.func.id, [_to_tree(arg) for arg in node.args])
    raise ToolError(f"{type(node).__name__} is not allowed")  # unreachable after expression.parse


def _run_worker(trees: list[tuple], names: list[str], timeout_s: float) -> str:
    """Runs `solve_worker` in a fresh interpreter and kills it at the deadline.

    A fresh `python -I` process rather than multiprocessing: fork would copy a multi-threaded
    parent (JAX runtime threads can deadlock the child), and spawn/forkserver re-import the
    caller's __main__ script in the child. -I keeps the working directory and PYTHON* variables
    out of the child's import path. The cost is the interpreter and sympy start-up (~0.4 s), which
    counts against timeout_s. The worker's CPU rlimit ends it even if this process is interrupted.
    """
    return _answer_text(
        _worker_call({"equations": trees, "names": names, "cpu_seconds": math.ceil(timeout_s) + 1}, timeout_s)
    )


def _answer_text(answer: dict) -> str:
    """A worker's answer for one problem ({"ok": text} or {"error": why}) -> the text, or ToolError."""
    if "ok" not in answer:
        raise ToolError(f"no result: {answer.get('error', 'unknown error')}")
    return answer["ok"]


def _worker_call(request: dict, timeout_s: float) -> dict:
    """One worker process: sends the JSON request, returns its JSON answer (ToolError on failure)."""
    with subprocess.Popen(
        [sys.executable, "-I", "-c", _WORKER_CODE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        try:
            out, err = proc.communicate(json.dumps(request).encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()  # reap it: no zombie left behind
            raise ToolError(f"solving took longer than {timeout_s:g} s") from None
    try:
        return json.loads(out)
    except ValueError:
        tail = err.decode(errors="replace")[-300:]
        raise ToolError(f"solver worker failed (exit code {proc.returncode}): {tail}") from None
