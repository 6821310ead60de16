"""Packing variable-length examples into fixed [L] rows for the training engine.

Each example is (token ids, loss weights) for a whole sequence (e.g. one conversation from
`data_pipelines.conversation`). Rows get the features the engine reads:

- decoder_input_tokens  = ids[:-1] of each example, concatenated;
- decoder_target_tokens = ids[1:] (the next token within the same example);
- decoder_loss_weights  = the target token's weight, 0 on padding. An example of n tokens
  takes n - 1 positions, each predicting the next token of the same example, so targets never
  cross an example boundary and every position of a segment, the last included, is trained
  with its target's weight; only the example's first token is never a target (it has no
  context). (The SeqIO path, `feature_converter.py`, uses the t5x layout instead: n positions
  with input 0 at the first, so the first token is a target too.)
- decoder_segment_ids   = 1, 2, ... per example in the row, 0 on padding;
- decoder_positions     = 0, 1, ... restarting at every example.

Greedy first-fit in arrival order within a window of rows (deterministic). Examples longer than
L + 1 tokens are cut to their first L + 1 tokens and counted; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

FEATURES = (
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
    "decoder_segment_ids",
    "decoder_positions",
)


@dataclasses.dataclass
class PackingStats:
    examples: int = 0
    rows: int = 0
    truncated: int = 0
    tokens: int = 0
    padding: int = 0

    @property
    def fill(self) -> float:
        return self.tokens / max(self.tokens + self.padding, 1)


class _Row:
    def __init__(self, length: int):
        self.length = length
        self.used = 0
        self.arrays = {k: np.zeros(length, np.float32 if k == "decoder_loss_weights" else np.int32) for k in FEATURES}
        self.segments = 0

    def add(self, ids: np.ndarray, weights: np.ndarray) -> None:
        n = len(ids) - 1
        s = slice(self.used, self.used + n)
        self.segments += 1
        self.arrays["decoder_input_tokens"][s] = ids[:-1]
        self.arrays["decoder_target_tokens"][s] = ids[1:]
        self.arrays["decoder_loss_weights"][s] = weights[1:]
        self.arrays["decoder_segment_ids"][s] = self.segments
        self.arrays["decoder_positions"][s] = np.arange(n)
        self.used += n


def pack(
    examples: Iterable[tuple[Sequence[int], Sequence[float]]],
    length: int,
    window: int = 8,
    stats: PackingStats | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields packed rows of `length` tokens from (ids, weights) examples."""
    stats = stats if stats is not None else PackingStats()
    open_rows: list[_Row] = []
    for ids, weights in examples:
        ids = np.asarray(ids, np.int32)
        weights = np.asarray(weights, np.float32)
        if len(ids) != len(weights):
            raise ValueError(f"example {stats.examples}: {len(ids)} ids but {len(weights)} weights")
        if len(ids) < 2:
            raise ValueError(f"example {stats.examples}: needs at least 2 tokens, got {len(ids)}")
        if len(ids) > length + 1:
            ids, weights = ids[: length + 1], weights[: length + 1]
            stats.truncated += 1
        stats.examples += 1
        need = len(ids) - 1
        row = next((r for r in open_rows if r.length - r.used >= need), None)
        if row is None:
            if len(open_rows) == window:
                yield _finish(open_rows.pop(0), stats)
            row = _Row(length)
            open_rows.append(row)
        row.add(ids, weights)
    for row in open_rows:
        yield _finish(row, stats)


def _finish(row: _Row, stats: PackingStats) -> dict[str, np.ndarray]:
    stats.rows += 1
    stats.tokens += row.used
    stats.padding += row.length - row.used
    return row.arrays
