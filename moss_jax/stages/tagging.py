"""The `tag` stage: score every reply with the preference model and turn scores into quality tags.

Our design (MOSS never published its tag format; MOSS_SPEC section 4): K tags (default 3) are
equal-size quantiles of the preference model's scores, with the cut points fixed on a held-out
score distribution and saved with the run; tag 0 is the lowest quality, K-1 the best. The
`preference_aware` stage trains on the tagged conversations (tag right after `<|MOSS|>:`, masked
from the loss, 5-10% tag dropout; see data_pipelines/conversation.py), and inference asks for
the best tag (`<|quality_{K-1}|>`).

Conversations to tag come from the preference pairs: each pair gives its chosen and its rejected
conversation (`data_pipelines.demo_data.pair_conversations` layout), so the tagged data spans
good and bad replies and the tags carry information. Every turn's reply is scored in its context.

Outputs in `out_dir`: `tags.jsonl` (conversation_id, turn, tag: the `load_tags` format),
`scores.jsonl` (conversation_id, turn, score, tag, split), `thresholds.json` (with the counts of
replies too long for `seq_len` to score, `unscored_too_long` and `unscored_too_long_heldout`),
`preference_tags.json` (num_tags, tokens, best, thresholds: read by chat and serve) and
`conversations.jsonl` (the tagged conversations, the preference-aware stage's training data).

`TagConfig.group_by = "language"` (the demo's setting) fixes the cut points per language of the
human turn (Chinese if it holds a CJK character, else English): a preference model's scores
need not share a scale across groups, and one set of global cut points then makes a tag mean
the group as much as the quality. The demo's model scores correct English replies 3.9 on
average and correct Chinese ones 1.1, so with global cut points the best tag held 604 English
but 105 Chinese correct replies, and the model asked for the best tag answered Chinese questions
in English. Per group, every group has the same share of each tag.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from data_pipelines import conversation as conv
from data_pipelines import specials as sp
from data_pipelines.demo_data import pair_conversations, write_jsonl
from data_pipelines.jsonl import iter_jsonl, write_text_atomic
from data_pipelines.vocab import load_vocabulary
from moss_jax.stages.scoring import encode_reply, reply_record, reward_scores

PREFERENCE_TAGS_FILE = "preference_tags.json"
GROUP_BY = ("none", "language")
_CJK = re.compile("[\u3400-\u9fff\uf900-\ufaff]")


@dataclasses.dataclass(frozen=True)
class TagConfig:
    """Args of the tag stage.

    reward_model: the preference model's params directory (the reward_model stage's `params`).
    vocab_path: the SentencePiece model.
    pair_files: preference pairs whose conversations are tagged (training data of the next stage).
    heldout_pair_files: held-out pairs whose scores fix the quantile cut points.
    out_dir: where the outputs go.
    """

    reward_model: str
    vocab_path: str
    pair_files: tuple[str, ...]
    heldout_pair_files: tuple[str, ...]
    out_dir: str
    num_tags: int = 3
    seq_len: int = 512
    batch_size: int = 32
    group_by: str = "none"

    def __post_init__(self):
        if not 2 <= self.num_tags <= sp.MAX_QUALITY_TAGS:
            raise ValueError(f"num_tags must be in [2, {sp.MAX_QUALITY_TAGS}], got {self.num_tags}")
        if self.group_by not in GROUP_BY:
            raise ValueError(f"TagConfig.group_by={self.group_by!r} is not one of {GROUP_BY}")


def turn_group(conversation: dict, turn: int, group_by: str) -> str:
    """The group whose cut points tag this turn's reply: "all", or the human turn's language."""
    if group_by == "none":
        return "all"
    human = conv.record_turns(conversation)[turn - 1].get("Human", "")
    return "zh" if _CJK.search(human) else "en"


def quantile_thresholds(scores: Sequence[float], num_tags: int) -> list[float]:
    """K-1 cut points splitting `scores` into K equal-size groups."""
    if len(scores) < num_tags:
        raise ValueError(f"need at least {num_tags} held-out scores to fix {num_tags} quantile tags, got {len(scores)}")
    return [float(q) for q in np.quantile(np.asarray(scores, np.float64), np.arange(1, num_tags) / num_tags)]


def assign_tags(scores: Sequence[float], thresholds: Sequence[float]) -> np.ndarray:
    """Tag index per score: the number of cut points at or below it (0 = lowest quality)."""
    return np.searchsorted(np.asarray(thresholds), np.asarray(scores), side="right").astype(np.int32)


def grouped_tags(held_scores, held_groups, scores, groups, num_tags: int):
    """Cut points per group from the held-out scores, and the tags of both score sets.

    Returns ({group: K-1 cut points}, tags of `scores`, tags of `held_scores`).
    """
    held_scores, scores = np.asarray(held_scores, np.float64), np.asarray(scores, np.float64)
    held_groups, groups = np.asarray(held_groups, str), np.asarray(groups, str)
    cuts = {str(g): quantile_thresholds(held_scores[held_groups == g], num_tags) for g in sorted(set(held_groups))}
    missing = sorted(set(groups.tolist()) - set(cuts))
    if missing:
        raise ValueError(f"no held-out replies in group(s) {missing} to fix their cut points")
    tags, held_tags = np.zeros(len(scores), np.int32), np.zeros(len(held_scores), np.int32)
    for g, c in cuts.items():
        tags[groups == g] = assign_tags(scores[groups == g], c)
        held_tags[held_groups == g] = assign_tags(held_scores[held_groups == g], c)
    return cuts, tags, held_tags


def _conversations(pair_files: Sequence[str]) -> list[dict]:
    out = []
    for _, _, record in iter_jsonl(list(pair_files)):
        out += pair_conversations(record)
    return out


def _score_turns(params, config, vocab, conversations, seq_len, batch_size, desc):
    """(keys, scores, unscored): every turn's reply that fits `seq_len` with its context, scored;
    `unscored` counts the replies whose last turn alone does not fit (they stay untagged)."""
    keys, rows = [], []
    dropped = 0
    for c in conversations:
        for turn in range(1, len(conv.record_turns(c)) + 1):
            row = encode_reply(reply_record(c, turn), vocab, seq_len)
            if row is None:
                dropped += 1
                continue
            keys.append((c["conversation_id"], turn))
            rows.append(row)
    if dropped:
        print(f"[tag] {desc}: {dropped} replies longer than seq_len {seq_len} were not scored (left untagged)")
    return keys, reward_scores(params, config, rows, batch_size, seq_len, desc=desc), dropped


def tag_stage(cfg: TagConfig) -> dict:
    """Runs the stage; returns a summary (thresholds, counts, mean score per tag)."""
    from moss_jax.convert.checkpoint_io import load_params

    out = Path(cfg.out_dir)
    config, params = load_params(cfg.reward_model)
    if "reward_head_kernel" not in params:
        raise ValueError(f"{cfg.reward_model} is not a preference model checkpoint (no reward_head_kernel)")
    vocab = load_vocabulary(cfg.vocab_path)
    held = _conversations(cfg.heldout_pair_files)
    train = _conversations(cfg.pair_files)
    held_keys, held_scores, held_unscored = _score_turns(
        params, config, vocab, held, cfg.seq_len, cfg.batch_size, "score held-out"
    )
    keys, scores, unscored = _score_turns(params, config, vocab, train, cfg.seq_len, cfg.batch_size, "score train")
    thresholds = quantile_thresholds(held_scores, cfg.num_tags)

    def groups(ks, conversations):
        by_id = {c["conversation_id"]: c for c in conversations}
        return np.asarray([turn_group(by_id[cid], t, cfg.group_by) for cid, t in ks])

    held_groups, train_groups = groups(held_keys, held), groups(keys, train)
    group_thresholds, tags, held_tags = grouped_tags(held_scores, held_groups, scores, train_groups, cfg.num_tags)
    summary = {
        "thresholds": thresholds,
        "group_by": cfg.group_by,
        "group_thresholds": group_thresholds,
        "tagged_replies": len(keys),
        # Replies longer than seq_len with their last turn: not scored, so the training replies
        # among them stay in conversations.jsonl without a tag, the held-out ones fix no cut point.
        "unscored_too_long": unscored,
        "unscored_too_long_heldout": held_unscored,
        "tag_counts": np.bincount(tags, minlength=cfg.num_tags).tolist(),
        "mean_score_by_tag": [
            float(scores[tags == k].mean()) if (tags == k).any() else None for k in range(cfg.num_tags)
        ],
    }
    if jax.process_index() != 0:  # every process scores the same data; one writes
        return summary
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "conversations.jsonl", train)
    write_jsonl(
        out / "tags.jsonl",
        [{"conversation_id": cid, "turn": t, "tag": int(k)} for (cid, t), k in zip(keys, tags, strict=True)],
    )
    write_jsonl(
        out / "scores.jsonl",
        [
            {"conversation_id": cid, "turn": t, "score": float(s), "tag": int(k), "split": split}
            for split, ks, ss, ts in (("train", keys, scores, tags), ("heldout", held_keys, held_scores, held_tags))
            for (cid, t), s, k in zip(ks, ss, ts, strict=True)
        ],
    )
    meta = {
        "num_tags": cfg.num_tags,
        "tokens": list(sp.QUALITY_TAGS[: cfg.num_tags]),
        "best": sp.QUALITY_TAGS[cfg.num_tags - 1],
        "thresholds": thresholds,
        "group_by": cfg.group_by,
        "group_thresholds": group_thresholds,
        "design": "equal-size quantiles of preference-model scores on held-out replies (per group when "
        "group_by is set); tag after <|MOSS|>:",
    }
    write_text_atomic(
        out / "thresholds.json",
        json.dumps(
            {
                "thresholds": thresholds,
                "group_by": cfg.group_by,
                "group_thresholds": group_thresholds,
                "num_heldout": len(held_scores),
                "unscored_too_long": unscored,
                "unscored_too_long_heldout": held_unscored,
            },
            indent=2,
        ),
    )
    write_text_atomic(out / PREFERENCE_TAGS_FILE, json.dumps(meta, indent=2))
    print(
        f"[tag] {len(keys)} replies tagged; thresholds {np.round(thresholds, 3).tolist()} "
        f"(group_by {cfg.group_by}: { ({g: np.round(c, 3).tolist() for g, c in group_thresholds.items()}) }); "
        f"counts {summary['tag_counts']}; {unscored} train and {held_unscored} held-out replies too long to score"
    )
    return summary
