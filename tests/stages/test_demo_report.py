"""The demo report's held-out contexts: cut at whole turns for generation and scoring alike."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from data_pipelines import conversation as conv
from moss_jax.config import get_config
from moss_jax.reward_model import RewardModel
from moss_jax.stages import demo_report as dr

TAGS = ["<|quality_0|>", "<|quality_2|>", None]
META = "You are MOSS.\n"


def encode(text):
    return list(text.encode("utf-8"))


class ByteVocab:
    encode = staticmethod(encode)


def turn(i, reply=True):
    t = {"Human": f"<|Human|>: question number {i}, asked in full?<eoh>\n"}
    if reply:
        t["MOSS"] = f"<|MOSS|>: answer number {i}, given in full.<eom>\n"
    return t


def pair(cid, n_history, last_human=None):
    turns = [turn(i) for i in range(n_history)] + [turn(n_history, reply=False)]
    if last_human is not None:
        turns[-1] = {"Human": f"<|Human|>: {last_human}<eoh>\n"}
    return {
        "conversation_id": cid,
        "meta_instruction": META,
        "num_turns": len(turns),
        "chat": {f"turn_{i}": t for i, t in enumerate(turns, 1)},
        "chosen": "<|MOSS|>: yes<eom>\n",
        "rejected": "<|MOSS|>: no<eom>\n",
    }


def test_long_contexts_lose_whole_turns_not_a_prefix(max_len=300):
    room = max_len - dr.REPLY_TOKENS - dr.REPLY_END_TOKENS
    long, short, hopeless = pair("long", 6), pair("short", 1), pair("hopeless", 2, last_human="x" * 400)
    assert len(encode(dr.reply_prompt(long, TAGS[1]))) > max_len - dr.REPLY_TOKENS  # the old cut hit it
    kept, turns_cut, dropped = dr.fit_contexts([long, short, hopeless], encode, max_len, TAGS)
    assert [p["conversation_id"] for p in kept] == ["long", "short"] and turns_cut == 1 and dropped == 1
    assert kept[1] == short
    cut = kept[0]
    turns = conv.record_turns(cut)  # still a valid record: num_turns follows the turns kept
    assert cut["num_turns"] == len(turns) < 7 and turns[-1] == conv.record_turns(long)[-1]
    for tag in TAGS:
        prompt = dr.reply_prompt(cut, tag)
        assert len(encode(prompt)) <= room
        assert prompt.startswith(META + "<|Human|>: question number")  # the meta instruction, then a whole turn
    # One more turn would not have fitted.
    wider = dict(long, num_turns=len(turns) + 1)
    wider["chat"] = {f"turn_{i}": t for i, t in enumerate(conv.record_turns(long)[-len(turns) - 1 :], 1)}
    assert len(encode(dr.reply_prompt(wider, TAGS[1]))) > room


def test_the_preference_model_scores_the_context_the_reply_came_from(max_len=300):
    config = get_config("debug", max_len=max_len)
    params = nn.unbox(RewardModel(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    long = pair("long", 6)
    kept, _, _ = dr.fit_contexts([long], encode, max_len, TAGS)
    reply = "r" * dr.REPLY_TOKENS  # the longest reply generation gives (one byte per token here)
    scores = dr.score_replies(params, config, ByteVocab(), kept, [reply], max_len)
    assert scores.shape == (1,)
    # Uncut, the scorer would have to drop turns the reply was generated with: refused, not hidden.
    with pytest.raises(ValueError, match="shorter context than it was generated from"):
        dr.score_replies(params, config, ByteVocab(), [long], [reply], max_len)


def test_the_report_shows_cut_contexts_and_unscored_tag_replies():
    m = {
        "pm_pair_accuracy": 0.9,
        "heldout_pairs": 10,
        "tool_exact_match_sft": 0.5,
        "tool_questions": 6,
        "tool_exact_match_pat": 0.6,
        "tool_exact_match_dpo": 0.4,
        "pm_score_by_tag": [0.1, 0.2, 0.3],
        "pm_score_no_tag": 0.0,
        "pm_score_sft": 0.0,
        "pm_score_dpo": 0.0,
        "dpo_pair_accuracy": 0.7,
        "sft_logprob_pair_accuracy": 0.6,
        "pm_score_prompts": 7,
        "pm_score_prompts_turns_cut": 2,
        "pm_score_prompts_dropped_too_long": 1,
        "generation_prompts_cut": 0,
        "tag_stage": {"tagged_replies": 40, "unscored_too_long": 3, "unscored_too_long_heldout": 0},
        "checks": {},
        "stage_seconds": {},
    }
    text = dr.markdown(m, {"tag": "<|quality_2|>", "turns": []})
    assert "| PM-score prompts: used / cut at whole turns / left out, too long | 7 / 2 / 1 |" in text
    assert "| generation prompts cut from the left (no turns to drop) | 0 |" in text
    assert "| tag stage: replies tagged / too long to score (train, held-out) | 40 / 3, 0 |" in text
