"""MOSS's tools (Search, Calculate, Solve, Text2Image) and the command/result loop around them.

Plain Python, no gin. The model's commands are untrusted input: see docs/tools.md for the
security model, the result formats and how to configure the search and text-to-image backends.

    from moss_jax.tools import ToolRegistry, ToolsConfig
    registry = ToolRegistry(ToolsConfig(enable_search=True, search_index_dir="index/"))
    body = registry.run_commands('Search("长城有多长"), Calculate("21196/2")')
"""

from moss_jax.tools.calculator import calculate
from moss_jax.tools.commands import Command, parse_commands
from moss_jax.tools.config import ToolConfigError, ToolsConfig, WebSearchConfig
from moss_jax.tools.errors import CommandParseError, ToolError
from moss_jax.tools.registry import TOOLS, CallResult, ToolRegistry, TurnResult, results_turn
from moss_jax.tools.search_tool import search
from moss_jax.tools.solver import solve
from moss_jax.tools.txt2img import text2image

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
