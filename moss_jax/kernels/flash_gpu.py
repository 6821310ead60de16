"""Flash attention for GPU in Pallas (Triton): forward, and a two-kernel backward.

Layout: Triton addresses strided memory directly, so the kernels read [B, L, H, K] without
the transposes the TPU variant needs; one program owns one (query block, batch, head) and
loops over key blocks with `fori_loop` (the causal bound is data-dependent through
`q_offset`, so skipped blocks cost nothing). Triton tiles must be powers of two: head_dim is
zero-padded to the next power of two (zeros change neither q.k nor the kept output columns)
and sequences to whole blocks.

Backward: `dkv` (one program per key block, looping over query blocks) and `dq` (one per query
block, looping over key blocks). A fused variant would need atomic adds into dQ; two kernels
keep the results deterministic. Both recompute p = exp(s - lse) from the saved log-sum-exp.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from moss_jax.kernels import common

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def default_block_sizes(head_dim: int) -> common.BlockSizes:
    """Tiles sized to keep the fp32 accumulator in registers: smaller query tiles for K = 256.

    FlashAttention-2's choices for these head dims; not timed here (no GPU on the dev host).
    """
    if head_dim > 128:
        return common.BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64)
    return common.BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64)


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    scale: float
    segments: bool
    interpret: bool | None
    blocks: common.BlockSizes
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class _Pass:
    block_q: int
    block_k: int
    q_len: int  # padded
    kv_len: int  # padded
    kv_real: int | None  # real key count when padded, else None

    @classmethod
    def make(cls, block_q: int, block_k: int, q_len: int, kv_len: int) -> _Pass:
        for block in (block_q, block_k):
            if block & (block - 1):
                raise ValueError(f"Triton block sizes must be powers of two, got {block}")
        bq = min(block_q, max(16, pl.next_power_of_2(q_len)))
        bk = min(block_k, max(16, pl.next_power_of_2(kv_len)))
        kv_pad = common.round_up(kv_len, bk)
        return cls(bq, bk, common.round_up(q_len, bq), kv_pad, None if kv_pad == kv_len else kv_len)

    @property
    def num_q(self) -> int:
        return self.q_len // self.block_q

    @property
    def num_k(self) -> int:
        return self.kv_len // self.block_k

    def kv_blocks_end(self, st: _Static, offset, i):
        """Key blocks [0, end) that query block i sees."""
        if not st.causal:
            return self.num_k
        return jnp.minimum(lax.div(offset + (i + 1) * self.block_q - 1, self.block_k) + 1, self.num_k)

    def q_blocks_start(self, st: _Static, offset, j):
        """First query block whose last row sees key block j."""
        if not st.causal:
            return 0
        return jnp.minimum(lax.div(jnp.maximum(j * self.block_k - offset, 0), self.block_q), self.num_q)


def _scores(st: _Static, geo: _Pass, offset, i, j, q, k, q_seg, kv_seg):
    """fp32 scaled scores [block_q, block_k] and mask; segment ids are 1-D blocks here."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32, precision=common.dot_precision(q.dtype))
    s = s * st.scale
    rows = offset + i * geo.block_q + jnp.arange(geo.block_q)[:, None]
    cols = j * geo.block_k + jnp.arange(geo.block_k)[None, :]
    if st.segments:
        q_seg, kv_seg = q_seg[:, None], kv_seg[None, :]
    return s, common.visible(rows, cols, q_seg, kv_seg, causal=st.causal, kv_len=geo.kv_real)


def _split_refs(st: _Static, refs):
    if st.segments:
        return refs[0], refs[1], refs[2:]
    return None, None, refs


def _fwd_kernel(offset_ref, q_ref, k_ref, v_ref, *refs, st: _Static, geo: _Pass):
    q_seg_ref, kv_seg_ref, (o_ref, lse_ref) = _split_refs(st, refs)
    i, offset = pl.program_id(0), offset_ref[0]
    q = q_ref[...]
    q_seg = q_seg_ref[...] if st.segments else None

    def kv_step(j, carry):
        m, row_sum, acc = carry
        cols = pl.ds(j * geo.block_k, geo.block_k)
        kv_seg = kv_seg_ref[cols] if st.segments else None
        s, mask = _scores(st, geo, offset, i, j, q, k_ref[cols, :], q_seg, kv_seg)
        m, row_sum, p, alpha = common.softmax_update(m, row_sum, s, mask)
        v = v_ref[cols, :]
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=common.dot_precision(v.dtype))
        return m, row_sum, alpha * acc + pv

    init = (
        jnp.full((geo.block_q, 1), common.MASK_VALUE, jnp.float32),
        jnp.zeros((geo.block_q, 1), jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )
    m, row_sum, acc = lax.fori_loop(0, geo.kv_blocks_end(st, offset, i), kv_step, init)
    out, lse = common.softmax_finish(m, row_sum, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def _dkv_kernel(offset_ref, q_ref, k_ref, v_ref, *refs, st: _Static, geo: _Pass):
    q_seg_ref, kv_seg_ref, (lse_ref, delta_ref, do_ref, dk_ref, dv_ref) = _split_refs(st, refs)
    j, offset = pl.program_id(0), offset_ref[0]
    k, v = k_ref[...], v_ref[...]
    kv_seg = kv_seg_ref[...] if st.segments else None
    prec = common.dot_precision(k.dtype)

    def q_step(i, carry):
        dk, dv = carry
        rows = pl.ds(i * geo.block_q, geo.block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        q_seg = q_seg_ref[rows] if st.segments else None
        s, mask = _scores(st, geo, offset, i, j, q, k, q_seg, kv_seg)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32, precision=prec)
        p, ds = common.softmax_grad(s, mask, lse_ref[rows][:, None], dp, delta_ref[rows][:, None])
        dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32, precision=prec)
        dk = dk + lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32, precision=prec)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(geo.q_blocks_start(st, offset, j), geo.num_q, q_step, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(offset_ref, q_ref, k_ref, v_ref, *refs, st: _Static, geo: _Pass):
    q_seg_ref, kv_seg_ref, (lse_ref, delta_ref, do_ref, dq_ref) = _split_refs(st, refs)
    i, offset = pl.program_id(0), offset_ref[0]
    q, do = q_ref[...], do_ref[...]
    q_seg = q_seg_ref[...] if st.segments else None
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    prec = common.dot_precision(q.dtype)

    def kv_step(j, dq):
        cols = pl.ds(j * geo.block_k, geo.block_k)
        k, v = k_ref[cols, :], v_ref[cols, :]
        kv_seg = kv_seg_ref[cols] if st.segments else None
        s, mask = _scores(st, geo, offset, i, j, q, k, q_seg, kv_seg)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32, precision=prec)
        _, ds = common.softmax_grad(s, mask, lse, dp, delta)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32, precision=prec)

    dq = lax.fori_loop(0, geo.kv_blocks_end(st, offset, i), kv_step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _pad(x: jax.Array, seq_len: int, head_dim: int) -> jax.Array:
    return common.pad_axis(common.pad_axis(x, 1, seq_len), 3, head_dim)


def _head_dim(k: int) -> int:
    return max(16, pl.next_power_of_2(k))  # tl.dot needs K >= 16


class _Specs:
    """BlockSpecs for a grid (blocks, B, H): a per-program tile or a whole row to loop over."""

    def __init__(self, geo: _Pass, head_dim: int):
        self.offset = pl.BlockSpec((1,), lambda n, b, h: (0,))
        self.q_tile = pl.BlockSpec((None, geo.block_q, None, head_dim), lambda n, b, h: (b, n, h, 0))
        self.kv_tile = pl.BlockSpec((None, geo.block_k, None, head_dim), lambda n, b, h: (b, n, h, 0))
        self.q_rows = pl.BlockSpec((None, geo.q_len, None, head_dim), lambda n, b, h: (b, 0, h, 0))
        self.kv_rows = pl.BlockSpec((None, geo.kv_len, None, head_dim), lambda n, b, h: (b, 0, h, 0))
        self.vec_tile = pl.BlockSpec((None, None, geo.block_q), lambda n, b, h: (b, h, n))
        self.vec_rows = pl.BlockSpec((None, None, geo.q_len), lambda n, b, h: (b, h, 0))
        self.seg_q_tile = pl.BlockSpec((None, geo.block_q), lambda n, b, h: (b, n))
        self.seg_k_tile = pl.BlockSpec((None, geo.block_k), lambda n, b, h: (b, n))
        self.seg_q_rows = pl.BlockSpec((None, geo.q_len), lambda n, b, h: (b, 0))
        self.seg_k_rows = pl.BlockSpec((None, geo.kv_len), lambda n, b, h: (b, 0))


def _segments(st: _Static, geo: _Pass, q_seg, kv_seg) -> list[jax.Array]:
    if not st.segments:
        return []
    return [
        common.pad_axis(q_seg.astype(jnp.int32), 1, geo.q_len),
        common.pad_axis(kv_seg.astype(jnp.int32), 1, geo.kv_len),
    ]


def _forward(st: _Static, q, k, v, q_seg, kv_seg, offset, *, interpret: bool):
    """[B, L, H, K] inputs -> (out [B, L, H, K], lse [B, H, L])."""
    batch, q_len, heads, head_dim = q.shape
    geo = _Pass.make(st.blocks.block_q, st.blocks.block_k, q_len, k.shape[1])
    kp = _head_dim(head_dim)
    q_p, k_p, v_p = _pad(q, geo.q_len, kp), _pad(k, geo.kv_len, kp), _pad(v, geo.kv_len, kp)
    sp = _Specs(geo, kp)
    seg_specs = [sp.seg_q_tile, sp.seg_k_rows] if st.segments else []
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, geo=geo),
        out_shape=(
            jax.ShapeDtypeStruct(q_p.shape, v.dtype),
            jax.ShapeDtypeStruct((batch, heads, geo.q_len), jnp.float32),
        ),
        grid=(geo.num_q, batch, heads),
        in_specs=[sp.offset, sp.q_tile, sp.kv_rows, sp.kv_rows, *seg_specs],
        out_specs=(sp.q_tile, sp.vec_tile),
        compiler_params=plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages),
        interpret=interpret,
        name="moss_flash_fwd_gpu",
    )(offset, q_p, k_p, v_p, *_segments(st, geo, q_seg, kv_seg))
    return out[:, :q_len, :, :head_dim], lse[:, :, :q_len]


def _backward(st: _Static, q, k, v, q_seg, kv_seg, offset, lse, delta, do, *, interpret: bool):
    """[B, L, H, K] inputs, lse/delta [B, H, L] -> (dq, dk, dv)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    geo = _Pass.make(st.blocks.block_q_bwd, st.blocks.block_k_bwd, q_len, kv_len)
    kp = _head_dim(head_dim)
    q_p, do_p = _pad(q, geo.q_len, kp), _pad(do, geo.q_len, kp)
    k_p, v_p = _pad(k, geo.kv_len, kp), _pad(v, geo.kv_len, kp)
    lse_p, delta_p = common.pad_axis(lse, 2, geo.q_len), common.pad_axis(delta, 2, geo.q_len)
    segs = _segments(st, geo, q_seg, kv_seg)
    sp = _Specs(geo, kp)
    params = dict(
        compiler_params=plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages), interpret=interpret
    )

    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, geo=geo),
        out_shape=(jax.ShapeDtypeStruct(k_p.shape, k.dtype), jax.ShapeDtypeStruct(v_p.shape, v.dtype)),
        grid=(geo.num_k, batch, heads),
        in_specs=[
            sp.offset,
            sp.q_rows,
            sp.kv_tile,
            sp.kv_tile,
            *([sp.seg_q_rows, sp.seg_k_tile] if st.segments else []),
            sp.vec_rows,
            sp.vec_rows,
            sp.q_rows,
        ],
        out_specs=(sp.kv_tile, sp.kv_tile),
        name="moss_flash_dkv_gpu",
        **params,
    )(offset, q_p, k_p, v_p, *segs, lse_p, delta_p, do_p)

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, geo=geo),
        out_shape=jax.ShapeDtypeStruct(q_p.shape, q.dtype),
        grid=(geo.num_q, batch, heads),
        in_specs=[
            sp.offset,
            sp.q_tile,
            sp.kv_rows,
            sp.kv_rows,
            *([sp.seg_q_tile, sp.seg_k_rows] if st.segments else []),
            sp.vec_tile,
            sp.vec_tile,
            sp.q_tile,
        ],
        out_specs=sp.q_tile,
        name="moss_flash_dq_gpu",
        **params,
    )(offset, q_p, k_p, v_p, *segs, lse_p, delta_p, do_p)
    crop = (slice(None), slice(None), slice(None), slice(0, head_dim))
    return dq[:, :q_len][crop], dk[:, :kv_len][crop], dv[:, :kv_len][crop]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, k, v, q_seg, kv_seg, offset):
    return _attention_fwd(st, q, k, v, q_seg, kv_seg, offset)[0]


def _attention_fwd(st: _Static, q, k, v, q_seg, kv_seg, offset):
    run = functools.partial(_forward, st)
    out, lse = common.on_platform(run, q, k, v, q_seg, kv_seg, offset, platform="cuda", interpret=st.interpret)
    return out, (q, k, v, q_seg, kv_seg, offset, out, lse)


def _attention_bwd(st: _Static, res, do):
    q, k, v, q_seg, kv_seg, offset, out, lse = res
    delta_BxHxL = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    run = functools.partial(_backward, st)
    args = (q, k, v, q_seg, kv_seg, offset, lse, delta_BxHxL, do.astype(q.dtype))
    dq, dk, dv = common.on_platform(run, *args, platform="cuda", interpret=st.interpret)
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention_gpu(
    q_BxLxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
    block_sizes: common.BlockSizes | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    interpret: bool | None = None,
) -> jax.Array:
    """Flash attention (GPU Pallas/Triton kernel) with the semantics of `moss_jax.attention`.

    `interpret=None` compiles the kernel when lowering for CUDA and runs the Pallas
    interpreter on any other platform; True/False force one.
    """
    head_dim = q_BxLxHxK.shape[-1]
    st = _Static(
        causal=causal,
        scale=1.0 / float(head_dim) ** 0.5,
        segments=common.check_segment_ids(q_segment_ids, kv_segment_ids),
        interpret=interpret,
        blocks=block_sizes or default_block_sizes(head_dim),
        num_warps=num_warps or (4 if head_dim <= 64 else 8),
        num_stages=num_stages,
    )
    offset = common.offset_array(q_offset)
    return _attention(st, q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, q_segment_ids, kv_segment_ids, offset)
