"""Flash-attention forward for NVIDIA Hopper (sm_90) in Pallas Mosaic GPU.

Why a second GPU forward: the Triton kernel (`flash_gpu`) ran at 1.34-1.48x cuDNN's forward time
on an H100 (docs/performance.md). Triton cannot express what Hopper kernels such as cuDNN's and
FlashAttention-3 use: a warpgroup that only issues TMA copies while others compute,
asynchronous `wgmma` overlapped with the softmax, and two compute warpgroups taking turns on the
tensor cores. Mosaic GPU exposes these, and this kernel is built the FlashAttention-3 way, on
the plan of JAX's own example (`jax.experimental.pallas.ops.gpu.attention_mgpu`), which covers
less than we need: float16 only, no softmax scale, no segment ids, no padding, no causal
backward.

One program owns 2 x `block_q` query rows of one (batch, head):

* warpgroups 0 and 1 each hold `block_q` rows of Q in shared memory and loop over the key blocks:
  S = Q K^T (`wgmma` into a fresh accumulator), the base-2 online softmax in registers (scores
  times scale * log2(e), as in `flash_gpu`), then acc = alpha * acc + P V (`wgmma` into the
  running accumulator, during which the next K block is awaited);
* warpgroup 2 streams K and V blocks through `stages` shared-memory slots with TMA; a slot is
  refilled once both compute warpgroups have released it (the "consumed" barriers);
* a two-party schedule barrier alternates the compute warpgroups: one's softmax runs while the
  other's matmuls occupy the tensor cores.

Masking is that of `moss_jax.attention` with `q_offset` 0: causal (query i sees key j <= i),
segment ids, and padded keys (sequences are padded to whole blocks; the real key count hides the
padded columns). Key blocks every row of a warpgroup sees whole skip the mask; with causal
masking the blocks above the diagonal are never loaded. A row that sees no key gets output 0
(the running max starts at a finite value, so no inf - inf), and the saved log-sum-exp is base 2,
the residual `flash_gpu`'s Triton backward kernels take: this module is a forward only.

Testing: on a CPU host the kernel is lowered for CUDA (`tests/kernels/test_flash_mgpu.py`), which
runs Pallas's Mosaic GPU lowering (shapes, layouts, shared-memory allocation), and run in JAX's
Mosaic GPU interpreter for its numbers and barrier protocol (`mgpu_interpret`,
`tests/kernels/test_flash_mgpu_interpret.py`); its speed needs an H100 (`bench/gpu_kernel_check.py`,
`bench/attention.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from moss_jax.kernels import common

_LOG2E = math.log2(math.e)
_COMPUTE_WGS = 2
# Registers per thread: 2 compute warpgroups x 232 + the TMA warpgroup x 40, times 128 threads,
# is 64512 of the SM's 65536 (JAX's example uses the same split).
_COMPUTE_REGS, _MEMORY_REGS = 232, 40
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per accumulator row
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per accumulator column
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# JAX 0.11 deprecates `plgpu.load`'s separate index argument, which JAX 0.10 requires.
_LOAD_TAKES_INDEX = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty
# Hopper's opt-in shared memory per block, less 4 KiB for barriers and alignment (Tiles.smem_bytes).
_SMEM_BUDGET = 232448 - 4096


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Query rows per compute warpgroup, keys per block, and K/V shared-memory slots."""

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2

    def __post_init__(self):
        if self.block_q != 64:
            # wgmma's M is 64 per warpgroup; larger tiles would need several accumulators.
            raise ValueError(f"Tiles.block_q must be 64 (one wgmma M per warpgroup), got {self.block_q}")
        if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
            raise ValueError(f"Tiles.block_kv must be 64, 128, 192 or 256, got {self.block_kv}")
        if self.stages < 2:
            raise ValueError(f"Tiles.stages must be at least 2 (double buffering), got {self.stages}")

    def smem_bytes(self, head_dim: int, dtype, segments: bool = True) -> int:
        """Shared memory of the buffers (Q/O, the K and V slots, log-sum-exp, segment ids); the
        barriers and alignment add 2.7-3.3 KiB (measured on the lowering)."""
        size = jnp.dtype(dtype).itemsize
        q_o = _COMPUTE_WGS * self.block_q * head_dim * size
        kv = 2 * self.stages * self.block_kv * head_dim * size
        ids = (_COMPUTE_WGS * self.block_q + self.stages * self.block_kv) * 4 if segments else 0
        return q_o + kv + _COMPUTE_WGS * self.block_q * 4 + ids


def default_tiles(head_dim: int) -> Tiles:
    """128-key blocks up to head_dim 128 and 64 for 256, whose fp32 [64, 256] accumulator takes
    128 registers per thread; 2 slots (both fit Hopper's shared memory in bf16)."""
    return Tiles(block_q=64, block_kv=128 if head_dim <= 128 else 64, stages=2)


def unsupported(q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset, tiles: Tiles | None = None) -> str | None:
    """Why this kernel cannot run a call (the caller then takes the Triton forward), or None."""
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1 or not dtypes <= set(_DTYPES):
        return f"q/k/v dtypes {sorted(d.name for d in dtypes)}: the Mosaic GPU forward takes one of bfloat16/float16"
    head_dim = _padded_dim(q.shape[-1])
    if head_dim > 256:
        return f"head_dim {q.shape[-1]}: the Mosaic GPU forward takes up to 256"
    if not (isinstance(q_offset, int) and q_offset == 0):
        return "a q_offset (KV-cache prefill/decode): the Mosaic GPU forward is for training (offset 0)"
    t = tiles or default_tiles(head_dim)
    if t.smem_bytes(head_dim, q.dtype) > _SMEM_BUDGET:
        return f"{t} at head_dim {head_dim} needs {t.smem_bytes(head_dim, q.dtype)} bytes of shared memory"
    return None


def _padded_dim(head_dim: int) -> int:
    """head_dim zero-padded to whole 64-column wgmma tiles (80 -> 128): zeros change neither
    q.k nor the kept output columns."""
    return common.round_up(head_dim, 64)


@functools.cache
def device_unsupported(causal: bool = True) -> str | None:
    """Why this host's GPU cannot run the kernels, or None: a Hopper GPU, or no GPU visible (a
    CPU host lowering for CUDA ahead of time is taken to target Hopper).

    CUDA 12.8 and 12.9 runtimes are refused for causal masking: ptxas 12.8.0-12.9.0 miscompiles it,
    silently (JAX's own example kernel refuses them too, meaning to allow 12.9.1). The runtime
    version reads major * 1000 + minor * 10, with no patch digit, so 12.9.1 (12090) cannot be told
    from 12.9.0 and is refused as well; 13.0 and later are accepted. (The runtime stands
    in for the ptxas that compiles the kernel, as in JAX's check.)
    """
    try:
        device = jax.local_devices(backend="gpu")[0]
    except RuntimeError:  # no GPU backend on this host
        return None
    capability = str(getattr(device, "compute_capability", ""))
    if capability.split(".")[0] != "9":
        return f"GPU {device.device_kind!r} (compute capability {capability or '?'}): wgmma needs sm_90 (Hopper)"
    runtime = _cuda_runtime_version()
    if causal and runtime is not None and 12080 <= runtime < 12100:  # 12.8.x and 12.9.x
        return (
            f"CUDA runtime {runtime} (12.8 or 12.9): ptxas 12.8.0-12.9.0 miscompiles the causal mask, and the "
            "runtime version has no patch digit to tell 12.9.1 apart (JAX's example refuses these too)"
        )
    return None


def _cuda_runtime_version() -> int | None:
    try:
        from jax._src.lib import cuda_versions
    except ImportError:
        return None
    return None if cuda_versions is None else int(cuda_versions.cuda_runtime_get_version())


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static sizes of one call; sequences padded to whole tiles."""

    causal: bool
    segments: bool
    scale_log2: float
    block_q: int
    block_kv: int
    stages: int
    q_len: int  # padded to 2 * block_q
    kv_len: int  # padded to block_kv
    kv_real: int | None  # the real key count when padded, else None
    head_dim: int
    dtype: jnp.dtype

    @property
    def num_q_tiles(self) -> int:
        return self.q_len // (_COMPUTE_WGS * self.block_q)

    @property
    def num_kv(self) -> int:
        return self.kv_len // self.block_kv

    def kv_steps(self, row_end):
        """Key blocks [0, n) that rows < `row_end` see."""
        if not self.causal:
            return self.num_kv
        return jnp.minimum(pl.cdiv(row_end, jnp.int32(self.block_kv)), self.num_kv)

    def kv_whole(self, first_row):
        """Key blocks [0, n) that every row from `first_row` on sees whole: no mask needed."""
        if self.segments:
            return 0
        limit = self.num_kv - (self.kv_real is not None)  # the last block holds the padded keys
        if not self.causal:
            return limit
        # Block j is below the diagonal when its last key (j + 1) * block_kv - 1 <= first_row.
        return jnp.minimum(lax.div(first_row + 1, jnp.int32(self.block_kv)), limit)


def _kernel(q_ref, k_ref, v_ref, *refs, geo: _Geometry):
    if geo.segments:
        q_seg_ref, kv_seg_ref, out_ref, lse_ref = refs
    else:
        (out_ref, lse_ref), q_seg_ref, kv_seg_ref = refs, None, None
    tiling, swizzle = plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)
    bq, bkv, d = geo.block_q, geo.block_kv, geo.head_dim
    scratch = (
        plgpu.SMEM((_COMPUTE_WGS, bq, d), geo.dtype, transforms=(tiling, swizzle)),  # Q, then O
        plgpu.SMEM((geo.stages, bkv, d), geo.dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((geo.stages, bkv, d), geo.dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((_COMPUTE_WGS, bq), jnp.float32),  # log-sum-exp
        # Segment ids reach registers through shared memory (Mosaic GPU loads a row layout from
        # shared memory only): the rows' ids once, the keys' ids with each K/V slot.
        plgpu.SMEM((_COMPUTE_WGS, bq), jnp.int32) if geo.segments else None,
        plgpu.SMEM((geo.stages, bkv), jnp.int32) if geo.segments else None,
    )
    loaded = (
        plgpu.Barrier(num_barriers=geo.stages),  # K slot filled
        plgpu.Barrier(num_barriers=geo.stages),  # V slot filled
        plgpu.Barrier(num_barriers=_COMPUTE_WGS),  # Q tile filled
        plgpu.Barrier(num_barriers=_COMPUTE_WGS) if geo.segments else None,  # rows' segment ids
        plgpu.Barrier(num_barriers=geo.stages) if geo.segments else None,  # keys' segment ids
    )
    consumed = (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=geo.stages),) * 2
    schedule = plgpu.Barrier(num_arrivals=_COMPUTE_WGS)
    pl.run_scoped(
        lambda *scoped: _program(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, out_ref, lse_ref, *scoped, geo=geo),
        scratch,
        loaded,
        consumed,
        schedule,
        collective_axes="wg",
    )


def _program(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, out_ref, lse_ref, smem, loaded, consumed, schedule, *, geo):
    qo_smem2, k_smem, v_smem, lse_smem2, q_seg_smem2, kv_seg_smem = smem
    k_loaded, v_loaded, q_loaded, q_seg_loaded, kv_seg_loaded = loaded
    k_consumed, v_consumed = consumed
    bq, bkv, d, stages = geo.block_q, geo.block_kv, geo.head_dim, geo.stages
    batch, head, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    program_steps = geo.kv_steps((tile + 1) * (_COMPUTE_WGS * bq))  # what the TMA warpgroup streams

    def take_turn():
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(_COMPUTE_REGS, action="increase")
        qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
        first_row = tile * (_COMPUTE_WGS * bq) + wg * bq
        steps = geo.kv_steps(first_row + bq)
        rows = (batch, pl.ds(first_row, bq), head)
        plgpu.copy_gmem_to_smem(q_ref.at[rows], qo_smem, q_loaded.at[wg])
        q_seg = None
        if geo.segments:
            q_seg_smem = q_seg_smem2.at[wg]
            plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, pl.ds(first_row, bq)], q_seg_smem, q_seg_loaded.at[wg])
            plgpu.barrier_wait(q_seg_loaded.at[wg])
            q_seg = load_whole(q_seg_smem, _ROW)
        plgpu.barrier_wait(q_loaded.at[wg])

        m = plgpu.layout_cast(jnp.full((bq,), common.MASK_VALUE, jnp.float32), _ROW)
        row_sum = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), _ROW)
        acc = plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA)

        @pl.when(steps > 0)
        def _():
            plgpu.barrier_wait(k_loaded.at[0])

        pl.when(wg == 1)(take_turn)  # warpgroup 0 takes the tensor cores first

        def step(j, carry, *, masked: bool):
            acc, m, row_sum = carry
            slot = lax.rem(j, jnp.int32(stages))

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                take_turn()
                return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC((bq, bkv), jnp.float32))
            plgpu.barrier_arrive(k_consumed.at[slot])
            if masked:
                kv_seg = None
                if geo.segments:
                    plgpu.barrier_wait(kv_seg_loaded.at[slot])
                    kv_seg = load_whole(kv_seg_smem.at[slot], _COL)
                ok = visible_tile(
                    (bq, bkv),
                    row_axis=0,
                    first_row=first_row,
                    first_col=j * bkv,
                    q_seg=q_seg,
                    kv_seg=kv_seg,
                    causal=geo.causal,
                    kv_len=geo.kv_real,
                )
                if ok is not None:  # None: nothing to mask (the masked loop then runs no step)
                    s = jnp.where(ok, s, -jnp.inf)
            m_next = jnp.maximum(m, s.max(axis=1) * geo.scale_log2)
            alpha = jnp.exp2(m - m_next)
            p = jnp.exp2(s * geo.scale_log2 - lax.broadcast_in_dim(m_next, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            row_sum = row_sum * alpha
            p_lo = p.astype(geo.dtype)

            def hand_over():
                plgpu.barrier_arrive(schedule)  # softmax done: the other warpgroup may compute
                plgpu.barrier_wait(v_loaded.at[slot])
                plgpu.barrier_wait(schedule)  # our turn on the tensor cores again

            # The order JAX's example measured fastest: up to head_dim 128 the row sum, then a
            # barrier pinning the values, then the hand-over; above, the hand-over first.
            if d <= 128:
                row_sum = row_sum + p.sum(axis=1)
                acc, row_sum, m_next, p_lo = lax.optimization_barrier((acc, row_sum, m_next, p_lo))
                hand_over()
            else:
                hand_over()
                row_sum = row_sum + p.sum(axis=1)

            def values(acc_ref):
                plgpu.wgmma(acc_ref, p_lo, v_smem.at[slot])
                nxt = j + 1

                @pl.when(nxt < steps)
                def _():  # while the wgmma runs
                    plgpu.barrier_wait(k_loaded.at[lax.rem(nxt, jnp.int32(stages))])

            acc = pl.run_state(values)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_next, row_sum

        whole = geo.kv_whole(first_row)
        carry = lax.fori_loop(0, whole, functools.partial(step, masked=False), (acc, m, row_sum))
        acc, m, row_sum = lax.fori_loop(whole, steps, functools.partial(step, masked=True), carry)

        if geo.causal:  # warpgroup 0 may need fewer blocks than the program streams: release them

            @pl.loop(steps, program_steps)
            def _(j):
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_arrive(k_consumed.at[slot])
                plgpu.barrier_arrive(v_consumed.at[slot])
                take_turn()
                take_turn()

        pl.when(wg == 0)(take_turn)

        safe = jnp.where(row_sum == 0.0, 1.0, row_sum)  # a row that saw no key: output 0
        acc = acc / lax.broadcast_in_dim(safe, acc.shape, [0])
        qo_smem[...] = acc.astype(geo.dtype)
        lse_smem[...] = m + jnp.log(safe) * _LOG2E
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[rows])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(first_row, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(_MEMORY_REGS, action="decrease")

        def fetch_k(j, slot):
            cols = (batch, pl.ds(j * bkv, bkv), head)
            plgpu.copy_gmem_to_smem(k_ref.at[cols], k_smem.at[slot], k_loaded.at[slot])

        def fetch_v(j, slot):  # and the keys' segment ids, read after the scores
            cols = (batch, pl.ds(j * bkv, bkv), head)
            plgpu.copy_gmem_to_smem(v_ref.at[cols], v_smem.at[slot], v_loaded.at[slot])
            if geo.segments:
                ids = kv_seg_ref.at[batch, pl.ds(j * bkv, bkv)]
                plgpu.copy_gmem_to_smem(ids, kv_seg_smem.at[slot], kv_seg_loaded.at[slot])

        for slot in range(stages):

            @pl.when(slot < program_steps)
            def _():
                fetch_k(slot, slot)
                fetch_v(slot, slot)

        @pl.loop(0, program_steps - stages)
        def _(i):
            j, slot = i + stages, lax.rem(i, jnp.int32(stages))
            plgpu.barrier_wait(k_consumed.at[slot])
            fetch_k(j, slot)
            plgpu.barrier_wait(v_consumed.at[slot])
            if geo.segments:  # the slot's key ids were read in registers (generic proxy): a proxy fence
                plgpu.commit_smem()  # orders those reads before the TMA (async proxy) overwrite
            fetch_v(j, slot)


def load_whole(ref, layout):
    """`plgpu.load` of all of `ref` into registers in `layout`, on JAX 0.10 and 0.11 alike."""
    if _LOAD_TAKES_INDEX:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def visible_tile(shape, *, row_axis: int, first_row, first_col, q_seg, kv_seg, causal: bool, kv_len: int | None):
    """`common.visible` for one tile in registers: [rows, cols] (`row_axis` 0) or the transposed
    [cols, rows] (`row_axis` 1, the backward's S^T); `q_seg` / `kv_seg` are the rows' / columns'
    ids in the matching reduced layouts. None when nothing is masked."""
    col_axis = 1 - row_axis

    def positions(axis, first):
        return plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA) + first

    rows = positions(row_axis, first_row) if causal else None
    cols = positions(col_axis, first_col) if causal or kv_len is not None else None
    if q_seg is not None:
        q_seg = lax.broadcast_in_dim(q_seg, shape, [row_axis])
        kv_seg = lax.broadcast_in_dim(kv_seg, shape, [col_axis])
    return common.visible(rows, cols, q_seg, kv_seg, causal=causal, kv_len=kv_len)


def flash_forward_hopper(
    q_BxLxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    causal: bool,
    scale: float,
    tiles: Tiles | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(out [B, L, H, K], base-2 log-sum-exp [B, H, L]) for `q_offset` 0; see `unsupported`."""
    common.check_shapes(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, impl="flash_forward_hopper")
    reason = unsupported(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, q_offset=0, tiles=tiles)
    if reason is not None:
        raise ValueError(f"flash_forward_hopper: {reason}")
    batch, q_len, heads, head_dim = q_BxLxHxK.shape
    kv_len = k_BxSxHxK.shape[1]
    dp = _padded_dim(head_dim)
    t = tiles or default_tiles(dp)
    segments = common.check_segment_ids(q_segment_ids, kv_segment_ids)
    q_pad = common.round_up(q_len, _COMPUTE_WGS * t.block_q)
    kv_pad = common.round_up(kv_len, t.block_kv)
    geo = _Geometry(
        causal=causal,
        segments=segments,
        scale_log2=scale * _LOG2E,
        block_q=t.block_q,
        block_kv=t.block_kv,
        stages=min(t.stages, kv_pad // t.block_kv),  # no slot that no block would fill
        q_len=q_pad,
        kv_len=kv_pad,
        kv_real=None if kv_pad == kv_len else kv_len,
        head_dim=dp,
        dtype=jnp.dtype(q_BxLxHxK.dtype),
    )
    args = [
        common.pad_tokens(q_BxLxHxK, q_pad, dp),
        common.pad_tokens(k_BxSxHxK, kv_pad, dp),
        common.pad_tokens(v_BxSxHxK, kv_pad, dp),
    ]
    if segments:
        args += common.pad_segment_ids(q_segment_ids, kv_segment_ids, q_pad, kv_pad)
    out, lse = plgpu.kernel(
        functools.partial(_kernel, geo=geo),
        out_type=(
            jax.ShapeDtypeStruct(args[0].shape, geo.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_pad), jnp.float32),
        ),
        grid=(heads, geo.num_q_tiles, batch),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=common.mosaic_interpret(),
    )(*args)
    return out[:, :q_len, :, :head_dim], lse[:, :, :q_len]
