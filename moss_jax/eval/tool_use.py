"""Tool-command accuracy: does the model emit the right command with the right argument?

Each held-out question (a JSON line: "human", the expected "command", optional "kind", "lang"
and "meta_instruction") is put in the plugin prompt the chat builds,

    <meta instruction><|Human|>: question<eoh>\\n<|Inner Thoughts|>:

the model generates (greedy) until `<eoc>`, and the text after `<|Commands|>:` is compared with
the expected command. A match is exact after parsing both into canonical form
(`moss_jax.tools.commands`: tool name and argument string equal); a reply whose commands do not
parse, or that calls another tool or another argument, is a miss (an expected command that does
not parse could never match: `read_questions` refuses it). The command is written before
the reply's `<|MOSS|>:` (where preference tags go), so this measures the tool decision itself.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import Any

from data_pipelines import specials as sp
from data_pipelines.jsonl import iter_jsonl
from moss_jax.inference.prompt import IDENTITY, Turn, meta_instruction, render_turn
from moss_jax.tools.commands import parse_commands
from moss_jax.tools.errors import CommandParseError

DEFAULT_META = meta_instruction(
    ["Web search: enabled. API: Search(query)", "Calculator: enabled. API: Calculate(expression)",
     "Equation solver: enabled. API: Solve(equation)", "Text-to-image: disabled."],
    inner_thoughts=True,
    identity=IDENTITY,
)  # fmt: skip


def command_prompt(human: str, meta: str) -> str:
    """The plugin prompt for one question, ending with `<|Inner Thoughts|>:`."""
    return meta + render_turn(Turn(human=human), tools=True)


def extract_commands(generated: str) -> str | None:
    """The commands text the model wrote after `<|Commands|>:` (None when it wrote none)."""
    marker = sp.ROLE_COMMANDS + ":"
    at = generated.find(marker)
    if at < 0:
        return None
    return generated[at + len(marker) :].split(sp.END_OF_COMMANDS)[0].strip()


def canonical(commands: str | None) -> tuple | None:
    """Commands text -> tuple of (tool, argument) pairs; None if it does not parse."""
    if commands is None:
        return None
    if commands.strip() == "None":
        return ()
    try:
        parsed = parse_commands(commands)
    except Exception:  # any parse failure is a miss, never a crash of the evaluation
        return None
    return tuple((c.name, c.argument) for c in parsed)


def read_questions(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The questions of a JSON lines file; ValueError naming file:line for a missing field or
    an expected command that does not parse (it could never be matched)."""
    out = []
    for p, lineno, obj in iter_jsonl([path]):
        for field in ("human", "command"):
            if not isinstance(obj.get(field), str):
                raise ValueError(f"{p}:{lineno}: a tool question needs a string field {field!r}")
        try:
            parse_commands(obj["command"])
        except CommandParseError as e:
            raise ValueError(f"{p}:{lineno}: expected command {obj['command']!r} does not parse ({e})") from e
        out.append(obj)
        if limit is not None and len(out) >= limit:
            break
    return out


def exact_match(generate: Any, questions: Sequence[dict], meta: str | None = None, max_new_tokens: int = 64) -> dict:
    """Runs the questions through `generate(prompts, max_new_tokens, stop_strings) -> texts`.

    Returns {"exact_match", "n", "by_kind": {kind: accuracy}, "examples": [...]}; the examples
    keep every question's expected and emitted command.
    """
    if not questions:
        raise ValueError("no tool questions to evaluate")
    prompts = [command_prompt(q["human"], q.get("meta_instruction") or meta or DEFAULT_META) for q in questions]
    texts = generate(prompts, max_new_tokens, [sp.END_OF_COMMANDS])
    hits, by_kind, examples = 0, collections.defaultdict(list), []
    for q, text in zip(questions, texts, strict=True):
        emitted = extract_commands(text)
        ok = emitted is not None and canonical(emitted) is not None and canonical(emitted) == canonical(q["command"])
        hits += ok
        by_kind[q.get("kind", "all")].append(ok)
        examples.append({"human": q["human"], "expected": q["command"], "emitted": emitted, "match": bool(ok)})
    return {
        "exact_match": hits / len(questions),
        "n": len(questions),
        "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "examples": examples,
    }


def evaluate(model: Any, questions_path: str | os.PathLike, limit: int | None = None, max_new_tokens: int = 64) -> dict:
    """The eval CLI's 'tools' suite: an `EvalModel` and a questions file."""
    return exact_match(model.generate, read_questions(questions_path, limit), max_new_tokens=max_new_tokens)
