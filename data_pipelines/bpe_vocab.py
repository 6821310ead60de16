"""A seqio Vocabulary over the released MOSS byte-level BPE tokenizer files.

MOSS's tokenizer is GPT-2's byte-level BPE extended with Chinese tokens, plus added tokens
(`<eoh> <eot> <eoc> <eor> <eom>`, `<|endoftext|>`, ...). Given the files a user downloaded
(`vocab.json`, `merges.txt`, and `added_tokens.json` when present), this builds the same
tokenizer with the HF `tokenizers` library (no BOS is added, as in the release) and exposes it
as a `seqio.Vocabulary`:

    vocab = MossBPEVocabulary("path/to/moss-moon-003-sft")       # eos = <eom> (the SFT eos)

Added tokens must keep the ids the files give them; a mismatch is an error naming the token.

Id 0 is a real token here (GPT-2's byte-level BPE gives it to "!"), yet seqio's `pad_id` is 0
and seqio treats 0 as padding in two places:
- `decode_tf` replaces every id after the first eos with `pad_id`; this class overrides it to
  drop those ids instead (otherwise "hi<eom>" padded decodes to "hi<eom>!!!!");
- seqio packing (`trim_and_pack_dataset`, used by `WeightedLMFeatureConverter(pack=True)`)
  measures an example's length by its non-zero ids, so a "!" would cut the example short and
  misalign it with its loss weights. This vocabulary must not feed packed SeqIO tasks: our
  tasks load only SentencePiece models (`vocab.load_vocabulary`, where 0 is pad and never a
  text token), and the converter rejects a `targets` id 0 with a clear error. Padding without
  packing (`PairFeatureConverter`, inference) is safe: those paths read lengths from the
  weights or the segment ids, never from id 0.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import seqio
import tensorflow as tf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers


class MossBPEVocabulary(seqio.Vocabulary):
    def __init__(self, tokenizer_dir: str | os.PathLike, eos_token: str | None = None):
        super().__init__(extra_ids=0)
        self.tokenizer_dir = Path(tokenizer_dir)
        vocab_file, merges_file = self.tokenizer_dir / "vocab.json", self.tokenizer_dir / "merges.txt"
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing (a byte-level BPE tokenizer needs vocab.json and merges.txt)")
        tok = Tokenizer(models.BPE.from_file(str(vocab_file), str(merges_file)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        added_file = self.tokenizer_dir / "added_tokens.json"
        added: dict[str, int] = json.loads(added_file.read_text(encoding="utf-8")) if added_file.is_file() else {}
        for token, token_id in sorted(added.items(), key=lambda kv: kv[1]):
            if tok.token_to_id(token) is None:
                tok.add_tokens([AddedToken(token, normalized=False, special=False)])
            if tok.token_to_id(token) != token_id:
                raise ValueError(
                    f"{added_file}: token {token!r} should have id {token_id} but gets "
                    f"{tok.token_to_id(token)} (added tokens must follow the base vocabulary contiguously)"
                )
        self._tok = tok
        if eos_token is None:
            eos_token = "<eom>" if tok.token_to_id("<eom>") is not None else "<|endoftext|>"
        self._eos_id = tok.token_to_id(eos_token)
        if self._eos_id is None:
            raise ValueError(f"{self.tokenizer_dir}: eos token {eos_token!r} is not in the vocabulary")

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def unk_id(self) -> int | None:
        return None  # byte-level BPE has no unknown token

    @property
    def _base_vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, s: str) -> Sequence[int]:
        return self._tok.encode(s, add_special_tokens=False).ids

    def _decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        def enc(x):
            return tf.constant(self._encode(x.numpy().decode("utf-8")), tf.int32)

        out = tf.py_function(enc, [s], tf.int32)
        out.set_shape([None])
        return out

    def _decode_rows(self, ids: tf.Tensor, through_eos: bool) -> tf.Tensor:
        """Decodes the innermost axis of `ids` (any rank >= 1) to strings of shape ids.shape[:-1]."""
        ids = tf.convert_to_tensor(ids)

        def dec(x):
            arr = x.numpy()
            rows = arr.reshape(int(np.prod(arr.shape[:-1])), arr.shape[-1])
            texts = [(self.decode if through_eos else self._decode)(row.tolist()) for row in rows]
            return tf.reshape(tf.constant(texts, tf.string), arr.shape[:-1])

        out = tf.py_function(dec, [ids], tf.string)
        out.set_shape(ids.shape[:-1])
        return out

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        return self._decode_rows(ids, through_eos=False)

    def decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """Decodes up to and including the first eos, DROPPING the ids after it (seqio's default
        replaces them with pad_id 0, which is "!" in this vocabulary). Rows padded with 0 and no
        eos still decode their padding as "!": end them with eos."""
        return self._decode_rows(ids, through_eos=True)

    def __eq__(self, other) -> bool:
        return isinstance(other, MossBPEVocabulary) and other.tokenizer_dir == self.tokenizer_dir

    def __hash__(self) -> int:
        return hash(("MossBPEVocabulary", str(self.tokenizer_dir)))
