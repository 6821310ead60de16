"""Conversation format compliance: replies end with the right end token, no invented role names.

For each held-out human message the model answers in MOSS's chat format (our meta instruction,
tools off, prompt ending with `<|MOSS|>:`; or, with `plugin=True`, tools on and the prompt ending
with `<|Inner Thoughts|>:`). A reply complies when

- chat: it ends with `<eom>` within the token budget, and contains no role marker
  (`<|Human|>`, `<|MOSS|>`, an invented `<|Assistant|>` ...) and no other end token;
- plugin: it is `thoughts<eot>\\n<|Commands|>: ...<eoc>` (the first pass of the tool loop), with
  no other role marker or end token; a reply that answers directly (`... <|MOSS|>: ...<eom>`)
  also complies, as the chat session accepts it.

Messages come from JSON lines: moss-003-sft-data records (every turn's `Human` field) or
`{"human": "..."}` objects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from data_pipelines import specials as sp
from moss_jax.eval.lm import EvalError, EvalModel

ROLE_MARKER = re.compile(r"<\|[^|<>\n]{1,40}\|>")
KNOWN_ROLES = (sp.ROLE_HUMAN, sp.ROLE_THOUGHTS, sp.ROLE_COMMANDS, sp.ROLE_RESULTS, sp.ROLE_MOSS)
QUALITY_TAG = re.compile(r"<\|quality_\d+\|>")


def read_messages(path: str | Path, limit: int | None = None) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"conversation file {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{n}: not JSON ({e.msg})") from e
            if isinstance(record, dict) and isinstance(record.get("human"), str):
                out.append(record["human"])
            elif isinstance(record, dict) and isinstance(record.get("chat"), dict):
                for turn_name, turn in record["chat"].items():
                    human = turn.get("Human") if isinstance(turn, dict) else None
                    if not isinstance(human, str):
                        raise EvalError(f"{path}:{n}: chat.{turn_name}.Human missing or not a string")
                    human = human.strip()
                    human = human.removeprefix(sp.ROLE_HUMAN + ":").removesuffix(sp.END_OF_HUMAN).strip()
                    out.append(human)
            else:
                raise EvalError(f"{path}:{n}: expected {{'human': str}} or a moss-003-sft record with 'chat'")
    if not out:
        raise EvalError(f"{path}: no messages")
    return out[:limit]


def check_reply(reply: str, plugin: bool = False) -> list[str]:
    """The format problems of one generated reply (empty list: compliant)."""
    problems = []
    text = QUALITY_TAG.sub("", reply).rstrip()
    if plugin and sp.ROLE_MOSS in text:  # answered in the first pass
        if not text.endswith(sp.END_OF_MOSS):
            problems.append("does not end with <eom>")
        allowed_roles = {sp.ROLE_MOSS, sp.ROLE_COMMANDS, sp.ROLE_RESULTS}
        allowed_ends = {sp.END_OF_THOUGHTS, sp.END_OF_COMMANDS, sp.END_OF_RESULTS, sp.END_OF_MOSS}
    elif plugin:  # thoughts and commands
        if not text.endswith(sp.END_OF_COMMANDS):
            problems.append("does not end with <eoc>")
        elif sp.END_OF_THOUGHTS + "\n" + sp.ROLE_COMMANDS + ":" not in text:
            problems.append("no '<eot>\\n<|Commands|>:' before the commands")
        allowed_roles, allowed_ends = {sp.ROLE_COMMANDS}, {sp.END_OF_THOUGHTS, sp.END_OF_COMMANDS}
    else:
        if not text.endswith(sp.END_OF_MOSS):
            problems.append("does not end with <eom>")
        allowed_roles, allowed_ends = set(), {sp.END_OF_MOSS}
    for marker in ROLE_MARKER.findall(text):
        if marker not in KNOWN_ROLES:
            problems.append(f"invented role name {marker}")
        elif marker not in allowed_roles:
            problems.append(f"writes another role's turn ({marker})")
    for end in sp.END_TOKENS:
        count = text.count(end)
        if end not in allowed_ends and count:
            problems.append(f"stray {end}")
        elif end in (sp.END_OF_MOSS, sp.END_OF_COMMANDS) and count > 1:
            problems.append(f"{end} {count} times")
    return problems


def evaluate(
    model: EvalModel,
    messages: Sequence[str],
    *,
    plugin: bool = False,
    max_new_tokens: int = 128,
    end_ids: Sequence[int] = (),
) -> dict:
    """Compliance rate over the messages, with the problems counted by kind and a few examples.

    `end_ids`: the token ids generation stops at (the CLI passes `<eom>`, and `<eoc>` with
    `plugin`); `EvalModel.generate` ends a reply that stopped at one with that token's text.
    """
    from moss_jax.inference.prompt import IDENTITY, Turn, meta_instruction, render_turn

    meta = IDENTITY if not plugin else meta_instruction(["Calculator: enabled. API: Calculate(expression)"], True)
    prompts = [meta + render_turn(Turn(human=m), tools=plugin) for m in messages]
    # Stop at the end token; a reply that stopped there ends with its text (`... <eom>`), one that
    # ran out of max_new_tokens does not, and is flagged.
    replies = model.generate(prompts, max_new_tokens, stop_ids=list(end_ids))
    kinds: dict[str, int] = {}
    examples = []
    ok = 0
    for m, r in zip(messages, replies, strict=True):
        problems = check_reply(r, plugin)
        ok += not problems
        for p in problems:
            key = re.sub(r"\(.*\)|<\|[^|]*\|>", "", p).strip()
            kinds[key] = kinds.get(key, 0) + 1
        if problems and len(examples) < 5:
            examples.append({"message": m[:200], "reply": r[:300], "problems": problems})
    return {
        "mode": "plugin" if plugin else "chat",
        "compliance": ok / len(messages),
        "replies": len(messages),
        "problems": kinds,
        "examples": examples,
    }
