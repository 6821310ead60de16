"""In-context copying probe: does the model predict a span better the second time it reads it?

Tool use needs in-context copying: an expression or a search topic from the question must reach
the command token by token, including tokens the model has rarely seen. The circuit that does
this for any token (an "induction head": find the earlier occurrence of the current token, copy
the token after it) is what the probe detects. Each probe sequence is

    <start> span <newline> span

where `span` is a stretch of held-out text with its words put in a random order
(`data_pipelines.tasks.shuffled_units`), so word statistics cannot predict it. The two copies
are the same token ids. A model that copies predicts the second copy far better than the
first; one that does not scores about the same on both (docs/alignment.md, "Why search stays
at 0"). Greedy (argmax) accuracy over each copy's tokens after its first.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import numpy as np

from moss_jax.eval.lm import EvalError, EvalModel


def probe_spans(documents: Sequence[str], n_spans: int, span_chars: int, seed: int) -> list[str]:
    """Up to `n_spans` shuffled spans of `span_chars` characters, one per long-enough document."""
    from data_pipelines.tasks import shuffled_units

    rng = random.Random(seed)
    out = []
    for doc in documents:
        if len(doc) < span_chars + 1:
            continue
        start = rng.randint(0, len(doc) - span_chars)
        span = shuffled_units(doc[start : start + span_chars], rng)
        if span.strip():
            out.append(span)
        if len(out) == n_spans:
            break
    return out


def evaluate(
    model: EvalModel,
    texts: Mapping[str, Sequence[str]],
    n_spans: int = 64,
    span_chars: int = 60,
    seed: int = 1,
) -> dict:
    """{language: {"first_copy_accuracy", "second_copy_accuracy", "copy_gain", "spans", "tokens"}}."""
    newline = model.encode("\n")
    if not newline:
        raise EvalError("the tokenizer encodes '\\n' to nothing; the copying probe separates copies with it")
    out = {}
    for lang, docs in texts.items():
        spans = probe_spans(docs, n_spans, span_chars, seed)
        seqs, lengths = [], []
        for span in spans:
            ids = list(model.encode(span))[: (model.max_len - 1 - len(newline)) // 2]
            if len(ids) < 2:
                continue
            seqs.append([model.start_id, *ids, *newline, *ids])
            lengths.append(len(ids))
        if not seqs:
            raise EvalError(f"{lang}: no document is longer than {span_chars} characters to take a probe span from")
        first, second = [], []
        for scores, n in zip(model.score(seqs), lengths, strict=True):
            # greedy[i - 1] says whether token i of the sequence was the argmax; token 0 is <start>.
            first.append(scores.greedy[1:n])  # the first copy's tokens 2..n
            second.append(scores.greedy[n + len(newline) + 1 : 2 * n + len(newline)])  # the same in copy two
        a, b = float(np.mean(np.concatenate(first))), float(np.mean(np.concatenate(second)))
        out[lang] = {
            "first_copy_accuracy": a,
            "second_copy_accuracy": b,
            "copy_gain": b - a,
            "spans": len(seqs),
            "tokens": int(sum(lengths)),
        }
    return out
