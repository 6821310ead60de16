"""The copying probe separates a model that copies in context from one that does not."""

import jax.numpy as jnp
import pytest

from moss_jax.eval import copying
from moss_jax.eval.cli import main
from moss_jax.eval.lm import EvalError, EvalModel

from .conftest import START, byte_decode, byte_encode, unigram_model

DOCS = {
    "en": ["The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 2] * 3,
    "zh": ["今天天气很好，我们去公园散步，然后在湖边喝茶聊天，晚上回家做饭看书休息。" * 2] * 3,
}


def copier_model() -> EvalModel:
    """In-context copying by construction: predict the byte that followed the latest earlier
    occurrence of the last four bytes (byte 0 when there is none)."""

    def logits_fn(ids_BxL, seg_BxL):
        length = ids_BxL.shape[1]
        same = jnp.ones(ids_BxL.shape + (length,), bool)  # [B, i, j]
        for k in range(4):
            shifted = jnp.pad(ids_BxL, ((0, 0), (k, 0)), constant_values=-1)[:, :length]
            same &= shifted[:, :, None] == shifted[:, None, :]
        earlier = jnp.arange(length)[None, :] < jnp.arange(length)[:, None]
        j = jnp.where(same & earlier[None], jnp.arange(length)[None, None, :], -1).max(-1)  # [B, i]
        nxt = jnp.take_along_axis(ids_BxL, jnp.clip(j + 1, 0, length - 1), axis=1)
        target = jnp.where(j >= 0, nxt, 0)
        return 5.0 * (jnp.arange(257)[None, None, :] == target[..., None])

    return EvalModel(
        logits_fn, vocab_size=257, max_len=512, encode=byte_encode, decode=byte_decode, start_id=START, batch_size=4
    )


def test_probe_spans_are_shuffled_and_deterministic():
    spans = copying.probe_spans(DOCS["en"], n_spans=3, span_chars=40, seed=0)
    assert len(spans) == 3 and spans == copying.probe_spans(DOCS["en"], 3, 40, seed=0)
    assert not any(s in DOCS["en"][0] for s in spans)  # word order changed
    assert copying.probe_spans(["short"], 3, 40, seed=0) == []


def test_copier_gains_and_a_unigram_model_does_not():
    copier = copying.evaluate(copier_model(), DOCS, n_spans=3, span_chars=40)
    flat = copying.evaluate(unigram_model("e"), DOCS, n_spans=3, span_chars=40)
    for lang in DOCS:
        assert copier[lang]["spans"] == 3
        # A span repeating four bytes misleads the copier now and then, never on most bytes.
        assert copier[lang]["second_copy_accuracy"] > 0.8
        assert copier[lang]["copy_gain"] > 0.5
        assert flat[lang]["copy_gain"] == pytest.approx(0.0, abs=0.05)
        assert flat[lang]["second_copy_accuracy"] < 0.3


def test_no_usable_text_is_an_error():
    with pytest.raises(EvalError, match="en: no document is longer than 40"):
        copying.evaluate(copier_model(), {"en": ["too short"]}, n_spans=3, span_chars=40)


def test_cli_needs_text(capsys):
    rc = main(["--checkpoint", "x", "--tokenizer", "x", "--suite", "copying"])
    assert rc == 2 and "suite 'copying' needs --text_dir or --corpus_dir" in capsys.readouterr().err
