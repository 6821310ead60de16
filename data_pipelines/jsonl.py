"""Reading JSON-lines files: one object per line, malformed lines named by file and line."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence

log = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """A malformed input line (the message names the file and line)."""


def iter_jsonl(
    paths: Sequence[str | os.PathLike],
    skip_malformed: bool = False,
    counter: dict | None = None,
    check: Callable[[dict], str | None] | None = None,
) -> Iterator[tuple[str, int, dict]]:
    """Yields (path, line number, object) for every non-blank line.

    Lines are split at b"\\n" and decoded one by one (a UTF-8 byte-order mark on the first line
    is ignored). A line that is not valid UTF-8, not a JSON object, or for which `check(obj)`
    returns a problem raises `DataFormatError` naming the file and line; with `skip_malformed`
    it is logged and counted in `counter["malformed"]`. Line numbers count every physical line
    (blank and skipped ones too), so they stay the same whatever is skipped.
    """
    for path in paths:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                obj = None
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    problem = f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)"
                else:
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                        problem = None if isinstance(obj, dict) else "malformed JSON line (not a JSON object)"
                    except json.JSONDecodeError as e:
                        problem = f"malformed JSON line ({e.msg} at column {e.colno})"
                if problem is None and check is not None:
                    problem = check(obj)
                if problem:
                    if not skip_malformed:
                        raise DataFormatError(f"{path}:{lineno}: {problem}")
                    if counter is not None:
                        counter["malformed"] = counter.get("malformed", 0) + 1
                    log.warning("%s:%d: skipped: %s", path, lineno, problem)
                    continue
                yield str(path), lineno, obj


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` through a temporary sibling and a rename: a reader never
    sees a half-written file. Creates the parent directory."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
