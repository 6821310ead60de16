"""Bits per byte and perplexity on held-out text, per language.

    bits/byte = -sum_t log2 p(t) / UTF-8 bytes of the text        (tokenizer-independent)
    perplexity = exp(-sum_t ln p(t) / tokens)                      (per token of this tokenizer)

Texts come from a directory of `<lang>.jsonl` ({"text": ...} per line) or `<lang>.txt` files
(one document per file), or from the embedded corpus's held-out documents (the SeqIO tasks'
validation split: every 100th document), so pre-training runs are scored on text they did not
see. Every token of a document is scored: the model sees `start_id` before the first one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moss_jax.eval.lm import EvalError, EvalModel


def read_texts(path: str | Path, languages: Sequence[str] | None = None, max_docs: int | None = None) -> dict:
    """{language: [documents]} from `<lang>.jsonl` / `<lang>.txt` files in a directory."""
    path = Path(path)
    if not path.is_dir():
        raise EvalError(f"text directory {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".txt"))
    out: dict[str, list[str]] = {}
    for p in files:
        lang = p.stem
        if languages and lang not in languages:
            continue
        if p.suffix == ".txt":
            docs = [p.read_text(encoding="utf-8")]
        else:
            docs = []
            with open(p, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise EvalError(f"{p}:{n}: not JSON ({e.msg})") from e
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise EvalError(f"{p}:{n}: expected an object with a string 'text' field")
                    docs.append(record["text"])
        out.setdefault(lang, []).extend(docs)
    if languages:
        missing = sorted(set(languages) - set(out))
        if missing:
            raise EvalError(f"{path}: no <lang>.jsonl or <lang>.txt for language(s) {missing}")
    if not out:
        raise EvalError(f"{path}: no <lang>.jsonl or <lang>.txt files")
    return {lang: [d for d in docs if d][:max_docs] for lang, docs in out.items()}


def heldout_corpus(corpus_dir: str | Path, max_docs: int | None = None, max_chars: int | None = None) -> dict:
    """The embedded corpus's validation documents (the ones SeqIO training never sees)."""
    from data_pipelines.corpus import read_corpus
    from data_pipelines.tasks import _in_split

    try:
        corpus = read_corpus(corpus_dir)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(str(e)) from e
    out = {}
    for lang, docs in corpus.items():
        held = [d[:max_chars] if max_chars else d for i, d in enumerate(docs) if _in_split(i, "validation")]
        out[lang] = held[:max_docs]
    return out


def text_stats(model: EvalModel, text: str) -> dict:
    """Sums for one document: nats, tokens, bytes, and the per-token log-probabilities."""
    ids = model.encode(text)
    if not ids:
        raise EvalError("cannot score an empty text")
    logp = model.text_logprobs(ids)
    return {"nats": float(-logp.sum()), "tokens": len(ids), "bytes": len(text.encode("utf-8")), "logprobs": logp}


def evaluate(model: EvalModel, texts: dict[str, Sequence[str]]) -> dict:
    """Per language: bits per byte, perplexity, bytes per token, and the document counts."""
    report = {}
    for lang, docs in texts.items():
        if not docs:
            raise EvalError(f"no documents for language {lang!r}")
        nats = tokens = nbytes = 0
        for doc in docs:
            s = text_stats(model, doc)
            nats, tokens, nbytes = nats + s["nats"], tokens + s["tokens"], nbytes + s["bytes"]
        report[lang] = {
            "bits_per_byte": nats / math.log(2) / nbytes,
            "perplexity": math.exp(nats / tokens),
            "bytes_per_token": nbytes / tokens,
            "documents": len(docs),
            "tokens": tokens,
            "bytes": nbytes,
        }
    return report


def loss_by_position(model: EvalModel, docs: Sequence[str], max_positions: int) -> np.ndarray:
    """Mean loss (nats) at each token position 0..max_positions-1 over documents long enough."""
    sums, counts = np.zeros(max_positions), np.zeros(max_positions)
    for doc in docs:
        ids = model.encode(doc)[: min(max_positions, model.max_len - 1)]
        if not ids:
            continue
        logp = model.text_logprobs(ids)
        sums[: len(logp)] -= logp
        counts[: len(logp)] += 1
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
