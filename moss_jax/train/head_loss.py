"""The LM head fused with the weighted cross-entropy, in token chunks: no [B, L, V] logits.

    loss_sum, ce_sum, z_sum = head_cross_entropy(x_BxLxD, head_DxV, bias_V, targets_BxL, weights_BxL, z_loss)

The same sums as `weighted_cross_entropy(x @ head + bias, ...)` (moss_jax/train/loss.py), computed
`chunk_tokens` tokens at a time: each chunk's fp32 logits [chunk, V] are formed, reduced to their
log-sum-exp, and turned at once into the logits' gradient

    dlogits = softmax * w * (1 + 2 z_loss lse) - onehot(target) * w,

which feeds the three gradients (x, head kernel, bias) while it is still in cache. The forward
pass under `jax.grad` therefore does the backward's work too and keeps only those gradients;
the backward pass scales them by the incoming cotangent. Three vocabulary-sized matmuls, as in
the plain path, but one read of each logits chunk for the softmax and none of the scatter and
elementwise passes over the full [B, L, V] logits (200 MB at 125m, 2 x 512 tokens), which took
about a third of the plain step on a CPU (docs/performance.md). Without `jax.grad` only the
loss is computed (same chunks, no gradients).

`ce_sum` and `z_sum` are metrics: they carry no gradient (`loss_sum = ce_sum + z_sum` does).

On a mesh (`jax.set_mesh`, as `compile_train_step` sets it) whose batch axes split the rows S
ways, the head kernel's and bias's gradients are accumulated per batch shard, [S, D, V] with S
sharded, and summed once after the last chunk: each chunk's contribution stays on its devices.
A single [D, V] accumulator would make XLA all-reduce every chunk's fp32 partial sum across the
batch shards, once per chunk (256-1024 times per step for the pod configs, 61-73% of all
collective bytes; docs/tpu.md). The head kernel itself is gathered whole along D once, before the
loop, not in every chunk. The price is memory: each chip holds a whole-D fp32 accumulator and the
gathered kernel through the loop (the vocabulary split only by `tensor`), +0.4 to +5.3 GiB per
chip on the 16B pod configs, for 2.5-41x fewer collective bytes (docs/tpu.md).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from moss_jax.kernels.partition import fit_axes

# Tokens per chunk (global batch rows x positions): [1024, V] fp32 logits are 200 MB at V = 51200;
# fewer tokens make the matmuls smaller and slower on CPU (docs/performance.md), more only add memory.
DEFAULT_CHUNK_TOKENS = 1024


def head_cross_entropy(
    x_BxLxD: jax.Array,
    head_DxV: jax.Array,
    bias_V: jax.Array,
    targets_BxL: jax.Array,
    weights_BxL: jax.Array,
    z_loss: float = 0.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of w * (CE + z_loss * lse^2), sum of w * CE, sum of w * z_loss * lse^2), fp32.

    Args:
      x_BxLxD: the final hidden states (after the last LayerNorm).
      head_DxV, bias_V: the untied LM head; logits = x @ head + bias, in fp32.
      targets_BxL: next-token ids.
      weights_BxL: loss weight per token (0 = not trained).
      z_loss: PaLM's z-loss coefficient.
      chunk_tokens: about this many tokens per chunk; chunks split the length axis (every chunk
        holds all B rows, so a batch-sharded input stays sharded the same way).
    """
    b, length, _ = x_BxLxD.shape
    chunk_len = max(1, min(length, int(chunk_tokens) // b))
    pad = -length % chunk_len
    targets_BxL = targets_BxL.astype(jnp.int32)
    weights_BxL = weights_BxL.astype(jnp.float32)
    if pad:  # padded positions carry weight 0 and target 0: they add nothing
        x_BxLxD = jnp.pad(x_BxLxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
        weights_BxL = jnp.pad(weights_BxL, ((0, 0), (0, pad)))
    total, ce, z = _fused(x_BxLxD, head_DxV, bias_V, targets_BxL, weights_BxL, float(z_loss), chunk_len)
    return total, jax.lax.stop_gradient(ce), jax.lax.stop_gradient(z)


def _chunks(a: jax.Array, chunk_len: int) -> jax.Array:
    """[B, L, ...] -> [L / chunk_len, B, chunk_len, ...]."""
    b, length = a.shape[:2]
    return jnp.moveaxis(a.reshape((b, length // chunk_len, chunk_len) + a.shape[2:]), 1, 0)


def _unchunk(a: jax.Array) -> jax.Array:
    """[N, B, C, ...] -> [B, N * C, ...]."""
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape((a.shape[0], a.shape[1] * a.shape[2]) + a.shape[3:])


def _logits(x_BxCxD, head_DxV, bias_V):
    return jnp.einsum("bcd,dv->bcv", x_BxCxD.astype(jnp.float32), head_DxV.astype(jnp.float32)) + bias_V.astype(
        jnp.float32
    )


def _gathered(head_DxV: jax.Array) -> jax.Array:
    """The head kernel whole along D on every device, gathered once before the chunk loop (under
    FSDP its D axis is sharded; left to itself XLA gathers it again in every chunk)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return head_DxV
    return jax.lax.with_sharding_constraint(head_DxV, PartitionSpec(None, PartitionSpec.UNCONSTRAINED))


def _loss_only(x_BxLxD, head_DxV, bias_V, targets_BxL, weights_BxL, z_loss, chunk_len):
    head_DxV = _gathered(head_DxV)

    def body(carry, xs):
        ce, z = carry
        x_BxCxD, t_BxC, w_BxC = xs
        logits_BxCxV = _logits(x_BxCxD, head_DxV, bias_V)
        lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
        ce_BxC = lse_BxC - jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
        return (ce + jnp.sum(ce_BxC * w_BxC), z + jnp.sum(z_loss * jnp.square(lse_BxC) * w_BxC)), None

    zero = jnp.zeros((), jnp.float32)
    xs = tuple(_chunks(a, chunk_len) for a in (x_BxLxD, targets_BxL, weights_BxL))
    (ce, z), _ = jax.lax.scan(body, (zero, zero), xs)
    return ce + z, ce, z


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused(x_BxLxD, head_DxV, bias_V, targets_BxL, weights_BxL, z_loss, chunk_len):
    return _loss_only(x_BxLxD, head_DxV, bias_V, targets_BxL, weights_BxL, z_loss, chunk_len)


def batch_shards(rows: int) -> tuple[tuple[str, ...] | None, int]:
    """(the mesh axes that split `rows` batch rows, their total size) under the mesh set by
    `jax.set_mesh` and the logical rules ("batch"); (None, 1) without one or where none divides."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None, 1
    axes = fit_axes(nn.logical_to_mesh_axes(("batch",))[0], rows, mesh)
    return (axes, math.prod(mesh.shape[a] for a in axes)) if axes else (None, 1)


def _fused_fwd(x_BxLxD, head_DxV, bias_V, targets_BxL, weights_BxL, z_loss, chunk_len):
    rows, v = x_BxLxD.shape[0], head_DxV.shape[1]
    vocab_V = jnp.arange(v, dtype=jnp.int32)
    head_f32 = _gathered(head_DxV).astype(jnp.float32)
    axes, shards = batch_shards(rows)

    def per_shard(a):
        """[S, ...] sharded over the batch axes on its first dimension, the rest left to XLA."""
        if axes is None:  # one shard (S = 1): nothing to say
            return a
        spec = PartitionSpec(axes, *([PartitionSpec.UNCONSTRAINED] * (a.ndim - 1)))
        return jax.lax.with_sharding_constraint(a, spec)

    def body(carry, xs):
        dhead_SxDxV, dbias_SxV, ce, z = carry
        x_BxCxD, t_BxC, w_BxC = xs
        x_BxCxD = x_BxCxD.astype(jnp.float32)
        logits_BxCxV = _logits(x_BxCxD, head_f32, bias_V)
        max_BxC = jnp.max(logits_BxCxV, axis=-1)
        exp_BxCxV = jnp.exp(logits_BxCxV - max_BxC[..., None])  # one exp pass: the lse and the softmax
        sum_BxC = jnp.sum(exp_BxCxV, axis=-1)
        lse_BxC = max_BxC + jnp.log(sum_BxC)
        ce_BxC = lse_BxC - jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
        z_BxC = z_loss * jnp.square(lse_BxC)
        # d(w (lse - logit_t + z lse^2)) / dlogits = softmax * w (1 + 2 z lse) - onehot(t) * w
        scale_BxC = w_BxC * (1.0 + 2.0 * z_loss * lse_BxC) / sum_BxC
        dlogits_BxCxV = exp_BxCxV * scale_BxC[..., None]
        dlogits_BxCxV = dlogits_BxCxV - jnp.where(vocab_V == t_BxC[..., None], w_BxC[..., None], 0.0)
        dx_BxCxD = jnp.einsum("bcv,dv->bcd", dlogits_BxCxV, head_f32)
        if shards == 1:  # one device (or an unsplit batch): the plain sums, as they always were
            dhead_SxDxV = dhead_SxDxV + jnp.einsum("bcd,bcv->dv", x_BxCxD, dlogits_BxCxV)[None]
            dbias_SxV = dbias_SxV + jnp.sum(dlogits_BxCxV, axis=(0, 1))[None]
        else:  # rows [S, B / S]: each batch shard sums into its own slice (no cross-shard reduction)
            x_SxBxCxD = x_BxCxD.reshape((shards, rows // shards) + x_BxCxD.shape[1:])
            dlogits_SxBxCxV = dlogits_BxCxV.reshape((shards, rows // shards) + dlogits_BxCxV.shape[1:])
            dhead_SxDxV = dhead_SxDxV + per_shard(jnp.einsum("sbcd,sbcv->sdv", x_SxBxCxD, dlogits_SxBxCxV))
            dbias_SxV = dbias_SxV + per_shard(jnp.sum(dlogits_SxBxCxV, axis=(1, 2)))
        carry = (dhead_SxDxV, dbias_SxV, ce + jnp.sum(ce_BxC * w_BxC), z + jnp.sum(z_BxC * w_BxC))
        return carry, (dx_BxCxD, ce_BxC + z_BxC)

    zero = jnp.zeros((), jnp.float32)
    init = (
        per_shard(jnp.zeros((shards,) + head_DxV.shape, jnp.float32)),
        per_shard(jnp.zeros((shards, v), jnp.float32)),
        zero,
        zero,
    )
    xs = tuple(_chunks(a, chunk_len) for a in (x_BxLxD, targets_BxL, weights_BxL))
    (dhead_SxDxV, dbias_SxV, ce, z), (dx, dweights) = jax.lax.scan(body, init, xs)
    dhead_DxV, dbias_V = jnp.sum(dhead_SxDxV, axis=0), jnp.sum(dbias_SxV, axis=0)  # one reduction
    residuals = (
        _unchunk(dx).astype(x_BxLxD.dtype),
        dhead_DxV.astype(head_DxV.dtype),
        dbias_V.astype(bias_V.dtype),
        _unchunk(dweights),  # d total / d weight = the token's CE + z-loss
        targets_BxL,
    )
    return (ce + z, ce, z), residuals


def _fused_bwd(z_loss, chunk_len, residuals, cotangents):
    del z_loss, chunk_len
    dx, dhead, dbias, dweights, targets_BxL = residuals
    # ce and z leave head_cross_entropy through stop_gradient: only the total's cotangent is nonzero.
    g = cotangents[0]
    dtargets = jnp.zeros(targets_BxL.shape, jax.dtypes.float0)
    return (
        (g * dx).astype(dx.dtype),
        (g * dhead).astype(dhead.dtype),
        (g * dbias).astype(dbias.dtype),
        dtargets,
        (g * dweights),
    )


_fused.defvjp(_fused_fwd, _fused_bwd)
