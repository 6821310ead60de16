"""Flash attention for GPU in Pallas (Triton): forward, and a two-kernel backward.

Layout: Triton addresses strided memory directly, so the kernels read [B, L, H, K] without
the transposes the TPU variant needs; one program owns one (query block, batch, head) and
loops over key blocks with `fori_loop` (the causal bound is data-dependent through
`q_offset`, so skipped blocks cost nothing). Triton tiles must be powers of two: head_dim is
zero-padded to the next power of two (zeros change neither q.k nor the kept output columns)
and sequences to whole blocks.

Each loop is split in two: the blocks every row of the tile sees whole (below the causal
diagonal, no segment ids, no padded keys) skip the mask, the rest build it. The softmax runs in
base 2 (scores times scale * log2(e), `exp2`): `exp` lowers to libdevice's accurate `expf`,
several instructions where `exp2` is one, and the exponentials are the elementwise work that
competes with the tensor cores. The saved log-sum-exp is in base 2 too; it never leaves the kernels.

Backward: `dkv` (one program per key block, looping over query blocks) and `dq` (one per query
block, looping over key blocks). A fused variant would need atomic adds into dQ; two kernels
keep the results deterministic. Both recompute p = exp2(s - lse) from the saved log-sum-exp.

Tiles (`default_launch`): 64 x 64 with 4 warps (8 for head_dim 256, whose fp32 accumulators
need the registers) and as many pipeline stages (at most 3) as fit the GPU's shared memory
by `smem_estimate`; larger head_dim x dtype tiles shrink until they fit (fp32, head_dim 256:
64 x 32 forward, 32 x 32 backward).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from moss_jax.kernels import common, flash_mgpu, flash_mgpu_bwd

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_LOG2E = math.log2(math.e)

# Shared memory one program may use (CUDA's per-block opt-in maximum) by compute capability;
# other parts (sm_86, sm_89, sm_120) have 99 KiB. With no GPU visible (lowering ahead of time on
# a CPU host) the kernels are sized for Hopper, the GPU the lowering tests name.
_SMEM_BYTES = {(9, 0): 232448, (10, 0): 232448, (8, 0): 166912, (8, 7): 166912}
_SMEM_SMALL = 101376
_SMEM_NO_GPU = 232448
# Candidate (block_q, block_k) per pass, best first (the H200 sweep: 64 x 64, 4 warps, 3 stages was
# the fastest forward and forward+backward at head_dim 128), then smaller until the tiles fit.
_TILES = ((64, 64), (64, 32), (32, 32), (32, 16), (16, 16))
_MAX_STAGES = 3
# Triton's tl.dot needs every matmul dim >= 16: the smallest tile, and head_dim's padded minimum.
_MIN_BLOCK = 16
_KERNEL = "GPU flash kernel"


@functools.cache
def smem_limit() -> int:
    """Shared memory per program on this host's first GPU, or Hopper's when there is none."""
    try:
        device = jax.local_devices(backend="gpu")[0]
        major, minor = (int(x) for x in str(device.compute_capability).split(".")[:2])
    except Exception:  # no CUDA backend here, or a device without a compute capability
        return _SMEM_NO_GPU
    return _SMEM_BYTES.get((major, minor), _SMEM_SMALL)


def smem_estimate(kernel: str, block_q: int, block_k: int, head_dim: int, dtype, num_stages: int) -> int:
    """An upper estimate of one program's shared memory in bytes for kernel "fwd", "dq" or "dkv".

    Each pipeline stage buffers the tiles loaded inside the loop (k and v for "fwd" / "dq"; q,
    dO, lse and delta for "dkv"); the tiles loaded once may feed the tensor cores from shared
    memory too, and one fp32 [block_q, block_k] tile passes through it to become a dot operand
    (p, dS). The first H200 run's failure (fp32, head_dim 256, 64 x 64 tiles, 2 stages: 278784
    bytes requested of 232448) is exactly 2 stages x (k + v) + that tile; the loaded-once tiles
    are the margin, and every setting that compiled there is within Hopper's limit by this count.
    """
    kp, size = _head_dim(head_dim), jnp.dtype(dtype).itemsize
    q_tile, k_tile, transit = block_q * kp * size, block_k * kp * size, block_q * block_k * 4
    if kernel == "fwd":
        return num_stages * 2 * k_tile + q_tile + transit
    if kernel == "dq":
        return num_stages * 2 * k_tile + 2 * q_tile + transit
    if kernel == "dkv":
        return num_stages * (2 * q_tile + 2 * block_q * 4) + 2 * k_tile + transit
    raise ValueError(f"unknown kernel {kernel!r}")


def fit_stages(kernels: tuple[str, ...], block_q: int, block_k: int, head_dim: int, dtype, limit: int) -> int:
    """The most pipeline stages (<= 3) whose estimate fits `limit` for all `kernels`; 0 if none does."""
    for stages in range(_MAX_STAGES, 0, -1):
        if all(smem_estimate(k, block_q, block_k, head_dim, dtype, stages) <= limit for k in kernels):
            return stages
    return 0


@dataclasses.dataclass(frozen=True)
class Launch:
    """Tiles, warps and pipeline stages of the forward kernel and of the two backward kernels."""

    blocks: common.BlockSizes
    num_warps: int
    num_stages: int
    num_stages_bwd: int


def default_warps(head_dim: int) -> int:
    """4 warps; 8 for head_dim 256, whose [64, 256] fp32 accumulators (dK and dV: two) would
    take 128 registers per thread each with 4."""
    return 4 if _head_dim(head_dim) <= 128 else 8


def default_launch(head_dim: int, dtype=jnp.bfloat16, smem_bytes: int | None = None) -> Launch:
    """The largest tiles of `_TILES` with at least 2 stages (else 1) that fit `smem_bytes`
    (default: `smem_limit()`), chosen per pass."""
    limit = smem_limit() if smem_bytes is None else smem_bytes
    chosen = []
    for kernels in (("fwd",), ("dq", "dkv")):
        fits = [(bq, bk, fit_stages(kernels, bq, bk, head_dim, dtype, limit)) for bq, bk in _TILES]
        chosen.append(next((c for c in fits if c[2] >= 2), next((c for c in fits if c[2]), (16, 16, 1))))
    (bq, bk, stages), (bq_bwd, bk_bwd, stages_bwd) = chosen
    blocks = common.BlockSizes(block_q=bq, block_k=bk, block_q_bwd=bq_bwd, block_k_bwd=bk_bwd)
    return Launch(blocks, default_warps(head_dim), stages, stages_bwd)


def default_block_sizes(head_dim: int, dtype=jnp.bfloat16) -> common.BlockSizes:
    """The tiles of `default_launch`."""
    return default_launch(head_dim, dtype).blocks


def resolve_launch(
    head_dim: int, dtype, block_sizes: common.BlockSizes | None, num_warps: int | None, num_stages: int | None
) -> Launch:
    """`flash_attention_gpu`'s settings: what is given, the rest from `default_launch`.

    Given tiles without `num_stages` get the most stages that fit; given stages apply to all
    three kernels.
    """
    if block_sizes is None:
        launch = default_launch(head_dim, dtype)
    else:
        b, limit = block_sizes, smem_limit()
        launch = Launch(
            b,
            default_warps(head_dim),
            fit_stages(("fwd",), b.block_q, b.block_k, head_dim, dtype, limit) or 1,
            fit_stages(("dq", "dkv"), b.block_q_bwd, b.block_k_bwd, head_dim, dtype, limit) or 1,
        )
    if num_warps is not None:
        launch = dataclasses.replace(launch, num_warps=num_warps)
    if num_stages is not None:
        launch = dataclasses.replace(launch, num_stages=num_stages, num_stages_bwd=num_stages)
    return launch


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    scale: float
    segments: bool
    interpret: bool | None
    launch: Launch
    forward: str = "triton"  # or "mosaic": flash_mgpu's Hopper kernel (q_offset 0 only)
    backward: str = "triton"  # or "mosaic": flash_mgpu_bwd's (with a Mosaic forward only)
    mosaic_tiles: flash_mgpu.Tiles | None = None
    mosaic_bwd: flash_mgpu_bwd.Variant = flash_mgpu_bwd.Variant()

    @property
    def scale_log2(self) -> float:
        """Scores times this are in base 2: exp(scale * s) = exp2(scale_log2 * s)."""
        return self.scale * _LOG2E


@dataclasses.dataclass(frozen=True)
class _Pass:
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
        for name, block in ((f"BlockSizes.block_q{suffix}", block_q), (f"BlockSizes.block_k{suffix}", block_k)):
            common.check_block(block, name=name, kernel=_KERNEL)
            if block & (block - 1):
                raise ValueError(f"{name}={block} must be a power of two for the {_KERNEL} (Triton tiles)")
            if block < _MIN_BLOCK:
                raise ValueError(
                    f"{name}={block} must be at least {_MIN_BLOCK} for the {_KERNEL} (Triton's tl.dot needs "
                    f"M, N, K >= {_MIN_BLOCK})"
                )
        bq = min(block_q, max(_MIN_BLOCK, pl.next_power_of_2(q_len)))
        bk = min(block_k, max(_MIN_BLOCK, pl.next_power_of_2(kv_len)))
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

    def kv_blocks_whole(self, st: _Static, offset, i):
        """Key blocks [0, end) that every row of query block i sees whole: no mask needed."""
        if st.segments:
            return 0
        limit = self.num_k - (self.kv_real is not None)  # the last block holds the padded keys
        if not st.causal:
            return limit
        # Block j is below the diagonal when its last key (j + 1) * bk - 1 <= the block's first row.
        return jnp.minimum(lax.div(offset + i * self.block_q + 1, self.block_k), limit)

    def q_blocks_start(self, st: _Static, offset, j):
        """First query block whose last row sees key block j."""
        if not st.causal:
            return 0
        return jnp.minimum(lax.div(jnp.maximum(j * self.block_k - offset, 0), self.block_q), self.num_q)

    def q_blocks_whole(self, st: _Static, offset, j, start):
        """First query block from which on every row sees key block j whole (>= start)."""
        if st.segments:
            return self.num_q
        if st.causal:
            first = lax.div(jnp.maximum((j + 1) * self.block_k - 1 - offset, 0) + self.block_q - 1, self.block_q)
            first = jnp.clip(first, start, self.num_q)
        else:
            first = start
        if self.kv_real is not None:
            # int32 operands spelled out: with a Python-int `first` (no causal mask) the select
            # lowered to Triton with mismatched i1/i32 operand types.
            last = jnp.asarray(j, jnp.int32) == self.num_k - 1
            first = lax.select(last, jnp.int32(self.num_q), jnp.asarray(first, jnp.int32))
        return first


def _scores(q, k):
    """Unscaled fp32 scores q @ k.T [block_q, block_k]."""
    return lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32, precision=common.dot_precision(q.dtype))


def _mask(st: _Static, geo: _Pass, offset, i, j, q_seg, kv_seg):
    """Which scores of tile (i, j) may attend; segment ids are 1-D blocks here."""
    rows = offset + i * geo.block_q + jnp.arange(geo.block_q)[:, None]
    cols = j * geo.block_k + jnp.arange(geo.block_k)[None, :]
    if st.segments:
        q_seg, kv_seg = q_seg[:, None], kv_seg[None, :]
    return common.visible(rows, cols, q_seg, kv_seg, causal=st.causal, kv_len=geo.kv_real)


def _softmax_update(m_prev, l_prev, s, mask, scale_log2: float):
    """`common.softmax_update` in base 2 on unscaled scores: the running max m is of s * scale_log2."""
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True) * scale_log2)  # scale > 0: max commutes
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s * scale_log2 - m_next)
    l_next = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
    return m_next, l_next, p, alpha


def _probs_grad(s, mask, lse2, dp, delta, scale_log2: float):
    """`common.softmax_grad` with the base-2 log-sum-exp: (p, dS w.r.t. the scaled scores)."""
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    p = jnp.exp2(s * scale_log2 - lse2)
    return p, p * (dp - delta)


def _split_refs(st: _Static, refs):
    if st.segments:
        return refs[0], refs[1], refs[2:]
    return None, None, refs


def _fwd_kernel(offset_ref, q_ref, k_ref, v_ref, *refs, st: _Static, geo: _Pass):
    q_seg_ref, kv_seg_ref, (o_ref, lse_ref) = _split_refs(st, refs)
    i, offset = pl.program_id(0), offset_ref[0]
    q = q_ref[...]
    q_seg = q_seg_ref[...] if st.segments else None
    prec = common.dot_precision(q.dtype)

    def kv_step(masked: bool):
        def step(j, carry):
            m, row_sum, acc = carry
            cols = pl.ds(j * geo.block_k, geo.block_k)
            s = _scores(q, k_ref[cols, :])
            mask = _mask(st, geo, offset, i, j, q_seg, kv_seg_ref[cols] if st.segments else None) if masked else None
            m, row_sum, p, alpha = _softmax_update(m, row_sum, s, mask, st.scale_log2)
            v = v_ref[cols, :]
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=prec)
            return m, row_sum, alpha * acc + pv

        return step

    init = (
        jnp.full((geo.block_q, 1), common.MASK_VALUE, jnp.float32),
        jnp.zeros((geo.block_q, 1), jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )
    whole = geo.kv_blocks_whole(st, offset, i)
    carry = lax.fori_loop(0, whole, kv_step(False), init)
    m, row_sum, acc = lax.fori_loop(whole, geo.kv_blocks_end(st, offset, i), kv_step(True), carry)
    l_safe = jnp.where(row_sum == 0.0, 1.0, row_sum)  # a row that saw no key: output 0
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log2(l_safe))[:, 0]


def _dkv_kernel(offset_ref, q_ref, k_ref, v_ref, *refs, st: _Static, geo: _Pass):
    q_seg_ref, kv_seg_ref, (lse_ref, delta_ref, do_ref, dk_ref, dv_ref) = _split_refs(st, refs)
    j, offset = pl.program_id(0), offset_ref[0]
    k, v = k_ref[...], v_ref[...]
    kv_seg = kv_seg_ref[...] if st.segments else None
    prec = common.dot_precision(k.dtype)

    def q_step(masked: bool):
        def step(i, carry):
            dk, dv = carry
            rows = pl.ds(i * geo.block_q, geo.block_q)
            q, do = q_ref[rows, :], do_ref[rows, :]
            s = _scores(q, k)
            mask = _mask(st, geo, offset, i, j, q_seg_ref[rows] if st.segments else None, kv_seg) if masked else None
            dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32, precision=prec)
            p, ds = _probs_grad(s, mask, lse_ref[rows][:, None], dp, delta_ref[rows][:, None], st.scale_log2)
            dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32, precision=prec)
            dk = dk + lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32, precision=prec)
            return dk, dv

        return step

    zeros = jnp.zeros(k.shape, jnp.float32)
    start = geo.q_blocks_start(st, offset, j)
    whole = geo.q_blocks_whole(st, offset, j, start)
    carry = lax.fori_loop(start, whole, q_step(True), (zeros, zeros))
    dk, dv = lax.fori_loop(whole, geo.num_q, q_step(False), carry)
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(offset_ref, q_ref, k_ref, v_ref, *refs, st: _Static, geo: _Pass):
    q_seg_ref, kv_seg_ref, (lse_ref, delta_ref, do_ref, dq_ref) = _split_refs(st, refs)
    i, offset = pl.program_id(0), offset_ref[0]
    q, do = q_ref[...], do_ref[...]
    q_seg = q_seg_ref[...] if st.segments else None
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    prec = common.dot_precision(q.dtype)

    def kv_step(masked: bool):
        def step(j, dq):
            cols = pl.ds(j * geo.block_k, geo.block_k)
            k, v = k_ref[cols, :], v_ref[cols, :]
            s = _scores(q, k)
            mask = _mask(st, geo, offset, i, j, q_seg, kv_seg_ref[cols] if st.segments else None) if masked else None
            dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32, precision=prec)
            _, ds = _probs_grad(s, mask, lse, dp, delta, st.scale_log2)
            return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32, precision=prec)

        return step

    whole = geo.kv_blocks_whole(st, offset, i)
    dq = lax.fori_loop(0, whole, kv_step(False), jnp.zeros(q.shape, jnp.float32))
    dq = lax.fori_loop(whole, geo.kv_blocks_end(st, offset, i), kv_step(True), dq)
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _head_dim(k: int) -> int:
    return max(_MIN_BLOCK, pl.next_power_of_2(k))  # tl.dot needs K >= 16


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
    return list(common.pad_segment_ids(q_seg, kv_seg, geo.q_len, geo.kv_len))


def _forward(st: _Static, q, k, v, q_seg, kv_seg, offset, *, interpret: bool):
    """[B, L, H, K] inputs -> (out [B, L, H, K], lse [B, H, L])."""
    batch, q_len, heads, head_dim = q.shape
    blocks = st.launch.blocks
    geo = _Pass.make(blocks, q_len, k.shape[1], backward=False)
    kp = _head_dim(head_dim)
    q_p, k_p, v_p = (common.pad_tokens(x, n, kp) for x, n in ((q, geo.q_len), (k, geo.kv_len), (v, geo.kv_len)))
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
        compiler_params=plgpu.CompilerParams(num_warps=st.launch.num_warps, num_stages=st.launch.num_stages),
        interpret=interpret,
        name="moss_flash_fwd_gpu",
    )(offset, q_p, k_p, v_p, *_segments(st, geo, q_seg, kv_seg))
    return out[:, :q_len, :, :head_dim], lse[:, :, :q_len]


def _backward(st: _Static, q, k, v, q_seg, kv_seg, offset, lse, delta, do, *, interpret: bool):
    """[B, L, H, K] inputs, lse/delta [B, H, L] -> (dq, dk, dv)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    blocks = st.launch.blocks
    geo = _Pass.make(blocks, q_len, kv_len, backward=True)
    kp = _head_dim(head_dim)
    q_p, do_p = common.pad_tokens(q, geo.q_len, kp), common.pad_tokens(do, geo.q_len, kp)
    k_p, v_p = common.pad_tokens(k, geo.kv_len, kp), common.pad_tokens(v, geo.kv_len, kp)
    lse_p, delta_p = common.pad_axis(lse, 2, geo.q_len), common.pad_axis(delta, 2, geo.q_len)
    segs = _segments(st, geo, q_seg, kv_seg)
    sp = _Specs(geo, kp)
    params = dict(
        compiler_params=plgpu.CompilerParams(num_warps=st.launch.num_warps, num_stages=st.launch.num_stages_bwd),
        interpret=interpret,
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
    hopper = None
    if st.forward == "mosaic":

        def hopper(q, k, v, q_seg, kv_seg, offset):
            del offset  # 0: flash_attention_gpu takes this path for a static q_offset of 0 only
            return flash_mgpu.flash_forward_hopper(
                q, k, v, q_seg, kv_seg, causal=st.causal, scale=st.scale, tiles=st.mosaic_tiles
            )

    run = functools.partial(_forward, st)
    args = (q, k, v, q_seg, kv_seg, offset)
    out, lse = common.on_platform(run, *args, platform="cuda", interpret=st.interpret, compiled=hopper)
    res_out, res_lse = common.name_residuals(out, lse)
    return out, (q, k, v, q_seg, kv_seg, offset, res_out, res_lse)


def _attention_bwd(st: _Static, res, do):
    q, k, v, q_seg, kv_seg, offset, out, lse = res
    delta_BxHxL = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    run = functools.partial(_backward, st)
    args = (q, k, v, q_seg, kv_seg, offset, lse, delta_BxHxL, do.astype(q.dtype))
    hopper = None
    if st.backward == "mosaic":

        def hopper(q, k, v, q_seg, kv_seg, offset, lse, delta, do):
            del offset  # 0, as for the forward
            return flash_mgpu_bwd.flash_backward_hopper(
                q, k, v, q_seg, kv_seg, lse, delta, do, causal=st.causal, scale=st.scale, variant=st.mosaic_bwd
            )

    dq, dk, dv = common.on_platform(run, *args, platform="cuda", interpret=st.interpret, compiled=hopper)
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
    num_stages: int | None = None,
    interpret: bool | None = None,
    forward: str = "triton",
    backward: str = "triton",
    mosaic_tiles: flash_mgpu.Tiles | None = None,
    mosaic_bwd: flash_mgpu_bwd.Variant | None = None,
) -> jax.Array:
    """Flash attention (GPU Pallas/Triton kernel) with the semantics of `moss_jax.attention`.

    `block_sizes`, `num_warps`, `num_stages`: None takes `default_launch`'s choice for this
    head_dim and dtype (`resolve_launch`); `num_stages` given applies to all three kernels.
    `interpret=None` compiles the kernel when lowering for CUDA and runs the Pallas
    interpreter on any other platform; True/False force one.
    `forward="mosaic"` runs the forward pass with `flash_mgpu`'s Hopper kernel where it applies
    (bf16/fp16, head_dim up to 256, `q_offset` the int 0, a Hopper GPU or none
    visible, `interpret` None) and the Triton forward otherwise. `backward="mosaic"` runs the
    backward with `flash_mgpu_bwd`'s fused Hopper kernel where the Mosaic forward ran and
    head_dim <= 128; otherwise the two Triton kernels. `mosaic_tiles`: the Mosaic forward's tiles
    (None: `flash_mgpu.default_tiles`); `mosaic_bwd`: the Mosaic backward's schedule
    (`flash_mgpu_bwd.Variant`; None: its default).

    Raises:
      ValueError: q/k/v shapes that do not match (`common.check_shapes`), or a `block_sizes` field
        that is not a power of two >= 16; all four fields are checked here, so a forward-only call
        rejects bad backward blocks too.
    """
    common.check_shapes(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, impl="flash_attention_gpu")
    for name, value in (("forward", forward), ("backward", backward)):
        if value not in ("triton", "mosaic"):
            raise ValueError(f"{name} must be 'triton' or 'mosaic', got {value!r}")
    if forward == "mosaic" and (
        interpret is not None
        or flash_mgpu.unsupported(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, q_offset=q_offset, tiles=mosaic_tiles) is not None
        or flash_mgpu.device_unsupported(causal) is not None
    ):
        forward = "triton"
    segments = common.check_segment_ids(q_segment_ids, kv_segment_ids)
    mosaic_bwd = flash_mgpu_bwd.Variant() if mosaic_bwd is None else mosaic_bwd
    if forward != "mosaic" or flash_mgpu_bwd.unsupported(q_BxLxHxK, segments=segments, variant=mosaic_bwd) is not None:
        backward = "triton"
    head_dim = q_BxLxHxK.shape[-1]
    launch = resolve_launch(head_dim, q_BxLxHxK.dtype, block_sizes, num_warps, num_stages)
    for bwd in (False, True):  # all four fields, so a forward-only call checks the backward's too
        _Pass.make(launch.blocks, q_BxLxHxK.shape[1], k_BxSxHxK.shape[1], backward=bwd)
    st = _Static(
        causal=causal,
        scale=1.0 / float(head_dim) ** 0.5,
        segments=segments,
        interpret=interpret,
        launch=launch,
        forward=forward,
        backward=backward,
        mosaic_tiles=mosaic_tiles if forward == "mosaic" else None,
        mosaic_bwd=mosaic_bwd if backward == "mosaic" else flash_mgpu_bwd.Variant(),
    )
    offset = common.offset_array(q_offset)
    return _attention(st, q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, q_segment_ids, kv_segment_ids, offset)
