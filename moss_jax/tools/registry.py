"""The tool registry the chat loop uses: `<|Commands|>` text in, `<|Results|>` body out.

Result formats follow the released MOSS data (docs/tools.md has the full description):

    Search("q") =>
    <|1|>: 'first snippet'
    <|2|>: 'second snippet'
    Calculate("(6000-4800)/6000*100") => '20.0'
    Solve("2/5*x+3/5*x=130") =>
    x = 130.000000000000
    Image generated successfully.

Each call is echoed in canonical form (`Command.render`), values are quoted the way Python's
repr() quotes them (the data's own style, and it keeps a snippet on one line), search numbering
continues across the searches of one turn, and calls are joined by newlines. A failed call
becomes `'No result.'` (Text2Image: `No result.`) and its reason is logged, never shown: the
model gets no error text to react to or leak. No exception escapes `execute` for any input.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from moss_jax.tools.calculator import calculate
from moss_jax.tools.commands import Command, parse_commands
from moss_jax.tools.config import ToolsConfig
from moss_jax.tools.errors import ToolError
from moss_jax.tools.search_tool import SearchBackend, make_backend, search
from moss_jax.tools.solver import solve, solve_many
from moss_jax.tools.txt2img import text2image

logger = logging.getLogger(__name__)

NONE = "None"
NO_RESULT = "No result."
IMAGE_DONE = "Image generated successfully."


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """How a tool appears to the model: its call name, capability label and API signature."""

    name: str
    label: str
    signature: str
    enable_field: str


TOOLS = (
    ToolSpec("Search", "Web search", "Search(query)", "enable_search"),
    ToolSpec("Calculate", "Calculator", "Calculate(expression)", "enable_calculate"),
    ToolSpec("Solve", "Equation solver", "Solve(equation)", "enable_solve"),
    ToolSpec("Text2Image", "Text-to-image", "Text2Image(description)", "enable_text2image"),
)
_BY_LOWER_NAME = {spec.name.lower(): spec for spec in TOOLS}


@dataclasses.dataclass(frozen=True)
class CallResult:
    """One executed call: its `<|Results|>` block, and for the chat loop what happened."""

    command: Command
    text: str
    ok: bool
    error: str | None = None
    image_path: Path | None = None


@dataclasses.dataclass(frozen=True)
class TurnResult:
    """All of one turn's calls; `text` is the `<|Results|>` body."""

    text: str
    calls: tuple[CallResult, ...] = ()
    parse_error: str | None = None


def results_turn(body: str) -> str:
    """The full results turn around a body: `<|Results|>: None<eor>` or `<|Results|>:\\n...\\n<eor>`."""
    if body == NONE:
        return "<|Results|>: None<eor>\n"
    return f"<|Results|>:\n{body}\n<eor>\n"


def _short(text: str, limit: int = 120) -> str:
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


class ToolRegistry:
    """Runs the model's commands with the tools `config` enables.

    Args:
      config: enable flags, backends and limits (default: Calculate and Solve only).
      search_backend: replaces the Search backend `config` would select.
    """

    def __init__(self, config: ToolsConfig | None = None, *, search_backend: SearchBackend | None = None):
        self.config = config or ToolsConfig()
        self._search_backend = search_backend
        self._presolved: dict[str, str] = {}
        if self.config.enable_search and search_backend is None:
            self._search_backend = make_backend(self.config)

    @property
    def enabled(self) -> tuple[ToolSpec, ...]:
        return tuple(spec for spec in TOOLS if getattr(self.config, spec.enable_field))

    def signatures(self) -> list[str]:
        """API signatures of the enabled tools, e.g. ["Search(query)", "Calculate(expression)"]."""
        return [spec.signature for spec in self.enabled]

    def capability_lines(self) -> list[str]:
        """One line per tool for the meta instruction: enabled with its API, or disabled."""
        enabled = set(self.enabled)
        return [
            f"{spec.label}: enabled. API: {spec.signature}" if spec in enabled else f"{spec.label}: disabled."
            for spec in TOOLS
        ]

    def presolve(self, problems: Sequence[str]) -> int:
        """Solves many `Solve` arguments in one worker process (`solver.solve_many`) ahead of the
        commands that use them; each later `Solve` of one of them uses that answer once. For data
        generation, where hundreds of equations would otherwise start a worker each. Returns how
        many were solved."""
        answers = solve_many(list(problems), timeout_s=self.config.solve_timeout_s)
        solved = {p: a for p, a in zip(problems, answers, strict=True) if isinstance(a, str)}
        self._presolved.update(solved)
        return len(solved)

    def run_commands(self, commands_text: str) -> str:
        """The `<|Results|>` body for the model's `<|Commands|>` text."""
        return self.execute(commands_text).text

    def execute(self, commands_text: str) -> TurnResult:
        """Parses and runs the commands (at most `config.max_commands`); never raises."""
        cfg = self.config
        if not self.enabled:
            if not isinstance(commands_text, str) or commands_text.strip() not in ("", NONE):
                logger.warning("no tools are enabled; ignoring commands %s", _short(str(commands_text)))
            return TurnResult(NONE)
        try:
            commands = parse_commands(commands_text, max_chars=cfg.max_commands_chars)
        except ToolError as e:
            logger.warning("unparsable commands %s: %s", _short(commands_text), e)
            return TurnResult(NO_RESULT, parse_error=str(e))
        if not commands:
            return TurnResult(NONE)
        if len(commands) > cfg.max_commands:
            dropped = ", ".join(c.render() for c in commands[cfg.max_commands :])
            logger.warning(
                "running the first %d of %d commands; dropped %s", cfg.max_commands, len(commands), _short(dropped, 300)
            )
            commands = commands[: cfg.max_commands]
        calls, next_ref = [], 1
        for command in commands:
            result, refs = self._call(command, next_ref)
            calls.append(result)
            next_ref += refs
        return TurnResult("\n".join(c.text for c in calls), tuple(calls))

    def _call(self, command: Command, first_ref: int) -> tuple[CallResult, int]:
        spec = _BY_LOWER_NAME.get(command.name.lower())
        if spec is not None:
            command = Command(spec.name, command.argument)
        try:
            if spec is None:
                raise ToolError(f"unknown tool {command.name!r}")
            if spec not in self.enabled:
                raise ToolError(f"tool {spec.name} is not enabled")
            return self._run(spec.name, command, first_ref)
        except ToolError as e:
            reason = str(e)
            logger.warning("%s failed: %s", _short(command.render()), reason)
        except Exception as e:  # noqa: BLE001 -- a tool bug must not take the chat loop down
            reason = f"{type(e).__name__}: {e}"
            logger.exception("%s crashed", _short(command.render()))
        text = NO_RESULT if command.name == "Text2Image" else f"{command.render()} => {NO_RESULT!r}"
        return CallResult(command, text, ok=False, error=reason), 0

    def _run(self, name: str, command: Command, first_ref: int) -> tuple[CallResult, int]:
        cfg = self.config
        if name == "Search":
            snippets = search(command.argument, config=cfg, backend=self._search_backend)
            if not snippets:
                raise ToolError("no matching document")
            lines = [f"<|{first_ref + i}|>: {s!r}" for i, s in enumerate(snippets)]
            return CallResult(command, f"{command.render()} =>\n" + "\n".join(lines), ok=True), len(snippets)
        if name == "Text2Image":
            path = text2image(command.argument, config=cfg)
            logger.info("Text2Image wrote %s", path)
            return CallResult(command, IMAGE_DONE, ok=True, image_path=path), 0
        if name == "Calculate":
            value = calculate(command.argument, timeout_s=cfg.calculate_timeout_s)
            text = f"{command.render()} => {value!r}"
        else:
            value = self._presolved.pop(command.argument, None)
            if value is None:
                value = solve(command.argument, timeout_s=cfg.solve_timeout_s)
            text = f"{command.render()} =>\n{value}"
        if len(value) > cfg.max_result_chars:  # a cut number would be a wrong number: refuse instead
            raise ToolError(f"result has {len(value)} characters; the limit is {cfg.max_result_chars}")
        return CallResult(command, text, ok=True), 0
