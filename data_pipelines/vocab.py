"""Vocabularies: train our SentencePiece model, load it as a `seqio.SentencePieceVocabulary`.

The model is trained on English + Chinese + code with byte fallback (every string round-trips
exactly, with one exception: a literal U+2581 "▁", SentencePiece's own whitespace symbol, decodes
as a space), digits split into single tokens, identity normalisation (no NFKC rewriting of code or
full-width Chinese punctuation), whitespace kept as written (code indentation), newline and tab
as single tokens, and MOSS's end tokens and the preference tags as user-defined symbols (one id
each). Ids follow the T5/seqio convention: pad 0, eos 1, unk 2, no bos.

    python -m data_pipelines.vocab --corpus_dir data/embedded --vocab_size 8192 --out data/vocab/moss_sp
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from data_pipelines.specials import USER_DEFINED_SYMBOLS

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
WHITESPACE_SYMBOLS = ("\n", "\t")


def _lines(documents: Iterable[str], max_line_chars: int) -> Iterator[str]:
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                yield line[:max_line_chars]


def train_sentencepiece(
    documents: Iterable[str],
    model_path: str | os.PathLike,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    max_line_chars: int = 4096,
    input_sentence_size: int = 2_000_000,
) -> Path:
    """Trains a SentencePiece model on `documents` and writes it to `model_path` (.model)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(documents, max_line_chars),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        user_defined_symbols=list(USER_DEFINED_SYMBOLS + WHITESPACE_SYMBOLS),
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        max_sentence_length=max_line_chars * 4,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    path = Path(model_path)
    if path.suffix != ".model":
        path = path.with_suffix(".model")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(path)
    return path


def load_vocabulary(model_path: str | os.PathLike):
    """The trained model as a `seqio.SentencePieceVocabulary`."""
    import seqio

    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no SentencePiece model (train one with python -m data_pipelines.vocab)")
    return seqio.SentencePieceVocabulary(str(path))


def main(argv: list[str] | None = None) -> int:
    from data_pipelines.corpus import LANGUAGES, read_corpus

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus_dir", required=True, help="directory with en.jsonl, zh.jsonl, code.jsonl")
    parser.add_argument("--out", required=True, help="model path (.model is appended if missing)")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--model_type", default="bpe", choices=("bpe", "unigram"))
    args = parser.parse_args(argv)
    corpus = read_corpus(args.corpus_dir)
    docs = [d for lang in LANGUAGES for d in corpus[lang]]
    path = train_sentencepiece(docs, args.out, vocab_size=args.vocab_size, model_type=args.model_type)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    stats = {lang: sum(len(sp.encode(d)) for d in corpus[lang]) for lang in LANGUAGES}
    chars = {lang: sum(len(d) for d in corpus[lang]) for lang in LANGUAGES}
    for lang in LANGUAGES:
        print(f"[vocab] {lang:4s}: {stats[lang]:10,d} tokens, {chars[lang] / max(stats[lang], 1):.2f} chars/token")
    print(json.dumps({"model": str(path), "vocab_size": sp.get_piece_size(), "tokens": stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
