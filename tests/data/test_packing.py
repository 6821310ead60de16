import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.packing import PackingStats, pack
from moss_jax.config import PRESETS
from moss_jax.model import MossLM, init_params


def _examples(seed=0, n=12, vocab=500):
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        k = rng.randint(2, 20)
        out.append((rng.randint(3, vocab, k).tolist(), (rng.rand(k) > 0.3).astype(np.float32).tolist()))
    return out


def test_segments_positions_and_weights():
    examples = _examples()
    stats = PackingStats()
    rows = list(pack(examples, length=32, stats=stats))
    assert stats.examples == len(examples) and stats.truncated == 0
    assert stats.tokens == sum(len(ids) - 1 for ids, _ in examples)
    seen = []
    for row in rows:
        seg, pos = row["decoder_segment_ids"], row["decoder_positions"]
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(pos[idx], np.arange(len(idx)))  # positions restart at 0
            seen.append(
                (row["decoder_input_tokens"][idx], row["decoder_target_tokens"][idx], row["decoder_loss_weights"][idx])
            )
        pad = seg == 0
        assert not row["decoder_loss_weights"][pad].any() and not row["decoder_input_tokens"][pad].any()
    # Every example appears exactly once, intact, with targets shifted within the example only.
    remaining = list(examples)
    for inputs, targets, weights in seen:
        match = next(e for e in remaining if np.array_equal(e[0][:-1], inputs))
        remaining.remove(match)
        assert np.array_equal(match[0][1:], targets) and np.allclose(match[1][1:], weights)
    assert not remaining


def test_overlong_examples_are_cut_and_counted():
    stats = PackingStats()
    rows = list(pack([(list(range(3, 60)), [1.0] * 57)], length=16, stats=stats))
    assert stats.truncated == 1 and len(rows) == 1 and rows[0]["decoder_positions"][-1] == 15
    with pytest.raises(ValueError, match="example 1: 3 ids but 2 weights"):
        list(pack([([3, 4], [1, 1]), ([3, 4, 5], [1, 1])], length=16))


def test_packed_logits_equal_each_example_alone():
    cfg = PRESETS["debug"]
    params = init_params(cfg, jax.random.PRNGKey(0))
    model = MossLM(cfg)
    examples = _examples(seed=3, n=5)
    row = next(pack(examples, length=64, window=1))
    logits = model.apply(
        {"params": params},
        jnp.asarray(row["decoder_input_tokens"])[None],
        positions_BxL=jnp.asarray(row["decoder_positions"])[None],
        segment_ids_BxL=jnp.asarray(row["decoder_segment_ids"])[None],
    )[0]
    seg = row["decoder_segment_ids"]
    for s in range(1, seg.max() + 1):
        idx = np.flatnonzero(seg == s)
        alone = model.apply({"params": params}, jnp.asarray(row["decoder_input_tokens"][idx])[None])[0]
        np.testing.assert_allclose(logits[idx], alone, atol=1e-5, rtol=0)


def test_last_position_of_each_segment_is_trained():
    """docs/data.md and packing.py: no position predicts across a boundary, and each segment's
    last position predicts the example's last token with that token's weight (not 0)."""
    import tensorflow as tf

    from data_pipelines.feature_converter import WEIGHTS_FEATURE, WeightedLMFeatureConverter

    examples = [([10, 11, 12, 13], [0, 0, 1, 1]), ([20, 21, 22], [0, 1, 1])]
    (row,) = list(pack(examples, 8))
    assert row["decoder_segment_ids"].tolist() == [1, 1, 1, 2, 2, 0, 0, 0]
    assert row["decoder_target_tokens"].tolist() == [11, 12, 13, 21, 22, 0, 0, 0]
    assert row["decoder_loss_weights"].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]  # positions 2 and 4 end segments

    ds = tf.data.Dataset.from_generator(
        lambda: ({"targets": ids, WEIGHTS_FEATURE: [w + 1 for w in ws]} for ids, ws in examples),
        output_signature={k: tf.TensorSpec((None,), tf.int32) for k in ("targets", WEIGHTS_FEATURE)},
    )
    (row,) = list(WeightedLMFeatureConverter(pack=True)(ds, {"targets": 8, WEIGHTS_FEATURE: 8}).as_numpy_iterator())
    # t5x layout: n positions per example, input 0 at each start.
    assert row["decoder_segment_ids"].tolist() == [1, 1, 1, 1, 2, 2, 2, 0]
    assert row["decoder_input_tokens"].tolist() == [0, 10, 11, 12, 0, 20, 21, 0]
    assert row["decoder_loss_weights"].tolist() == [0, 0, 1, 1, 0, 1, 1, 0]  # positions 3 and 6 end segments
