"""Flash attention for TPU in Pallas (Mosaic): forward, and a two-kernel backward.

Layout: the wrapper transposes [B, L, H, K] to [B, H, L, K] so every block is a
(rows, head_dim) tile; the last two block dims must be multiples of (8, 128) or full, so the
query block is a multiple of 16 (bf16 packs 16 rows per tile) and the key block a multiple of
128 (it is the lane dim of the score tile). Sequences are padded to whole blocks.

Grid (B, H, query blocks, key blocks), the last axis sequential ("arbitrary") carrying the
online-softmax state in VMEM scratch. `q_offset` is a scalar-prefetch operand: the kernels use
it for the causal mask and the index maps use it to skip blocks above the diagonal (a skipped
step maps to the block already resident, so Pallas issues no DMA for it).

Backward: `dkv` (grid over key blocks, sequential over query blocks) and `dq` (grid over query
blocks, sequential over key blocks); TPU has no atomics, so dQ cannot be summed inside the dK/dV
kernel. Both recompute p = exp(s - lse) from the saved log-sum-exp. Per-row vectors (lse,
delta, query segment ids) are broadcast over 128 lanes and key segment ids over 8 sublanes, the
layouts Mosaic handles without relayouts.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moss_jax.kernels import common

LANES, SUBLANES = 128, 8
# 512-row tiles (maxtext's splash-attention defaults); compile-checked to fit VMEM for
# head_dim 256 in fp32 and bf16 (tests/kernels/test_tpu_compile.py). Not timed on hardware here.
DEFAULT_BLOCK_SIZES = common.BlockSizes(block_q=512, block_k=512, block_q_bwd=512, block_k_bwd=512)
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
_TN = (((0,), (0,)), ((), ()))  # contract the first dims: a.T @ b
_KERNEL = "TPU flash kernel"


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    scale: float
    segments: bool
    interpret: bool | None
    blocks: common.BlockSizes


@dataclasses.dataclass(frozen=True)
class _Pass:
    """Geometry of one kernel launch: block sizes and padded lengths."""

    block_q: int
    block_k: int
    q_len: int  # padded
    kv_len: int  # padded
    kv_real: int | None  # real key count when padded, else None

    @classmethod
    def make(cls, blocks: common.BlockSizes, q_len: int, kv_len: int, *, backward: bool) -> _Pass:
        """The forward's (`backward` False) or both backward kernels' geometry from `blocks`."""
        suffix = "_bwd" if backward else ""
        block_q, block_k = getattr(blocks, "block_q" + suffix), getattr(blocks, "block_k" + suffix)
        bq = common.fit_block(block_q, q_len, 16, name=f"BlockSizes.block_q{suffix}", kernel=_KERNEL)
        bk = common.fit_block(block_k, kv_len, LANES, name=f"BlockSizes.block_k{suffix}", kernel=_KERNEL)
        kv_pad = common.round_up(kv_len, bk)
        return cls(bq, bk, common.round_up(q_len, bq), kv_pad, None if kv_pad == kv_len else kv_len)

    @property
    def num_q(self) -> int:
        return self.q_len // self.block_q

    @property
    def num_k(self) -> int:
        return self.kv_len // self.block_k

    def last_kv_block(self, offset, i):
        """Last key block that query block i sees under the causal mask (clamped to the grid)."""
        # lax.div on non-negative operands: jnp's floor division lowers through `sign`, which
        # Mosaic cannot lower from a CPU host compiling for a TPU topology.
        return jnp.minimum(lax.div(offset + (i + 1) * self.block_q - 1, self.block_k), self.num_k - 1)

    def first_q_block(self, offset, j):
        """First query block whose last row sees key block j under the causal mask."""
        return jnp.minimum(lax.div(jnp.maximum(j * self.block_k - offset, 0), self.block_q), self.num_q - 1)

    def runs(self, st: _Static, offset, i, j):
        """Whether block (i, j) has any pair the causal mask allows."""
        if not st.causal:
            return True
        return j * self.block_k <= offset + (i + 1) * self.block_q - 1


def _scores(st: _Static, geo: _Pass, offset, i, j, q, k, q_seg_ref, kv_seg_ref):
    """fp32 scaled scores [block_q, block_k] of q block i against k block j, and their mask."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32, precision=common.dot_precision(q.dtype))
    s = s * st.scale
    shape = (geo.block_q, geo.block_k)
    rows = offset + i * geo.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = j * geo.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
    q_seg = kv_seg = None
    if st.segments:
        q_seg = jnp.tile(q_seg_ref[...], (1, geo.block_k // LANES))
        kv_seg = kv_seg_ref[:1, :]
    return s, common.visible(rows, cols, q_seg, kv_seg, causal=st.causal, kv_len=geo.kv_real)


def _split_refs(st: _Static, refs):
    if st.segments:
        return refs[0], refs[1], refs[2:]
    return None, None, refs


def _fwd_kernel(offset_ref, q_ref, k_ref, v_ref, *refs, st: _Static, geo: _Pass):
    q_seg_ref, kv_seg_ref, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _split_refs(st, refs)
    i, j, offset = pl.program_id(2), pl.program_id(3), offset_ref[0]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, common.MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(geo.runs(st, offset, i, j))
    def _step():
        s, mask = _scores(st, geo, offset, i, j, q_ref[...], k_ref[...], q_seg_ref, kv_seg_ref)
        m, row_sum, p, alpha = common.softmax_update(m_scr[...][:, :1], l_scr[...][:, :1], s, mask)
        v = v_ref[...]
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=common.dot_precision(v.dtype))
        acc_scr[...] = alpha * acc_scr[...] + pv
        m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
        l_scr[...] = jnp.broadcast_to(row_sum, l_scr.shape)

    @pl.when(j == geo.num_k - 1)
    def _finish():
        out, lse = common.softmax_finish(m_scr[...][:, :1], l_scr[...][:, :1], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _dkv_kernel(offset_ref, q_ref, k_ref, v_ref, *refs, st: _Static, geo: _Pass):
    q_seg_ref, kv_seg_ref, (lse_ref, delta_ref, do_ref, dk_ref, dv_ref, dk_scr, dv_scr) = _split_refs(st, refs)
    j, i, offset = pl.program_id(2), pl.program_id(3), offset_ref[0]

    @pl.when(i == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(geo.runs(st, offset, i, j))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        prec = common.dot_precision(q.dtype)
        s, mask = _scores(st, geo, offset, i, j, q, k, q_seg_ref, kv_seg_ref)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32, precision=prec)
        p, ds = common.softmax_grad(s, mask, lse_ref[...][:, :1], dp, delta_ref[...][:, :1])
        dv_scr[...] += lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32, precision=prec)
        dk_scr[...] += lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32, precision=prec)

    @pl.when(i == geo.num_q - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * st.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(offset_ref, q_ref, k_ref, v_ref, *refs, st: _Static, geo: _Pass):
    q_seg_ref, kv_seg_ref, (lse_ref, delta_ref, do_ref, dq_ref, dq_scr) = _split_refs(st, refs)
    i, j, offset = pl.program_id(2), pl.program_id(3), offset_ref[0]

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(geo.runs(st, offset, i, j))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        prec = common.dot_precision(q.dtype)
        s, mask = _scores(st, geo, offset, i, j, q, k, q_seg_ref, kv_seg_ref)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32, precision=prec)
        _, ds = common.softmax_grad(s, mask, lse_ref[...][:, :1], dp, delta_ref[...][:, :1])
        dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32, precision=prec)

    @pl.when(j == geo.num_k - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * st.scale).astype(dq_ref.dtype)


def _specs(st: _Static, geo: _Pass, head_dim: int, *, q_major: bool):
    """BlockSpecs of (q, k, v, [q_seg, kv_seg], lse, delta, do) for a grid (B, H, major, minor).

    `q_major`: the third grid axis walks query blocks (forward, dq), else key blocks (dkv).
    The minor axis is clamped to the blocks the causal mask needs, so skipped steps re-use
    the resident block instead of fetching a new one.
    """

    def ij(major, minor, offset_ref):
        if q_major:
            i, j = major, minor
            if st.causal:
                j = jnp.minimum(j, geo.last_kv_block(offset_ref[0], i))
        else:
            i, j = minor, major
            if st.causal:
                i = jnp.maximum(i, geo.first_q_block(offset_ref[0], j))
        return i, j

    def q_map(b, h, major, minor, offset_ref):
        return b, h, ij(major, minor, offset_ref)[0], 0

    def kv_map(b, h, major, minor, offset_ref):
        return b, h, ij(major, minor, offset_ref)[1], 0

    def q_seg_map(b, h, major, minor, offset_ref):
        return b, ij(major, minor, offset_ref)[0], 0

    def kv_seg_map(b, h, major, minor, offset_ref):
        return b, 0, ij(major, minor, offset_ref)[1]

    q_spec = pl.BlockSpec((None, None, geo.block_q, head_dim), q_map)
    kv_spec = pl.BlockSpec((None, None, geo.block_k, head_dim), kv_map)
    row_spec = pl.BlockSpec((None, None, geo.block_q, LANES), q_map)
    seg_specs = []
    if st.segments:
        seg_specs = [
            pl.BlockSpec((None, geo.block_q, LANES), q_seg_map),
            pl.BlockSpec((None, SUBLANES, geo.block_k), kv_seg_map),
        ]
    return q_spec, kv_spec, seg_specs, row_spec


def _segment_operands(st: _Static, geo: _Pass, q_seg, kv_seg) -> list[jax.Array]:
    """Segment ids padded and broadcast to the lane/sublane layouts the kernels read."""
    if not st.segments:
        return []
    q_seg, kv_seg = common.pad_segment_ids(q_seg, kv_seg, geo.q_len, geo.kv_len)
    batch = q_seg.shape[0]
    return [
        lax.broadcast_in_dim(q_seg, (batch, geo.q_len, LANES), (0, 1)),
        lax.broadcast_in_dim(kv_seg, (batch, SUBLANES, geo.kv_len), (0, 2)),
    ]


def _params(*semantics: str) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _cost(geo: _Pass, st: _Static, batch: int, heads: int, head_dim: int, matmuls: int, nbytes: int):
    pairs = batch * heads * geo.q_len * geo.kv_len // (2 if st.causal else 1)
    return pl.CostEstimate(flops=2 * matmuls * pairs * head_dim, transcendentals=pairs, bytes_accessed=nbytes)


def _forward(st: _Static, q, k, v, q_seg, kv_seg, offset, *, interpret: bool):
    """[B, H, L, K] inputs -> (out [B, H, L, K], lse [B, H, L, 1])."""
    batch, heads, q_len, head_dim = q.shape
    geo = _Pass.make(st.blocks, q_len, k.shape[2], backward=False)
    q_p = common.pad_axis(q, 2, geo.q_len)
    k_p, v_p = common.pad_axis(k, 2, geo.kv_len), common.pad_axis(v, 2, geo.kv_len)
    q_spec, kv_spec, seg_specs, row_spec = _specs(st, geo, head_dim, q_major=True)
    grid = (batch, heads, geo.num_q, geo.num_k)
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, geo=geo),
        out_shape=(
            jax.ShapeDtypeStruct(q_p.shape, v.dtype),
            jax.ShapeDtypeStruct((batch, heads, geo.q_len, LANES), jnp.float32),
        ),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=grid,
            in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
            out_specs=(q_spec, row_spec),
            scratch_shapes=[
                pltpu.VMEM((geo.block_q, LANES), jnp.float32),
                pltpu.VMEM((geo.block_q, LANES), jnp.float32),
                pltpu.VMEM((geo.block_q, head_dim), jnp.float32),
            ],
        ),
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        cost_estimate=_cost(geo, st, batch, heads, head_dim, 2, 4 * q_p.nbytes + 2 * k_p.nbytes),
        interpret=interpret,
        name="moss_flash_fwd_tpu",
    )(offset, q_p, k_p, v_p, *_segment_operands(st, geo, q_seg, kv_seg))
    return out[:, :, :q_len], lse[:, :, :q_len, :1]


def _backward(st: _Static, q, k, v, q_seg, kv_seg, offset, lse, delta, do, *, interpret: bool):
    """[B, H, L, K] inputs, lse/delta [B, H, L, 1] -> (dq, dk, dv)."""
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    geo = _Pass.make(st.blocks, q_len, kv_len, backward=True)
    q_p, do_p = common.pad_axis(q, 2, geo.q_len), common.pad_axis(do, 2, geo.q_len)
    k_p, v_p = common.pad_axis(k, 2, geo.kv_len), common.pad_axis(v, 2, geo.kv_len)
    rows = [jnp.broadcast_to(common.pad_axis(x, 2, geo.q_len), (batch, heads, geo.q_len, LANES)) for x in (lse, delta)]
    segs = _segment_operands(st, geo, q_seg, kv_seg)
    nbytes = 4 * q_p.nbytes + 4 * k_p.nbytes
    common_args = dict(compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"), interpret=interpret)

    q_spec, kv_spec, seg_specs, row_spec = _specs(st, geo, head_dim, q_major=False)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, geo=geo),
        out_shape=(jax.ShapeDtypeStruct(k_p.shape, k.dtype), jax.ShapeDtypeStruct(v_p.shape, v.dtype)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, heads, geo.num_k, geo.num_q),
            in_specs=[q_spec, kv_spec, kv_spec, *seg_specs, row_spec, row_spec, q_spec],
            out_specs=(kv_spec, kv_spec),
            scratch_shapes=[pltpu.VMEM((geo.block_k, head_dim), jnp.float32)] * 2,
        ),
        cost_estimate=_cost(geo, st, batch, heads, head_dim, 4, nbytes),
        name="moss_flash_dkv_tpu",
        **common_args,
    )(offset, q_p, k_p, v_p, *segs, *rows, do_p)

    q_spec, kv_spec, seg_specs, row_spec = _specs(st, geo, head_dim, q_major=True)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, geo=geo),
        out_shape=jax.ShapeDtypeStruct(q_p.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, heads, geo.num_q, geo.num_k),
            in_specs=[q_spec, kv_spec, kv_spec, *seg_specs, row_spec, row_spec, q_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((geo.block_q, head_dim), jnp.float32)],
        ),
        cost_estimate=_cost(geo, st, batch, heads, head_dim, 3, nbytes),
        name="moss_flash_dq_tpu",
        **common_args,
    )(offset, q_p, k_p, v_p, *segs, *rows, do_p)
    return dq[:, :, :q_len], dk[:, :, :kv_len], dv[:, :, :kv_len]


def _to_bhlk(x: jax.Array) -> jax.Array:
    return x.transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, k, v, q_seg, kv_seg, offset):
    return _attention_fwd(st, q, k, v, q_seg, kv_seg, offset)[0]


def _attention_fwd(st: _Static, q, k, v, q_seg, kv_seg, offset):
    run = functools.partial(_forward, st)
    out, lse = common.on_platform(run, q, k, v, q_seg, kv_seg, offset, platform="tpu", interpret=st.interpret)
    res_out, res_lse = common.name_residuals(out, lse)
    return out, (q, k, v, q_seg, kv_seg, offset, res_out, res_lse)


def _attention_bwd(st: _Static, res, do):
    q, k, v, q_seg, kv_seg, offset, out, lse = res
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    run = functools.partial(_backward, st)
    args = (q, k, v, q_seg, kv_seg, offset, lse, delta, do.astype(q.dtype))
    dq, dk, dv = common.on_platform(run, *args, platform="tpu", interpret=st.interpret)
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention_tpu(
    q_BxLxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
    block_sizes: common.BlockSizes = DEFAULT_BLOCK_SIZES,
    interpret: bool | None = None,
) -> jax.Array:
    """Flash attention (TPU Pallas kernel) with the semantics of `moss_jax.attention`.

    `interpret=None` compiles the kernel when lowering for TPU and runs the Pallas
    interpreter on any other platform; True/False force one.

    Raises:
      ValueError: q/k/v shapes that do not match (`common.check_shapes`), or a `block_sizes` field
        that is not a multiple of 16 (query blocks) or 128 (key blocks); all four fields are
        checked here, so a forward-only call rejects bad backward blocks too.
    """
    common.check_shapes(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, impl="flash_attention_tpu")
    for bwd in (False, True):  # all four fields, so a forward-only call checks the backward's too
        _Pass.make(block_sizes, q_BxLxHxK.shape[1], k_BxSxHxK.shape[1], backward=bwd)
    st = _Static(
        causal=causal,
        scale=1.0 / float(q_BxLxHxK.shape[-1]) ** 0.5,
        segments=common.check_segment_ids(q_segment_ids, kv_segment_ids),
        interpret=interpret,
        blocks=block_sizes,
    )
    q, k, v = (_to_bhlk(x) for x in (q_BxLxHxK, k_BxSxHxK, v_BxSxHxK))
    out_BxHxLxK = _attention(st, q, k, v, q_segment_ids, kv_segment_ids, common.offset_array(q_offset))
    return _to_bhlk(out_BxHxLxK)
