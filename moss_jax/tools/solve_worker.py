"""The equation solver's worker process: builds sympy expressions from a validated tree and solves.

Runs only in a child process started by `solver.solve`, one per call. Input is the tree made by
`solver.prepare` from an AST that `expression.parse` already allow-listed, so sympy never sees
text: no `sympify`/`parse_expr` (which call `eval`). The parent kills the process on timeout;
resource limits here are a second fence against memory blow-ups and file writes.
"""

from __future__ import annotations

import json
import resource
import sys
from fractions import Fraction
from typing import Any

import sympy

MEMORY_LIMIT_BYTES = 2 * 1024**3
MAX_SOLUTION_SETS = 16

Tree = tuple[Any, ...]


def _real_root3(x):
    return sympy.real_root(x, 3)


_FUNCTIONS = {
    "sqrt": sympy.sqrt,
    "cbrt": _real_root3,
    "exp": sympy.exp,
    "log": lambda x, base=None: sympy.log(x) if base is None else sympy.log(x, base),
    "ln": sympy.log,
    "log10": lambda x: sympy.log(x, 10),
    "log2": lambda x: sympy.log(x, 2),
    "sin": sympy.sin,
    "cos": sympy.cos,
    "tan": sympy.tan,
    "asin": sympy.asin,
    "acos": sympy.acos,
    "atan": sympy.atan,
    "atan2": sympy.atan2,
    "sinh": sympy.sinh,
    "cosh": sympy.cosh,
    "tanh": sympy.tanh,
    "degrees": lambda x: x * 180 / sympy.pi,
    "radians": lambda x: x * sympy.pi / 180,
    "abs": sympy.Abs,
    "floor": sympy.floor,
    "ceil": sympy.ceiling,
    "factorial": sympy.factorial,
    "comb": sympy.binomial,
    "perm": sympy.ff,
    "min": sympy.Min,
    "max": sympy.Max,
    "hypot": lambda a, b: sympy.sqrt(a**2 + b**2),
}
_CONSTANTS = {"pi": sympy.pi, "e": sympy.E, "tau": 2 * sympy.pi}
_UNDEFINED = (sympy.zoo, sympy.nan, sympy.oo, -sympy.oo)
_BINARY = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "//": lambda a, b: sympy.floor(a / b),
    "%": sympy.Mod,
    "**": sympy.Pow,
}


def build(tree: Tree, symbols: dict[str, sympy.Symbol]) -> sympy.Expr:
    """A sympy expression from the tuple tree; only constructors, never a string parser."""
    kind = tree[0]
    if kind == "int":
        return sympy.Integer(tree[1])
    if kind == "float":
        # Decimal literals become exact rationals (0.4 -> 2/5), so 2/5*x + 0.6*x = 130 is exact.
        value = Fraction(tree[1])
        return sympy.Rational(value.numerator, value.denominator)
    if kind == "const":
        return _CONSTANTS[tree[1]]
    if kind == "var":
        return symbols[tree[1]]
    if kind == "neg":
        return -build(tree[1], symbols)
    if kind == "chain":  # ("chain", first, [[op, operand], ...]): a+b-c... folded left to right, in a loop
        value = build(tree[1], symbols)
        for op, operand in tree[2]:
            value = _BINARY[op](value, build(operand, symbols))
        return value
    if kind == "call":
        return _FUNCTIONS[tree[1]](*(build(arg, symbols) for arg in tree[2]))
    raise ValueError(f"unknown node kind {kind!r}")


def solve_trees(equations: list[Tree], names: list[str]) -> str:
    """Solves `expr == 0` for every tree; one `name = value` line per unknown per solution."""
    symbols = {name: sympy.Symbol(name) for name in names}
    exprs = [build(tree, symbols) for tree in equations]
    if any(expr.has(*_UNDEFINED) for expr in exprs):  # e.g. x/(1-1): sympy would "solve" x*zoo = 1
        raise ValueError("division by zero")
    unknowns = [symbols[name] for name in names]
    # A single equation goes in bare: given a one-element list, sympy's system path returns []
    # for polynomials it cannot solve in radicals (x**5 - x + 1) instead of their CRootOf roots.
    solutions = sympy.solve(exprs[0] if len(exprs) == 1 else exprs, unknowns, dict=True)
    lines = []
    for solution in solutions[:MAX_SOLUTION_SETS]:
        for symbol in unknowns:
            if symbol in solution:
                if solution[symbol].has(*_UNDEFINED):
                    continue
                # evalf's default 15 significant digits: 130 -> "130.000000000000", as in MOSS's data.
                # str(), not format(): a sympy Float formats as 1.00000000000000E+20, prints as ...e+20.
                lines.append(f"{symbol} = {solution[symbol].evalf()!s}")
    if not lines:
        raise ValueError("no solution found")
    return "\n".join(lines)


def _limit_resources(cpu_seconds: int) -> None:
    limits = [
        (resource.RLIMIT_AS, MEMORY_LIMIT_BYTES),
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_FSIZE, 0),  # the solver never writes files
    ]
    for which, value in limits:
        try:
            _, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, hard))
        except (ValueError, OSError):
            pass  # a platform without this limit still has the parent's kill-on-timeout


def main() -> None:
    """Entry point: reads {"equations", "names", "cpu_seconds"} (or {"batch": [...], "cpu_seconds"}) JSON
    on stdin, answers on stdout."""
    request = json.loads(sys.stdin.read())
    _limit_resources(int(request["cpu_seconds"]))
    if "batch" in request:  # solver.solve_many: {"batch": [{"equations", "names"}, ...]}
        answer = {"batch": [_answer(job) for job in request["batch"]]}
    else:
        answer = _answer(request)
    sys.stdout.write(json.dumps(answer))


def _answer(job: dict) -> dict:
    try:
        return {"ok": solve_trees(job["equations"], job["names"])}
    except Exception as e:  # noqa: BLE001 -- any failure is a "No result." for the model
        return {"error": f"{type(e).__name__}: {e}"[:500]}
