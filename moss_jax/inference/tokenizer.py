"""The text side of inference: a thin wrapper over a seqio Vocabulary (ours or MOSS's BPE)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_pipelines import specials


class Tokenizer:
    """encode/decode plus the ids of MOSS's end tokens.

    Args:
      vocab: a `seqio.Vocabulary` (data_pipelines.vocab.load_vocabulary, or
        data_pipelines.bpe_vocab.MossBPEVocabulary for the released tokenizer files).
    """

    def __init__(self, vocab: Any):
        self.vocab = vocab
        self._ids: dict[str, int] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.vocab.vocab_size)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.vocab.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        # seqio's public decode() cuts the text at the first EOS id; generated text must show
        # everything the model wrote, so go to the vocabulary's own decoder.
        return self.vocab._decode([int(i) for i in ids])

    def token_id(self, piece: str) -> int:
        """The id of a piece that is a single token (the end tokens are); ValueError otherwise."""
        if piece not in self._ids:
            ids = self.encode(piece)
            if len(ids) != 1:
                raise ValueError(f"{piece!r} is not a single token in this vocabulary (encodes to {ids})")
            self._ids[piece] = ids[0]
        return self._ids[piece]

    @property
    def eom_id(self) -> int:
        return self.token_id(specials.END_OF_MOSS)

    @property
    def eoc_id(self) -> int:
        return self.token_id(specials.END_OF_COMMANDS)

    @property
    def eot_id(self) -> int:
        return self.token_id(specials.END_OF_THOUGHTS)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A SentencePiece `.model` file (ours) or a directory with the released BPE files."""
    path = Path(path)
    if path.is_dir():
        from data_pipelines.bpe_vocab import MossBPEVocabulary

        return Tokenizer(MossBPEVocabulary(path))
    from data_pipelines.vocab import load_vocabulary

    return Tokenizer(load_vocabulary(path))
