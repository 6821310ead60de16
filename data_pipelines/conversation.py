"""MOSS conversations -> token ids and per-token loss weights.

Input: one moss-003-sft-data style record (MOSS_SPEC section 4):

    {"conversation_id": ..., "meta_instruction": "...", "num_turns": N, "category": ...,
     "chat": {"turn_1": {"Human": "<|Human|>: ...<eoh>\\n",
                         "Inner Thoughts": "<|Inner Thoughts|>: ...<eot>\\n",      (plugin data)
                         "Commands": "<|Commands|>: Search(\\"...\\")<eoc>\\n",      (plugin data)
                         "Tool Responses": "<|Results|>:\\n...\\n<eor>\\n",        (plugin data)
                         "MOSS": "<|MOSS|>: ...<eom>\\n"}, ...}}

Loss weights (documented choice; `MaskOptions`):
- meta instruction: 0;
- human turns: 0 by default (common practice); `train_human=True` reproduces the released MOSS
  mask, which trained them;
- inner thoughts and the MOSS reply: the role marker (`<|Inner Thoughts|>:`, `<|MOSS|>:`) is
  0 because the prompt supplies it at inference; the text and its end token (+ newline) are 1;
- commands: 1, marker included (the model writes `<|Commands|>:` itself after `<eot>`);
- tool results: the `<|Results|>:` prefix and `<eor>` (+ newline) are 1, the contents 0, as
  in the released mask.
With `train_human=True` every marker is trained too (the released behaviour: only the meta
instruction and the result contents are masked).

Conversations longer than `max_len` are cut at whole turns (never mid-turn); a record whose
meta instruction plus first turn does not fit, or whose kept tokens have no loss weight, is
dropped and counted in `ConversionStats`.
Preference pairs (`encode_pair`) instead drop context turns from the front, the same ones for
both sides. A malformed record (wrong JSON types included: a null turn, a string `num_turns`)
raises `ConversationError` naming the record, turn and field; so does an empty "Human" or
"MOSS" field (the optional plugin fields may be empty or null: the turn used no tool).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Mapping
from typing import Any, Protocol

from data_pipelines import specials as sp

TURN_FIELDS = ("Human", "Inner Thoughts", "Commands", "Tool Responses", "MOSS")
_MARKERS = {
    "Human": sp.ROLE_HUMAN + ":",
    "Inner Thoughts": sp.ROLE_THOUGHTS + ":",
    "Commands": sp.ROLE_COMMANDS + ":",
    "Tool Responses": sp.ROLE_RESULTS + ":",
    "MOSS": sp.ROLE_MOSS + ":",
}
_END = {
    "Human": sp.END_OF_HUMAN,
    "Inner Thoughts": sp.END_OF_THOUGHTS,
    "Commands": sp.END_OF_COMMANDS,
    "Tool Responses": sp.END_OF_RESULTS,
    "MOSS": sp.END_OF_MOSS,
}


class Vocab(Protocol):
    def encode(self, s: str) -> list[int]: ...


class ConversationError(ValueError):
    """A conversation record is malformed (the message names the record and field)."""


@dataclasses.dataclass(frozen=True)
class MaskOptions:
    train_human: bool = False


@dataclasses.dataclass(frozen=True)
class Segment:
    text: str
    weight: float
    kind: str


@dataclasses.dataclass
class ConversionStats:
    examples: int = 0
    dropped_too_long: int = 0
    dropped_untrained: int = 0
    truncated: int = 0
    turns_cut: int = 0

    def report(self) -> str:
        return (
            f"{self.examples} conversations kept, {self.truncated} cut at whole turns "
            f"({self.turns_cut} turns removed), {self.dropped_too_long} dropped (longer than max_len even with "
            f"the fewest turns), {self.dropped_untrained} dropped (no token with a loss weight)"
        )


_TURN_OBJECT = f"expected an object with fields among {TURN_FIELDS}"


def _describe(value: Any) -> str:
    """`value`'s JSON type and a short preview, for error messages: "null", "a string ('1')"."""
    if value is None:
        return "null"
    kind = {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )
    preview = repr(value)
    return f"{kind} ({preview[:60]}{'...' if len(preview) > 60 else ''})"


def _split_field(field: str, text: str, where: str) -> tuple[str, str, str]:
    """(marker, body, end) with end = end token plus anything after it (the newline)."""
    marker = _MARKERS[field]
    if not text.startswith(marker):
        raise ConversationError(f"{where}: {field!r} does not start with {marker!r}: {text[:60]!r}")
    end_at = text.rfind(_END[field])
    if end_at < len(marker):
        raise ConversationError(f"{where}: {field!r} does not contain its end token {_END[field]!r}")
    return marker, text[len(marker) : end_at], text[end_at:]


def turn_segments(
    turn: Mapping[str, str], options: MaskOptions, where: str = "turn", tag: str | None = None
) -> list[Segment]:
    """Segments of one turn with their loss weights (see module docstring).

    `tag` (a preference tag token) is placed right after `<|MOSS|>:`, with loss weight 0.
    """
    if not isinstance(turn, Mapping):
        raise ConversationError(f"{where}: is {_describe(turn)}, {_TURN_OBJECT}")
    unknown = set(turn) - set(TURN_FIELDS)
    if unknown:
        raise ConversationError(f"{where}: unknown field(s) {sorted(unknown)}; expected {TURN_FIELDS}")
    for required in ("Human", "MOSS"):
        if required not in turn:
            raise ConversationError(f"{where}: missing field {required!r}")
    out: list[Segment] = []
    released = options.train_human
    for field in TURN_FIELDS:
        text = turn.get(field)
        if field not in ("Human", "MOSS") and text is None:
            continue  # optional plugin fields may be null
        if not isinstance(text, str):
            raise ConversationError(f"{where}: field {field!r} is {_describe(text)}, expected a string")
        if not text:
            if field in ("Human", "MOSS"):
                raise ConversationError(f"{where}: field {field!r} is empty")
            continue  # an empty optional plugin field: the turn used no tool
        marker, body, end = _split_field(field, text, where)
        if field == "Human":
            w = 1.0 if released else 0.0
            out += [Segment(marker, w, "human"), Segment(body, w, "human"), Segment(end, w, "human")]
        elif field == "Tool Responses":
            out += [
                Segment(marker, 1.0, "results_format"),
                Segment(body, 0.0, "results"),
                Segment(end, 1.0, "results_format"),
            ]
        elif field == "Commands":
            out += [Segment(marker, 1.0, "commands"), Segment(body, 1.0, "commands"), Segment(end, 1.0, "commands")]
        else:
            kind = "thoughts" if field == "Inner Thoughts" else "moss"
            out.append(Segment(marker, 1.0 if released else 0.0, kind + "_marker"))
            if kind == "moss" and tag is not None:
                out.append(Segment(tag, 0.0, "tag"))
            out += [Segment(body, 1.0, kind), Segment(end, 1.0, kind)]
    return [s for s in out if s.text]


def record_turns(record: Mapping[str, Any], where: str = "record") -> list[Mapping[str, str]]:
    """The record's turns in order; checks the `chat` layout, `num_turns` and that every turn is an
    object (its fields are checked by `turn_segments`)."""
    chat = record.get("chat")
    if chat is not None and not isinstance(chat, Mapping):
        raise ConversationError(f"{where}: 'chat' is {_describe(chat)}, expected an object turn_1..turn_N")
    if not chat:
        raise ConversationError(f"{where}: missing or empty 'chat' object")
    keys = sorted(
        chat, key=lambda k: int(re.fullmatch(r"turn_(\d+)", k).group(1)) if re.fullmatch(r"turn_(\d+)", k) else -1
    )
    bad = [k for k in keys if not re.fullmatch(r"turn_\d+", k)]
    if bad:
        raise ConversationError(f"{where}: 'chat' keys must be turn_1..turn_N, got {bad}")
    numbers = [int(k[5:]) for k in keys]
    if numbers != list(range(1, len(keys) + 1)):
        raise ConversationError(f"{where}: turns are not numbered 1..{len(keys)}: {keys}")
    if "num_turns" in record:
        n = record["num_turns"]
        if isinstance(n, bool) or not isinstance(n, int):
            raise ConversationError(f"{where}: 'num_turns' is {_describe(n)}, expected an integer")
        if n != len(keys):
            raise ConversationError(f"{where}: num_turns={n} but 'chat' has {len(keys)} turns")
    for k in keys:
        if not isinstance(chat[k], Mapping):
            raise ConversationError(f"{where} {k}: is {_describe(chat[k])}, {_TURN_OBJECT}")
    return [chat[k] for k in keys]


def encode_conversation(
    record: Mapping[str, Any],
    vocab: Vocab,
    max_len: int,
    options: MaskOptions = MaskOptions(),
    stats: ConversionStats | None = None,
    where: str | None = None,
    tags: Mapping[int, str] | None = None,
) -> tuple[list[int], list[float]] | None:
    """Token ids and loss weights of a whole conversation, cut at whole turns to `max_len`.

    `tags` maps a turn number (1-based) to the preference tag token placed after its
    `<|MOSS|>:` (see `tag_for_turn`). Returns None (and counts it in `stats`) if not even the
    first turn fits, or if no kept token has a loss weight (nothing to train on).
    """
    where = where or f"conversation {record.get('conversation_id', '?')}"
    meta = record.get("meta_instruction", "")
    if not isinstance(meta, str):
        raise ConversationError(f"{where}: 'meta_instruction' is {_describe(meta)}, expected a string")
    ids: list[int] = list(vocab.encode(meta)) if meta else []
    weights: list[float] = [0.0] * len(ids)
    turns = record_turns(record, where)
    kept = 0
    for i, turn in enumerate(turns, 1):
        t_ids, t_w = _encode_segments(turn_segments(turn, options, f"{where} turn_{i}", tag=(tags or {}).get(i)), vocab)
        if len(ids) + len(t_ids) > max_len:
            break
        ids += t_ids
        weights += t_w
        kept += 1
    untrained = kept > 0 and not any(weights)
    if stats is not None:
        if kept == 0:
            stats.dropped_too_long += 1
        elif untrained:
            stats.dropped_untrained += 1
        else:
            stats.examples += 1
            if kept < len(turns):
                stats.truncated += 1
                stats.turns_cut += len(turns) - kept
    return (ids, weights) if kept and not untrained else None


def tag_for_turn(
    tag_index: int,
    conversation_id: Any,
    turn: int,
    dropout: float,
    seed: int,
    num_tags: int = sp.MAX_QUALITY_TAGS,
) -> str | None:
    """The tag token for a turn, or None when tag dropout removes it (deterministic per seed).

    `num_tags` is the run's K (the tag stage's `preference_tags.json`): a tag outside [0, K) is
    an error, not one of the other reserved tags. Dropout (5-10% in preference-aware training)
    keeps the model usable without a tag.
    """
    if not 1 <= num_tags <= sp.MAX_QUALITY_TAGS:
        raise ValueError(f"num_tags must be in [1, {sp.MAX_QUALITY_TAGS}], got {num_tags}")
    if isinstance(tag_index, bool) or not isinstance(tag_index, int) or not 0 <= tag_index < num_tags:
        raise ConversationError(
            f"conversation {conversation_id} turn {turn}: tag {tag_index!r} is outside [0, {num_tags}) "
            f"(this run has {num_tags} quality tags)"
        )
    if dropout and random.Random(f"{seed}:{conversation_id}:{turn}").random() < dropout:
        return None
    return sp.QUALITY_TAGS[tag_index]


def _encode_segments(segments: list[Segment], vocab: Vocab) -> tuple[list[int], list[float]]:
    ids: list[int] = []
    weights: list[float] = []
    for seg in segments:
        piece = list(vocab.encode(seg.text))
        ids += piece
        weights += [seg.weight] * len(piece)
    return ids, weights


def encode_pair(
    record: Mapping[str, Any],
    vocab: Vocab,
    max_len: int,
    options: MaskOptions = MaskOptions(),
    stats: ConversionStats | None = None,
    where: str | None = None,
) -> dict[str, tuple[list[int], list[float]]] | None:
    """A preference pair: the shared context with the chosen and the rejected final reply.

    Record: a conversation whose last turn has no "MOSS" field, plus "chosen" and "rejected"
    MOSS fields (`<|MOSS|>: ...<eom>\n`). Weights are 1 only on the final reply's text and end
    token (the response whose log-probability the reward model and DPO score). Context turns are
    dropped from the front, whole turns at a time, until the side with the LONGER reply fits
    `max_len`; both sides keep the same context (identical ids), so the pair differs only in the
    reply. A pair whose last turn alone does not fit is dropped and counted in `stats`; a pair
    that lost context turns is counted as truncated.
    """
    where = where or f"pair {record.get('conversation_id', '?')}"
    turns = record_turns(record, where)
    if "MOSS" in turns[-1]:
        raise ConversationError(f"{where}: the last turn must not have a 'MOSS' field (it comes from chosen/rejected)")
    replies = {}
    for side in ("chosen", "rejected"):
        replies[side] = record.get(side)
        if not isinstance(replies[side], str):
            raise ConversationError(f"{where}: missing string field {side!r}")
    meta = record.get("meta_instruction", "")
    if not isinstance(meta, str):
        raise ConversationError(f"{where}: 'meta_instruction' is {_describe(meta)}, expected a string")
    meta_ids = list(vocab.encode(meta)) if meta else []
    context = []  # every turn before the last, untrained
    for i, turn in enumerate(turns[:-1], 1):
        segs = turn_segments(turn, options, f"{where} turn_{i}")
        context.append(_encode_segments([Segment(s.text, 0.0, s.kind) for s in segs], vocab))
    last = {}  # the last turn with each reply: weight only on the reply's text and end token
    for side, reply in replies.items():
        segs = turn_segments(dict(turns[-1]) | {"MOSS": reply}, options, f"{where} turn_{len(turns)} ({side})")
        last[side] = _encode_segments(
            [Segment(s.text, s.weight if s.kind == "moss" else 0.0, s.kind) for s in segs], vocab
        )
    longest = max(len(ids) for ids, _ in last.values())
    # One start for both sides, sized by the longer reply: both keep the same context.
    start = 0
    while start < len(context) and len(meta_ids) + sum(len(t[0]) for t in context[start:]) + longest > max_len:
        start += 1
    if len(meta_ids) + sum(len(t[0]) for t in context[start:]) + longest > max_len:
        if stats is not None:
            stats.dropped_too_long += 1
        return None
    ctx_ids = meta_ids + [i for t in context[start:] for i in t[0]]
    ctx_weights = [0.0] * len(meta_ids) + [w for t in context[start:] for w in t[1]]
    out = {side: (ctx_ids + ids, ctx_weights + weights) for side, (ids, weights) in last.items()}
    if stats is not None:
        stats.examples += 1
        if start:
            stats.truncated += 1
            stats.turns_cut += start
    return out
