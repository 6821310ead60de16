"""Flash-attention backward for NVIDIA Hopper (sm_90) in Pallas Mosaic GPU: one fused kernel.

The Triton backward (`flash_gpu`) runs two kernels, `dkv` and `dq`, which together do 7 block
matmuls per (query block, key block) pair; cuDNN and FlashAttention-3 do 5 in one kernel by
adding each key block's share of dQ into an fp32 buffer in global memory. This kernel does the
same, with the TMA unit's reduce-add (`copy_smem_to_gmem(..., reduction_op="add")`).

One program owns 2 x 64 keys of one (batch, head):

* warpgroups 0 and 1 each hold 64 keys' K and V in shared memory and loop over the query blocks
  (64 rows) that can see them: S^T = K Q^T, P^T = exp2(S^T * scale * log2(e) - lse) from the
  forward's base-2 log-sum-exp, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
  dK += dS^T Q (all `wgmma`); dS^T goes to shared memory, where dQ_part = dS K (the transposed
  view) is formed and added to the fp32 dQ buffer by TMA: by default (`Variant.shared_dq`) the two
  warpgroups exchange their dS^T there and each adds half of dQ's columns over all 128 keys;
* warpgroup 2 streams Q, dO, lse, delta (and the rows' segment ids) through `STAGES` slots.

`Variant` holds the schedule options (the order of the wgmmas, the dQ exchange), timed side by
side on an H100 (its docstring). Masking is the forward's (causal, segment ids, padded keys;
q_offset 0); with causal masking a key block's loop starts at the first query block that sees
it (with shared_dq both warpgroups start at the program's first; otherwise warpgroup 1 releases
the one block the program streams for warpgroup 0 only). The summation order of dQ's adds depends on
scheduling: dQ is not bit-reproducible run to run (dK and dV are), as in FlashAttention-3.

Limits: head_dim (padded to a multiple of 64) at most 128: dK and dV accumulators of [64, 256]
fp32 would need 256 registers per thread; wider heads keep the Triton backward. Checked on a
CPU host as the forward: lowered for CUDA, and run in JAX's Mosaic GPU interpreter
(`mgpu_interpret`; docs/kernels.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from moss_jax.kernels import common
from moss_jax.kernels.flash_mgpu import (
    _COL,
    _COMPUTE_REGS,
    _COMPUTE_WGS,
    _LOG2E,
    _MEMORY_REGS,
    _ROW,
    _SMEM_BUDGET,
    _padded_dim,
    load_whole,
    visible_tile,
)

BLOCK = 64  # query rows per step and keys per warpgroup (one wgmma M)
STAGES = 2
_MAX_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class Variant:
    """Schedule options of the fused backward (`bench/attention.py --mgpu_bwd` times them; the
    default is overlap+shared_dq+wide_regs, the fastest on an H100; "base" is every option off).

    overlap: S^T = K Q^T and dP^T = V dO^T are issued together and the softmax runs while dP^T is
      computed; dV += P^T dO and dK += dS^T Q then go as one group (off: dV is issued with dP^T
      after the softmax, and dK alone).
    shared_dq: the two compute warpgroups exchange dS^T through shared memory once per query block
      and each adds half of dQ's columns over all 128 keys of the program, so every (query
      block, program) pair makes one fp32 reduce-add of [64, head_dim] instead of two (off: each
      warpgroup adds its own keys' [64, head_dim] part). Padded head_dim 128 only (the halves
      must be whole 64-column tiles of the 128-byte swizzle); other widths keep the
      per-warpgroup dQ.

    pipeline: meant to keep the tensor cores fed across the whole step (supersedes overlap): S^T
      and dP^T go together; right after the softmax P^T is cast to bf16 and dV += P^T dO is
      issued; dS^T is formed (from that bf16 P^T, so the fp32 one need not stay beside dP^T)
      while dV runs; dK += dS^T Q and the dQ part are issued without a wait between them, and
      the dS^T exchange (shared_dq) happens while dK runs. Measured 1-4% slower than without it,
      and ptxas spilled more (500 against 464 bytes a thread): off by default.
    wide_regs: the compute warpgroups get 240 registers a thread and the TMA warpgroup 24
      (`setmaxnreg`; off: the forward's 232 and 40). ptxas spilled 464 bytes a thread at 232 for
      overlap+shared_dq (`bench/mgpu_sass.py`).

    Forward+backward on an H100 (2026-11-27, bf16, B=4, H=16, K=128, causal; docs/performance.md),
    ms at L = 2048 / 4096 / 8192, measured in one run:

      overlap+shared_dq           0.799 / 2.38 / 8.25
      ...+wide_regs (default)     0.767 / 2.31 / 8.24
      ...+pipeline                0.798 / 2.44 / 8.55
      ...+pipeline+wide_regs      0.790 / 2.38 / 8.30
      cuDNN                       0.778 / 2.18 / 7.55

    and in an earlier run base 0.839 / 2.64 / 9.42 against overlap+shared_dq 0.811 / 2.36 / 8.36.
    """

    overlap: bool = True
    shared_dq: bool = True
    pipeline: bool = False
    wide_regs: bool = True

    @property
    def registers(self) -> tuple[int, int]:
        """`setmaxnreg` of the compute warpgroups and of the TMA warpgroup."""
        return (240, 24) if self.wide_regs else (_COMPUTE_REGS, _MEMORY_REGS)

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """ "base" (every option off), or the options that are on joined by "+" ("overlap")."""
        names = [] if spec == "base" else spec.split("+")
        fields = [f.name for f in dataclasses.fields(cls)]
        if not spec or any(n not in fields for n in names) or len(set(names)) != len(names):
            raise ValueError(f"backward variant {spec!r}: expected 'base' or some of {fields} joined by '+'")
        return cls(**{f: f in names for f in fields})

    def applies(self, head_dim: int) -> Variant:
        """This variant for a padded head_dim (shared_dq off where the halves are not whole tiles)."""
        return dataclasses.replace(self, shared_dq=self.shared_dq and head_dim == 128)


def smem_bytes(head_dim: int, dtype, segments: bool, variant: Variant = Variant()) -> int:
    """Buffers: per warpgroup K, V, dS^T (two with shared_dq) and the fp32 dQ part (half its
    columns with shared_dq); per slot Q, dO, lse, delta (ids)."""
    size = jnp.dtype(dtype).itemsize
    shared = variant.applies(head_dim).shared_dq
    ds = (2 if shared else 1) * BLOCK * BLOCK * size
    dq = BLOCK * (head_dim // 2 if shared else head_dim) * 4
    per_wg = 2 * BLOCK * head_dim * size + ds + dq + (BLOCK * 4 if segments else 0)
    per_slot = 2 * BLOCK * head_dim * size + 2 * BLOCK * 4 + (BLOCK * 4 if segments else 0)
    return _COMPUTE_WGS * per_wg + STAGES * per_slot


def unsupported(q: jax.Array, *, segments: bool = True, variant: Variant = Variant()) -> str | None:
    """Why this kernel cannot run the backward of a call the Hopper forward ran, or None."""
    head_dim = _padded_dim(q.shape[-1])
    if head_dim > _MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]}: the Mosaic GPU backward takes up to {_MAX_HEAD_DIM} (registers)"
    need = smem_bytes(head_dim, q.dtype, segments, variant)
    if need > _SMEM_BUDGET:
        return f"head_dim {q.shape[-1]} needs {need} bytes of shared memory"
    return None


@dataclasses.dataclass(frozen=True)
class _Geometry:
    causal: bool
    segments: bool
    scale: float
    q_len: int  # padded to BLOCK
    kv_len: int  # padded to 2 * BLOCK
    kv_real: int | None
    head_dim: int
    dtype: jnp.dtype
    variant: Variant = Variant()

    @property
    def num_q(self) -> int:
        return self.q_len // BLOCK

    @property
    def num_kv_tiles(self) -> int:
        return self.kv_len // (_COMPUTE_WGS * BLOCK)

    def q_start(self, kv_first):
        """First query block whose last row sees key `kv_first`."""
        if not self.causal:
            return 0
        return jnp.minimum(lax.div(kv_first, jnp.int32(BLOCK)), self.num_q)

    def q_whole(self, kv_first, start):
        """First query block from which on every row sees keys [kv_first, kv_first + BLOCK) whole."""
        if self.segments:
            return self.num_q
        first = start
        if self.causal:  # row i * BLOCK sees the block's last key kv_first + BLOCK - 1
            first = jnp.clip(pl.cdiv(kv_first + BLOCK - 1, jnp.int32(BLOCK)), start, self.num_q)
        if self.kv_real is not None:  # the warpgroup holding padded keys masks every block
            first = jnp.where(kv_first + BLOCK > self.kv_real, jnp.int32(self.num_q), first)
        return first


def _kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, geo: _Geometry):
    if geo.segments:
        q_seg_ref, kv_seg_ref, dq_acc_ref, dk_ref, dv_ref = refs
    else:
        (dq_acc_ref, dk_ref, dv_ref), q_seg_ref, kv_seg_ref = refs, None, None
    swizzled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
    d, wgs, shared = geo.head_dim, _COMPUTE_WGS, geo.variant.shared_dq
    scratch = dict(
        k=plgpu.SMEM((wgs, BLOCK, d), geo.dtype, **swizzled),  # then dK
        v=plgpu.SMEM((wgs, BLOCK, d), geo.dtype, **swizzled),  # then dV
        # dS^T; with shared_dq one per warpgroup for each of two query blocks in flight
        ds=plgpu.SMEM((2, wgs, BLOCK, BLOCK) if shared else (wgs, BLOCK, BLOCK), geo.dtype, **swizzled),
        # A dQ part on its way to the fp32 buffer; swizzled (128-byte rows of 32 floats) against
        # bank conflicts when the registers are stored.
        dq=plgpu.SMEM(
            (wgs, BLOCK, d // 2 if shared else d),
            jnp.float32,
            transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)),
        ),
        kv_seg=plgpu.SMEM((wgs, BLOCK), jnp.int32) if geo.segments else None,
        q=plgpu.SMEM((STAGES, BLOCK, d), geo.dtype, **swizzled),
        do=plgpu.SMEM((STAGES, BLOCK, d), geo.dtype, **swizzled),
        lse=plgpu.SMEM((STAGES, BLOCK), jnp.float32),
        delta=plgpu.SMEM((STAGES, BLOCK), jnp.float32),
        q_seg=plgpu.SMEM((STAGES, BLOCK), jnp.int32) if geo.segments else None,
    )
    names = ("q", "do", "lse", "delta", "q_seg") if geo.segments else ("q", "do", "lse", "delta")
    barriers = dict(
        kv_loaded=plgpu.Barrier(num_barriers=wgs),
        v_loaded=plgpu.Barrier(num_barriers=wgs),
        kv_seg_loaded=plgpu.Barrier(num_barriers=wgs) if geo.segments else None,
        **{f"{n}_loaded": plgpu.Barrier(num_barriers=STAGES) for n in names},
        consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=STAGES),
        # shared_dq: both warpgroups' dS^T of a query block are in shared memory (one barrier per
        # dS^T buffer); both are done reading the other's K (before K's buffer takes dK)
        ds_ready=plgpu.Barrier(num_arrivals=wgs, num_barriers=2) if shared else None,
        k_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=1) if shared else None,
    )
    gmem = dict(q=q_ref, k=k_ref, v=v_ref, do=do_ref, lse=lse_ref, delta=delta_ref, q_seg=q_seg_ref, kv_seg=kv_seg_ref)
    out = dict(dq=dq_acc_ref, dk=dk_ref, dv=dv_ref)
    pl.run_scoped(
        lambda smem, bars: _program(gmem, out, smem, bars, names, geo=geo),
        scratch,
        barriers,
        collective_axes="wg",
    )


def _program(gmem, out, smem, bars, names, *, geo: _Geometry):
    batch, head, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("kv_seq")
    wg = lax.axis_index("wg")
    d, shared, overlap = geo.head_dim, geo.variant.shared_dq, geo.variant.overlap
    program_start = geo.q_start(tile * (_COMPUTE_WGS * BLOCK))  # what the TMA warpgroup streams from

    def slot_of(i):
        return lax.rem(i - program_start, jnp.int32(STAGES))

    def wait_slot(slot):
        for n in names:
            plgpu.barrier_wait(bars[f"{n}_loaded"].at[slot])

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(geo.variant.registers[0], action="increase")
        kv_first = tile * (_COMPUTE_WGS * BLOCK) + wg * BLOCK
        keys = (batch, pl.ds(kv_first, BLOCK), head)
        k_smem, v_smem, dq_smem = smem["k"].at[wg], smem["v"].at[wg], smem["dq"].at[wg]
        plgpu.copy_gmem_to_smem(gmem["k"].at[keys], k_smem, bars["kv_loaded"].at[wg])
        plgpu.copy_gmem_to_smem(gmem["v"].at[keys], v_smem, bars["v_loaded"].at[wg])
        kv_seg = None
        if geo.segments:
            ids = gmem["kv_seg"].at[batch, pl.ds(kv_first, BLOCK)]
            plgpu.copy_gmem_to_smem(ids, smem["kv_seg"].at[wg], bars["kv_seg_loaded"].at[wg])
            plgpu.barrier_wait(bars["kv_seg_loaded"].at[wg])
            kv_seg = load_whole(smem["kv_seg"].at[wg], _ROW)  # S^T's rows are keys
        plgpu.barrier_wait(bars["kv_loaded"].at[wg])
        plgpu.barrier_wait(bars["v_loaded"].at[wg])
        # With shared_dq both warpgroups take every query block the program streams (each dQ
        # needs both dS^T; warpgroup 1's first block under causal masking is all masked: zeros).
        start = program_start if shared else geo.q_start(kv_first)
        whole = geo.q_whole(kv_first, start)

        @pl.loop(program_start, start)
        def _(i):  # warpgroup 1 skips the block only warpgroup 0 needs (causal): release it
            slot = slot_of(i)
            wait_slot(slot)
            plgpu.barrier_arrive(bars["consumed"].at[slot])

        def probs(s_t, i, slot, masked: bool):
            """P^T from S^T: the mask, then exp2 against the forward's log-sum-exp."""
            if masked:
                q_seg = load_whole(smem["q_seg"].at[slot], _COL) if geo.segments else None
                ok = visible_tile(
                    (BLOCK, BLOCK),
                    row_axis=1,  # S^T: keys down, query rows across
                    first_row=i * BLOCK,
                    first_col=kv_first,
                    q_seg=q_seg,
                    kv_seg=kv_seg,
                    causal=geo.causal,
                    kv_len=geo.kv_real,
                )
                if ok is not None:  # None: nothing to mask (the masked loop then runs no step)
                    s_t = jnp.where(ok, s_t, -jnp.inf)
            lse = load_whole(smem["lse"].at[slot], _COL)
            return jnp.exp2(s_t * (geo.scale * _LOG2E) - lax.broadcast_in_dim(lse, s_t.shape, [1]))

        def add_dq(ds_t, i, slot, issued=None):
            """dQ_part = dS K for this warpgroup's keys (or, shared_dq, half the columns over both
            warpgroups' keys), added to the fp32 buffer by the TMA unit. `issued(n)` (pipeline)
            runs right after the dQ wgmmas are issued, n of them (earlier wgmmas may be in flight)."""
            rows = (batch, pl.ds(i * BLOCK, BLOCK), head)

            def store(dq, dst):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous part has left dq_smem
                dq_smem[...] = dq
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(dq_smem, dst, reduction_op="add")

            def then_read(acc_ref, n):
                if issued is not None:
                    issued(n)
                return acc_ref[...]

            if not shared:
                ds_smem = smem["ds"].at[wg]
                ds_smem[...] = ds_t
                plgpu.commit_smem()

                def dq_part(acc_ref):
                    plgpu.wgmma(acc_ref, ds_smem.transpose((1, 0)), k_smem)
                    return then_read(acc_ref, 1)

                store(pl.run_scoped(dq_part, plgpu.ACC((BLOCK, d), jnp.float32)), out["dq"].at[rows])
                return
            buf = lax.rem(i - program_start, jnp.int32(2))
            smem["ds"].at[buf, wg][...] = ds_t
            plgpu.commit_smem()  # this warpgroup's stores, visible to the other's wgmma (async proxy)
            plgpu.barrier_arrive(bars["ds_ready"].at[buf])
            plgpu.barrier_wait(bars["ds_ready"].at[buf])
            half = d // 2
            for w in range(_COMPUTE_WGS):  # static column halves: warpgroup w adds columns w * half...

                @pl.when(wg == w)
                def _():
                    cols = pl.ds(w * half, half)

                    def dq_part(acc_ref):
                        for j in range(_COMPUTE_WGS):
                            ds_j = smem["ds"].at[buf, j].transpose((1, 0))
                            plgpu.wgmma(acc_ref, ds_j, smem["k"].at[j, :, cols])
                        return then_read(acc_ref, _COMPUTE_WGS)

                    store(pl.run_scoped(dq_part, plgpu.ACC((BLOCK, half), jnp.float32)), out["dq"].at[(*rows, cols)])

        def grad_scores(p_t, dp_t, slot):
            """dS^T = P^T (dP^T - delta), in the inputs' dtype (delta read here, after dP^T)."""
            delta = load_whole(smem["delta"].at[slot], _COL)
            return (p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))).astype(geo.dtype)

        def step(i, carry, *, masked: bool):
            dk, dv = carry
            slot = slot_of(i)
            q_smem, do_smem = smem["q"].at[slot], smem["do"].at[slot]
            wait_slot(slot)
            if geo.variant.pipeline:  # its own order (Variant's docstring); Q, dO free after dV, dK

                def body(refs):
                    dv_ref, dk_ref = refs

                    def scores(s_ref, dp_ref):
                        plgpu.wgmma(s_ref, k_smem, q_smem.transpose((1, 0)))
                        plgpu.wgmma(dp_ref, v_smem, do_smem.transpose((1, 0)))
                        p_lo = probs(plgpu.wgmma_accumulator_load(s_ref, wait_n=1), i, slot, masked).astype(geo.dtype)
                        plgpu.wgmma(dv_ref, p_lo, do_smem)  # runs while dS^T is formed
                        return p_lo, plgpu.wgmma_accumulator_load(dp_ref, wait_n=1)  # dP^T done, dV in flight

                    acc = plgpu.ACC((BLOCK, BLOCK), jnp.float32)
                    p_lo, dp_t = pl.run_scoped(scores, acc, acc)
                    ds_t = grad_scores(p_lo.astype(jnp.float32), dp_t, slot)
                    plgpu.wgmma(dk_ref, ds_t, q_smem)

                    def issued(n):  # dV and dK are done once at most the n dQ wgmmas are in flight
                        plgpu.wgmma_wait(n)
                        plgpu.barrier_arrive(bars["consumed"].at[slot])  # Q, dO, lse, delta of this slot

                    add_dq(ds_t, i, slot, issued)

                dv, dk = pl.run_state(body)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
                return dk, dv
            if overlap:

                def scores_and_dp(s_ref, dp_ref):  # two wgmmas; the softmax waits for the first only
                    plgpu.wgmma(s_ref, k_smem, q_smem.transpose((1, 0)))
                    plgpu.wgmma(dp_ref, v_smem, do_smem.transpose((1, 0)))
                    p_t = probs(plgpu.wgmma_accumulator_load(s_ref, wait_n=1), i, slot, masked)
                    return p_t, dp_ref[...]

                acc = plgpu.ACC((BLOCK, BLOCK), jnp.float32)
                p_t, dp_t = pl.run_scoped(scores_and_dp, acc, acc)
                ds_t = grad_scores(p_t, dp_t, slot)
                p_lo = p_t.astype(geo.dtype)

                def dv_and_dk(refs):  # two wgmmas, one wait
                    dv_ref, dk_ref = refs
                    plgpu.wgmma(dv_ref, p_lo, do_smem)
                    plgpu.wgmma(dk_ref, ds_t, q_smem)

                dv, dk = pl.run_state(dv_and_dk)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
            else:

                def scores_t(acc_ref):
                    plgpu.wgmma(acc_ref, k_smem, q_smem.transpose((1, 0)))
                    return acc_ref[...]

                p_t = probs(pl.run_scoped(scores_t, plgpu.ACC((BLOCK, BLOCK), jnp.float32)), i, slot, masked)
                p_lo = p_t.astype(geo.dtype)

                def dv_and_dp(refs):  # two wgmmas, one wait
                    dv_ref, dp_ref = refs
                    plgpu.wgmma(dv_ref, p_lo, do_smem)
                    plgpu.wgmma(dp_ref, v_smem, do_smem.transpose((1, 0)))

                zeros = plgpu.layout_cast(jnp.zeros((BLOCK, BLOCK), jnp.float32), plgpu.Layout.WGMMA)
                dv, dp_t = pl.run_state(dv_and_dp)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros)))
                ds_t = grad_scores(p_t, dp_t, slot)

                def dk_step(acc_ref):
                    plgpu.wgmma(acc_ref, ds_t, q_smem)

                dk = pl.run_state(dk_step)(plgpu.ACC.init(dk))
            plgpu.barrier_arrive(bars["consumed"].at[slot])  # Q, dO, lse, delta of this slot are done
            add_dq(ds_t, i, slot)
            return dk, dv

        zeros = plgpu.layout_cast(jnp.zeros((BLOCK, d), jnp.float32), plgpu.Layout.WGMMA)
        carry = lax.fori_loop(start, whole, functools.partial(step, masked=True), (zeros, zeros))
        dk, dv = lax.fori_loop(whole, geo.num_q, functools.partial(step, masked=False), carry)

        if shared:  # the other warpgroup's last dQ part has read this warpgroup's K
            plgpu.barrier_arrive(bars["k_free"].at[0])
            plgpu.barrier_wait(bars["k_free"].at[0])
        k_smem[...] = (dk * geo.scale).astype(geo.dtype)  # dS^T is w.r.t. the scaled scores
        v_smem[...] = dv.astype(geo.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, out["dk"].at[keys], commit_group=False)
        plgpu.copy_smem_to_gmem(v_smem, out["dv"].at[keys], commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(geo.variant.registers[1], action="decrease")

        def fetch(i, slot):
            rows = (batch, pl.ds(i * BLOCK, BLOCK), head)
            vec = (batch, head, pl.ds(i * BLOCK, BLOCK))
            sources = dict(q=gmem["q"].at[rows], do=gmem["do"].at[rows], lse=gmem["lse"].at[vec])
            sources["delta"] = gmem["delta"].at[vec]
            if geo.segments:
                sources["q_seg"] = gmem["q_seg"].at[batch, pl.ds(i * BLOCK, BLOCK)]
            for n in names:
                plgpu.copy_gmem_to_smem(sources[n], smem[n].at[slot], bars[f"{n}_loaded"].at[slot])

        for s in range(STAGES):

            @pl.when(program_start + s < geo.num_q)
            def _():
                fetch(program_start + s, s)

        @pl.loop(program_start + STAGES, geo.num_q)
        def _(i):
            slot = slot_of(i)
            plgpu.barrier_wait(bars["consumed"].at[slot])
            # lse, delta (and the ids) were read in registers (generic proxy): a proxy fence orders
            # those reads before the TMA (async proxy) overwrite.
            plgpu.commit_smem()
            fetch(i, slot)


def flash_backward_hopper(
    q_BxLxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    lse_BxHxL: jax.Array,
    delta_BxHxL: jax.Array,
    do_BxLxHxK: jax.Array,
    *,
    causal: bool,
    scale: float,
    variant: Variant = Variant(),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) of `flash_mgpu.flash_forward_hopper` (q_offset 0) from its base-2 log-sum-exp
    and delta = rowsum(out * dO) [B, H, L]; see `unsupported`. `variant`: the schedule (`Variant`)."""
    segments = common.check_segment_ids(q_segment_ids, kv_segment_ids)
    reason = unsupported(q_BxLxHxK, segments=segments, variant=variant)
    if reason is not None:
        raise ValueError(f"flash_backward_hopper: {reason}")
    batch, q_len, heads, head_dim = q_BxLxHxK.shape
    kv_len = k_BxSxHxK.shape[1]
    dp = _padded_dim(head_dim)
    q_pad, kv_pad = common.round_up(q_len, BLOCK), common.round_up(kv_len, _COMPUTE_WGS * BLOCK)
    geo = _Geometry(
        causal=causal,
        segments=segments,
        scale=scale,
        q_len=q_pad,
        kv_len=kv_pad,
        kv_real=None if kv_pad == kv_len else kv_len,
        head_dim=dp,
        dtype=jnp.dtype(q_BxLxHxK.dtype),
        variant=variant.applies(dp),
    )

    def rows(x, length):
        return common.pad_tokens(x.astype(geo.dtype), length, dp)

    # Padded query rows: zero q and dO, lse = delta = 0, so p^T = 1 meets dO = 0 and dP^T = 0: nothing.
    args = [
        rows(q_BxLxHxK, q_pad),
        rows(k_BxSxHxK, kv_pad),
        rows(v_BxSxHxK, kv_pad),
        rows(do_BxLxHxK, q_pad),
        common.pad_axis(lse_BxHxL.astype(jnp.float32), 2, q_pad),
        common.pad_axis(delta_BxHxL.astype(jnp.float32), 2, q_pad),
    ]
    if segments:
        args += common.pad_segment_ids(q_segment_ids, kv_segment_ids, q_pad, kv_pad)
    dq_acc = jax.new_ref(jnp.zeros((batch, q_pad, heads, dp), jnp.float32))
    kv_shape = jax.ShapeDtypeStruct((batch, kv_pad, heads, dp), geo.dtype)
    dk, dv = pl.kernel(
        functools.partial(_kernel, geo=geo),
        out_type=(kv_shape, kv_shape),
        mesh=plgpu.Mesh(
            grid=(heads, geo.num_kv_tiles, batch),
            grid_names=("heads", "kv_seq", "batch"),
            num_threads=_COMPUTE_WGS + 1,
            thread_name="wg",
        ),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=common.mosaic_interpret() or False,
        name="moss_flash_bwd_hopper",
    )(*args, dq_acc)
    dq = (dq_acc[...] * scale)[:, :q_len, :, :head_dim].astype(q_BxLxHxK.dtype)
    crop = (slice(None), slice(0, kv_len), slice(None), slice(0, head_dim))
    return dq, dk[crop], dv[crop]
