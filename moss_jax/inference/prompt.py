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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from data_pipelines import specials as sp

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


def _results_block(body: str) -> str:
    if body.strip() == NONE:
        return f"{sp.ROLE_RESULTS}: {NONE}{sp.END_OF_RESULTS}\n"
    return f"{sp.ROLE_RESULTS}:\n{body}\n{sp.END_OF_RESULTS}\n"


def render_turn(turn: Turn, *, tools: bool, collapse_results: bool = False, tag: str | None = None) -> str:
    """One turn as text; a pending turn (moss None) ends with the role the model writes next.

    Args:
      tools: render the inner-thoughts/commands/results fields (the plugin format). A finished
        turn without them (e.g. an earlier reply sent to the server) gets "None" for each.
      collapse_results: replace the results body with "None" (earlier turns, to save context,
        as the deployed MOSS service did).
      tag: preference tag token written right after a pending turn's `<|MOSS|>:`.
    """
    out = f"{sp.ROLE_HUMAN}: {turn.human}{sp.END_OF_HUMAN}\n"
    if tools:
        if turn.thoughts is None and turn.moss is None:
            return out + f"{sp.ROLE_THOUGHTS}:"
        out += f"{sp.ROLE_THOUGHTS}: {turn.thoughts or NONE}{sp.END_OF_THOUGHTS}\n"
        out += f"{sp.ROLE_COMMANDS}: {turn.commands or NONE}{sp.END_OF_COMMANDS}\n"
        results = NONE if collapse_results or turn.results is None else turn.results
        out += _results_block(results)
    out += f"{sp.ROLE_MOSS}:"
    if turn.moss is not None:
        out += f" {turn.moss}{sp.END_OF_MOSS}\n"
    elif tag is not None:
        out += tag
    return out


class PromptTooLongError(ValueError):
    """Even the meta instruction and the current turn alone do not fit the token budget."""


def build_prompt(
    turns: Sequence[Turn],
    *,
    meta: str,
    tools: bool,
    count_tokens: Callable[[str], int],
    max_tokens: int,
    tag: str | None = None,
) -> tuple[str, int]:
    """The prompt text and how many leading turns were dropped to fit `max_tokens`.

    History is cut at whole turns (each starts at `<|Human|>`), oldest first; the last turn
    is the pending one and is never dropped. `tag` follows the pending turn's `<|MOSS|>:`
    (not its `<|Inner Thoughts|>:`: the tag belongs to the reply).
    """
    if not turns or turns[-1].moss is not None:
        raise ValueError("the last turn must be the pending one (moss=None)")
    last = len(turns) - 1
    rendered = [
        render_turn(t, tools=tools, collapse_results=i < last, tag=tag if i == last else None)
        for i, t in enumerate(turns)
    ]
    for dropped in range(len(turns)):
        text = meta + "".join(rendered[dropped:])
        if count_tokens(text) <= max_tokens:
            return text, dropped
    raise PromptTooLongError(
        f"the meta instruction plus the current message need {count_tokens(meta + rendered[-1])} tokens; "
        f"the limit is {max_tokens}"
    )
