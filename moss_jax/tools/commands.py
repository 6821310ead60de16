"""Parse the model's `<|Commands|>` text into tool calls, and render calls back.

Grammar (MOSS emits `Search("q"), Calculate("e")` or `None`):

    commands := "None" | call ([","|"，"] call)*
    call     := NAME "(" STRING ")"
    STRING   := "..." | '...' | “...” | ‘...’   with escapes \\ \" \' \n \t \r

The text is untrusted model output, so the parser is a hand-written scanner (no eval, no regex
backtracking on the whole input) with a size cap, and anything else is a CommandParseError.
One leniency, because models do it: a closing quote only ends the argument when the next
non-blank character is `)`, so `Search("the "best" pizza")` reads as the query `the "best" pizza`.
"""

from __future__ import annotations

import dataclasses

from moss_jax.tools.errors import CommandParseError

COMMANDS_PREFIX = "<|Commands|>:"
END_OF_COMMANDS = "<eoc>"
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019"}
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r"}
_SEPARATORS = (",", "\uff0c")  # ASCII and full-width comma


@dataclasses.dataclass(frozen=True)
class Command:
    """One tool call: `name("argument")`."""

    name: str
    argument: str

    def render(self) -> str:
        """The call in MOSS's canonical form (double quotes), as echoed in `<|Results|>`."""
        escaped = (
            self.argument.replace("\\", "\\\\")
            .replace('"', '\\"')
            .replace("\n", "\\n")
            .replace("\t", "\\t")
            .replace("\r", "\\r")
        )
        return f'{self.name}("{escaped}")'


def strip_markers(text: str) -> str:
    """Drops an optional leading `<|Commands|>:` and trailing `<eoc>` (and blanks around them)."""
    text = text.strip()
    if text.startswith(COMMANDS_PREFIX):
        text = text[len(COMMANDS_PREFIX) :].strip()
    if text.endswith(END_OF_COMMANDS):
        text = text[: -len(END_OF_COMMANDS)].strip()
    return text


def parse_commands(text: str, *, max_chars: int = 8000) -> list[Command]:
    """Parses commands text into calls; `None` (or nothing) gives [].

    Args:
      text: the `<|Commands|>` body, with or without the role marker and `<eoc>`.
      max_chars: longer input is rejected before any scanning.

    Raises:
      CommandParseError: with the position and what was expected.
    """
    if not isinstance(text, str):
        raise CommandParseError(f"commands must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise CommandParseError(f"commands text is {len(text)} characters; the limit is {max_chars}")
    if "\x00" in text:
        raise CommandParseError("commands text contains a NUL byte")
    text = strip_markers(text)
    if text.rstrip(".") in ("", "None", "none"):
        return []
    return _Scanner(text).calls()


class _Scanner:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def _error(self, expected: str) -> CommandParseError:
        found = repr(self.text[self.pos : self.pos + 10]) if self.pos < len(self.text) else "end of text"
        return CommandParseError(f"expected {expected} at character {self.pos}, found {found}")

    def _skip_blanks(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _peek_after_blanks(self, pos: int) -> str:
        while pos < len(self.text) and self.text[pos].isspace():
            pos += 1
        return self.text[pos] if pos < len(self.text) else ""

    def calls(self) -> list[Command]:
        calls = []
        while True:
            self._skip_blanks()
            calls.append(self._call())
            self._skip_blanks()
            if self.pos == len(self.text):
                return calls
            if self.text[self.pos] in _SEPARATORS:
                self.pos += 1
                self._skip_blanks()
                if self.pos == len(self.text):  # a trailing comma is harmless
                    return calls

    def _call(self) -> Command:
        start = self.pos
        # ASCII names only: a look-alike letter must not turn into a known tool name.
        while self.pos < len(self.text) and (self.text[self.pos].isascii() and self.text[self.pos].isalnum()):
            self.pos += 1
        name = self.text[start : self.pos]
        if not name or not name[0].isalpha():
            self.pos = start
            raise self._error("a tool name such as Search")
        self._skip_blanks()
        if self.pos == len(self.text) or self.text[self.pos] != "(":
            raise self._error(f"'(' after {name}")
        self.pos += 1
        self._skip_blanks()
        argument = self._string()
        self._skip_blanks()
        if self.pos == len(self.text) or self.text[self.pos] != ")":
            raise self._error(f"')' to close {name}(")
        self.pos += 1
        return Command(name, argument)

    def _string(self) -> str:
        if self.pos == len(self.text) or self.text[self.pos] not in _QUOTES:
            raise self._error("a quoted argument")
        close = _QUOTES[self.text[self.pos]]
        start = self.pos
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "\\" and self.pos + 1 < len(self.text):
                nxt = self.text[self.pos + 1]
                # Unknown escapes stay as written (like Python), so `\frac` or `C:\dir` survive.
                out.append(_ESCAPES.get(nxt, "\\" + nxt))
                self.pos += 2
                continue
            if ch == close and self._peek_after_blanks(self.pos + 1) == ")":
                self.pos += 1
                return "".join(out)
            out.append(ch)
            self.pos += 1
        self.pos = start
        raise self._error("a closing quote followed by ')'")
