"""Scoring and log-probabilities of conversation replies with a trained model, in fixed-shape batches.

Both the `tag` stage and the demo's evaluation need, for many (context, reply) texts, either the
preference model's score at the last token or a policy's log-probability of the reply. Rows are
encoded with the same segment-wise tokenisation as training (`data_pipelines.conversation`),
right-padded to one length and run in batches of one size, so each function compiles once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from data_pipelines import conversation as conv
from moss_jax.config import MossConfig
from moss_jax.model import MossLM
from moss_jax.reward_model import RewardModel, last_token_scores
from moss_jax.train.objectives import sequence_logprobs


def reply_record(record: dict, turn: int, reply_field: str | None = None) -> dict:
    """The conversation cut after `turn` (1-based), optionally with that turn's MOSS field replaced."""
    turns = conv.record_turns(record)
    chat = {f"turn_{i}": dict(t) for i, t in enumerate(turns[:turn], 1)}
    if reply_field is not None:
        chat[f"turn_{turn}"]["MOSS"] = reply_field
    return {"meta_instruction": record.get("meta_instruction", ""), "chat": chat}


def encode_reply(
    record: dict, vocab: Any, max_len: int, stats: conv.ConversionStats | None = None
) -> tuple[list[int], list[float]] | None:
    """(ids, weights) of a conversation whose last turn's reply is scored; weights mark that reply.

    Earlier context is cut at whole turns to fit; None if the last turn alone does not fit. Both
    are counted in `stats` when given (`truncated`, `dropped_too_long`).
    """
    turns = conv.record_turns(record)
    last = dict(turns[-1])
    reply = last.pop("MOSS")
    pair = {
        "meta_instruction": record.get("meta_instruction", ""),
        "chat": {**{f"turn_{i}": t for i, t in enumerate(turns[:-1], 1)}, f"turn_{len(turns)}": last},
        "chosen": reply,
        "rejected": reply,
    }
    out = conv.encode_pair(pair, vocab, max_len, stats=stats)
    return None if out is None else out["chosen"]


def _batches(rows: Sequence[tuple[list[int], list[float]]], batch_size: int, seq_len: int, desc: str):
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False):
        chunk = rows[start : start + batch_size]
        ids = np.zeros((batch_size, seq_len), np.int32)
        weights = np.zeros((batch_size, seq_len), np.float32)
        seg = np.zeros((batch_size, seq_len), np.int32)
        for b, (row_ids, row_w) in enumerate(chunk):
            n = len(row_ids)
            ids[b, :n], weights[b, :n], seg[b, :n] = row_ids, row_w, 1
        # t5x convention: inputs are the targets shifted right with 0 at the start.
        inputs = np.concatenate([np.zeros((batch_size, 1), np.int32), ids[:, :-1]], axis=1)
        pos = np.broadcast_to(np.arange(seq_len, dtype=np.int32), ids.shape) * seg
        yield len(chunk), {"inputs": inputs, "targets": ids, "weights": weights, "seg": seg, "pos": pos}


@functools.lru_cache(maxsize=8)
def _score_fn(config: MossConfig):
    model = RewardModel(config)

    @jax.jit
    def fn(params, b):
        scores = model.apply({"params": params}, b["inputs"], positions_BxL=b["pos"], segment_ids_BxL=b["seg"])
        return last_token_scores(scores, b["seg"])

    return fn


@functools.lru_cache(maxsize=8)
def _logprob_fn(config: MossConfig):
    model = MossLM(config)

    @jax.jit
    def fn(params, b):
        logits = model.apply({"params": params}, b["inputs"], positions_BxL=b["pos"], segment_ids_BxL=b["seg"])
        return sequence_logprobs(logits, b["targets"], b["weights"])

    return fn


def _run(fn, params, rows, batch_size, seq_len, desc) -> np.ndarray:
    too_long = [i for i, (ids, _) in enumerate(rows) if len(ids) > seq_len]
    if too_long:
        raise ValueError(f"{len(too_long)} rows are longer than seq_len {seq_len} (first: row {too_long[0]})")
    out = []
    for n, b in _batches(rows, batch_size, seq_len, desc):
        out.append(np.asarray(fn(params, {k: jnp.asarray(v) for k, v in b.items()}))[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def reward_scores(params, config, rows, batch_size=32, seq_len=None, desc="score") -> np.ndarray:
    """The preference model's score of each (ids, weights) row at its last token."""
    return _run(_score_fn(config), params, rows, batch_size, seq_len or config.max_len, desc)


def reply_logprobs(params, config, rows, batch_size=32, seq_len=None, desc="logprob") -> np.ndarray:
    """The language model's log-probability of each row's weighted tokens (the reply)."""
    return _run(_logprob_fn(config), params, rows, batch_size, seq_len or config.max_len, desc)
