"""Host-side bookkeeping of one generated sequence: stop tokens, stop strings, text deltas.

Stop tokens end a row inside the jitted loop; stop strings can only be seen in decoded text,
so the host checks them here after every chunk and tells the loop to finish the row. Text is
streamed in deltas that never show part of a stop string (a suffix that could still become
one is held back) nor half of a multi-byte character (byte-fallback pieces decode to U+FFFD
until the character is complete).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class SequenceStream:
    """Tokens and text of one generated sequence.

    Args:
      budget: max new tokens.
      stop_ids: token ids that end the sequence (kept in `tokens`, never in `text`).
      stop_strings: strings that end the sequence (the text is cut before them).
      decode: ids -> text; without it only tokens are tracked (no stop strings, no text).
    """

    def __init__(
        self,
        budget: int,
        stop_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        decode: Callable[[list[int]], str] | None = None,
    ):
        if stop_strings and decode is None:
            raise ValueError("stop strings need a decode function (a tokenizer)")
        if any(not s for s in stop_strings):
            raise ValueError("stop strings must be non-empty")
        self.budget = budget
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.stop_strings = tuple(stop_strings)
        self.decode = decode
        self.tokens: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None  # "stop" or "length"
        self._text = ""  # decoded text without stop tokens, cut at a stop string once found
        self._emitted = 0  # characters of text returned by text_delta
        self._checked = 0  # characters already searched for stop strings

    def push(self, token: int) -> bool:
        """Adds one generated token; returns True when the sequence has just finished."""
        if self.finished:
            raise RuntimeError("push() after the sequence finished")
        self.tokens.append(int(token))
        if int(token) in self.stop_ids:
            self._finish("stop")
            return True
        if self.decode is not None:
            self._text = self.decode([t for t in self.tokens if t not in self.stop_ids])
            cut = self._stop_string_at(self._text) if self.stop_strings else None
            if cut is not None:
                self._text = self._text[:cut]
                self._finish("stop")
                return True
        if len(self.tokens) >= self.budget:
            self._finish("length")
            return True
        return False

    def push_many(self, tokens: Sequence[int]) -> list[int]:
        """Adds tokens until the sequence finishes; returns the ones it accepted."""
        accepted = []
        for t in tokens:
            if self.finished:
                break
            accepted.append(int(t))
            self.push(t)
        return accepted

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.finish_reason = reason

    def _stop_string_at(self, text: str) -> int | None:
        # Only the tail can hold a new match: everything before was checked at earlier tokens.
        longest = max(len(s) for s in self.stop_strings)
        start = max(0, self._checked - longest + 1)
        hits = [i for s in self.stop_strings if (i := text.find(s, start)) >= 0]
        self._checked = len(text.rstrip(REPLACEMENT_CHAR))
        return min(hits) if hits else None

    @property
    def text(self) -> str:
        """All text so far (without the stop string or stop tokens)."""
        return self._text

    def text_delta(self) -> str:
        """Text not yet returned that is safe to show now (everything once finished)."""
        if self.finished:
            safe = len(self._text)
        else:
            safe = len(self._text.rstrip(REPLACEMENT_CHAR))
            hold = 0
            for s in self.stop_strings:
                for n in range(min(len(s) - 1, safe), 0, -1):
                    if self._text[safe - n : safe] == s[:n]:
                        hold = max(hold, n)
                        break
            safe -= hold
        if safe <= self._emitted:
            return ""
        delta = self._text[self._emitted : safe]
        self._emitted = safe
        return delta
