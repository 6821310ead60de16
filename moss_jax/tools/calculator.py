"""Calculate("..."): a bounded evaluator over the validated expression AST (never `eval`).

Arithmetic follows Python's rules, which is what the released MOSS results show
(`(6000-4800)/6000*100` -> `20.0`, `2+3` -> `5`): `/` is true division, ints stay exact.
Every operation is bounded before it runs: integers stay under MAX_INT_BITS (so `9**9**9` is
refused from its size estimate, not computed), floats must stay finite and real, factorial/comb/perm
arguments are capped, and a deadline is checked at every node. With the node and depth caps of
`expression.py`, one call costs at most milliseconds, so it runs in-process.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from collections.abc import Callable

from moss_jax.tools import expression
from moss_jax.tools.errors import ToolError

Number = int | float

MAX_INT_BITS = 8192  # about 2,466 decimal digits
MAX_FACTORIAL_ARG = 966  # the largest n whose n! fits in MAX_INT_BITS (967! has 8202 bits)
MAX_COMB_ARG = 10000
MAX_ROUND_DIGITS = 100

_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def calculate(expression_text: str, *, timeout_s: float = 1.0) -> str:
    """Evaluates an arithmetic expression; returns the value as Python prints it ('20.0', '5').

    Args:
      expression_text: e.g. "(6000-4800)/6000*100"; full-width digits and operators are accepted.
      timeout_s: wall-clock budget (checked at every node of the expression).

    Raises:
      ToolError: for anything outside the allowed grammar or limits, or a math error
        (division by zero, domain error, overflow, complex result).
    """
    node = expression.parse(expression.normalize(expression_text))
    return format_number(evaluate(node, deadline=time.monotonic() + timeout_s))


def format_number(value: Number) -> str:
    """Python's own str() (the released data's format); ints are size-checked first."""
    if isinstance(value, int):
        _check_int(value)
    return str(value)


def evaluate(node: ast.expr, *, deadline: float) -> Number:
    """Evaluates a node validated by `expression.parse` (no variables)."""
    if time.monotonic() > deadline:
        raise ToolError("calculation timed out")
    try:
        return _checked(_evaluate(node, deadline))
    except ToolError:  # a ValueError too; already says what went wrong
        raise
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("number too large") from None
    except (ValueError, TypeError) as e:  # math domain errors, non-integer factorial, ...
        raise ToolError(f"math error: {e}") from None


def _checked(value: Number) -> Number:
    """Every value, intermediate ones included, must be a real, finite number within MAX_INT_BITS."""
    if isinstance(value, complex):
        raise ToolError("result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("result is not finite")
    if isinstance(value, int):
        _check_int(value)
    return value


def _evaluate(node: ast.expr, deadline: float) -> Number:
    # Recursion is safe: expression.parse capped the depth at MAX_DEPTH, and a chain such as
    # a+b-c+... (one level there, one tree level per operator here) is folded in a loop.
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in _CONSTANTS:
            raise ToolError(f"unknown name {node.id!r}")
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp):
        value = evaluate(node.operand, deadline=deadline)
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp):
        links = expression.chain(node)
        value = evaluate(links[0].left, deadline=deadline)
        for link in links:
            value = _checked(_BINARY[type(link.op)](value, evaluate(link.right, deadline=deadline)))
        return value
    if isinstance(node, ast.Call):
        args = [evaluate(a, deadline=deadline) for a in node.args]
        return _FUNCTIONS[node.func.id](*args)
    raise ToolError(f"{type(node).__name__} is not allowed in an expression")  # unreachable after parse


def _check_int(value: int) -> None:
    if value.bit_length() > MAX_INT_BITS:
        raise ToolError(f"integer result larger than {MAX_INT_BITS} bits")


def _mul(a: Number, b: Number) -> Number:
    if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
        raise ToolError(f"integer result larger than {MAX_INT_BITS} bits")
    return a * b


def _pow(base: Number, exponent: Number) -> Number:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        # Size of the result from the operands alone: 9**387420489 is refused without computing it.
        if exponent > MAX_INT_BITS or exponent * (abs(base).bit_length() - 1) > MAX_INT_BITS:
            raise ToolError(f"integer result larger than {MAX_INT_BITS} bits")
    if isinstance(exponent, int) and exponent.bit_length() > 64:
        exponent = float(exponent)  # float pow overflows (an error) instead of looping over a huge int
    return base**exponent


def _int_arg(name: str, value: Number, limit: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value <= limit:
        raise ToolError(f"{name}() needs an integer between 0 and {limit}, got {value!r}")
    return value


def _factorial(n: Number) -> int:
    return math.factorial(_int_arg("factorial", n, MAX_FACTORIAL_ARG))


def _comb(n: Number, k: Number) -> int:
    return math.comb(_int_arg("comb", n, MAX_COMB_ARG), _int_arg("comb", k, MAX_COMB_ARG))


def _perm(n: Number, k: Number) -> int:
    return math.perm(_int_arg("perm", n, MAX_COMB_ARG), _int_arg("perm", k, MAX_COMB_ARG))


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int) or abs(ndigits) > MAX_ROUND_DIGITS:
        raise ToolError(f"round() digits must be an integer within +-{MAX_ROUND_DIGITS}")
    return round(x, ndigits)


def _integers(name: str, *values: Number) -> list[int]:
    if not all(isinstance(v, int) for v in values):
        raise ToolError(f"{name}() needs integers")
    return list(values)


def _log(x: Number, base: Number | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


_BINARY: dict[type, Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: _mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _pow,
}

_FUNCTIONS: dict[str, Callable[..., Number]] = {
    "sqrt": math.sqrt,
    "cbrt": math.cbrt,
    "exp": math.exp,
    "log": _log,
    "ln": math.log,
    "log10": math.log10,
    "log2": math.log2,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "atan2": math.atan2,
    "sinh": math.sinh,
    "cosh": math.cosh,
    "tanh": math.tanh,
    "degrees": math.degrees,
    "radians": math.radians,
    "abs": abs,
    "floor": math.floor,
    "ceil": math.ceil,
    "round": _round,
    "factorial": _factorial,
    "comb": _comb,
    "perm": _perm,
    "gcd": lambda a, b: math.gcd(*_integers("gcd", a, b)),
    "lcm": lambda a, b: math.lcm(*_integers("lcm", a, b)),
    "min": min,
    "max": max,
    "hypot": math.hypot,
}
assert set(_FUNCTIONS) == set(expression.FUNCTIONS), "calculator and expression grammar must list the same functions"
