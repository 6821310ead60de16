"""A byte-level packed pre-training pipeline over local text files.

Tokens are UTF-8 bytes (ids 0-255) and a document separator `EOS_ID = 256`, so any text
round-trips exactly and no vocabulary has to be trained. It is the engine's self-contained
source for CPU runs: the default corpus is the Python standard library's own source, which
every Python installation ships. (The SentencePiece/SeqIO mixtures are the production path.)

Documents are concatenated with EOS and cut into rows of `seq_len + 1` tokens; each row
becomes inputs/targets shifted by one, with segment ids per document, positions restarting
at every document start, and loss weight 0 where the target belongs to the next document.
Row order is a seeded permutation per epoch; the position is a single counter, so the
iterator's state is exact and tiny: {"rows_consumed": n}.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterator, Sequence

import numpy as np

EOS_ID = 256
VOCAB_SIZE = 257


def stdlib_source_files(max_bytes: int = 8 * 1024**2) -> list[str]:
    """Python files of the standard library (sorted, tests excluded), up to `max_bytes` in total."""
    root = sysconfig.get_paths()["stdlib"]
    files, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, root)
        if rel.startswith(("test", "idlelib", "site-packages")) or "/test" in rel:
            continue
        size = os.path.getsize(path)
        if size == 0:
            continue
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    if not files:
        raise FileNotFoundError(f"no Python source files found under {root}")
    return files


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: Sequence[int]) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class ByteTextPipeline:
    """Deterministic, checkpointable iterator of packed [batch, seq_len] training batches."""

    def __init__(
        self,
        files: Sequence[str],
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        verbose: bool = True,
    ):
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by the process count {process_count}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        chunks, docs = [], []
        for doc_index, path in enumerate(files):
            with open(path, "rb") as f:
                data = np.frombuffer(f.read(), np.uint8).astype(np.int32)
            chunks += [data, np.array([EOS_ID], np.int32)]
            docs.append(np.full(len(data) + 1, doc_index, np.int32))
        self.tokens = np.concatenate(chunks)
        self.doc_ids = np.concatenate(docs)
        self.rows_per_epoch = (len(self.tokens) - 1) // seq_len
        if self.rows_per_epoch < batch_size:
            raise ValueError(
                f"corpus of {len(self.tokens)} tokens gives {self.rows_per_epoch} rows of {seq_len}, "
                f"fewer than one batch of {batch_size}"
            )
        self.rows_consumed = 0
        self._perm_epoch, self._perm = -1, None
        if verbose:
            print(
                f"[data] byte_text: {len(files)} documents, {len(self.tokens):,} tokens (bytes + EOS), "
                f"{self.rows_per_epoch:,} rows of {seq_len} per epoch"
            )

    # Checkpointable position --------------------------------------------------------
    def get_state(self) -> dict:
        return {"rows_consumed": int(self.rows_consumed), "seed": self.seed, "seq_len": self.seq_len}

    def set_state(self, state: dict) -> None:
        if state.get("seq_len", self.seq_len) != self.seq_len or state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data state {state} was saved with a different seq_len/seed than this pipeline")
        self.rows_consumed = int(state["rows_consumed"])

    # Rows -----------------------------------------------------------------------------
    def _row_index(self, n: int) -> int:
        epoch, i = divmod(n, self.rows_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.rows_per_epoch)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def _row(self, row: int) -> dict[str, np.ndarray]:
        start = row * self.seq_len
        window = self.tokens[start : start + self.seq_len + 1]
        doc = self.doc_ids[start : start + self.seq_len + 1]
        inputs, targets = window[:-1], window[1:]
        new_doc = np.concatenate([[True], doc[1:-1] != doc[:-2]])
        segment_ids = np.cumsum(new_doc).astype(np.int32)
        idx = np.arange(self.seq_len)
        positions = idx - np.maximum.accumulate(np.where(new_doc, idx, 0))
        weights = (doc[1:] == doc[:-1]).astype(np.float32)
        return {
            "decoder_input_tokens": inputs,
            "decoder_target_tokens": targets,
            "decoder_segment_ids": segment_ids,
            "decoder_positions": positions.astype(np.int32),
            "decoder_loss_weights": weights,
        }

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """This process's rows of the next global batch."""
        per_process = self.batch_size // self.process_count
        first = self.rows_consumed + self.process_index * per_process
        rows = [self._row(self._row_index(first + i)) for i in range(per_process)]
        self.rows_consumed += self.batch_size
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def stdlib_byte_text(
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    max_bytes: int = 8 * 1024**2,
) -> ByteTextPipeline:
    """The engine's data factory over the Python standard library's source code."""
    return ByteTextPipeline(
        stdlib_source_files(max_bytes),
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        verbose=process_index == 0,
    )
