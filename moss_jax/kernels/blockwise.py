"""Memory-efficient attention in plain XLA: loops over key blocks with an online softmax.

The CPU path of `impl="auto"`. Peak memory is O(block_q * block_k) scores per (batch, head)
instead of the reference's full [B, H, L, S] matrix, so long sequences fit on a CPU host.
The loops are `fori_loop`s with data-dependent bounds (causal blocks above the diagonal are
skipped), which autodiff cannot reverse, so the backward pass is a custom VJP that recomputes
the probabilities from the saved log-sum-exp, exactly like the Pallas kernels.

All arithmetic is fp32 (inputs are upcast per block), as in the reference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from moss_jax.kernels import common

# Measured on a 2-core CPU (docs/kernels.md): 512 x 512 blocks keep each einsum large enough
# to amortise the loop overhead while the per-step scores stay a few MiB.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    scale: float
    kv_len: int | None  # real key count when keys were padded, else None
    block_q: int
    block_k: int


def _einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _block_mask(st: _Static, offset: jax.Array, i, j, q_seg_BxQ, kv_seg_BxC) -> jax.Array | None:
    """Mask [B or 1, 1, block_q, block_k] of query block i against key block j."""
    rows = offset + i * st.block_q + jnp.arange(st.block_q)[:, None]
    cols = j * st.block_k + jnp.arange(st.block_k)[None, :]
    mask = common.visible(rows, cols, None, None, causal=st.causal, kv_len=st.kv_len)
    mask = None if mask is None else mask[None, None]
    if q_seg_BxQ is not None:
        seg = (q_seg_BxQ[:, :, None] == kv_seg_BxC[:, None, :])[:, None]
        mask = seg if mask is None else jnp.logical_and(mask, seg)
    return mask


def _kv_block_bounds(st: _Static, offset: jax.Array, i, num_k: int):
    """Key blocks [0, hi) that query block i can see (all of them unless causal)."""
    if not st.causal:
        return num_k
    last_row = offset + (i + 1) * st.block_q - 1
    return jnp.clip(last_row // st.block_k + 1, 0, num_k)


def _q_block_start(st: _Static, offset: jax.Array, j, num_q: int):
    """First query block whose last row can see key block j (0 unless causal)."""
    if not st.causal:
        return 0
    return jnp.clip((j * st.block_k - offset) // st.block_q, 0, num_q)


def _slice(x: jax.Array | None, start, size: int, axis: int = 1) -> jax.Array | None:
    return None if x is None else lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _forward(st: _Static, q, k, v, q_seg, kv_seg, offset):
    """Padded inputs -> (out [B, Lp, H, K] fp32, lse [B, H, Lp, 1])."""
    batch, q_len, heads, head_dim = q.shape
    num_q, num_k = q_len // st.block_q, k.shape[1] // st.block_k

    def q_block(i):
        q_i = _slice(q, i * st.block_q, st.block_q).astype(jnp.float32)
        q_seg_i = _slice(q_seg, i * st.block_q, st.block_q)

        def kv_step(j, carry):
            m, row_sum, acc = carry
            k_j = _slice(k, j * st.block_k, st.block_k).astype(jnp.float32)
            v_j = _slice(v, j * st.block_k, st.block_k).astype(jnp.float32)
            s = _einsum("bqhk,bshk->bhqs", q_i, k_j) * st.scale
            mask = _block_mask(st, offset, i, j, q_seg_i, _slice(kv_seg, j * st.block_k, st.block_k))
            m, row_sum, p, alpha = common.softmax_update(m, row_sum, s, mask)
            return m, row_sum, alpha * acc + _einsum("bhqs,bshk->bhqk", p, v_j)

        shape = (batch, heads, st.block_q)
        init = (jnp.full(shape + (1,), common.MASK_VALUE), jnp.zeros(shape + (1,)), jnp.zeros(shape + (head_dim,)))
        m, row_sum, acc = lax.fori_loop(0, _kv_block_bounds(st, offset, i, num_k), kv_step, init)
        out_BxHxQxK, lse = common.softmax_finish(m, row_sum, acc)
        return out_BxHxQxK.transpose(0, 2, 1, 3), lse

    out_NxBxQxHxK, lse_NxBxHxQx1 = lax.map(q_block, jnp.arange(num_q))
    out = out_NxBxQxHxK.transpose(1, 0, 2, 3, 4).reshape(batch, q_len, heads, head_dim)
    lse = lse_NxBxHxQx1.transpose(1, 2, 0, 3, 4).reshape(batch, heads, q_len, 1)
    return out, lse


def _backward(st: _Static, q, k, v, q_seg, kv_seg, offset, lse, delta, do):
    """Padded inputs -> (dq, dk, dv) in fp32; one recomputation of the scores per block pair."""
    num_q, num_k = q.shape[1] // st.block_q, k.shape[1] // st.block_k

    def kv_block(j, grads):
        dq, dk, dv = grads
        k_j = _slice(k, j * st.block_k, st.block_k).astype(jnp.float32)
        v_j = _slice(v, j * st.block_k, st.block_k).astype(jnp.float32)
        kv_seg_j = _slice(kv_seg, j * st.block_k, st.block_k)

        def q_step(i, carry):
            dq, dk_j, dv_j = carry
            rows = i * st.block_q
            q_i = _slice(q, rows, st.block_q).astype(jnp.float32)
            do_i = _slice(do, rows, st.block_q)
            s = _einsum("bqhk,bshk->bhqs", q_i, k_j) * st.scale
            dp = _einsum("bqhk,bshk->bhqs", do_i, v_j)
            mask = _block_mask(st, offset, i, j, _slice(q_seg, rows, st.block_q), kv_seg_j)
            p, ds = common.softmax_grad(
                s, mask, _slice(lse, rows, st.block_q, 2), dp, _slice(delta, rows, st.block_q, 2)
            )
            ds = ds * st.scale
            dq_i = _slice(dq, rows, st.block_q) + _einsum("bhqs,bshk->bqhk", ds, k_j)
            dq = lax.dynamic_update_slice_in_dim(dq, dq_i, rows, axis=1)
            return dq, dk_j + _einsum("bhqs,bqhk->bshk", ds, q_i), dv_j + _einsum("bhqs,bqhk->bshk", p, do_i)

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        dq, dk_j, dv_j = lax.fori_loop(_q_block_start(st, offset, j, num_q), num_q, q_step, (dq, zeros, zeros))
        dk = lax.dynamic_update_slice_in_dim(dk, dk_j, j * st.block_k, axis=1)
        dv = lax.dynamic_update_slice_in_dim(dv, dv_j, j * st.block_k, axis=1)
        return dq, dk, dv

    init = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
    return lax.fori_loop(0, num_k, kv_block, init)


def _pad_inputs(st: _Static, q, k, v, q_seg, kv_seg):
    q_len, kv_len = common.round_up(q.shape[1], st.block_q), common.round_up(k.shape[1], st.block_k)
    q, k, v = common.pad_axis(q, 1, q_len), common.pad_axis(k, 1, kv_len), common.pad_axis(v, 1, kv_len)
    if q_seg is not None:
        q_seg, kv_seg = common.pad_axis(q_seg, 1, q_len), common.pad_axis(kv_seg, 1, kv_len)
    return q, k, v, q_seg, kv_seg


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, k, v, q_seg, kv_seg, offset):
    return _attention_fwd(st, q, k, v, q_seg, kv_seg, offset)[0]


def _attention_fwd(st: _Static, q, k, v, q_seg, kv_seg, offset):
    out, lse = _forward(st, *_pad_inputs(st, q, k, v, q_seg, kv_seg), offset)
    out = out[:, : q.shape[1]].astype(v.dtype)
    res_out, res_lse = common.name_residuals(out, lse)
    return out, (q, k, v, q_seg, kv_seg, offset, res_out, res_lse)


def _attention_bwd(st: _Static, res, do):
    q, k, v, q_seg, kv_seg, offset, out, lse = res
    delta_BxHxLx1 = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1)[..., None]
    q_p, k_p, v_p, q_seg_p, kv_seg_p = _pad_inputs(st, q, k, v, q_seg, kv_seg)
    delta_BxHxLx1 = common.pad_axis(delta_BxHxLx1, 2, q_p.shape[1])
    do_p = common.pad_axis(do.astype(jnp.float32), 1, q_p.shape[1])
    dq, dk, dv = _backward(st, q_p, k_p, v_p, q_seg_p, kv_seg_p, offset, lse, delta_BxHxLx1, do_p)
    q_len, kv_len = q.shape[1], k.shape[1]
    return (
        dq[:, :q_len].astype(q.dtype),
        dk[:, :kv_len].astype(k.dtype),
        dv[:, :kv_len].astype(v.dtype),
        None,
        None,
        None,
    )


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(
    q_BxLxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> jax.Array:
    """Attention with the semantics of `moss_jax.attention` in O(block) memory; output dtype of v."""
    common.check_shapes(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, impl="blockwise")
    common.check_segment_ids(q_segment_ids, kv_segment_ids)
    q_len, kv_len = q_BxLxHxK.shape[1], k_BxSxHxK.shape[1]
    kernel = "blockwise implementation"
    block_q = common.fit_block(block_q, q_len, 1, name="block_q", kernel=kernel)
    block_k = common.fit_block(block_k, kv_len, 1, name="block_k", kernel=kernel)
    st = _Static(
        causal=causal,
        scale=1.0 / float(q_BxLxHxK.shape[-1]) ** 0.5,
        kv_len=None if kv_len % block_k == 0 else kv_len,
        block_q=block_q,
        block_k=block_k,
    )
    offset = jnp.asarray(q_offset, jnp.int32)
    return _attention(st, q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, q_segment_ids, kv_segment_ids, offset)
