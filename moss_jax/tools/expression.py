"""Validated arithmetic expressions: the one front end the calculator and the equation solver share.

Model output is untrusted (LangChain's calculator and numexpr both shipped code execution this way),
so nothing here evaluates anything. The text goes through, in order:
  1. a size cap and a NUL check, before any other work;
  2. a short, explicit table that maps full-width digits/operators (what a model writes for a
     Chinese question) and ×, ÷, −, π to ASCII; no general Unicode normalisation, because NFKC
     would turn look-alike letters such as `ｓｑｒｔ` or mathematical bold into real names;
  3. an ASCII character allow-list (no quotes, brackets, dots-after-names, `@`, `:`...);
  4. implicit multiplication (`2x`, `3(x+1)`, `(a)(b)`) and `^` as power;
  5. `ast.parse(mode="eval")`, which only builds a tree;
  6. a node allow-list (numbers, + - * / // % **, unary +/-, calls of allowed functions by
     name, allowed names), with caps on node count and depth.

Depth counts what a reader sees as nesting: each operator, unary sign and function call puts its
operands one level below itself, but a chain of same-precedence, left-associative operations
(`a+b-c+...`, `a*b/c%d...`) is one operator however long it is. Python's tree nests such a chain one
level per operator, so every consumer walks it with `chain`, in a loop. Powers are right
associative (2**2**2 is 2**(2**2)), so a power tower still nests a level per operator.
"""

from __future__ import annotations

import ast
import re

from moss_jax.tools.errors import ToolError

MAX_EXPRESSION_CHARS = 1000
MAX_NODES = 400
MAX_DEPTH = 40
MAX_NAME_CHARS = 20

# name -> (min args, max args). The calculator evaluates them with `math`, the solver with sympy.
FUNCTIONS: dict[str, tuple[int, int]] = {
    "sqrt": (1, 1),
    "cbrt": (1, 1),
    "exp": (1, 1),
    "log": (1, 2),
    "ln": (1, 1),
    "log10": (1, 1),
    "log2": (1, 1),
    "sin": (1, 1),
    "cos": (1, 1),
    "tan": (1, 1),
    "asin": (1, 1),
    "acos": (1, 1),
    "atan": (1, 1),
    "atan2": (2, 2),
    "sinh": (1, 1),
    "cosh": (1, 1),
    "tanh": (1, 1),
    "degrees": (1, 1),
    "radians": (1, 1),
    "abs": (1, 1),
    "floor": (1, 1),
    "ceil": (1, 1),
    "round": (1, 2),
    "factorial": (1, 1),
    "comb": (2, 2),
    "perm": (2, 2),
    "gcd": (2, 2),
    "lcm": (2, 2),
    "min": (1, 16),
    "max": (1, 16),
    "hypot": (2, 2),
}
CONSTANTS = ("pi", "e", "tau")

_CHAR_MAP = str.maketrans(
    {
        **{chr(0xFF10 + i): str(i) for i in range(10)},  # ０-９
        "\uff0b": "+",
        "\uff0d": "-",
        "\u2212": "-",  # minus sign
        "\uff0a": "*",
        "\u00d7": "*",  # ×
        "\uff0f": "/",
        "\u00f7": "/",  # ÷
        "\uff08": "(",
        "\uff09": ")",
        "\uff0e": ".",
        "\uff05": "%",
        "\uff3e": "^",
        "\uff0c": ",",
        "\uff1d": "=",
        "\uff1b": ";",
        "\u3000": " ",  # ideographic space
        "\u03c0": "pi",  # π
    }
)
_ALLOWED_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_ .,+-*/%()^=;\t\n\r")
# A number (not inside a name such as log2) directly followed by a name or "(": 2x, 3(x+1).
# The lookahead keeps exponents (1e5, 2E-3) and digit separators (1_000) whole.
_NUMBER_THEN_NAME = re.compile(r"\b(\d+(?:\.\d*)?)(?=(?![eE][+-]?\d)[A-Za-z(])")
_PAREN_THEN_OPERAND = re.compile(r"\)\s*(?=[A-Za-z_(\d.])")
_VARIABLE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")

_BINARY_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
# Same precedence, left associative: a+b-c is ((a+b)-c). `**` is right associative and not here.
_CHAIN_FAMILIES = ((ast.Add, ast.Sub), (ast.Mult, ast.Div, ast.FloorDiv, ast.Mod))
_UNARY_OPS = (ast.UAdd, ast.USub)


def normalize(text: str, *, allowed: str = "") -> str:
    """Caps, maps and allow-lists the characters of an expression; returns ASCII text.

    Args:
      text: untrusted expression text.
      allowed: extra characters the caller splits on itself ("=;" for the solver); they are
        rejected otherwise.
    """
    if not isinstance(text, str):
        raise ToolError(f"expression must be a string, got {type(text).__name__}")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression is {len(text)} characters; the limit is {MAX_EXPRESSION_CHARS}")
    if "\x00" in text:
        raise ToolError("expression contains a NUL byte")
    text = text.translate(_CHAR_MAP)
    for ch in text:
        if ch not in _ALLOWED_CHARS or (ch in "=;" and ch not in allowed):
            code = f"U+{ord(ch):04X}"
            raise ToolError(f"character {ch!r} ({code}) is not allowed in an expression")
    if len(text) > MAX_EXPRESSION_CHARS:  # π -> pi can grow the text
        raise ToolError(f"expression is too long; the limit is {MAX_EXPRESSION_CHARS} characters")
    return text


def parse(text: str, *, variables: bool = False) -> ast.expr:
    """Parses one normalised expression (no `=` or `;`) into a validated AST.

    Args:
      text: output of `normalize`.
      variables: allow free names (unknowns for the solver); otherwise only CONSTANTS and
        FUNCTIONS are names.

    Returns:
      The expression node; only the node types listed in the module docstring occur in it.
    """
    text = _PAREN_THEN_OPERAND.sub(")*", _NUMBER_THEN_NAME.sub(r"\1*", text)).replace("^", "**")
    if not text.strip():
        raise ToolError("expression is empty")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ToolError(f"not a valid expression: {getattr(e, 'msg', e)}") from None
    _check(tree.body, variables)
    return tree.body


def chain(node: ast.BinOp) -> list[ast.BinOp]:
    """The links of the left-associative chain that `node` ends, innermost first, without recursion.

    For `a+b-c` (parsed as `(a+b)-c`) that is `[a+b, (a+b)-c]`: the chain's first operand is
    `links[0].left`, then each link applies `link.op` with `link.right`; each link is also the
    sub-expression "everything up to here". A link's left side continues the chain while it is a
    BinOp of the same family (+ - or * / // %); a power, or an operation of another family, ends
    it and is an operand (one level deeper). A power is a chain of one link.
    """
    family = next((f for f in _CHAIN_FAMILIES if isinstance(node.op, f)), None)
    links = [node]
    while family is not None and isinstance(node.left, ast.BinOp) and isinstance(node.left.op, family):
        node = node.left
        links.append(node)
    links.reverse()
    return links


def variable_names(node: ast.expr) -> set[str]:
    """Free names in a validated expression that are not constants or functions (the unknowns)."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id not in CONSTANTS and n.id not in FUNCTIONS}


def _check(root: ast.expr, variables: bool) -> None:
    # Iterative walk: the depth cap must hold before any recursive code sees the tree. A chain
    # (a+b-c...) is one level: its operands are one level below it, its links all count as nodes.
    stack = [(root, 1)]
    count = 0
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ToolError(
                f"expression is nested deeper than {MAX_DEPTH} levels (each operator, unary sign and function "
                "call nests its operands one level deeper; a chain such as a+b-c+... or a*b/c*... counts once)"
            )
        if isinstance(node, ast.BinOp):
            links = chain(node)
            for link in links:
                if not isinstance(link.op, _BINARY_OPS):
                    raise ToolError(f"operator {type(link.op).__name__} is not allowed")
            count += len(links)
            children = [links[0].left, *(link.right for link in links)]
        else:
            count += 1
            children = _children(node, variables)
        if count > MAX_NODES:
            raise ToolError(
                f"expression has more than {MAX_NODES} parts (each number, name, operator and function call is one)"
            )
        stack.extend((child, depth + 1) for child in children)


def _children(node: ast.AST, variables: bool) -> list[ast.expr]:
    if isinstance(node, ast.Constant):
        # bool is an int subclass and complex parses from `1j`; neither is arithmetic here.
        if type(node.value) not in (int, float):
            raise ToolError(f"literal {node.value!r} is not a real number")
        return []
    if isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, _UNARY_OPS):
            raise ToolError(f"operator {type(node.op).__name__} is not allowed")
        return [node.operand]
    if isinstance(node, ast.Name):
        _check_name(node.id, variables)
        return []
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            what = node.func.id if isinstance(node.func, ast.Name) else type(node.func).__name__
            raise ToolError(f"call of {what!r} is not allowed; allowed functions: {', '.join(FUNCTIONS)}")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise ToolError(f"{node.func.id}() takes positional arguments only")
        low, high = FUNCTIONS[node.func.id]
        if not low <= len(node.args) <= high:
            raise ToolError(f"{node.func.id}() takes {low}-{high} arguments, got {len(node.args)}")
        return list(node.args)
    raise ToolError(f"{type(node).__name__} is not allowed in an expression")


def _check_name(name: str, variables: bool) -> None:
    if name in FUNCTIONS:
        raise ToolError(f"function {name!r} used without calling it")
    if name in CONSTANTS:
        return
    if name.startswith("_") or not variables:
        raise ToolError(f"unknown name {name!r}; allowed constants: {', '.join(CONSTANTS)}")
    if len(name) > MAX_NAME_CHARS or not _VARIABLE.fullmatch(name):
        raise ToolError(f"variable name {name!r} is not allowed")
