"""Quantile tags: equal-size groups fixed on held-out scores; bounds and errors."""

import numpy as np
import pytest

from moss_jax.stages.tagging import TagConfig, assign_tags, grouped_tags, quantile_thresholds, turn_group


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


def test_grouped_cut_points_give_every_group_the_same_tag_shares():
    """A preference model scoring one language higher overall: global cut points give that
    language most best tags; per-group cut points give each group a third of each tag."""
    rs = np.random.RandomState(1)
    held = np.concatenate([rs.randn(600) + 3.0, rs.randn(600) - 1.0])
    held_groups = ["en"] * 600 + ["zh"] * 600
    train = np.concatenate([rs.randn(900) + 3.0, rs.randn(300) - 1.0])
    groups = np.array(["en"] * 900 + ["zh"] * 300)
    global_tags = assign_tags(train, quantile_thresholds(held, 3))
    assert (global_tags[groups == "zh"] == 2).mean() < 0.05
    cuts, tags, held_tags = grouped_tags(held, held_groups, train, groups, 3)
    assert sorted(cuts) == ["en", "zh"] and cuts["en"][0] > cuts["zh"][1]
    for g in ("en", "zh"):
        shares = np.bincount(tags[groups == g], minlength=3) / (groups == g).sum()
        assert np.all(np.abs(shares - 1 / 3) < 0.06), (g, shares)
        held_shares = np.bincount(held_tags[np.array(held_groups) == g], minlength=3)
        assert np.all(np.abs(held_shares - 200) <= 1)
    with pytest.raises(ValueError, match=r"no held-out replies in group\(s\) \['fr'\]"):
        grouped_tags(held, held_groups, [0.0], ["fr"], 3)


def test_turn_group_is_the_human_turn_language():
    c = {
        "chat": {
            "turn_1": {"Human": "<|Human|>: What is 2+2?<eoh>\n", "MOSS": "<|MOSS|>: 4<eom>\n"},
            "turn_2": {"Human": "<|Human|>: 计算 3*3<eoh>\n", "MOSS": "<|MOSS|>: 9<eom>\n"},
        }
    }
    assert [turn_group(c, t, "language") for t in (1, 2)] == ["en", "zh"]
    assert turn_group(c, 2, "none") == "all"
    with pytest.raises(ValueError, match="group_by"):
        TagConfig("rm", "v", (), (), "out", group_by="topic")


class _ByteVocab:
    def encode(self, text):
        return list(text.encode("utf-8"))


def _pair(cid, human):
    return {
        "conversation_id": cid,
        "meta_instruction": "",
        "chat": {"turn_1": {"Human": f"<|Human|>: {human}<eoh>\n"}},
        "chosen": "<|MOSS|>: yes.<eom>\n",
        "rejected": "<|MOSS|>: no.<eom>\n",
    }


def test_replies_too_long_to_score_are_counted_in_the_summary_and_thresholds(tmp_path, monkeypatch):
    """They stay untagged in conversations.jsonl; the count must reach the summary (DONE.json)
    and thresholds.json, not only the log."""
    import json

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import moss_jax.convert.checkpoint_io as checkpoint_io
    from moss_jax.config import get_config
    from moss_jax.reward_model import RewardModel
    from moss_jax.stages import tagging

    config = get_config("debug", max_len=128)
    params = nn.unbox(RewardModel(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    monkeypatch.setattr(checkpoint_io, "load_params", lambda path: (config, params))
    monkeypatch.setattr(tagging, "load_vocabulary", lambda path: _ByteVocab())
    for name, humans in (("train", ["hi", "ok", "x" * 300]), ("held", ["a", "b", "c", "y" * 300, "z" * 300])):
        lines = [json.dumps(_pair(f"{name}{i}", h)) for i, h in enumerate(humans)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = TagConfig(
        "rm",
        "vocab",
        (str(tmp_path / "train.jsonl"),),
        (str(tmp_path / "held.jsonl"),),
        str(tmp_path / "out"),
        num_tags=2,
        seq_len=128,
        batch_size=4,
    )
    summary = tagging.tag_stage(cfg)
    # Each pair gives two conversations (chosen and rejected): one long train pair, two held-out.
    assert summary["tagged_replies"] == 4
    assert summary["unscored_too_long"] == 2 and summary["unscored_too_long_heldout"] == 4
    saved = json.loads((tmp_path / "out" / "thresholds.json").read_text())
    assert saved["unscored_too_long"] == 2 and saved["unscored_too_long_heldout"] == 4
    assert saved["num_heldout"] == 6
