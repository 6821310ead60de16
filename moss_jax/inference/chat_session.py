"""A multi-turn MOSS conversation: history, the tools switch and the tool loop.

With tools on, one user message takes two generations (MOSS_SPEC section 3):

    ... <|Inner Thoughts|>:   -> generate to <eoc>: " thoughts<eot>\\n<|Commands|>: Search(\\"q\\")"
    run the commands, append <|Results|>:\\n...\\n<eor>\\n<|MOSS|>:
    -> generate to <eom>: the reply (streamed)

The first pass also stops where the model starts its reply itself (`<|MOSS|>:`, having skipped
its commands): the turn then gets commands and results "None", and the reply is always written
by the reply pass, with the caller's token cap, stop strings and preference tag (tags.py: the
reply continues from `<|MOSS|>:<|quality_i|>`).

Token budget of a tool turn (context `max_len`, reply cap `max_new_tokens`): the reply prompt
may use `max_len - max_new_tokens` tokens, and it holds the first prompt plus the thoughts,
commands and results. So the first prompt's history is cut to leave `tool_pass_tokens` (the
first pass's cap) plus `results_tokens` free, or, when the message alone leaves less, at least
MIN_TOOL_PASS_TOKENS + MIN_RESULTS_TOKENS (otherwise PromptTooLongError, before anything
runs); results (then thoughts, then commands) that still do not fit are cut, with TRUNCATED
at the cut. The reply pass therefore always fits and always gets `max_new_tokens`.

Tools are reached through `Tools` (capability lines + execute), which `moss_jax.tools.ToolRegistry`
satisfies; a registry with every tool disabled works (all commands give "None"). Generation is
reached through `TextGenerator`, so the same session runs on a local decoder or the server's
batching engine.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from data_pipelines import specials as sp
from moss_jax.inference.prompt import (
    IDENTITY,
    NONE,
    Prompt,
    PromptTooLongError,
    Turn,
    build_prompt,
    meta_instruction,
    render_turn_parts,
    reply_budget_why,
)
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
# Least room a tool turn keeps for the first pass (thoughts and commands) and for the results.
MIN_TOOL_PASS_TOKENS = 32
MIN_RESULTS_TOKENS = 32
# Written where a tool pass field was cut to fit the context (the model and the client see it).
TRUNCATED = " [truncated]"
# Joining rendered parts can tokenize a few ids differently at their boundaries.
_BOUNDARY_SLACK = 8

logger = logging.getLogger(__name__)


class ChatSession:
    """Conversation state and the generate/tools loop.

    Args:
      generator: runs the model.
      tokenizer: `moss_jax.inference.tokenizer.Tokenizer` (encode_parts, decode, token ids).
      max_len: the model's context length (prompt + reply).
      tools: the tool registry; None means no tools at all.
      tools_on: start with tools enabled (needs a plugin-trained model to be useful).
      sampling: decoding settings (MOSS defaults unless given); every generation of the
        conversation draws from its own seed derived from `sampling.seed` (`seed_for`).
      max_new_tokens: cap of the reply, below `max_len`; the prompt gets the rest of the context.
      tag: preference tag token written after `<|MOSS|>:` (tags.resolve_tag), None for none.
      stop_strings: extra strings that end the reply (besides `<|Human|>`).
      identity: the meta instruction's identity text (the capability list follows it).
      tool_pass_tokens: cap of the first pass (inner thoughts and commands) with tools on.
      results_tokens: room for tool results that the history makes way for with tools on.
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
        tool_pass_tokens: int = 256,
        results_tokens: int = 512,
    ):
        if tools_on and tools is None:
            raise ValueError("tools_on=True needs a tools registry")
        if not 1 <= max_new_tokens < max_len:
            raise ValueError(
                f"max_new_tokens must be in [1, {max_len}) (below the context length), got {max_new_tokens}"
            )
        if tool_pass_tokens < MIN_TOOL_PASS_TOKENS or results_tokens < MIN_RESULTS_TOKENS:
            raise ValueError(
                f"tool_pass_tokens and results_tokens must be at least {MIN_TOOL_PASS_TOKENS} and "
                f"{MIN_RESULTS_TOKENS}, got {tool_pass_tokens} and {results_tokens}"
            )
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
        self.tool_pass_tokens = tool_pass_tokens
        self.results_tokens = results_tokens
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

    @property
    def reply_prompt_limit(self) -> int:
        """The most prompt tokens the reply generation may have: the context minus `max_new_tokens`."""
        return self.max_len - self.max_new_tokens

    def first_pass(self, message: str) -> tuple[list[int], int]:
        """(prompt ids, new-token cap) of the first generation for `message`; history unchanged.

        Raises PromptTooLongError when the message does not fit (with tools on: together with
        the least room for the tool pass), so a caller can refuse it before anything runs.
        """
        prompt, cap = self._first(self.history + [Turn(human=message)])
        return prompt.ids, cap

    def _build(self, turns: list[Turn], max_tokens: int) -> Prompt:
        return build_prompt(
            turns,
            meta=self.meta(),
            tools=self.tools_on,
            encode=self.tokenizer.encode_parts,
            max_tokens=max_tokens,
            tag=self.tag,
        )

    def _tool_overhead(self) -> int:
        """Tokens a tool turn's reply prompt adds to its first prompt, besides the text of the
        thoughts, commands and results: markers, end tokens, the tag, three TRUNCATED markers."""
        encode = self.tokenizer.encode_parts
        cut = Turn("", thoughts=TRUNCATED.strip(), commands=TRUNCATED.strip(), results=TRUNCATED.strip())
        reply = encode(render_turn_parts(cut, tools=True, tag=self.tag))
        first = encode(render_turn_parts(Turn(""), tools=True))
        return len(reply) - len(first) + _BOUNDARY_SLACK

    def _first(self, turns: list[Turn]) -> tuple[Prompt, int]:
        limit = self.reply_prompt_limit
        if not self.tools_on:
            try:
                return self._build(turns, limit), self.max_new_tokens
            except PromptTooLongError as e:
                why = reply_budget_why(self.max_len, self.max_new_tokens)
                raise PromptTooLongError(e.needed, e.limit, why) from None
        room = limit - self._tool_overhead()  # the first prompt plus thoughts, commands and results
        try:
            prompt = self._build(turns, room - self.tool_pass_tokens - self.results_tokens)
        except PromptTooLongError:
            least = MIN_TOOL_PASS_TOKENS + MIN_RESULTS_TOKENS
            try:
                prompt = self._build(turns[-1:], room - least)
            except PromptTooLongError as e:
                why = (
                    f" (with tools on: the {self.max_len}-token context minus {self.max_new_tokens} reply tokens "
                    f"minus {limit - e.limit} kept for inner thoughts, commands and tool results)"
                )
                raise PromptTooLongError(e.needed, e.limit, why) from None
            prompt = dataclasses.replace(prompt, dropped=len(turns) - 1)
        left = room - len(prompt.ids)
        cap = min(self.tool_pass_tokens, max(MIN_TOOL_PASS_TOKENS, left - self.results_tokens, left // 3))
        return prompt, cap

    def _reply_prompt(self, turns: list[Turn]) -> Prompt:
        """The reply pass's prompt; a tool turn that does not fit is cut, results first."""
        limit = self.reply_prompt_limit
        try:
            return self._build(turns, limit)
        except PromptTooLongError:
            pass
        turn = turns[-1]
        for field in ("results", "thoughts", "commands"):
            if (getattr(turn, field) or NONE) == NONE:
                continue  # nothing to cut
            fits = self._cut_to_fit(turn, field, limit)
            logger.warning("cut the tool pass's %s to fit the %d-token context", field, self.max_len)
            if fits:
                break
        return self._build(turns, limit)  # the turn alone fits now (the first pass left room for it)

    def _cut_to_fit(self, turn: Turn, field: str, limit: int) -> bool:
        """Sets `turn.<field>` to its longest prefix (plus TRUNCATED) with which the turn alone
        fits `limit` and returns True; with none, leaves just the marker and returns False."""
        text = getattr(turn, field) or NONE

        def fits(n: int) -> bool:
            setattr(turn, field, (text[:n] + TRUNCATED).strip())
            try:
                self._build([turn], limit)
                return True
            except PromptTooLongError:
                return False

        if not fits(0):
            return False
        lo, hi = 0, len(text)  # fits(lo); the whole text did not fit
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return fits(lo)

    def seed_for(self, turn: int, *, tool_pass: bool) -> int:
        """The sampling seed of one generation: turn `turn` (0-based, counting the history) draws
        its reply from `seed + 2 * turn` and its tool pass from `seed + 2 * turn + 1`.

        Each generation of a conversation gets its own random stream (one seed for all of them
        would repeat the same per-step draws in every pass and turn), and the same `seed` replays
        the same conversation; a first reply without tools uses `seed` itself, as `generate` does.
        """
        return self.sampling.seed + 2 * turn + (1 if tool_pass else 0)

    def _generate(self, ids: list[int], cap: int, stop_ids, stop_strings, on_text, seed: int) -> Generation:
        return self.generator.generate_text(
            ids,
            max_new_tokens=cap,
            stop_ids=stop_ids,
            stop_strings=stop_strings,
            sampling=dataclasses.replace(self.sampling, seed=seed),
            on_text=on_text,
        )

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
        result is None when none ran), before the reply is generated; `turn.results` is then what
        the model reads (cut with TRUNCATED if it did not fit).

        Raises:
          PromptTooLongError: the message does not fit; raised before any generation or tool.
        """
        turn = Turn(human=message)
        index = len(self.history)  # this turn's place in the conversation: its generations' seeds
        turns = self.history + [turn]
        first, cap = self._first(turns)
        prompt, tool_result = first, None
        reply_stops = ROLE_GUARDS + self.stop_strings
        if self.tools_on:
            stops = ROLE_GUARDS + (sp.ROLE_MOSS + ":",)  # the reply is the reply pass's job
            stop_ids = [self.tokenizer.eoc_id, self.tokenizer.eom_id]
            gen = self._generate(first.ids, cap, stop_ids, stops, on_thoughts, self.seed_for(index, tool_pass=True))
            turn.thoughts, turn.commands = parse_tool_pass(gen.text)
            if turn.commands == NONE:
                turn.results = NONE
            else:
                tool_result = self.tools.execute(turn.commands)
                turn.results = tool_result.text
            prompt = self._reply_prompt(turns)
            if on_tools is not None:
                on_tools(turn, tool_result)
        reply = self._generate(
            prompt.ids,
            self.max_new_tokens,
            [self.tokenizer.eom_id],
            reply_stops,
            _strip_leading_space(on_text),
            self.seed_for(index, tool_pass=False),
        )
        turn.moss = reply.text.strip()
        self.history.append(turn)
        return Reply(turn.moss, turn, reply.finish_reason, max(first.dropped, prompt.dropped), tool_result)


def parse_tool_pass(text: str) -> tuple[str, str]:
    """(thoughts, commands) from the first pass's text, the text after `<|Inner Thoughts|>:`.

    The thoughts end at `<eot>` or, when the model left it out, where `<|Commands|>:` starts;
    anything from `<|MOSS|>:` on (a reply the model started itself) is not part of the pass.
    Missing parts are "None".
    """
    text = text.split(sp.ROLE_MOSS + ":", 1)[0]
    marker = sp.ROLE_COMMANDS + ":"
    ends = [i for i in (text.find(sp.END_OF_THOUGHTS), text.find(marker)) if i >= 0]
    cut = min(ends, default=len(text))
    thoughts, rest = text[:cut], text[cut:]
    commands = NONE
    if marker in rest:
        commands = rest.split(marker, 1)[1].replace(sp.END_OF_COMMANDS, "").strip() or NONE
    return thoughts.strip() or NONE, commands


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
