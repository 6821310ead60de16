"""Evaluation and report of the end-to-end demo (moss_jax/stages/demo.py).

Everything is measured on held-out data the stages never trained on: held-out preference pairs
(the preference model's pair accuracy, DPO's implicit-reward accuracy, the prompts for the
score-by-tag curve) and held-out tool questions (search topics and equations unseen in training,
fresh numbers). Greedy decoding throughout.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines import conversation as conv
from data_pipelines import specials as sp
from data_pipelines.demo_data import moss_field
from data_pipelines.jsonl import iter_jsonl, write_text_atomic

HEADLINE_KEYS = (
    "pm_pair_accuracy",
    "tool_exact_match_sft",
    "tool_exact_match_pat",
    "tool_exact_match_dpo",
    "pm_score_by_tag",
    "pm_score_no_tag",
    "pm_score_sft",
    "pm_score_dpo",
    "dpo_pair_accuracy",
)
REPLY_TOKENS = 48
# Room kept after REPLY_TOKENS for what the preference model reads around the reply: the space
# after `<|MOSS|>:`, `<eom>\n`, and ids that re-encoding the decoded reply may add.
REPLY_END_TOKENS = 8


def _load(path: Path):
    from moss_jax.convert.checkpoint_io import load_params

    return load_params(path)


def _pairs(path: Path, limit: int | None = None) -> list[dict]:
    out = [r for _, _, r in iter_jsonl([path])]
    return out[:limit] if limit else out


def pair_rows(pairs: list[dict], vocab, seq_len: int) -> tuple[list, list, int]:
    """Encoded (chosen rows, rejected rows); pairs that do not fit are dropped and counted."""
    chosen, rejected, dropped = [], [], 0
    for p in pairs:
        enc = conv.encode_pair(p, vocab, seq_len)
        if enc is None:
            dropped += 1
            continue
        chosen.append(enc["chosen"])
        rejected.append(enc["rejected"])
    return chosen, rejected, dropped


def reply_prompt(pair: dict, tag: str | None) -> str:
    """The held-out context as the model saw it in training, ending `<|MOSS|>:` (+ tag)."""
    turns = conv.record_turns(pair)
    text = pair.get("meta_instruction", "")
    for turn in turns:
        text += "".join(turn[f] for f in conv.TURN_FIELDS if f in turn and f != "MOSS")
        if "MOSS" in turn:
            text += turn["MOSS"]
    return text + sp.ROLE_MOSS + ":" + (tag or "")


def fit_contexts(pairs: list[dict], encode, max_len: int, tags: list[str | None]) -> tuple[list[dict], int, int]:
    """The held-out contexts cut to fit generation and scoring, at whole turns as training cuts.

    Each pair keeps its meta instruction and its last turn and loses earlier turns, oldest first,
    until its prompt (`reply_prompt`, with the longest of `tags`) plus REPLY_TOKENS generated and
    REPLY_END_TOKENS fit `max_len`; so the reply is generated from, and scored in, the same
    context. Returns (the pairs that fit, how many of them lost turns, how many did not fit even
    with their last turn alone: left out).
    """
    out, turns_cut, dropped = [], 0, 0
    room = max_len - REPLY_TOKENS - REPLY_END_TOKENS
    for pair in pairs:
        turns = conv.record_turns(pair)
        for start in range(len(turns)):
            kept = dict(pair, chat={f"turn_{i}": dict(t) for i, t in enumerate(turns[start:], 1)})
            if "num_turns" in pair:
                kept["num_turns"] = len(turns) - start
            if max(len(encode(reply_prompt(kept, tag))) for tag in tags) <= room:
                out.append(kept)
                turns_cut += start > 0
                break
        else:
            dropped += 1
    return out, turns_cut, dropped


def generate_replies(model, pairs: list[dict], tag: str | None) -> list[str]:
    texts = model.generate([reply_prompt(p, tag) for p in pairs], REPLY_TOKENS, [sp.END_OF_MOSS])
    return [t[1:] if t.startswith(" ") else t for t in texts]


def score_replies(rm_params, rm_config, vocab, pairs: list[dict], replies: list[str], seq_len: int) -> np.ndarray:
    """The preference model's score of each reply in its pair's whole context (see fit_contexts)."""
    from moss_jax.stages.scoring import encode_reply, reward_scores

    rows = []
    for p, reply in zip(pairs, replies, strict=True):
        turns = conv.record_turns(p)
        chat = {f"turn_{i}": dict(t) for i, t in enumerate(turns, 1)}
        chat[f"turn_{len(turns)}"]["MOSS"] = moss_field(reply.strip())
        stats = conv.ConversionStats()
        row = encode_reply({"meta_instruction": p.get("meta_instruction", ""), "chat": chat}, vocab, seq_len, stats)
        if row is None or stats.truncated:
            raise ValueError(
                f"pair {p.get('conversation_id')}: context and reply do not fit {seq_len} tokens, so the "
                "preference model would score the reply in a shorter context than it was generated from "
                "(fit_contexts leaves room for it)"
            )
        rows.append(row)
    return reward_scores(rm_params, rm_config, rows, batch_size=16, seq_len=seq_len, desc="score replies")


def loss_curves(paths, stages: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2))
    for ax, stage in zip(np.atleast_1d(axes), stages, strict=True):
        rows = [json.loads(line) for line in open(paths.stage(stage) / "metrics.jsonl")]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
        if "accuracy" in rows[0]:
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in rows], [r["accuracy"] for r in rows], color="tab:orange", marker=".")
            ax2.set_ylabel("pair accuracy (train batch)", color="tab:orange")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def score_by_tag_plot(scores: list[float], extra: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    labels = [f"tag {k}" for k in range(len(scores))] + list(extra)
    values = list(scores) + list(extra.values())
    ax.bar(labels, values, color=["tab:blue"] * len(scores) + ["tab:gray"] * len(extra))
    ax.set_ylabel("mean preference-model score")
    ax.set_title("generations on held-out prompts")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def sample_conversation(params, config, tokenizer, registry, tag: str | None) -> dict:
    """One chat through the real tool loop (generate to <eoc>, run tools, generate to <eom>)."""
    from moss_jax.inference.chat_session import ChatSession
    from moss_jax.inference.local import LocalGenerator
    from moss_jax.inference.sampling import SamplingParams
    from moss_jax.stages.demo import DEMO_IDENTITY

    generator = LocalGenerator(params, config, tokenizer.decode)
    session = ChatSession(
        generator,
        tokenizer,
        config.max_len,
        tools=registry,
        tools_on=True,
        sampling=SamplingParams(),  # greedy
        max_new_tokens=96,
        tag=tag,
        identity=DEMO_IDENTITY,
    )
    out = []
    for message in ("What is 17*23+8?", "解方程 4*x+6=30。"):
        reply = session.send(message)
        t = reply.turn
        out.append(
            {
                "human": message,
                "inner_thoughts": t.thoughts,
                "commands": t.commands,
                "results": t.results,
                "moss": reply.text,
            }
        )
    return {"tag": tag, "turns": out}


def evaluate_and_report(paths, scale, summaries: dict, timings: dict) -> dict:
    """Measures everything, writes `<workdir>/report/`, returns the metrics."""
    from moss_jax.eval.analysis import rises_by_tag
    from moss_jax.eval.lm import EvalModel
    from moss_jax.eval.tool_use import exact_match, read_questions
    from moss_jax.inference.tokenizer import load_tokenizer
    from moss_jax.stages.demo import registry_for
    from moss_jax.stages.scoring import reply_logprobs, reward_scores
    from moss_jax.stages.tagging import PREFERENCE_TAGS_FILE

    t0 = time.perf_counter()
    report = paths.report
    report.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(paths.vocab)
    vocab = tokenizer.vocab  # the seqio vocabulary training encoded with
    _, sft = _load(paths.params("sft"))
    _, pat = _load(paths.params("preference_aware"))
    _, dpo = _load(paths.params("dpo"))
    rm_config, rm = _load(paths.params("reward_model"))
    config = rm_config
    seq_len = config.max_len
    tags_meta = json.loads((paths.params("preference_aware") / PREFERENCE_TAGS_FILE).read_text())
    tag_tokens = tags_meta["tokens"]
    models = {
        name: EvalModel.from_params(config, params, tokenizer, batch_size=16, name=name)
        for name, params in (("sft", sft), ("pat", pat), ("dpo", dpo))
    }
    metrics: dict[str, Any] = {}

    # Preference model and DPO on held-out pairs.
    held = _pairs(paths.demo / "pairs_heldout.jsonl")
    chosen, rejected, dropped = pair_rows(held, vocab, seq_len)
    rc = reward_scores(rm, rm_config, chosen, 16, seq_len, desc="pm chosen")
    rr = reward_scores(rm, rm_config, rejected, 16, seq_len, desc="pm rejected")
    metrics["pm_pair_accuracy"] = float(np.mean(rc > rr))
    kinds = [p.get("rejection_kind", "?") for p in held if conv.encode_pair(p, vocab, seq_len) is not None]
    metrics["pm_pair_accuracy_by_rejection"] = {
        k: float(np.mean([a > b for a, b, kk in zip(rc, rr, kinds, strict=True) if kk == k]))
        for k in sorted(set(kinds))
    }
    metrics["heldout_pairs"] = len(chosen)
    metrics["heldout_pairs_dropped_too_long"] = dropped
    beta = 0.1
    lp = {
        (name, side): reply_logprobs(params, config, rows, 16, seq_len, desc=f"logp {name} {side}")
        for name, params in (("dpo", dpo), ("sft", sft))
        for side, rows in (("chosen", chosen), ("rejected", rejected))
    }
    margin = beta * ((lp["dpo", "chosen"] - lp["sft", "chosen"]) - (lp["dpo", "rejected"] - lp["sft", "rejected"]))
    metrics["dpo_pair_accuracy"] = float(np.mean(margin > 0))
    metrics["dpo_beta"] = beta
    metrics["sft_logprob_pair_accuracy"] = float(np.mean(lp["sft", "chosen"] > lp["sft", "rejected"]))

    # Tool-command exact match on held-out questions.
    questions = read_questions(paths.demo / "tool_questions.jsonl")
    tool = {name: exact_match(models[name].generate, questions) for name in ("sft", "pat", "dpo")}
    for name, r in tool.items():
        metrics[f"tool_exact_match_{name}"] = r["exact_match"]
        metrics[f"tool_exact_match_{name}_by_kind"] = r["by_kind"]
    metrics["tool_questions"] = len(questions)

    # Preference-model score of generations, per conditioning tag (worst first), and baselines.
    prompts, turns_cut, too_long = fit_contexts(
        held[: scale.tag_prompts], tokenizer.encode, seq_len, [*tag_tokens, None]
    )
    metrics["pm_score_prompts_turns_cut"] = turns_cut
    metrics["pm_score_prompts_dropped_too_long"] = too_long
    by_tag = []
    samples = {}
    for k, tag in enumerate(tag_tokens):
        replies = generate_replies(models["pat"], prompts, tag)
        by_tag.append(float(np.mean(score_replies(rm, rm_config, vocab, prompts, replies, seq_len))))
        samples[f"pat_tag_{k}"] = replies[:3]
    metrics["pm_score_by_tag"] = by_tag
    for label, model, tag in (("no_tag", "pat", None), ("sft", "sft", None), ("dpo", "dpo", None)):
        replies = generate_replies(models[model], prompts, tag)
        metrics[f"pm_score_{label}"] = float(np.mean(score_replies(rm, rm_config, vocab, prompts, replies, seq_len)))
        samples[label] = replies[:3]
    metrics["pm_score_prompts"] = len(prompts)
    metrics["tag_thresholds"] = tags_meta["thresholds"]  # global; the tags used these per group if set:
    metrics["tag_group_thresholds"] = tags_meta.get("group_thresholds")
    metrics["monotone_by_tag"] = rises_by_tag(by_tag)  # strict: worst < ... < best
    # Prompts EvalModel.generate cut from the left (tool questions have no turns to drop): 0 expected.
    metrics["generation_prompts_cut"] = sum(m.prompts_cut for m in models.values())
    metrics["checks"] = {
        "pm_pair_accuracy >= 0.9": metrics["pm_pair_accuracy"] >= 0.9,
        "tool_exact_match_pat >= 0.8": metrics["tool_exact_match_pat"] >= 0.8,
        "tool_exact_match_pat >= tool_exact_match_sft": metrics["tool_exact_match_pat"]
        >= metrics["tool_exact_match_sft"],
        "pm_score_by_tag rises (worst < ... < best)": metrics["monotone_by_tag"],
        "dpo_pair_accuracy > 0.5": metrics["dpo_pair_accuracy"] > 0.5,
    }

    # Sample conversation through the real tool loop, best tag.
    registry = registry_for(paths)
    conversation = sample_conversation(pat, config, tokenizer, registry, tags_meta["best"])
    (report / "sample_conversation.json").write_text(json.dumps(conversation, ensure_ascii=False, indent=2))

    loss_curves(paths, ["pretrain", "sft", "reward_model", "preference_aware", "dpo"], report / "loss_curves.png")
    score_by_tag_plot(
        by_tag,
        {"no tag": metrics["pm_score_no_tag"], "SFT": metrics["pm_score_sft"], "DPO": metrics["pm_score_dpo"]},
        report / "pm_score_by_tag.png",
    )
    timings["evaluate"] = time.perf_counter() - t0
    metrics["stage_seconds"] = timings
    metrics["stages"] = {
        s: {k: v for k, v in summ.items() if k in ("first_loss", "last_loss", "loss_drop", "last_metrics", "end_step")}
        for s, summ in summaries.items()
    }
    metrics["tag_stage"] = {
        k: summaries["tag"].get(k)
        for k in (
            "tag_counts",
            "mean_score_by_tag",
            "thresholds",
            "tagged_replies",
            "unscored_too_long",
            "unscored_too_long_heldout",
        )
    }
    write_text_atomic(report / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False))
    write_text_atomic(
        report / "tool_examples.json",
        json.dumps({n: r["examples"] for n, r in tool.items()}, ensure_ascii=False, indent=1),
    )
    write_text_atomic(report / "generations.json", json.dumps(samples, ensure_ascii=False, indent=1))
    write_text_atomic(report / "report.md", markdown(metrics, conversation))
    return metrics


def markdown(m: dict, conversation: dict) -> str:
    tags = " < ".join(f"{s:.3f}" for s in m["pm_score_by_tag"])
    tag = m.get("tag_stage") or {}
    lines = [
        "# moss_jax embedded demo: report",
        "",
        "Held-out figures (greedy decoding). Targets from the alignment issue in brackets.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| preference model pair accuracy [>= 0.90] | {m['pm_pair_accuracy']:.3f} ({m['heldout_pairs']} pairs) |",
        f"| tool-command exact match, SFT | {m['tool_exact_match_sft']:.3f} ({m['tool_questions']} questions) |",
        f"| tool-command exact match, preference-aware, best tag [>= 0.80, >= SFT] | {m['tool_exact_match_pat']:.3f} |",
        f"| tool-command exact match, DPO | {m['tool_exact_match_dpo']:.3f} |",
        f"| PM score of generations by tag, worst to best [rising] | {tags} |",
        "| PM score: no tag / SFT / DPO | "
        f"{m['pm_score_no_tag']:.3f} / {m['pm_score_sft']:.3f} / {m['pm_score_dpo']:.3f} |",
        f"| DPO implicit-reward pair accuracy [> 0.5] | {m['dpo_pair_accuracy']:.3f} |",
        f"| SFT log-prob pair accuracy (before DPO) | {m['sft_logprob_pair_accuracy']:.3f} |",
        f"| PM-score prompts: used / cut at whole turns / left out, too long | {m['pm_score_prompts']} / "
        f"{m['pm_score_prompts_turns_cut']} / {m['pm_score_prompts_dropped_too_long']} |",
        f"| generation prompts cut from the left (no turns to drop) | {m['generation_prompts_cut']} |",
        f"| tag stage: replies tagged / too long to score (train, held-out) | {tag.get('tagged_replies')} / "
        f"{tag.get('unscored_too_long')}, {tag.get('unscored_too_long_heldout')} |",
        "",
        "Checks: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in m["checks"].items()),
        "",
        "The tool command is written before `<|MOSS|>:`, where the tag goes, so the tag cannot change",
        "the command itself; preference-aware training is compared with DPO on the quality of the",
        "replies (PM score of generations) and on tool accuracy.",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![PM score by tag](pm_score_by_tag.png)",
        "",
        f"## Sample conversation (preference-aware model, tag {conversation['tag']}, real tools)",
        "",
    ]
    for t in conversation["turns"]:
        lines += [
            f"- **Human**: {t['human']}",
            f"  - Inner Thoughts: {t['inner_thoughts']}",
            f"  - Commands: `{t['commands']}`",
            f"  - Results: `{(t['results'] or '').strip()}`",
            f"- **MOSS**: {t['moss']}",
        ]
    lines += ["", "Stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in m["stage_seconds"].items() if v), ""]
    return "\n".join(lines)
