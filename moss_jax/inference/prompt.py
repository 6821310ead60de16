"""MOSS prompts: our meta instruction, the turn format, and history cut to fit the context.

    <meta instruction>
    <|Human|>: ...<eoh>\\n
    <|Inner Thoughts|>: ...<eot>\\n        (tools on)
    <|Commands|>: ...<eoc>\\n              (tools on)
    <|Results|>:\\n...\\n<eor>\\n            (tools on)
    <|MOSS|>: ...<eom>\\n

A prompt always ends with the role the model must write next (`<|MOSS|>:`, or
`<|Inner Thoughts|>:` when tools are on): the released demos left it out and the model then
invented role names. A preference tag (tags.py) goes right after the `<|MOSS|>:` the model
continues from, with no space, as in preference-aware training; earlier turns are rendered
without tags (the server only knows their text, and training drops some tags too).

The meta instruction text is ours (MOSS_SPEC: do not copy the released one); its capability
list has one line per tool and the inner-thoughts switch, as in the SFT data.

Prompts are built as parts (`render_turn_parts`, `build_prompt`): the template's role markers,
end tokens and tag are trusted; the meta instruction, messages, thoughts, commands, tool results
and replies are not, and `Tokenizer.encode_parts` never lets a special string in them (a snippet
holding `<eor>`) become a special id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from data_pipelines import specials as sp
from moss_jax.inference.tokenizer import Part

IDENTITY = (
    "You are MOSS, a conversational AI assistant built by an open research team.\n"
    "- MOSS is helpful, honest and careful: it answers what it knows, says plainly when it does not know, "
    "and does not make up facts, sources or tool results.\n"
    "- MOSS replies in the language the human writes in (English or Chinese) and keeps answers focused.\n"
    "- MOSS declines requests that would cause harm, and explains briefly why.\n"
    "- MOSS can write and explain code; code goes in fenced blocks.\n"
)
CAPABILITIES_HEADER = "Capabilities and tools available to MOSS:\n"
NONE = "None"


@dataclasses.dataclass
class Turn:
    """One exchange. `moss is None` marks the turn being generated."""

    human: str
    thoughts: str | None = None
    commands: str | None = None
    results: str | None = None  # the <|Results|> body; "None" when no tool ran
    moss: str | None = None


def meta_instruction(capability_lines: Sequence[str], inner_thoughts: bool, identity: str = IDENTITY) -> str:
    """Identity and rules, then one line per capability (tools enabled with their API, or disabled)."""
    lines = [f"- Inner thoughts: {'enabled' if inner_thoughts else 'disabled'}."]
    lines += [f"- {line}" for line in capability_lines]
    return identity + CAPABILITIES_HEADER + "\n".join(lines) + "\n"


def _results_block(body: str) -> list[Part]:
    if body.strip() == NONE:
        return [Part(f"{sp.ROLE_RESULTS}: {NONE}{sp.END_OF_RESULTS}\n", True)]
    return [Part(f"{sp.ROLE_RESULTS}:\n", True), Part(body, False), Part(f"\n{sp.END_OF_RESULTS}\n", True)]


def render_turn_parts(turn: Turn, *, tools: bool, collapse_results: bool = False, tag: str | None = None) -> list[Part]:
    """`render_turn` as parts: the template's markers and end tokens are trusted, every text field
    (human message, thoughts, commands, tool results, reply) is not (tokenizer.encode_parts)."""
    out = [Part(f"{sp.ROLE_HUMAN}: ", True), Part(turn.human, False), Part(f"{sp.END_OF_HUMAN}\n", True)]
    if tools:
        if turn.thoughts is None and turn.moss is None:
            return out + [Part(f"{sp.ROLE_THOUGHTS}:", True)]
        out += [Part(f"{sp.ROLE_THOUGHTS}: ", True), Part(turn.thoughts or NONE, False)]
        out += [Part(f"{sp.END_OF_THOUGHTS}\n{sp.ROLE_COMMANDS}: ", True), Part(turn.commands or NONE, False)]
        out += [Part(f"{sp.END_OF_COMMANDS}\n", True)]
        results = NONE if collapse_results or turn.results is None else turn.results
        out += _results_block(results)
    out.append(Part(f"{sp.ROLE_MOSS}:", True))
    if turn.moss is not None:
        out += [Part(" ", True), Part(turn.moss, False), Part(f"{sp.END_OF_MOSS}\n", True)]
    elif tag is not None:
        out.append(Part(tag, True))
    return out


def render_turn(turn: Turn, *, tools: bool, collapse_results: bool = False, tag: str | None = None) -> str:
    """One turn as text; a pending turn (moss None) ends with the role the model writes next.

    Args:
      tools: render the inner-thoughts/commands/results fields (the plugin format). A finished
        turn without them (e.g. an earlier reply sent to the server) gets "None" for each.
      collapse_results: replace the results body with "None" (earlier turns, to save context,
        as the deployed MOSS service did).
      tag: preference tag token written right after a pending turn's `<|MOSS|>:`.
    """
    return "".join(p.text for p in render_turn_parts(turn, tools=tools, collapse_results=collapse_results, tag=tag))


class PromptTooLongError(ValueError):
    """Even the meta instruction and the current turn alone do not fit the token budget.

    Args:
      needed: tokens of the meta instruction plus the current turn.
      limit: the budget they had to fit.
      why: appended to the message (what the budget is made of).
    """

    def __init__(self, needed: int, limit: int, why: str = ""):
        super().__init__(
            f"the meta instruction plus the current message need {needed} tokens; the limit is {limit}{why}"
        )
        self.needed = needed
        self.limit = limit


def reply_budget_why(max_len: int, reply_tokens: int) -> str:
    """`PromptTooLongError`'s `why` for a prompt budget of the context minus the reply's tokens
    (the terminal chat, the server with and without tools all word it so)."""
    return f" (the {max_len}-token context minus {reply_tokens} reply tokens)"


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A built prompt: its parts (for `Tokenizer.encode_parts`), their ids, and the history cut."""

    parts: tuple[Part, ...]
    ids: list[int]
    dropped: int  # leading turns cut to fit the budget

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts)


def build_prompt(
    turns: Sequence[Turn],
    *,
    meta: str,
    tools: bool,
    encode: Callable[[Sequence[Part]], Sequence[int]],
    max_tokens: int,
    tag: str | None = None,
    why: str = "",
) -> Prompt:
    """The prompt, history cut oldest first (whole turns) until it has at most `max_tokens` ids.

    History is cut at whole turns (each starts at `<|Human|>`); the last turn is the pending
    one and is never dropped. `tag` follows the pending turn's `<|MOSS|>:` (not its
    `<|Inner Thoughts|>:`: the tag belongs to the reply).

    Args:
      meta: the meta instruction; encoded as untrusted text (a client's system message may be
        part of it; our own text holds no special strings, so its ids are unchanged).
      encode: parts -> ids, normally `Tokenizer.encode_parts`, which keeps special strings in
        untrusted text from becoming special ids.
      why: what `max_tokens` is made of, for the error (e.g. `reply_budget_why(...)`).

    Raises:
      PromptTooLongError: the meta instruction and the pending turn alone need more than `max_tokens`.
    """
    if not turns or turns[-1].moss is not None:
        raise ValueError("the last turn must be the pending one (moss=None)")
    last = len(turns) - 1
    rendered = [
        render_turn_parts(t, tools=tools, collapse_results=i < last, tag=tag if i == last else None)
        for i, t in enumerate(turns)
    ]
    head = [Part(meta, False)]
    for dropped in range(len(turns)):
        parts = tuple(head + [p for turn_parts in rendered[dropped:] for p in turn_parts])
        ids = list(encode(parts))
        if len(ids) <= max_tokens:
            return Prompt(parts, ids, dropped)
    raise PromptTooLongError(len(ids), max_tokens, why)
