"""Decode attention for GPU in Pallas (Triton): one new query per sequence against a KV cache.

    out_BxHxK = decode_attention_gpu(q_BxHxK, k_cache_BxSxHxK, v_cache_BxSxHxK, lengths_B)

Same contract as `decode_tpu`: key j of row b is visible iff j < lengths[b] and the segment
ids match when given. One program per (row, head) reads the cache in place ([B, S, H, K] is
strided memory to Triton) and loops over key blocks only up to lengths[b], so the cost
follows the tokens generated so far, not the cache size. With one query row a tensor-core dot
would be 15/16 padding, so scores and the weighted sum are elementwise products and
reductions; decoding is bandwidth-bound either way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from moss_jax.kernels import common

DEFAULT_BLOCK_K = 64


def _kernel(lengths_ref, q_ref, k_ref, v_ref, *seg_refs, o_ref, scale: float, block_k: int, segments: bool):
    q_seg_ref, kv_seg_ref = seg_refs if segments else (None, None)
    length = lengths_ref[0]
    q = q_ref[...].astype(jnp.float32)[None, :]  # [1, K]
    q_seg = q_seg_ref[0] if segments else None

    def kv_step(j, carry):
        m, row_sum, acc = carry
        cols = pl.ds(j * block_k, block_k)
        k = k_ref[cols, :].astype(jnp.float32)
        s = jnp.sum(k * q, axis=1)[None, :] * scale  # [1, block_k]
        pos = j * block_k + jnp.arange(block_k)[None, :]
        kv_seg = kv_seg_ref[cols][None, :] if segments else None
        mask = common.visible(None, pos, q_seg, kv_seg, causal=False, kv_len=length)
        m, row_sum, p, alpha = common.softmax_update(m, row_sum, s, mask)
        pv = jnp.sum(p[0][:, None] * v_ref[cols, :].astype(jnp.float32), axis=0)[None, :]
        return m, row_sum, alpha * acc + pv

    init = (jnp.full((1, 1), common.MASK_VALUE, jnp.float32), jnp.zeros((1, 1), jnp.float32), jnp.zeros(q.shape))
    m, row_sum, acc = lax.fori_loop(0, lax.div(length + block_k - 1, block_k), kv_step, init)
    out, _ = common.softmax_finish(m, row_sum, acc)
    o_ref[...] = out[0].astype(o_ref.dtype)


def _decode(q, k, v, lengths, q_seg, kv_seg, *, block_k: int, scale: float, interpret: bool):
    batch, heads, head_dim = q.shape
    kv_len = k.shape[1]
    segments = q_seg is not None
    in_specs = [
        pl.BlockSpec((None, 1), lambda b, h: (b, 0)),
        pl.BlockSpec((None, None, head_dim), lambda b, h: (b, h, 0)),
        pl.BlockSpec((None, kv_len, None, head_dim), lambda b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, kv_len, None, head_dim), lambda b, h: (b, 0, h, 0)),
    ]
    operands = [lengths[:, None], q, k, v]
    if segments:
        in_specs += [pl.BlockSpec((None, 1), lambda b, h: (b, 0)), pl.BlockSpec((None, kv_len), lambda b, h: (b, 0))]
        operands += [q_seg.astype(jnp.int32)[:, None], kv_seg.astype(jnp.int32)]

    def kernel(*refs):
        *inputs, o_ref = refs
        _kernel(*inputs, o_ref=o_ref, scale=scale, block_k=block_k, segments=segments)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, v.dtype),
        grid=(batch, heads),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, head_dim), lambda b, h: (b, h, 0)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="moss_decode_gpu",
    )(*operands)


def decode_attention_gpu(
    q_BxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    lengths_B: jax.Array,
    *,
    q_segment_ids_B: jax.Array | None = None,
    kv_segment_ids_BxS: jax.Array | None = None,
    block_k: int = DEFAULT_BLOCK_K,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of one query per row over the first lengths[b] cache rows (see module doc).

    Forward only (decoding is inference; `moss_jax.attention` gives one-token queries a VJP through
    the flash kernel). A row with no visible key gets zeros.

    Raises:
      ValueError: q/k/v shapes that do not match (`common.check_shapes`), or a `block_k` that is
        not a positive power of two (Triton tiles, `jnp.arange(block_k)` among them).
    """
    common.check_shapes(q_BxHxK, k_BxSxHxK, v_BxSxHxK, impl="decode_attention_gpu", decode=True)
    common.check_block(block_k, name="block_k", kernel="GPU decode kernel")
    if block_k & (block_k - 1):
        raise ValueError(f"block_k={block_k} must be a power of two for the GPU decode kernel (Triton tiles)")
    segments = common.check_segment_ids(q_segment_ids_B, kv_segment_ids_BxS)
    _, kv_len, _, head_dim = k_BxSxHxK.shape
    # Triton tiles are powers of two: pad head_dim (zeros leave q.k and the kept columns
    # unchanged) and, only when the cache length is not a multiple of the block, the cache.
    block_k = min(block_k, max(16, pl.next_power_of_2(kv_len)))
    head_pad = pl.next_power_of_2(head_dim)
    kv_pad = common.round_up(kv_len, block_k)
    q = common.pad_axis(q_BxHxK, 2, head_pad)
    k, v = (common.pad_axis(common.pad_axis(x, 3, head_pad), 1, kv_pad) for x in (k_BxSxHxK, v_BxSxHxK))
    kv_seg = common.pad_axis(kv_segment_ids_BxS, 1, kv_pad) if segments else None
    lengths = jnp.minimum(lengths_B.astype(jnp.int32), kv_len)
    run = functools.partial(_decode, block_k=block_k, scale=head_dim**-0.5)
    out = common.on_platform(run, q, k, v, lengths, q_segment_ids_B, kv_seg, platform="cuda", interpret=interpret)
    return out[..., :head_dim]
