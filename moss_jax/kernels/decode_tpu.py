"""Decode attention for TPU in Pallas (Mosaic): one new query per sequence against a KV cache.

    out_BxHxK = decode_attention_tpu(q_BxHxK, k_cache_BxSxHxK, v_cache_BxSxHxK, lengths_B)

Key j of row b is visible iff j < lengths[b] and, when given, kv_segment_ids[b, j] ==
q_segment_ids[b]. The cache is read in the model's own [B, S, H, K] layout: a transpose to
[B, H, S, K] would copy the whole cache on every generated token, which costs more than the
attention itself. A block holds all heads of `block_k` cache rows ((H, K) are the array's own
last two dims, which Mosaic's tiling rule accepts), and each head's (block_k, K) tile is a
strided load from it.

Grid (B, key blocks). The per-row lengths are a scalar-prefetch operand: steps past a row's
length skip their compute and their index map points at the last needed block, so Pallas
fetches nothing for them. A 2048-slot cache holding 100 tokens reads one block, not sixteen.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moss_jax.kernels import common

LANES = 128
# k and v blocks, double-buffered, must fit well inside the default 16 MiB scoped VMEM.
_VMEM_BUDGET_BYTES = 8 * 2**20
_NT = (((1,), (1,)), ((), ()))


def pick_block_k(kv_len: int, heads: int, head_dim: int, dtype: jnp.dtype) -> int:
    """Cache rows per block: the VMEM budget, a multiple of 128 (the segment-id lane dim)."""
    itemsize = jnp.dtype(dtype).itemsize
    sublanes = 8 * (4 // itemsize)  # a (8, 128) tile holds 16 bf16 rows
    row_bytes = common.round_up(heads, sublanes) * common.round_up(head_dim, LANES) * itemsize
    rows = max(LANES, (_VMEM_BUDGET_BYTES // (4 * row_bytes)) // LANES * LANES)
    if kv_len <= rows:
        return kv_len
    # Prefer a divisor of the cache length: padding would copy the cache every step.
    for block in range(rows, LANES - 1, -LANES):
        if kv_len % block == 0:
            return block
    return rows


def _kernel(lengths_ref, q_seg_ref, q_ref, k_ref, v_ref, kv_seg_ref, o_ref, m_scr, l_scr, acc_scr, *, scale, block_k):
    b, j = pl.program_id(0), pl.program_id(1)
    length = lengths_ref[b]
    heads = q_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, common.MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(j * block_k < length)
    def _step():
        cols = j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
        q_seg = None if q_seg_ref is None else q_seg_ref[b]
        mask = common.visible(None, cols, q_seg, kv_seg, causal=False, kv_len=length)
        prec = common.dot_precision(q_ref.dtype)
        # Static loop over heads: each is a (1, K) x (K, block_k) product on the MXU.
        for h in range(heads):
            row = pl.ds(h, 1)
            s = lax.dot_general(q_ref[row, :], k_ref[:, h, :], _NT, preferred_element_type=jnp.float32, precision=prec)
            m, row_sum, p, alpha = common.softmax_update(m_scr[row, :][:, :1], l_scr[row, :][:, :1], s * scale, mask)
            v = v_ref[:, h, :]
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=prec)
            acc_scr[row, :] = alpha * acc_scr[row, :] + pv
            m_scr[row, :] = jnp.broadcast_to(m, (1, LANES))
            l_scr[row, :] = jnp.broadcast_to(row_sum, (1, LANES))

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        out, _ = common.softmax_finish(m_scr[:, :1], l_scr[:, :1], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)


def _decode(q, k, v, lengths, q_seg, kv_seg, *, block_k: int, interpret: bool):
    batch, heads, head_dim = q.shape
    num_k = k.shape[1] // block_k
    segments = q_seg is not None

    def last_block(b, lengths_ref):
        return jnp.maximum(lax.div(lengths_ref[b] + block_k - 1, block_k) - 1, 0)

    def kv_map(b, j, lengths_ref, *_):
        return b, jnp.minimum(j, last_block(b, lengths_ref)), 0, 0

    def seg_map(b, j, lengths_ref, *_):
        return b, 0, jnp.minimum(j, last_block(b, lengths_ref))

    def q_map(b, j, *_):
        return b, 0, 0

    def kernel(lengths_ref, *refs):
        if segments:
            q_seg_ref, q_ref, k_ref, v_ref, kv_seg_ref, *rest = refs
        else:
            (q_ref, k_ref, v_ref, *rest), q_seg_ref, kv_seg_ref = refs, None, None
        _kernel(lengths_ref, q_seg_ref, q_ref, k_ref, v_ref, kv_seg_ref, *rest, scale=head_dim**-0.5, block_k=block_k)

    kv_spec = pl.BlockSpec((None, block_k, heads, head_dim), kv_map)
    q_spec = pl.BlockSpec((None, heads, head_dim), q_map)
    in_specs = [q_spec, kv_spec, kv_spec]
    operands = [q, k, v]
    if segments:
        in_specs.append(pl.BlockSpec((None, 1, block_k), seg_map))
        operands.append(kv_seg.astype(jnp.int32)[:, None, :])
    prefetch = [lengths.astype(jnp.int32)] + ([q_seg.astype(jnp.int32)] if segments else [])
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, v.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(batch, num_k),
            in_specs=in_specs,
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((heads, LANES), jnp.float32),
                pltpu.VMEM((heads, LANES), jnp.float32),
                pltpu.VMEM((heads, head_dim), jnp.float32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="moss_decode_tpu",
    )(*prefetch, *operands)


def decode_attention_tpu(
    q_BxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    lengths_B: jax.Array,
    *,
    q_segment_ids_B: jax.Array | None = None,
    kv_segment_ids_BxS: jax.Array | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of one query per row over the first lengths[b] cache rows (see module doc).

    Forward only (decoding is inference; `moss_jax.attention` gives one-token queries a VJP through
    the flash kernel). A row with no visible key gets zeros.

    Raises:
      ValueError: q/k/v shapes that do not match (`common.check_shapes`), or a `block_k` that is
        neither a positive multiple of 128 nor the whole cache length.
    """
    common.check_shapes(q_BxHxK, k_BxSxHxK, v_BxSxHxK, impl="decode_attention_tpu", decode=True)
    segments = common.check_segment_ids(q_segment_ids_B, kv_segment_ids_BxS)
    _, kv_len, heads, head_dim = k_BxSxHxK.shape
    if block_k is None:
        block_k = pick_block_k(kv_len, heads, head_dim, k_BxSxHxK.dtype)
    common.check_block(block_k, name="block_k", kernel="TPU decode kernel")
    if block_k != kv_len and block_k % LANES:
        raise ValueError(
            f"block_k={block_k} must be a multiple of {LANES} or the whole cache ({kv_len}) for the TPU decode kernel"
        )
    padded = kv_len if block_k == kv_len else common.round_up(kv_len, block_k)
    # Rows past kv_len are hidden by the lengths, which never exceed kv_len.
    k, v = common.pad_axis(k_BxSxHxK, 1, padded), common.pad_axis(v_BxSxHxK, 1, padded)
    kv_seg = common.pad_axis(kv_segment_ids_BxS, 1, padded) if segments else None
    lengths = jnp.minimum(lengths_B.astype(jnp.int32), kv_len)
    run = functools.partial(_decode, block_k=block_k)
    return common.on_platform(run, q_BxHxK, k, v, lengths, q_segment_ids_B, kv_seg, platform="tpu", interpret=interpret)
