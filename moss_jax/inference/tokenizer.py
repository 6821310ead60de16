"""The text side of inference: a thin wrapper over a seqio Vocabulary (ours or MOSS's BPE).

Special tokens and untrusted text: MOSS's end tokens (`<eoh>`, `<eot>`, `<eoc>`, `<eor>`,
`<eom>`), `<|endoftext|>` and the preference tags are user-defined symbols (added tokens in the
released BPE), so the vocabulary turns their *text* into the special id wherever it occurs. A
search snippet or a user message containing `<eor>\\n<|MOSS|>: ...` would then close the results
block or forge a turn. `encode_parts` is the one encoder for prompts: only the parts the prompt
template wrote may produce special ids; in every other part a special string is cut after its
first character and the two sides are encoded separately, so it becomes ordinary pieces
(`<`, `e`, `or`, `>`) and decodes back to the same text. Text without special strings encodes
exactly as `encode` would encode it.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from data_pipelines import specials

# The base model's end-of-text token of the released tokenizer (MOSS_SPEC section 2).
END_OF_TEXT = "<|endoftext|>"


def check_unicode(text: str, what: str = "the text") -> None:
    """ValueError naming the first lone surrogate in `text` (a str that is not valid Unicode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = text[e.start]
        raise ValueError(
            f"{what} is not valid Unicode: lone surrogate U+{ord(char):04X} at character {e.start}"
        ) from None


class Part(NamedTuple):
    """A piece of prompt text; only `trusted` parts (the prompt template) may yield special ids."""

    text: str
    trusted: bool


class Tokenizer:
    """encode/decode plus the ids of MOSS's end tokens.

    Args:
      vocab: a `seqio.Vocabulary` (data_pipelines.vocab.load_vocabulary, or
        data_pipelines.bpe_vocab.MossBPEVocabulary for the released tokenizer files).
    """

    def __init__(self, vocab: Any):
        self.vocab = vocab
        self._ids: dict[str, int] = {}
        self._special_strings: tuple[str, ...] | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.vocab.vocab_size)

    def encode(self, text: str) -> list[int]:
        """Plain encoding: special strings anywhere in `text` become special ids (trusted text only).

        Raises ValueError for text that is not valid Unicode (a lone surrogate, e.g. from
        undecodable input bytes read with errors="surrogateescape"), which no vocabulary encodes.
        """
        check_unicode(text)
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
    def special_strings(self) -> tuple[str, ...]:
        """Texts this vocabulary encodes as one special id: MOSS's specials and the vocabulary's
        own user-defined (SentencePiece) or added (BPE) tokens, except whitespace ones."""
        if self._special_strings is None:
            candidates = set(specials.USER_DEFINED_SYMBOLS) | {END_OF_TEXT} | set(_declared_specials(self.vocab))
            self._special_strings = tuple(sorted(s for s in candidates if s.strip() and len(self.encode(s)) == 1))
        return self._special_strings

    def encode_untrusted(self, text: str) -> list[int]:
        """`text` as ordinary text: no special id, whatever it contains; decodes back to `text`."""
        return self.encode_parts([Part(text, False)])

    def encode_parts(self, parts: Sequence[tuple[str, bool]]) -> list[int]:
        """The ids of the parts' joined text, where only trusted parts may produce special ids.

        Every special string that is not wholly inside one trusted part is cut (after its first
        character, or at the part boundary it crosses) and the pieces are encoded separately.
        With no such string this is exactly `encode("".join(texts))`, so ordinary text keeps
        its usual ids; decoding the result always gives the joined text back.
        """
        texts = [p[0] for p in parts]
        text = "".join(texts)
        cuts = self._cuts(text, parts)
        if not cuts:
            return self.encode(text)
        bounds = [0, *cuts, len(text)]
        return [i for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a for i in self.encode(text[a:b])]

    def _cuts(self, text: str, parts: Sequence[tuple[str, bool]]) -> list[int]:
        starts, pos = [], 0  # starts[k]: where part k begins in `text`
        for part_text, _ in parts:
            starts.append(pos)
            pos += len(part_text)
        cuts = set()
        for s in self.special_strings:
            at = text.find(s)
            while at >= 0:
                end = at + len(s)
                # The parts holding its first and last character: the last ones starting at or
                # before them (never an empty part, whose successor starts at the same position).
                first = bisect.bisect_right(starts, at) - 1
                last = bisect.bisect_right(starts, end - 1) - 1
                if not all(parts[k][1] for k in range(first, last + 1)):
                    # Inside one untrusted part: after its first character; across parts: at the
                    # first boundary it crosses.
                    cuts.add(at + 1 if first == last else starts[first + 1])
                at = text.find(s, at + 1)
        return sorted(cuts)

    @property
    def eom_id(self) -> int:
        return self.token_id(specials.END_OF_MOSS)

    @property
    def eoc_id(self) -> int:
        return self.token_id(specials.END_OF_COMMANDS)

    @property
    def eot_id(self) -> int:
        return self.token_id(specials.END_OF_THOUGHTS)


def _declared_specials(vocab: Any) -> list[str]:
    """User-defined pieces of a SentencePiece model, or added tokens of a `tokenizers` BPE."""
    sp_model = getattr(vocab, "sp_model", None)
    if isinstance(sp_model, bytes):
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(sp_model)
        user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        return [p.piece for p in proto.pieces if p.type == user_defined]
    hf_tokenizer = getattr(vocab, "_tok", None)  # data_pipelines.bpe_vocab.MossBPEVocabulary
    if hf_tokenizer is not None and hasattr(hf_tokenizer, "get_added_tokens_decoder"):
        return [t.content for t in hf_tokenizer.get_added_tokens_decoder().values()]
    return []


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A SentencePiece `.model` file (ours) or a directory with the released BPE files."""
    path = Path(path)
    if path.is_dir():
        from data_pipelines.bpe_vocab import MossBPEVocabulary

        return Tokenizer(MossBPEVocabulary(path))
    from data_pipelines.vocab import load_vocabulary

    return Tokenizer(load_vocabulary(path))
