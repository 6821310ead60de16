"""Token-level losses.

The language-model loss is a weighted cross-entropy. Normalizer (documented contract):

    loss = sum_t w_t * CE_t / max(sum_t w_t, 1)

over every token of the global batch (all micro-batches together), so a batch's loss is the
mean over the tokens that are trained (SFT masks set w_t = 0 on prompts and tool results,
packing sets it to 0 on padding). The functions return sums; the caller divides once, which
makes gradient accumulation exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_cross_entropy(
    logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Returns (sum of w * CE, sum of w * z_loss * logsumexp^2), both fp32 scalars.

    The z-loss term (PaLM) keeps the softmax normaliser near 1; it is 0 when `z_loss` is 0.
    """
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    weights_BxL = weights_BxL.astype(jnp.float32)
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]
    ce_sum = jnp.sum((log_z_BxL - target_logit_BxL) * weights_BxL)
    z_sum = jnp.sum(z_loss * jnp.square(log_z_BxL) * weights_BxL) if z_loss else jnp.zeros((), jnp.float32)
    return ce_sum, z_sum


def normalizer(weights_BxL: jax.Array) -> jax.Array:
    """The loss denominator: the total loss weight, at least 1."""
    return jnp.maximum(jnp.sum(weights_BxL.astype(jnp.float32)), 1.0)
