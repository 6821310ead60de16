"""Bits per byte equals a direct computation from the model's token log-probabilities."""

import functools
import json
import math

import jax
import numpy as np
import pytest

from moss_jax.eval import bits_per_byte as bpb
from moss_jax.eval.lm import EvalError, EvalModel
from moss_jax.model import MossLM

from .conftest import START, ByteTokenizer, byte_encode

TEXTS = {
    "en": ["The quick brown fox jumps over the lazy dog."],
    "zh": ["今天天气很好，我们去公园散步。"],
    "code": ["def f(x):\n    return x * 2\n"],
}


@functools.cache
def _forward(config):
    return jax.jit(lambda params, ids: MossLM(config).apply({"params": params}, ids))


def full_logprobs(config, params, seq):
    """log p(seq[i + 1] | seq[:i + 1]) from one plain forward pass (right-padded to max_len: causal)."""
    padded = np.zeros((1, config.max_len), np.int32)
    padded[0, : len(seq)] = seq
    logits = np.asarray(_forward(config)(params, padded)[0], np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    return np.array([logp[i, seq[i + 1]] for i in range(len(seq) - 1)])


def direct_logprobs(config, params, ids):
    """log p(ids[i] | START, ids[:i]), no harness code."""
    return full_logprobs(config, params, [START, *ids])


@pytest.fixture(scope="module")
def model(byte_debug_model):
    config, params = byte_debug_model
    return EvalModel.from_params(config, params, ByteTokenizer(), start_id=START, batch_size=2)


def test_bits_per_byte_matches_direct_computation(model, byte_debug_model):
    config, params = byte_debug_model
    report = bpb.evaluate(model, TEXTS)
    for lang, docs in TEXTS.items():
        ids = byte_encode(docs[0])
        logp = direct_logprobs(config, params, ids)
        nbytes = len(docs[0].encode("utf-8"))
        assert report[lang]["bytes"] == nbytes == len(ids)
        assert report[lang]["bits_per_byte"] == pytest.approx(-logp.sum() / math.log(2) / nbytes, rel=1e-5)
        assert report[lang]["perplexity"] == pytest.approx(math.exp(-logp.mean()), rel=1e-5)
    assert report["zh"]["bytes"] == 3 * len(TEXTS["zh"][0])  # CJK characters are 3 UTF-8 bytes


def test_long_text_is_scored_in_windows(model, byte_debug_model):
    """A text over max_len (64) is scored in windows that overlap by one token, each token once."""
    config, params = byte_debug_model
    text = "abcdefghij" * 15  # 150 tokens
    ids = byte_encode(text)
    logp = model.text_logprobs(ids)
    assert logp.shape == (150,)
    seq = [START, *ids]
    want = []
    for start in range(0, len(seq) - 1, config.max_len - 1):
        want += list(full_logprobs(config, params, seq[start : start + config.max_len]))
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-5)


def test_text_files_and_errors(tmp_path, model):
    (tmp_path / "en.jsonl").write_text(
        json.dumps({"text": "hello world"}) + "\n\n" + json.dumps({"text": "bye"}) + "\n"
    )
    (tmp_path / "code.txt").write_text("print(1)\n")
    texts = bpb.read_texts(tmp_path)
    assert texts == {"code": ["print(1)\n"], "en": ["hello world", "bye"]}
    with pytest.raises(EvalError, match=r"language\(s\) \['zh'\]"):
        bpb.read_texts(tmp_path, languages=["en", "zh"])
    (tmp_path / "zh.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(EvalError, match=r"zh.jsonl:1: expected an object with a string 'text'"):
        bpb.read_texts(tmp_path)
    with pytest.raises(EvalError, match="empty text"):
        bpb.text_stats(model, "")


def test_loss_by_position(model, byte_debug_model):
    config, params = byte_debug_model
    docs = ["abcdef", "xyz"]
    curve = bpb.loss_by_position(model, docs, 8)
    first = [-direct_logprobs(config, params, byte_encode(d)) for d in docs]
    assert curve[0] == pytest.approx((first[0][0] + first[1][0]) / 2, rel=1e-5)
    assert curve[4] == pytest.approx(first[0][4], rel=1e-5)
    assert np.isnan(curve[6:]).all()


@pytest.mark.slow
def test_tensor_parallel_scores_and_generation_match_one_device(byte_debug_model):
    """Heads, MLP and vocabulary sharded over 4 (fake CPU) devices: the same numbers and tokens."""
    from moss_jax.model import param_shardings
    from moss_jax.sharding import make_mesh

    config, params = byte_debug_model
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (tests/conftest.py asks XLA for 8 CPU devices)")
    mesh = make_mesh(data=1, fsdp=1, tensor=4, devices=jax.devices()[:4])
    sharded = jax.device_put(params, param_shardings(config, mesh))
    one = EvalModel.from_params(config, params, ByteTokenizer(), start_id=START, batch_size=2)
    four = EvalModel.from_params(config, sharded, ByteTokenizer(), start_id=START, batch_size=2, mesh=mesh)
    ids = byte_encode("sharded scoring")
    np.testing.assert_allclose(four.text_logprobs(ids), one.text_logprobs(ids), rtol=1e-5, atol=1e-5)
    assert four.generate(["abc"], 6) == one.generate(["abc"], 6)
