"""Pre-training by tokens: documents split into sequence-length chunks, mixtures by token share.

Two things seqio does by default lose or skew pre-training tokens:

- trimming: a task's examples are cut to the sequence length, so every document longer than
  `seq_len` loses its tail (at 512 tokens, most English and code tokens). `split_targets` splits
  each tokenized document (EOS included) into consecutive chunks of at most the requested
  `targets` length instead: every token reaches training, and packing fills rows with chunks.
- mixing: `seqio.Mixture` rates are relative numbers of EXAMPLES. With documents of very
  different lengths, rates equal to the wanted token counts (MOSS's 360:100:220) give very
  different token shares. `TokenShareMixture` takes token shares and, for the sequence length
  the dataset is requested with, samples task i with example rate `share_i / m_i`, where `m_i`
  is the task's mean tokens per (chunked) example; its expected token share is then `share_i`.

Both are options (`split`, `rates_by`): a run may trim documents to their first `seq_len`
tokens instead (`split=False`; the share of tokens that keeps is estimated from the same sample
and logged) or mix by examples (`rates_by="examples"`, plain seqio rates). The CPU demo does
both: its 2M-parameter model learned to copy tool arguments only from document starts
(docs/alignment.md).

`m_i` is estimated from a bounded sample: the first `sample_examples` examples of the task's
train split (whole documents, EOS included, in source order), tokenized once per mixture and
cached; for a length L, `m_i = sum(n) / sum(ceil(n / L))` over the sampled document lengths n.
The estimate is logged with the resulting rates. Sources should be in no particular order
(shuffled at write time) for the head of the file to be a fair sample.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_EXAMPLES = 2000
RATES_BY = ("tokens", "examples")


def split_targets(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None = None) -> tf.data.Dataset:
    """A seqio preprocessor: splits each example's `targets` into consecutive chunks of at most
    `sequence_length["targets"]` tokens (only the last chunk shorter). No token is dropped: the
    chunks of one example, in order, are its `targets`. Other features are copied to every chunk.
    Without a length (`sequence_length` None) examples pass unchanged."""
    length = (sequence_length or {}).get("targets")
    if not length:
        return dataset
    if length < 1:
        raise ValueError(f"split_targets: sequence length must be positive, got {length}")

    def chunks(ex):
        targets = ex["targets"]
        starts = tf.range(0, tf.size(targets), length)
        rest = {k: v for k, v in ex.items() if k != "targets"}
        return tf.data.Dataset.from_tensor_slices(starts).map(lambda s: {**rest, "targets": targets[s : s + length]})

    return dataset.flat_map(chunks)


class TokenShareMixture(seqio.Mixture):
    """A `seqio.Mixture` whose rates are shares of TOKENS (see the module docstring).

    `get_rate(task)` returns the configured token weight; the example rates used for sampling
    depend on the requested `targets` length (`example_rates(length)`). Do not nest it inside
    another mixture (a parent would mix by the token weights as if they were example rates).
    """

    def __init__(
        self,
        name: str,
        tasks: Sequence[tuple[str | seqio.Task, float]],
        default_rate=None,
        sample_examples: int = DEFAULT_SAMPLE_EXAMPLES,
        split: bool = True,
        rates_by: str = "tokens",
        **kwargs,
    ):
        super().__init__(name, tasks, default_rate, **kwargs)
        if sample_examples < 1:
            raise ValueError(f"mixture {name}: sample_examples must be positive, got {sample_examples}")
        if rates_by not in RATES_BY:
            raise ValueError(f"mixture {name}: rates_by must be one of {RATES_BY}, got {rates_by!r}")
        self.split = split
        self.rates_by = rates_by
        for task_name, rate in self.rate_per_task_name.items():
            if callable(rate) or not float(rate) > 0:
                raise ValueError(f"mixture {name}: token share of {task_name} must be a positive number, got {rate!r}")
        self.sample_examples = sample_examples
        self._document_lengths: dict[str, np.ndarray] = {}
        self._length: int | None = None

    def document_lengths(self, task: seqio.Task) -> np.ndarray:
        """Token counts of the first `sample_examples` train examples, unsplit (cached)."""
        if task.name not in self._document_lengths:
            ds = task.get_dataset(
                sequence_length=None, split="train", shuffle=False, num_epochs=1, trim_output_features=False
            )
            n = np.array([len(ex["targets"]) for ex in ds.take(self.sample_examples).as_numpy_iterator()], np.int64)
            if not n.size or not n.sum():
                raise ValueError(
                    f"mixture {self.name}: task {task.name} has no tokens in its train split, so its mean tokens "
                    "per example (which sets its sampling rate) cannot be estimated; is its source empty?"
                )
            self._document_lengths[task.name] = n
            log.info(
                "mixture %s: %s: %d train examples sampled, %.1f tokens each on average",
                self.name,
                task.name,
                n.size,
                n.mean(),
            )
        return self._document_lengths[task.name]

    def tokens_per_example(self, task: seqio.Task, length: int | None) -> float:
        """Mean tokens per example at `length` (None: whole documents): after `split_targets`,
        or, without `split`, after trimming each document to its first `length` tokens."""
        n = self.document_lengths(task)
        if not length:
            return float(n.mean())
        if not self.split:
            return float(np.minimum(n, length).mean())
        return float(n.sum() / np.ceil(n / length).sum())

    def kept_fraction(self, task: seqio.Task, length: int | None) -> float:
        """Share of the task's tokens that reach training at `length` (1 when split)."""
        n = self.document_lengths(task)
        if self.split or not length:
            return 1.0
        return float(np.minimum(n, length).sum() / n.sum())

    def example_rates(self, length: int | None, tasks: Sequence[seqio.Task] | None = None) -> dict[str, float]:
        """Per task: the example rate giving its configured token share at `targets` length `length`."""
        tasks = self.tasks if tasks is None else tasks
        per_example = {t.name: self.tokens_per_example(t, length) for t in tasks}
        if self.rates_by == "tokens":
            rates = {t.name: self.get_rate(t) / per_example[t.name] for t in tasks}
        else:
            rates = {t.name: float(self.get_rate(t)) for t in tasks}
        tokens = {t.name: rates[t.name] * per_example[t.name] for t in tasks}
        total = sum(tokens.values())
        log.warning(
            "mixture %s at length %s (rates by %s, documents %s): %s",
            self.name,
            length,
            self.rates_by,
            "split into chunks" if self.split else "trimmed",
            "; ".join(
                f"{t.name} token share {tokens[t.name] / total:.3f}, {per_example[t.name]:.1f} tokens per example "
                f"(from {self.document_lengths(t).size} sampled), example rate {rates[t.name]:.3g}"
                + ("" if self.split else f", {self.kept_fraction(t, length):.1%} of its tokens kept by trimming")
                for t in tasks
            ),
        )
        return rates

    def get_dataset(self, sequence_length: Mapping[str, int] | None = None, *args, **kwargs) -> tf.data.Dataset:
        self._length = (sequence_length or {}).get("targets")
        return super().get_dataset(sequence_length, *args, **kwargs)

    def _get_all_mixing_rates(self, tasks):  # seqio's hook (as PyGloveTunableMixture uses it)
        rates = self.example_rates(self._length, tasks)
        return [rates[t.name] for t in tasks]
