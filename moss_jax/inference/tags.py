"""Preference tags at inference: the quality tag placed right after `<|MOSS|>:` (MOSS_SPEC section 4).

Preference-aware training puts a tag token `<|quality_i|>` (i = 0 is the worst of K levels)
right after the `<|MOSS|>:` marker, with no space (data_pipelines/conversation.py). At inference
the chat and the server ask for one level by writing its tag after the `<|MOSS|>:` the model
continues from. The preference-aware stage saves next to the exported params:

    preference_tags.json = {"num_tags": K, "tokens": ["<|quality_0|>", ...], "best": "<|quality_K-1|>",
                            "thresholds": [...]}

A tag choice is "best" (the default when that file exists), "none" (the default otherwise),
"auto" (whichever of the two is the default) or an index i.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from data_pipelines import specials as sp

TAGS_FILE = "preference_tags.json"
NAMED_CHOICES = ("auto", "best", "none")

TagChoice = str | int  # "auto" | "best" | "none" | an index


class TagError(ValueError):
    """An invalid tag choice or preference_tags.json."""


@dataclasses.dataclass(frozen=True)
class PreferenceTags:
    """The tags a checkpoint was trained with: `tokens[i]` is level i (0 worst), `best` the one to ask for."""

    tokens: tuple[str, ...]
    best: str
    thresholds: tuple[float, ...] = ()

    def __post_init__(self):
        k = len(self.tokens)
        if not 1 <= k <= sp.MAX_QUALITY_TAGS or self.tokens != sp.QUALITY_TAGS[:k]:
            raise TagError(f"tokens must be the first K (1..{sp.MAX_QUALITY_TAGS}) quality tags, got {self.tokens}")
        if self.best not in self.tokens:
            raise TagError(f"best tag {self.best!r} is not one of {self.tokens}")

    @property
    def num_tags(self) -> int:
        return len(self.tokens)


def load_preference_tags(checkpoint_dir: str | os.PathLike) -> PreferenceTags | None:
    """The checkpoint's `preference_tags.json`, or None when it has none; TagError when malformed."""
    path = Path(checkpoint_dir) / TAGS_FILE
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        tokens = tuple(obj["tokens"])
        if obj.get("num_tags", len(tokens)) != len(tokens):
            raise TagError(f"num_tags={obj['num_tags']} but {len(tokens)} tokens")
        return PreferenceTags(tokens, obj["best"], tuple(float(t) for t in obj.get("thresholds", ())))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise TagError(f"{path}: not a valid preference tags file ({type(e).__name__}: {e})") from None


def parse_tag_choice(value: Any) -> TagChoice:
    """A choice from a flag or a request field: "auto", "best", "none", or an index (int or digits)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TagError(f"a tag choice is 'best', 'none', 'auto' or an index, got {value!r}")
    if isinstance(value, str) and value not in NAMED_CHOICES:
        raise TagError(f"a tag choice is 'best', 'none', 'auto' or an index, got {value!r}")
    return value


def resolve_tag(choice: TagChoice, tags: PreferenceTags | None) -> str | None:
    """The tag token to write after `<|MOSS|>:`, or None for no tag.

    Without a preference_tags.json an index may still name one of the tag tokens reserved in
    the vocabulary (0..MAX_QUALITY_TAGS-1); "best" needs the file (it alone knows K).
    """
    choice = parse_tag_choice(choice)
    if choice == "none" or (choice == "auto" and tags is None):
        return None
    if choice in ("best", "auto"):
        if tags is None:
            raise TagError(f"tag 'best' needs the checkpoint's {TAGS_FILE} (written by preference-aware training)")
        return tags.best
    limit = tags.num_tags if tags is not None else sp.MAX_QUALITY_TAGS
    if not 0 <= choice < limit:
        raise TagError(f"tag index must be in [0, {limit}), got {choice}")
    return sp.QUALITY_TAGS[choice]


def check_tag_token(tag: str | None, tokenizer: Any) -> None:
    """Raises TagError when the tokenizer has no single token for `tag` (e.g. the released BPE files)."""
    if tag is None:
        return
    try:
        tokenizer.token_id(tag)
    except ValueError as e:
        raise TagError(f"this tokenizer cannot write the tag: {e}") from None
