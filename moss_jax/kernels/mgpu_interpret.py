"""Running the Hopper kernels (`flash_mgpu`, `flash_mgpu_bwd`) on a CPU, in JAX's Mosaic GPU
interpreter.

JAX ships a GPU interpret mode for Pallas Mosaic GPU kernels: every warpgroup becomes a CPU
thread, shared and global memory are simulated buffers, barriers are real blocking barriers that
track phases, TMA copies and `wgmma` are numpy copies and matmuls. Neither JAX 0.10's interpreter
(the version this project pins) nor JAX 0.11's (the lent GPU machines' JAX; it needs Python >= 3.12:
`scripts/test_kernels_jax_next.sh`) covers everything a FlashAttention-3-style kernel uses.
`install()` adds what is missing, each piece the semantics the hardware gives:

1. `plgpu.layout_cast` is a register-layout hint: the identity on values (0.10 has no CPU rule
   for it; 0.11 has).
2. `pl.run_state` over a WGMMA accumulator (acc = alpha * acc + P V) becomes a scoped accumulator
   allocation: store the initial value, run the body, read the final value. The body's other
   value inputs are discharged (passed as values). On 0.10, `plgpu.load` from shared memory into
   registers becomes a plain read (0.11 has it). On 0.11 the accumulator's initial store is not
   race-checked: registers are private, and the interpreter reuses the accumulator's key across
   the grid's programs, whose clocks restart.
3. `wgmma` with its left operand in registers (P in P V), and on 0.10 with transposed
   shared-memory operands (K^T in Q K^T; 0.11 handles these). Its shared-memory operands are
   race-checked as reads (neither JAX does). On 0.11 the tensor cores read as an asynchronous
   agent: at the warpgroup's async-proxy clock plus one event in a vector-clock slot of the
   warpgroup's own (`_tensor_core_read`), which then joins the warpgroup's clocks because `wgmma`
   completes at issue here. So a tile stored in registers without a fence races with the read,
   and so does a slot released (barrier arrival) before the `wgmma` that reads it.
4. A barrier may end its life with phases its last thread, the TMA warpgroup in both kernels,
   did not wait for: it stops waiting for "slot consumed" once it has nothing left to load, while
   the compute warpgroups still release their last slots. On hardware each waiter tracks its own
   parity, so trailing completions nobody awaits are harmless; the interpreter raised at
   deallocation. A compute warpgroup that skips its last wait, and a barrier completing twice
   before any waiter observed it, are still errors.
5. `copy_smem_to_gmem(..., reduction_op="add")`, the TMA reduce-add the backward uses to sum dQ
   over key blocks: read, add, store, under a lock (the hardware's reduction is atomic). On 0.11
   an asynchronous TMA task like JAX's stores: its source read is race-checked, and
   `wait_smem_to_gmem` orders it; its destination write is recorded and checked, except that
   reduce-adds into one place do not race with each other. The 0.11 callbacks added here fail
   the kernel as JAX's own do (`fail_on_exception`), aborting the other warpgroups' barriers.
6. On 0.10, a `Ref` passed into `pl.kernel` (the backward's fp32 dQ buffer) arrives with no
   memory space: it is global memory (0.11 says so itself).

What this checks: the numbers (the kernels' index arithmetic, masking, online softmax, padding,
the five backward matmuls, the dQ reduction), the barrier protocol (a wait for a phase that never
completes hangs; a slot refilled before it was released completes a barrier twice, which raises),
and, with `detect_races=True`, the race detector on shared-memory reads and writes
(`races_found()` covers every kernel since the context began). JAX 0.11's detector also models
the asynchronous side: TMA copies and stores carry their own vector clocks, `commit_smem` is the
fence from the generic proxy (register stores and loads) to the async proxy (TMA, `wgmma`), and
`wait_smem_to_gmem` is what orders a TMA store's read of its buffer. So on 0.11 a `wgmma` reading
a tile stored without a fence, a buffer rewritten before its TMA store read it, and a slot read in
registers and refilled by TMA without a fence are races (tests/kernels/test_flash_mgpu_interpret.py
plants each); on 0.10 those go unnoticed (its copies complete at issue, `commit_smem` is a no-op).
On both, a V block used before its barrier and a K slot released before the `wgmma` that reads
it are races (planted too).
Not checked on either: speed, register pressure, shared-memory bank conflicts, `wgmma_wait`
(`wgmma` completes at issue), and ptxas. Those need an H100 (`bench/gpu_kernel_check.py`).

The interpreter runs each warpgroup as a CPU computation that blocks on barriers. JAX's CPU client
dispatches computations asynchronously onto a pool with one thread per core, so on a machine with
fewer cores than warpgroups (3) they deadlock. Turn async dispatch off before JAX's first
computation (the CPU client reads it once, when it starts):
`jax.config.update("jax_cpu_enable_async_dispatch", False)`. (It is a JAX flag, not read from
the environment.) `hopper_interpret()` checks the flag; it cannot see a client started before the
flag changed, which then hangs (the timeout below ends it).

A kernel that raises inside the interpreter leaves the other warpgroups waiting on barriers: the
process hangs. Run it under a timeout (the tests run it in a subprocess).

Use::

    with mgpu_interpret.hopper_interpret():
        out = flash_gpu.flash_attention_gpu(q, k, v, forward="mosaic", backward="mosaic")

Inside the context `common.on_platform` takes the kernels' compiled variants (the Hopper kernels)
on any platform, and those pass the interpreter's parameters as their `interpret`; the Triton
kernels (the backward at head_dim 256) keep Pallas's own interpreter. Trace inside the context:
a function traced outside it keeps the Triton path, and a function jitted inside it keeps the
interpreter where its cached trace is reused outside (jit's cache does not see the context).
Call the kernels op by op, not inside an enclosing `jax.jit`: XLA:CPU runs a jitted program's
callbacks on its intra-op pool, one thread per core, where the blocking warpgroups starve each
other (the same deadlock as above).

The patches target the interpreter internals of JAX 0.10 and 0.11; `unsupported()` names any
other version, and `install()` raises naming a missing piece where the internals differ.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import callback, source_info_util, xla_bridge
from jax._src import core as jax_core
from jax._src import linear_util as lu
from jax._src.interpreters import mlir
from jax._src.interpreters import partial_eval as pe
from jax._src.state import discharge as state_discharge
from jax._src.state import primitives as state_primitives
from jax._src.state import types as state_types
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from moss_jax.kernels import common

_installed = False
_install_lock = threading.Lock()


_SUPPORTED = ((0, 10), (0, 11))


def _jax_minor() -> tuple[int, int]:
    return tuple(jax.__version_info__[:2])


def unsupported() -> str | None:
    """Why these patches cannot run on this JAX, or None (JAX 0.10 and 0.11)."""
    if _jax_minor() not in _SUPPORTED:
        return (
            f"mgpu_interpret patches the Mosaic GPU interpreters of JAX 0.10 and 0.11; JAX {jax.__version__} "
            "may have changed their internals (the project pins jax 0.10.2: setup.py)"
        )
    return None


def models_async_proxy() -> bool:
    """Whether this JAX's interpreter models asynchronous TMA copies and proxy fences (0.11)."""
    return _jax_minor() >= (0, 11)


@functools.cache
def _internals() -> dict[str, Any]:
    """The interpreter modules patched here (looked up and checked once); a clear error where this
    JAX lacks them."""
    reason = unsupported()
    if reason is not None:
        raise RuntimeError(reason)
    try:
        from jax._src.pallas.mosaic.interpret import utils as interpret_utils
        from jax._src.pallas.mosaic_gpu import core as gpu_core
        from jax._src.pallas.mosaic_gpu import primitives as gpu_primitives
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks, jaxpr_interpret, shared_memory
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
        from jax._src.pallas.mosaic_gpu.interpret import params as interpret_params
    except ImportError as e:
        raise RuntimeError(f"mgpu_interpret: this JAX ({jax.__version__}) has no Mosaic GPU interpreter: {e}") from e
    found = dict(
        interpret_utils=interpret_utils,
        gpu_core=gpu_core,
        gpu_primitives=gpu_primitives,
        gpu_callbacks=gpu_callbacks,
        jaxpr_interpret=jaxpr_interpret,
        ipc=ipc,
        interpret_params=interpret_params,
        shared_memory=shared_memory,
    )
    needed = [
        ("gpu_core", "WGMMAAbstractAccumulatorRef"),
        ("gpu_primitives", "load_p"),
        ("gpu_callbacks", "copy_smem_to_gmem"),
        ("gpu_callbacks", "is_gmem_memory_space"),
        ("gpu_callbacks", "HostAllocationKey"),
        ("gpu_callbacks", "_get_shared_memory"),
        ("gpu_callbacks", "_remove_noop_transforms"),
        ("jaxpr_interpret", "JaxprInterpreter"),
        ("shared_memory", "Barrier"),
        ("gpu_callbacks", "_initialize_shared_memory"),
        ("gpu_callbacks", "_races"),
        ("gpu_callbacks", "get_races"),
        ("interpret_params", "InterpretGPUParams"),
        ("ipc", "reset_gpu_interpret_mode_state"),
    ]
    if _jax_minor() == (0, 10):
        needed.append(("gpu_core", "layout_cast_p"))
    else:  # JAX 0.11: TMA stores are asynchronous tasks; memory accesses carry an axis permutation
        needed += [
            ("gpu_callbacks", "AsyncCopySmemToGmemTask"),
            ("gpu_callbacks", "fail_on_exception"),
            ("gpu_callbacks", "TOKEN_SHAPE_DTYPE"),
            ("jaxpr_interpret", "resolve_ref"),
            ("shared_memory", "GPULoggingInfo"),
            ("shared_memory", "GPUSharedMemory"),
            ("shared_memory", "GpuClockBundle"),
            ("gpu_core", "WarpMesh"),
        ]
    for module, name in needed:
        if not hasattr(found[module], name):
            raise RuntimeError(
                f"mgpu_interpret: JAX {jax.__version__}'s Mosaic GPU interpreter has no {module}.{name}; "
                "these patches target the interpreters of JAX 0.10.2 and 0.11.2"
            )
    methods = [("JaxprInterpreter", "interpret"), ("JaxprInterpreter", "_interpret_wgmma_ref_p")]
    if _jax_minor() == (0, 11):
        methods += [("JaxprInterpreter", "_interpret_swap_p")]
        methods += [("GPUSharedMemory", m) for m in ("get_next_tma_thread_id", "execute_async_task", "incr_clock")]
    for cls, method in methods:
        owner = found["jaxpr_interpret" if cls == "JaxprInterpreter" else "shared_memory"]
        if not hasattr(getattr(owner, cls), method):
            raise RuntimeError(f"mgpu_interpret: {cls}.{method} is missing in JAX {jax.__version__}")
    return found


# 2. run_state over accumulators, register loads ---------------------------------------------


def _run_state_as_scoped(eqn, m):
    """A function of the run_state's inputs returning its outputs, built from run_scoped."""
    body = eqn.params["jaxpr"]
    outer_ref = [isinstance(v.aval, state_types.AbstractRef) for v in eqn.invars]
    is_acc = [isinstance(v.aval, m["gpu_core"].WGMMAAbstractAccumulatorRef) for v in body.invars]
    plain = [not r and not a for r, a in zip(outer_ref, is_acc, strict=True)]
    # JAX 0.11 merged ClosedJaxpr into Jaxpr: the body is closed already.
    closed_body = jax_core.ClosedJaxpr(body, ()) if _jax_minor() == (0, 10) else body
    closed = state_discharge.discharge_state(closed_body, should_discharge=plain)

    def run(*ins):
        accs = [x for x, a in zip(ins, is_acc, strict=True) if a]

        def scoped(*acc_refs):
            refs = iter(acc_refs)
            args = [next(refs) if a else x for x, a in zip(ins, is_acc, strict=True)]
            for ref, x in zip(acc_refs, accs, strict=True):
                state_primitives.ref_set(ref, (), x)  # a plain store: the interpreter has no accumulator store
            plain_out = jax_core.eval_jaxpr(closed.jaxpr, closed.consts, *args)
            return [ref[...] for ref in acc_refs], plain_out

        acc_out, plain_out = pl.run_scoped(scoped, *[plgpu.ACC(jnp.shape(x), jnp.result_type(x)) for x in accs])
        acc_it, plain_it = iter(acc_out), iter(plain_out)
        return [
            x if r else (next(acc_it) if a else next(plain_it)) for x, r, a in zip(ins, outer_ref, is_acc, strict=True)
        ]

    return run


_rewritten: dict[int, tuple[Any, Any, list]] = {}


def _rewrite(jaxpr, m):
    """`jaxpr` with run_state and register loads replaced (cached), and its new constants."""
    special = (state_discharge.run_state_p,)
    if _jax_minor() == (0, 10):  # 0.11 reads registers from shared memory itself
        special += (m["gpu_primitives"].load_p,)
    if not any(e.primitive in special for e in jaxpr.eqns):
        return jaxpr, []
    hit = _rewritten.get(id(jaxpr))
    if hit is not None and hit[0] is jaxpr:
        return hit[1], hit[2]

    def fn(*args):
        env = {}

        def read(a):
            return a.val if isinstance(a, jax_core.Literal) else env[a]

        for var, x in zip(jaxpr.constvars + jaxpr.invars, args, strict=True):
            env[var] = x
        for e in jaxpr.eqns:
            ins = [read(a) for a in e.invars]
            # Each equation keeps its source location (the kernel's line in barrier and race reports).
            name_stack = source_info_util.current_name_stack() + e.source_info.name_stack
            with source_info_util.user_context(e.source_info.traceback, name_stack=name_stack):
                if e.primitive is state_discharge.run_state_p:
                    outs = _run_state_as_scoped(e, m)(*ins)
                elif e.primitive in special[1:]:  # JAX 0.10's register load: a read
                    outs = [state_primitives.get_p.bind(*ins, tree=e.params["tree"])]
                else:
                    outs = e.primitive.bind(*ins, **e.primitive.get_bind_params(e.params))
                    if not e.primitive.multiple_results:
                        outs = [outs]
            for var, x in zip(e.outvars, outs, strict=True):
                env[var] = x
        return [read(v) for v in jaxpr.outvars]

    avals = [v.aval for v in jaxpr.constvars + jaxpr.invars]
    new, _, consts = pe.trace_to_jaxpr_dynamic(lu.wrap_init(fn, debug_info=jaxpr.debug_info), avals)
    _rewritten[id(jaxpr)] = (jaxpr, new, consts)  # keeps `jaxpr` alive, so its id stays unique
    return new, consts


# 3. wgmma with a register operand and transposed operands -----------------------------------


def _thread_context(m, device_id, thread_id, grid_point_coords, source_info):
    """(the simulated memory, the global thread id, the logging info) of a callback's thread."""
    shared = m["gpu_callbacks"]._get_shared_memory()
    info = m["interpret_utils"].GPULoggingInfo(
        device_id=device_id,
        grid_point_coords=tuple(int(x) for x in grid_point_coords),
        thread_id=thread_id,
        source_info=source_info,
    )
    return shared, shared.get_global_thread_id(device_id, thread_id), info


def _location(m, key_array, transforms):
    """(allocation key, index range) of a buffer reference with only index transforms left."""
    cb = m["gpu_callbacks"]
    rng = m["interpret_utils"].to_range(jax.tree.map(int, cb._remove_noop_transforms(transforms)))
    return cb.HostAllocationKey.from_array(key_array), rng


def _read_operand(m, shared, key_array, transforms, ids, info) -> np.ndarray:
    """A `wgmma` operand from shared memory, race-checked like any read of it."""
    device_id, thread_id, thread = ids
    index, perms = [], []
    for t in m["gpu_callbacks"]._remove_noop_transforms(transforms):
        if isinstance(t, state_types.TransposeTransform):
            perms.append(tuple(t.permutation))
        elif perms:
            raise NotImplementedError(f"mgpu_interpret: an indexer after a transpose ({transforms})")
        else:
            index.append(jax.tree.map(int, t))
    key = m["gpu_callbacks"].HostAllocationKey.from_array(key_array)
    read_range = m["interpret_utils"].to_range(index)
    val, _, clock = shared.get_buffer_content(key, read_range, thread, logging_info=info)
    if val is None:
        raise RuntimeError(f"mgpu_interpret: wgmma read an unallocated buffer {key}")
    if shared.detect_races:  # e.g. a K/V slot read before its "loaded" barrier was awaited
        m["gpu_callbacks"].get_races().check_read(
            device_id, thread_id, clock, key, read_range, source_info=info.source_info
        )
    for perm in perms:
        val = np.transpose(val, perm)
    return val


def _wgmma(m, *, token, device_id, grid_point_coords, thread_id, acc, acc_transforms, acc_dtype, a, a_transforms,
           a_in_registers, b, b_transforms, source_info=None):  # fmt: skip
    device_id, thread_id = int(device_id), int(thread_id)
    shared, thread, info = _thread_context(m, device_id, thread_id, grid_point_coords, source_info)
    ids = (device_id, thread_id, thread)
    lhs = np.asarray(a) if a_in_registers else _read_operand(m, shared, a, a_transforms, ids, info)
    rhs = _read_operand(m, shared, b, b_transforms, ids, info)
    acc_key, acc_range = _location(m, acc, acc_transforms)
    current, _, _ = shared.get_buffer_content(acc_key, acc_range, thread, logging_info=info)
    # The tensor cores multiply bf16/fp16 operands exactly and accumulate in fp32.
    product = np.matmul(lhs.astype(np.float32), rhs.astype(np.float32))
    shared.store_buffer_content(acc_key, acc_range, (current + product).astype(acc_dtype), thread, logging_info=info)
    return token


def _interpret_wgmma_ref_p(self, m, eqn, token, get_invals):
    """`wgmma` through `_wgmma` (JAX 0.10) or `_wgmma_011`, which take its left operand from
    registers where it is a value."""
    acc, a, b, *leaves = get_invals()
    empty = jax.tree.structure([])
    trees = jax.tree_util.treedef_tuple(tuple(eqn.params[f"{x}_transforms_tree"] or empty for x in ("acc", "a", "b")))
    acc_t, a_t, b_t = jax.tree.unflatten(trees, leaves)
    a_in_registers = not isinstance(eqn.invars[1].aval, state_types.AbstractRef)
    params = dict(acc_dtype=eqn.invars[0].aval.dtype, a_in_registers=a_in_registers, source_info=eqn.source_info)
    if _jax_minor() == (0, 10):
        fn = functools.partial(_wgmma, m, **params)
        where = dict(device_id=self.device_info.device_id, grid_point_coords=self.grid_point_coords)
        where.update(thread_id=self.thread_id, ordered=True)
    else:  # refs into a RefUnion name their member; a failure aborts the kernel as JAX's callbacks do
        resolve = m["jaxpr_interpret"].resolve_ref
        acc, acc_t = resolve(eqn.invars[0].aval, acc, acc_t)
        if not a_in_registers:
            a, a_t = resolve(eqn.invars[1].aval, a, a_t)
        b, b_t = resolve(eqn.invars[2].aval, b, b_t)
        fn = m["gpu_callbacks"].fail_on_exception(functools.partial(_wgmma_011, m, **params))
        where = dict(mesh_location=self.mesh_location, thread=self.thread)
    refs = dict(acc=acc, acc_transforms=acc_t, a=a, a_transforms=a_t, b=b, b_transforms=b_t)
    out = callback.io_callback(fn, m["gpu_callbacks"].TOKEN_SHAPE_DTYPE, token=token, **where, **refs)
    return out, []


def _access_011(m, shared, key_array, transforms):
    """(allocation key, access) of a buffer reference in JAX 0.11's interpreter."""
    cb = m["gpu_callbacks"]
    key = cb.HostAllocationKey.from_array(key_array)
    return key, shared.access(key, jax.tree.map(int, cb._remove_noop_transforms(transforms)))


def _tensor_core_read(shared, thread) -> Any:
    """The clock of a `wgmma`'s shared-memory operand read: the warpgroup's async-proxy clock (what
    it fenced with `commit_smem`, and what barriers brought it) plus one event in the warpgroup's
    own tensor-core slot (`_shared_memory_init_011`). `wgmma` completes at issue here, so the event
    joins both of the warpgroup's clocks: its later stores and barrier arrivals are ordered after
    the read, its earlier ones are not (a slot released before the `wgmma` that reads it races
    with the refill), and a store not fenced before the read races with it."""
    slot = shared.tensor_core_base + shared.thread_to_vc_position(thread)
    with shared.lock:
        bundle = shared.clocks[thread]
        bundle.generic_clock.inc(slot)
        bundle.async_smem_clock.inc(slot)
        return bundle.async_smem_clock.copy()


def _shared_memory_init_011(self, m, original, **kw):
    """JAX 0.11's shared memory, with one more vector-clock slot per thread for its tensor cores
    (`_tensor_core_read`), placed after the TMA agents' slots, which JAX cycles through as before."""
    per_device_tma = kw["num_tma_threads_per_device"]
    warps = m["gpu_core"].WarpMesh._NUM_WARPS_PER_WARPGROUP
    threads = kw["num_blocks_per_cluster"] * kw["num_threads_per_block"] * (1 + warps)  # per device
    original(self, **dict(kw, num_tma_threads_per_device=per_device_tma + threads))
    self.num_tma_threads = kw["num_devices"] * per_device_tma
    self.tensor_core_base = len(self.all_concurrent_threads) + self.num_tma_threads


def _wgmma_011(m, *, token, mesh_location, thread, acc, acc_transforms, acc_dtype, a, a_transforms, a_in_registers,
               b, b_transforms, source_info=None):  # fmt: skip
    """JAX 0.11: its memory accesses carry the transposes; shared-memory operands are read through
    the async proxy, as the tensor cores do (`_tensor_core_read`)."""
    cb = m["gpu_callbacks"]
    shared = cb._get_shared_memory()
    info = m["shared_memory"].GPULoggingInfo(mesh_location, thread, source_info)
    reads = []

    def operand(key_array, transforms):
        key, acc_ = _access_011(m, shared, key_array, transforms)
        val, _, _ = shared.get_buffer_content(key, acc_, thread, logging_info=info)
        if val is None:
            raise RuntimeError(f"mgpu_interpret: wgmma read an unallocated buffer {key}")
        reads.append((key, acc_))
        return val

    lhs = np.asarray(a) if a_in_registers else operand(a, a_transforms)
    rhs = operand(b, b_transforms)
    if shared.detect_races:
        clock = _tensor_core_read(shared, thread)
        for key, acc_ in reads:
            cb.get_races().check_read(thread, clock, key, acc_, source_info=source_info)
    acc_key, acc_access = _access_011(m, shared, acc, acc_transforms)
    current, _, _ = shared.get_buffer_content(acc_key, acc_access, thread, logging_info=info)
    # The tensor cores multiply bf16/fp16 operands exactly and accumulate in fp32.
    product = np.matmul(lhs.astype(np.float32), rhs.astype(np.float32))
    shared.store_buffer_content(acc_key, acc_access, (current + product).astype(acc_dtype), thread, logging_info=info)
    return token


def _acc_swap_011(m, token, mesh_location, thread, key_array, transforms, val, *, source_info=None):
    """A store into a WGMMA accumulator (registers, private to the warpgroup): no race check. The
    interpreter reuses an accumulator's key across the grid's programs, whose clocks restart."""
    cb = m["gpu_callbacks"]
    shared = cb._get_shared_memory()
    info = m["shared_memory"].GPULoggingInfo(mesh_location, thread, source_info)
    key, access = _access_011(m, shared, key_array, transforms)
    old, _, _ = shared.get_buffer_content(key, access, thread, increment_clock=False, logging_info=info)
    shared.store_buffer_content(key, access, np.asarray(val), thread, increment_clock=False, logging_info=info)
    return token, old


def _interpret_swap_p_011(self, m, original, eqn, token, get_invals):
    """2. (JAX 0.11): the accumulator's initial value, stored by the run_state rewrite."""
    if not isinstance(eqn.invars[0].aval, m["gpu_core"].WGMMAAbstractAccumulatorRef):
        return original(self, eqn, token, get_invals)
    invals = get_invals()
    ref, transforms = m["jaxpr_interpret"].resolve_ref(
        eqn.invars[0].aval, invals[0], jax.tree.unflatten(eqn.params["tree"], invals[2:])
    )
    return callback.io_callback(
        m["gpu_callbacks"].fail_on_exception(functools.partial(_acc_swap_011, m, source_info=eqn.source_info)),
        (m["gpu_callbacks"].TOKEN_SHAPE_DTYPE, eqn.outvars[0].aval),
        token,
        self.mesh_location,
        self.thread,
        ref,
        transforms,
        invals[1],
    )


# 4. trailing barrier phases; 5. TMA reduce-add ----------------------------------------------


def _barrier_deallocate(self):
    """JAX's check, except that the last thread, the TMA warpgroup (`wg == _COMPUTE_WGS` in both
    kernels), may stop waiting before the last completions: it has nothing left to load. A compute
    warpgroup that skips its last wait is still an error."""
    with self.cv:
        self.ref_count -= 1
        if self.ref_count > 0:
            return
        producer = self.num_participating_threads - 1
        for tid, next_phase in enumerate(self.next_awaited_phase_by_thread):
            waited = next_phase - 1
            if tid != producer and 0 < waited < self.phase:
                raise ValueError(
                    f"Thread {tid} did not observe all phases ({self.phase}) for barrier (but observed {waited})."
                )


def _barrier_deallocate_011(self):
    """JAX 0.11's check, with the same exemption for the TMA warpgroup (the block's last)."""
    with self.cv:
        self.ref_count -= 1
        if self.ref_count > 0:
            return
        if self.arrivals_count != 0:
            raise ValueError(f"Barrier deallocated with {self.arrivals_count} arrivals pending.")
        producer = self.num_pallas_threads_per_block - 1
        for thread, observed in self.last_observed_phase_by_thread.items():
            if observed != self.phase and thread.warpgroup_id != producer:
                raise ValueError(
                    f"When barrier {id(self)} was deallocated, thread {thread} had only observed barrier up to "
                    f"phase {observed - 1}, but barrier completed up to phase {self.phase - 1}."
                )


_reduce_lock = threading.Lock()


def _check_reduction(reduction_op, predicate) -> None:
    """The TMA reductions these patches run: an unpredicated add."""
    if reduction_op != "add":
        raise NotImplementedError(f"mgpu_interpret: TMA reduction {reduction_op!r} (only 'add')")
    if predicate is not None:
        raise NotImplementedError("mgpu_interpret: a predicated TMA reduction")


def _copy_smem_to_gmem(m, original, *, reduction_op, **kw):
    if reduction_op is None:
        return original(reduction_op=None, **kw)
    _check_reduction(reduction_op, kw["predicate"])
    device_id, thread_id = int(kw["device_id"]), int(kw["thread_id"])
    shared, thread, info = _thread_context(m, device_id, thread_id, kw["grid_point_coords"], kw["source_info"])
    src_key, src_range = _location(m, kw["src_allocation_key_as_array"], kw["src_transforms"])
    dst_key, dst_range = _location(m, kw["dst_allocation_key_as_array"], kw["dst_transforms"])
    val, _, _ = shared.get_buffer_content(src_key, src_range, thread, logging_info=info)
    with _reduce_lock:  # the hardware's reduce-add is atomic per element
        current, _, _ = shared.get_buffer_content(dst_key, dst_range, thread, logging_info=info)
        shared.store_buffer_content(dst_key, dst_range, current + val, thread, logging_info=info)
    return kw["token"]


_REDUCE_ADD = "TMA reduce-add,"


def _check_reduce_add(races, thread, clock, key, access, source_info) -> None:
    """`check_write` for a reduce-add's destination, except that reduce-adds into one place do not
    race with each other (the hardware's reduction is atomic); recorded, tagged, so that a plain
    access racing with it is still reported."""
    from jax._src.pallas.mosaic.interpret.race_detection_state import _ranges_overlap

    frame = f"{_REDUCE_ADD} {source_info_util.summarize(source_info) if source_info is not None else 'pallas_call'}"
    with races.lock:
        prior = [*races.writes[key], *races.reads[key]]
        races.writes[key].append((thread, clock, access.range, frame))
    for other_thread, other_clock, other_range, other_frame in prior:
        if other_frame.startswith(_REDUCE_ADD) or other_clock.ordered(clock):
            continue
        if not _ranges_overlap(access.range, other_range):
            continue
        print(
            f"RACE DETECTED\n  {frame} of {key}[{access.range}] from {thread}\n  clock: {clock}\n"
            f"  access of {key}[{other_range}] from {other_thread}, {other_frame}\n  clock: {other_clock}\n"
        )
        with races.lock:
            races.races_found = True
        return


_reduce_add_class: list = []


def _reduce_add_task(m):
    """JAX 0.11's asynchronous TMA store, reducing (+) into global memory atomically. Its source
    read is race-checked as a store's; concurrent reduce-adds into one destination do not race
    with each other (the hardware's reduction is atomic), so the destination write is not."""
    cb = m["gpu_callbacks"]

    class ReduceAddTask(cb.AsyncCopySmemToGmemTask):
        def __call__(self, tma_thread_id: int):
            shared = cb._get_shared_memory()
            self.pre_read(tma_thread_id, shared)
            val, _, _ = shared.get_buffer_content(
                self.src_allocation_key, self.src_access, self.thread, logging_info=self.logging_info
            )
            if shared.detect_races:  # post_read, with a reduce-add's check of the destination
                self.clock.inc(tma_thread_id)
                self.write_clock = self.clock.copy()
                clock = self.clock.async_smem_clock.copy()
                _check_reduce_add(
                    cb.get_races(), self.thread, clock, self.dst_allocation_key, self.dst_access, self.source_info
                )
            with _reduce_lock:
                key, access = self.dst_allocation_key, self.dst_access
                current, _, _ = shared.get_buffer_content(key, access, self.thread, logging_info=self.logging_info)
                shared.store_buffer_content(key, access, current + val, self.thread, logging_info=self.logging_info)
            self.post_write(tma_thread_id, shared)

    if not _reduce_add_class:
        _reduce_add_class.append(ReduceAddTask)
    return _reduce_add_class[0]


def _copy_smem_to_gmem_011(m, original, *, reduction_op, **kw):
    if reduction_op is None:
        return original(reduction_op=None, **kw)
    _check_reduction(reduction_op, kw["predicate"])
    cb = m["gpu_callbacks"]
    shared = cb._get_shared_memory()
    thread = kw["thread"]
    src_key, src_access = _access_011(m, shared, kw["src_allocation_key_as_array"], kw["src_transforms"])
    dst_key, dst_access = _access_011(m, shared, kw["dst_allocation_key_as_array"], kw["dst_transforms"])
    task = _reduce_add_task(m)(
        mesh_location=kw["mesh_location"],
        thread=thread,
        src_allocation_key=src_key,
        src_access=src_access,
        dst_allocation_key=dst_key,
        dst_access=dst_access,
        source_info=kw["source_info"],
        clock=shared.incr_clock(thread) if shared.detect_races else None,
    )
    shared.execute_async_task(task)
    return kw["token"]


# ---------------------------------------------------------------------------------------------


def install() -> None:
    """Patches JAX's Mosaic GPU interpreter (once per process); see the module docstring."""
    global _installed
    with _install_lock:
        if _installed:
            return
        m = _internals()
        v010 = _jax_minor() == (0, 10)
        if v010:  # 0.11's interpreter has 1. and 6.
            layout_cast_p = m["gpu_core"].layout_cast_p
            layout_cast_p.def_impl(lambda x, new_layout: x)  # 1.
            mlir.register_lowering(layout_cast_p, lambda ctx, x, new_layout: [x], platform="cpu")

        interpreter = m["jaxpr_interpret"].JaxprInterpreter
        original_interpret = interpreter.interpret

        def interpret(self, jaxpr, token, *args):  # 2.
            new, consts = _rewrite(jaxpr, m)
            if new is jaxpr:
                return original_interpret(self, jaxpr, token, *args)
            return original_interpret(self, new, token, *consts, *args)

        interpreter.interpret = interpret
        if not v010:
            swap = interpreter._interpret_swap_p
            interpreter._interpret_swap_p = functools.partialmethod(_interpret_swap_p_011, m, swap)
            gsm = m["shared_memory"].GPUSharedMemory
            gsm.__init__ = functools.partialmethod(_shared_memory_init_011, m, gsm.__init__)
        interpreter._interpret_wgmma_ref_p = functools.partialmethod(_interpret_wgmma_ref_p, m)  # 3.
        m["shared_memory"].Barrier.deallocate = _barrier_deallocate if v010 else _barrier_deallocate_011  # 4.
        cb = m["gpu_callbacks"]
        if v010:
            cb.copy_smem_to_gmem = functools.partial(_copy_smem_to_gmem, m, cb.copy_smem_to_gmem)  # 5.
        else:  # a failure marks the kernel failed and aborts its barriers, as JAX's own callbacks do
            copy = functools.partial(_copy_smem_to_gmem_011, m, cb.copy_smem_to_gmem)
            cb.copy_smem_to_gmem = cb.fail_on_exception(copy)
        cb._initialize_shared_memory = functools.partial(_initialize_shared_memory, m, cb._initialize_shared_memory)
        if v010:
            is_gmem = cb.is_gmem_memory_space
            cb.is_gmem_memory_space = lambda space: space is None or is_gmem(space)  # 6.
        _installed = True


def check_dispatch() -> None:
    """Raises unless JAX's CPU client runs computations inline (see the module docstring)."""
    if xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value:
        raise RuntimeError(
            "mgpu_interpret: the interpreter's warpgroups deadlock under JAX's asynchronous CPU dispatch "
            "on a machine with fewer cores than warpgroups; call "
            "jax.config.update('jax_cpu_enable_async_dispatch', False) before JAX's first computation"
        )


_races_before = False  # races seen by kernels before the current one, since `hopper_interpret` began


def _initialize_shared_memory(m, original, **kw):
    """JAX's, which starts a fresh race-detection state per kernel: the old one's verdict is kept."""
    global _races_before
    cb = m["gpu_callbacks"]
    if cb._races is not None and cb._races.races_found:
        _races_before = True
    return original(**kw)


def races_found() -> bool:
    """Whether the interpreter's race detector (`hopper_interpret(detect_races=True)`) saw a race in
    any kernel run since the context began."""
    current = _internals()["gpu_callbacks"]._races
    return _races_before or bool(current is not None and current.races_found)


@contextlib.contextmanager
def hopper_interpret(*, detect_races: bool = False):
    """Runs the Hopper kernels in JAX's Mosaic GPU interpreter for code traced inside."""
    global _races_before
    install()
    check_dispatch()
    m = _internals()
    _races_before = False
    m["gpu_callbacks"]._races = None
    params = m["interpret_params"].InterpretGPUParams(detect_races=detect_races)
    with common.interpret_mosaic(params):
        try:
            yield
        except BaseException:
            m["ipc"].reset_gpu_interpret_mode_state()
            raise
