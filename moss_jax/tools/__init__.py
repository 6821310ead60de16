"""MOSS's tools (Search, Calculate, Solve, Text2Image) and the command/result loop around them.

Plain Python, no gin. The model's commands are untrusted input: see docs/tools.md for the
security model, the result formats and how to configure the search and text-to-image backends.

    from moss_jax.tools import ToolRegistry, ToolsConfig
    registry = ToolRegistry(ToolsConfig(enable_search=True, search_index_dir="index/"))
    body = registry.run_commands('Search("长城有多长"), Calculate("21196/2")')
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Public name -> the module that defines it, imported on first use (PEP 562). Importing the
# package imports none of them, so `python -m moss_jax.tools.search_index` runs that module once,
# as __main__, instead of after the package had already imported it (runpy's RuntimeWarning).
_EXPORTS = {
    "calculate": "moss_jax.tools.calculator",
    "Command": "moss_jax.tools.commands",
    "parse_commands": "moss_jax.tools.commands",
    "ToolConfigError": "moss_jax.tools.config",
    "ToolsConfig": "moss_jax.tools.config",
    "WebSearchConfig": "moss_jax.tools.config",
    "CommandParseError": "moss_jax.tools.errors",
    "ToolError": "moss_jax.tools.errors",
    "TOOLS": "moss_jax.tools.registry",
    "CallResult": "moss_jax.tools.registry",
    "ToolRegistry": "moss_jax.tools.registry",
    "TurnResult": "moss_jax.tools.registry",
    "results_turn": "moss_jax.tools.registry",
    "search": "moss_jax.tools.search_tool",
    "solve": "moss_jax.tools.solver",
    "text2image": "moss_jax.tools.txt2img",
}

if TYPE_CHECKING:
    from moss_jax.tools.calculator import calculate
    from moss_jax.tools.commands import Command, parse_commands
    from moss_jax.tools.config import ToolConfigError, ToolsConfig, WebSearchConfig
    from moss_jax.tools.errors import CommandParseError, ToolError
    from moss_jax.tools.registry import TOOLS, CallResult, ToolRegistry, TurnResult, results_turn
    from moss_jax.tools.search_tool import search
    from moss_jax.tools.solver import solve
    from moss_jax.tools.txt2img import text2image


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "TOOLS",
    "CallResult",
    "Command",
    "CommandParseError",
    "ToolConfigError",
    "ToolError",
    "ToolRegistry",
    "ToolsConfig",
    "TurnResult",
    "WebSearchConfig",
    "calculate",
    "parse_commands",
    "results_turn",
    "search",
    "solve",
    "text2image",
]
assert set(__all__) == set(_EXPORTS), "__all__ and _EXPORTS must list the same names"
