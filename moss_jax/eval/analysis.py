"""Helpers of the analysis notebooks (notebooks/): metrics files, attention maps, preference scores."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moss_jax.config import MossConfig
from moss_jax.eval.lm import EvalError


def read_jsonl(path: str | Path, required: dict[str, type | tuple[type, ...]]) -> list[dict]:
    """JSON lines whose objects have the `required` fields of the given types."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{n}: not JSON ({e.msg})") from e
            for field, kind in required.items():
                if not isinstance(row, dict) or not isinstance(row.get(field), kind) or isinstance(row[field], bool):
                    raise EvalError(f"{path}:{n}: field '{field}' missing or not {kind}")
            rows.append(row)
    if not rows:
        raise EvalError(f"{path}: empty")
    return rows


def read_metrics(run_dir: str | Path) -> dict[str, np.ndarray]:
    """A training run's metrics.jsonl as {metric: values}, with `step`; non-finite values kept as NaN."""
    rows = read_jsonl(Path(run_dir) / "metrics.jsonl", {"step": int, "loss": (int, float)})
    keys = sorted({k for r in rows for k in r})
    return {k: np.array([float(r.get(k, math.nan)) for r in rows]) for k in keys}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    c = np.cumsum(np.insert(np.asarray(values, float), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def read_scores(path: str | Path) -> dict[str, Any]:
    """The tag stage's scores.jsonl: {"score": float, "tag": int, "split": "train"|"heldout"}."""
    rows = read_jsonl(path, {"score": (int, float), "tag": int, "split": str})
    for n, r in enumerate(rows, 1):
        if r["split"] not in ("train", "heldout"):
            raise EvalError(f"{path}: record {n}: split {r['split']!r} is not 'train' or 'heldout'")
    return {
        "score": np.array([float(r["score"]) for r in rows]),
        "tag": np.array([r["tag"] for r in rows]),
        "split": np.array([r["split"] for r in rows]),
    }


def rises_by_tag(scores_by_tag: Sequence[float]) -> bool:
    """Whether the scores rise strictly from the worst tag to the best (worst < ... < best).

    Strict: a better tag that scores only as well as a worse one does not count as rising
    (docs/alignment.md). The demo report's `monotone_by_tag` and the preference_scores notebook
    both use this.
    """
    return bool(all(a < b for a, b in zip(scores_by_tag[:-1], scores_by_tag[1:], strict=True)))


def layer_params(params: Any, layer: int, n_layers: int) -> Any:
    """One layer's parameters from a scanned (stacked) or unrolled parameter tree."""
    if not 0 <= layer < n_layers:
        raise EvalError(f"layer {layer} out of range: the model has {n_layers} layers")
    if "layers" in params:
        return jax.tree.map(lambda x: x[layer], params["layers"])
    return params[f"layers_{layer}"]


def attention_probs(config: MossConfig, params: Any, ids: list[int], layer: int) -> np.ndarray:
    """Softmax attention weights [H, L, L] of one layer for one sequence (causal, fp32).

    Runs the blocks below `layer` with the model's own Block, then recomputes that layer's
    scores from its LayerNorm, projections and rotary (the model's kernels return no weights).
    """
    layer_params(params, layer, config.n_layers)  # range check
    if not ids:
        raise EvalError("attention_probs needs at least one token")
    return np.asarray(_attention_probs(config, layer, params, jnp.asarray(ids, jnp.int32)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _attention_probs(config: MossConfig, layer: int, params: Any, ids_L: jax.Array) -> jax.Array:
    from moss_jax.layers import Block, apply_rotary, layer_norm

    x = jnp.asarray(params["embedding"])[ids_L][None].astype(jnp.float32)
    pos = jnp.arange(ids_L.shape[0])[None]
    for i in range(layer):
        block = {"params": layer_params(params, i, config.n_layers)}
        (x, _), _ = Block(config).apply(block, (x, None), pos, None, None)
    p = layer_params(params, layer, config.n_layers)
    h = layer_norm(config, "ln").apply({"params": p["ln"]}, x)
    q = apply_rotary(jnp.einsum("bld,dhk->blhk", h, p["attn"]["query"]), pos, config.rotary_dim, config.rotary_base)
    k = apply_rotary(jnp.einsum("bld,dhk->blhk", h, p["attn"]["key"]), pos, config.rotary_dim, config.rotary_base)
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(config.head_dim)
    causal = jnp.tril(jnp.ones((ids_L.shape[0], ids_L.shape[0]), bool))
    scores = jnp.where(causal, scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1)[0]
