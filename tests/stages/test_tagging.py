"""Quantile tags: equal-size groups fixed on held-out scores; bounds and errors."""

import numpy as np
import pytest

from moss_jax.stages.tagging import TagConfig, assign_tags, quantile_thresholds


def test_quantile_tags_split_heldout_scores_into_equal_groups():
    held = np.random.RandomState(0).randn(3000)
    cuts = quantile_thresholds(held, 3)
    assert len(cuts) == 2 and cuts[0] < cuts[1]
    counts = np.bincount(assign_tags(held, cuts), minlength=3)
    assert np.all(np.abs(counts - 1000) <= 2)


def test_tags_are_ordered_by_score_and_cover_the_range():
    cuts = [0.0, 1.0]
    np.testing.assert_array_equal(assign_tags([-5, -0.1, 0.0, 0.5, 1.0, 7], cuts), [0, 0, 1, 1, 2, 2])


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="num_tags"):
        TagConfig("rm", "v", (), (), "out", num_tags=9)
    with pytest.raises(ValueError, match="held-out scores"):
        quantile_thresholds([1.0, 2.0], 3)
