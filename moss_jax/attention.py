"""The model's single attention entry point.

`attention` is the only function the model calls; faster implementations (Pallas
kernels, blockwise XLA) plug in behind `impl`. Masking semantics, shared by all
implementations:

* query i (at absolute index `q_offset + i` in the key sequence) may attend key j
  only if `q_offset + i >= j` when `causal`;
* and only if `q_segment_ids[b, i] == kv_segment_ids[b, j]` when segment ids are
  given (0 marks padding; packed sequences use 1, 2, ...).

Scores and softmax are computed in float32; the output has the dtype of `v`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

_IMPLS: dict[str, Callable[..., jax.Array]] = {}


def register(name: str):
    """Registers an attention implementation under `name`."""

    def wrap(fn):
        _IMPLS[name] = fn
        return fn

    return wrap


def make_mask(
    q_len: int,
    kv_len: int,
    *,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    causal: bool,
    q_offset: jax.Array | int = 0,
) -> jax.Array | None:
    """Boolean mask [B or 1, 1, L, S] (True = may attend), or None when unmasked."""
    mask = None
    if causal:
        q_idx = jnp.arange(q_len)[:, None] + q_offset
        kv_idx = jnp.arange(kv_len)[None, :]
        mask = (q_idx >= kv_idx)[None, None]
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None:
        seg = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
        mask = seg if mask is None else jnp.logical_and(mask, seg)
    return mask


@register("xla")
def xla_attention(
    q_BxLxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
) -> jax.Array:
    """Reference attention: materialises the [B, H, L, S] score matrix in fp32."""
    head_dim = q_BxLxHxK.shape[-1]
    scores_BxHxLxS = jnp.einsum("blhk,bshk->bhls", q_BxLxHxK.astype(jnp.float32), k_BxSxHxK.astype(jnp.float32)) * (
        1.0 / jnp.sqrt(jnp.float32(head_dim))
    )
    mask = make_mask(
        q_BxLxHxK.shape[1],
        k_BxSxHxK.shape[1],
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        causal=causal,
        q_offset=q_offset,
    )
    if mask is not None:
        scores_BxHxLxS = jnp.where(mask, scores_BxHxLxS, jnp.finfo(jnp.float32).min)
    probs_BxHxLxS = jax.nn.softmax(scores_BxHxLxS, axis=-1)
    # A fully masked row (a padding query with no visible key) gets zeros, not a uniform average.
    if mask is not None:
        probs_BxHxLxS = jnp.where(mask, probs_BxHxLxS, 0.0)
    out = jnp.einsum("bhls,bshk->blhk", probs_BxHxLxS, v_BxSxHxK.astype(jnp.float32))
    return out.astype(v_BxSxHxK.dtype)


def available_impls() -> tuple[str, ...]:
    return tuple(sorted(_IMPLS))


def attention(
    q_BxLxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
    impl: str = "xla",
) -> jax.Array:
    """Multi-head attention [B, L, H, K] x [B, S, H, K] -> [B, L, H, K] (see module doc)."""
    if impl not in _IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; available: {available_impls()}")
    return _IMPLS[impl](
        q_BxLxHxK,
        k_BxSxHxK,
        v_BxSxHxK,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        causal=causal,
        q_offset=q_offset,
    )
