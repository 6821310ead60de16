"""MOSS sampling: penalty formula and order, top-k/top-p kept sets, seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax.inference.sampling import (
    MOSS_DEFAULTS,
    RowSampling,
    SamplingParams,
    apply_repetition_penalty,
    argmax_last,
    filter_top_k_top_p,
    select_next,
)


def test_repetition_penalty_formula():
    logits = jnp.asarray([[-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]])
    seen = jnp.asarray([[True, False, True, True, False, True]])
    out = np.asarray(apply_repetition_penalty(logits, seen, jnp.asarray([2.0])))
    # score < 0: x * p; else x / p; unseen ids untouched.
    np.testing.assert_allclose(out[0], [-4.0, -1.0, 0.0, 0.5, 2.0, 1.5])


def _reference_filter(logits, top_k, top_p):
    """HF order: TopK then TopP (on the renormalised top-k distribution), as a kept set."""
    order = np.argsort(-logits, kind="stable")
    keep = np.zeros_like(logits, bool)
    k = len(logits) if top_k == 0 else min(top_k, len(logits))
    kept = order[:k]
    probs = np.exp(logits[kept] - logits[kept].max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    keep[kept[(before < top_p) | (np.arange(k) == 0)]] = True
    return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (5, 1.0), (8, 0.7), (0, 1.0), (3, 0.01)])
def test_filter_matches_reference(top_k, top_p):
    logits = np.random.RandomState(top_k).randn(4, 50).astype(np.float32) * 3
    out = np.asarray(filter_top_k_top_p(jnp.asarray(logits), jnp.full((4,), top_k), jnp.full((4,), top_p)))
    for row in range(4):
        keep = _reference_filter(logits[row], top_k, top_p)
        np.testing.assert_array_equal(np.isfinite(out[row]), keep)
        np.testing.assert_allclose(out[row][keep], logits[row][keep])


@pytest.mark.parametrize("top_k,top_p", [(4, 1.0), (0, 0.6), (6, 0.8)])
def test_samples_never_leave_the_kept_set(top_k, top_p):
    n, vocab = 2000, 40
    logits_V = np.random.RandomState(7).randn(vocab).astype(np.float32) * 2
    temperature = 0.7
    keep = _reference_filter(logits_V / temperature, top_k, top_p)
    sampling = RowSampling.from_params(
        [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=s) for s in range(n)]
    )
    logits = jnp.broadcast_to(jnp.asarray(logits_V), (n, vocab))
    drawn = np.asarray(jax.jit(select_next)(logits, jnp.zeros((n, vocab), bool), sampling, jnp.zeros((n,), jnp.int32)))
    assert keep[drawn].all(), sorted(set(drawn[~keep[drawn]]))
    # Not trivially satisfied: every kept token shows up, so the filter is not too tight either.
    assert set(drawn.tolist()) == set(np.flatnonzero(keep).tolist())


def test_penalty_applies_before_temperature_and_top_k():
    # With top_k=1 the draw is the argmax of the penalised logits; penalising after top-k would
    # keep token 0 (the raw argmax) instead.
    logits = jnp.asarray([[5.0, 4.0, 1.0]])
    seen = jnp.asarray([[True, False, False]])
    sampling = RowSampling.from_params([SamplingParams(temperature=0.5, top_k=1, repetition_penalty=2.0)])
    assert int(select_next(logits, seen, sampling, jnp.zeros((1,), jnp.int32))[0]) == 1


def test_greedy_row_ignores_randomness_and_sampled_rows_use_their_seed():
    logits = jnp.asarray(np.random.RandomState(0).randn(3, 30).astype(np.float32))
    seen = jnp.zeros((3, 30), bool)
    count = jnp.zeros((3,), jnp.int32)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, seed=1)]
    select = jax.jit(select_next)
    out = np.asarray(select(logits.at[2].set(logits[1]), seen, RowSampling.from_params(params), count))
    assert out[0] == int(jnp.argmax(logits[0]))
    assert out[1] == out[2]  # same seed, same logits, same step: same draw
    draws = {
        int(select(logits[1:2], seen[:1], RowSampling.from_params([params[1]]), jnp.asarray([c]))[0]) for c in range(40)
    }
    assert len(draws) > 3  # the step count feeds the key: fresh randomness each step


def test_sampling_params():
    assert SamplingParams.from_kwargs().greedy
    assert SamplingParams.from_kwargs(repetition_penalty=1.1).greedy
    assert SamplingParams.from_kwargs(top_p=0.9).temperature == 1.0
    assert MOSS_DEFAULTS == SamplingParams(temperature=0.7, top_p=0.8, repetition_penalty=1.02)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_argmax_last_equals_jnp_argmax():
    """Ties take the first index, a NaN counts as the max, all -inf rows give 0 (as jnp.argmax)."""
    rng = np.random.RandomState(0)
    x = rng.randn(9, 300).astype(np.float32)
    x[1, [5, 70]] = 10.0  # tie
    x[2, [3, 40]] = np.nan
    x[3] = -np.inf
    x[4, 17] = np.inf
    x[5] = np.nan
    x[6, 100:] = 0.0
    x[6, :100] = -1.0  # tie across many
    for rows in (x, x[:1], x.reshape(3, 3, 300)):
        got = jax.jit(argmax_last)(jnp.asarray(rows))
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(rows), axis=-1))
