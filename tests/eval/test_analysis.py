"""Notebook helpers: attention weights reproduce the model's attention output; metrics and scores files."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax.eval import analysis
from moss_jax.eval.lm import EvalError
from moss_jax.layers import Attention, Block, layer_norm


def test_attention_probs_reproduce_the_layer_output(byte_debug_model):
    config, params = byte_debug_model
    ids = [5, 77, 3, 200, 9, 14, 61]
    pos = jnp.arange(len(ids))[None]
    x = jnp.asarray(params["embedding"])[jnp.asarray(ids)][None]
    p0 = analysis.layer_params(params, 0, config.n_layers)
    (x1, _), _ = Block(config).apply({"params": p0}, (x, None), pos, None, None)  # input of layer 1
    p1 = analysis.layer_params(params, 1, config.n_layers)
    h = layer_norm(config, "ln").apply({"params": p1["ln"]}, x1)
    want, _ = Attention(config).apply({"params": p1["attn"]}, h, pos, None, None, None)
    probs = analysis.attention_probs(config, params, ids, 1)  # [H, L, L]
    assert probs.shape == (config.n_heads, len(ids), len(ids))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(probs, k=1) == 0)  # causal
    v = jnp.einsum("bld,dhk->blhk", h, p1["attn"]["value"])[0]
    out = jnp.einsum("hqs,shk,hkd->qd", probs, v, p1["attn"]["out"])
    np.testing.assert_allclose(out, want[0], atol=1e-5)
    with pytest.raises(EvalError, match="layer 2 out of range"):
        analysis.attention_probs(config, params, ids, 2)


def test_metrics_and_scores_files(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 5.0, "grad_norm": 2.0}) + "\n" + json.dumps({"step": 2, "loss": 4.0}) + "\n"
    )
    m = analysis.read_metrics(tmp_path)
    np.testing.assert_array_equal(m["loss"], [5.0, 4.0])
    assert m["grad_norm"][0] == 2.0 and np.isnan(m["grad_norm"][1])
    np.testing.assert_allclose(analysis.smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    with pytest.raises(EvalError, match=r"metrics.jsonl:1: field 'loss'"):
        analysis.read_metrics(tmp_path)
    (tmp_path / "scores.jsonl").write_text(json.dumps({"score": 0.5, "tag": 1, "split": "test"}) + "\n")
    with pytest.raises(EvalError, match="split 'test'"):
        analysis.read_scores(tmp_path / "scores.jsonl")
    (tmp_path / "scores.jsonl").write_text(json.dumps({"score": 0.5, "tag": "1", "split": "train"}) + "\n")
    with pytest.raises(EvalError, match=r"scores.jsonl:1: field 'tag'"):
        analysis.read_scores(tmp_path / "scores.jsonl")


def test_scores_rise_by_tag_only_when_strictly_increasing():
    assert analysis.rises_by_tag([-0.5, 0.1, 0.7])
    assert not analysis.rises_by_tag([0.1, 0.1, 0.7])  # a tie is not a rise
    assert not analysis.rises_by_tag([0.7, 0.1, 0.9])
    assert analysis.rises_by_tag([1.0])
