"""A multi-turn MOSS conversation: history, the tools switch and the tool loop.

With tools on, one user message takes two generations (MOSS_SPEC section 3):

    ... <|Inner Thoughts|>:   -> generate to <eoc>: " thoughts<eot>\\n<|Commands|>: Search(\\"q\\")"
    run the commands, append <|Results|>:\\n...\\n<eor>\\n<|MOSS|>:
    -> generate to <eom>: the reply (streamed)

With a preference tag (tags.py) the reply pass continues from `<|MOSS|>:<|quality_i|>`; the
first pass then also stops at `<|MOSS|>:`, so a model that skips its commands still answers
after the tag (the turn gets commands and results "None").

Tools are reached through `Tools` (capability lines + execute), which `moss_jax.tools.ToolRegistry`
satisfies; a registry with every tool disabled works (all commands give "None"). Generation is
reached through `TextGenerator`, so the same session runs on a local decoder or the server's
batching engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from data_pipelines import specials as sp
from moss_jax.inference.prompt import IDENTITY, NONE, Turn, build_prompt, meta_instruction
from moss_jax.inference.sampling import MOSS_DEFAULTS, SamplingParams


@dataclasses.dataclass(frozen=True)
class Generation:
    """One finished generation: text (stop tokens and stop strings removed), ids, why it ended."""

    text: str
    tokens: list[int]
    finish_reason: str  # "stop" or "length"


class TextGenerator(Protocol):
    """Prompt ids in, generated text out, streaming text deltas to `on_text`."""

    def generate_text(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        stop_strings: Sequence[str],
        sampling: SamplingParams,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation: ...


class Tools(Protocol):
    def capability_lines(self) -> list[str]: ...

    def execute(self, commands_text: str) -> Any: ...  # has `.text`, the <|Results|> body


@dataclasses.dataclass(frozen=True)
class Reply:
    """A finished turn as the user sees it, plus the tool pass for those who want it."""

    text: str
    turn: Turn
    finish_reason: str
    dropped_turns: int  # history turns cut from the prompt to fit the context
    tool_result: Any = None  # what `Tools.execute` returned (calls, errors, images), if commands ran


# The model sometimes starts the next human turn instead of ending its own: stop there.
ROLE_GUARDS = (sp.ROLE_HUMAN,)


class ChatSession:
    """Conversation state and the generate/tools loop.

    Args:
      generator: runs the model.
      tokenizer: `moss_jax.inference.tokenizer.Tokenizer` (encode, decode, token ids).
      max_len: the model's context length (prompt + reply).
      tools: the tool registry; None means no tools at all.
      tools_on: start with tools enabled (needs a plugin-trained model to be useful).
      sampling: decoding settings (MOSS defaults unless given).
      max_new_tokens: cap of each generation.
      tag: preference tag token written after `<|MOSS|>:` (tags.resolve_tag), None for none.
      stop_strings: extra strings that end the reply (besides `<|Human|>`).
      identity: the meta instruction's identity text (the capability list follows it).
    """

    def __init__(
        self,
        generator: TextGenerator,
        tokenizer: Any,
        max_len: int,
        *,
        tools: Tools | None = None,
        tools_on: bool = False,
        sampling: SamplingParams = MOSS_DEFAULTS,
        max_new_tokens: int = 512,
        tag: str | None = None,
        stop_strings: Sequence[str] = (),
        identity: str = IDENTITY,
    ):
        if tools_on and tools is None:
            raise ValueError("tools_on=True needs a tools registry")
        self.generator = generator
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.tools = tools
        self.tools_on = tools_on
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.tag = tag
        self.stop_strings = tuple(stop_strings)
        self.identity = identity
        self.history: list[Turn] = []

    def reset(self) -> None:
        self.history = []

    def set_tools(self, on: bool) -> None:
        if on and self.tools is None:
            raise ValueError("no tools registry was given")
        self.tools_on = on

    def meta(self) -> str:
        if self.tools is None:
            return meta_instruction([], inner_thoughts=self.tools_on, identity=self.identity)
        lines = self.tools.capability_lines()
        if not self.tools_on:  # the switch turns every tool off, whatever the registry enables
            lines = [line.split(":")[0] + ": disabled." for line in lines]
        return meta_instruction(lines, inner_thoughts=self.tools_on, identity=self.identity)

    def _budgets(self) -> tuple[int, int]:
        """(prompt token budget, new-token cap): at least half the context stays for the prompt."""
        new = min(self.max_new_tokens, self.max_len // 2)
        return self.max_len - new, new

    def _prompt(self, turns: list[Turn]) -> tuple[list[int], int]:
        text, dropped = build_prompt(
            turns,
            meta=self.meta(),
            tools=self.tools_on,
            count_tokens=lambda s: len(self.tokenizer.encode(s)),
            max_tokens=self._budgets()[0],
            tag=self.tag,
        )
        return self.tokenizer.encode(text), dropped

    def prompt_ids(self, message: str) -> list[int]:
        """The first generation's prompt for `message` (raises PromptTooLongError); history unchanged."""
        return self._prompt(self.history + [Turn(human=message)])[0]

    def _generate(self, turns: list[Turn], stop_ids, stop_strings, on_text) -> tuple[Generation, int]:
        ids, dropped = self._prompt(turns)
        gen = self.generator.generate_text(
            ids,
            max_new_tokens=min(self._budgets()[1], self.max_len - len(ids)),
            stop_ids=stop_ids,
            stop_strings=stop_strings,
            sampling=self.sampling,
            on_text=on_text,
        )
        return gen, dropped

    def send(
        self,
        message: str,
        on_text: Callable[[str], None] | None = None,
        *,
        on_thoughts: Callable[[str], None] | None = None,
        on_tools: Callable[[Turn, Any], None] | None = None,
    ) -> Reply:
        """Answers `message`, streaming the reply text to `on_text`; the turn joins the history.

        With tools on, `on_thoughts` gets the first pass's raw text (inner thoughts, commands) as
        it is generated, and `on_tools(turn, tool_result)` is called once the commands ran (the
        result is None when none ran), before the reply is generated.
        """
        turn = Turn(human=message)
        turns = self.history + [turn]
        dropped, tool_result = 0, None
        if self.tools_on:
            # With a tag the reply must start after it: stop where the model writes `<|MOSS|>:`.
            stops = ROLE_GUARDS + ((sp.ROLE_MOSS + ":",) if self.tag is not None else ())
            first, dropped = self._generate(turns, [self.tokenizer.eoc_id, self.tokenizer.eom_id], stops, on_thoughts)
            thoughts, commands, direct_reply = parse_tool_pass(first.text)
            if direct_reply is not None:  # the model skipped the commands and answered
                turn.thoughts, turn.commands, turn.results = thoughts, NONE, NONE
                if on_tools is not None:
                    on_tools(turn, None)
                turn.moss = direct_reply
                if on_text is not None:
                    on_text(direct_reply)
                self.history.append(turn)
                return Reply(direct_reply, turn, first.finish_reason, dropped)
            turn.thoughts, turn.commands = thoughts, commands
            if commands == NONE:
                turn.results = NONE
            else:
                tool_result = self.tools.execute(commands)
                turn.results = tool_result.text
            if on_tools is not None:
                on_tools(turn, tool_result)
        stops = ROLE_GUARDS + self.stop_strings
        reply, dropped2 = self._generate(turns, [self.tokenizer.eom_id], stops, _strip_leading_space(on_text))
        turn.moss = reply.text.strip()
        self.history.append(turn)
        return Reply(turn.moss, turn, reply.finish_reason, max(dropped, dropped2), tool_result)


def parse_tool_pass(text: str) -> tuple[str, str, str | None]:
    """(thoughts, commands, direct reply or None) from the text after `<|Inner Thoughts|>:`."""
    thoughts, _, rest = text.partition(sp.END_OF_THOUGHTS)
    moss_marker = sp.ROLE_MOSS + ":"
    if moss_marker in thoughts + rest and sp.ROLE_COMMANDS + ":" not in thoughts + rest:
        before, _, reply = (thoughts + rest).partition(moss_marker)
        return before.strip() or NONE, NONE, reply.replace(sp.END_OF_MOSS, "").strip()
    commands = NONE
    marker = sp.ROLE_COMMANDS + ":"
    if marker in rest:
        commands = rest.split(marker, 1)[1].replace(sp.END_OF_COMMANDS, "").strip() or NONE
    return thoughts.strip() or NONE, commands, None


def _strip_leading_space(on_text: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """The reply follows `<|MOSS|>:` with a space; users should not see it."""
    if on_text is None:
        return None
    started = False

    def wrapped(delta: str) -> None:
        nonlocal started
        if not started:
            delta = delta.lstrip()
            started = bool(delta)
        if delta:
            on_text(delta)

    return wrapped
