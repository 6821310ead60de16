"""The Hopper kernels (kernels/flash_mgpu.py forward, flash_mgpu_bwd.py backward): lowering for
CUDA on this host, routing, limits.

On a CPU host the kernels are lowered here (Pallas's Mosaic GPU lowering checks shapes, layouts and
shared memory); their numbers on this host come from JAX's Mosaic GPU interpreter
(test_flash_mgpu_interpret.py). `test_matches_reference_on_hopper` runs them compiled where a
Hopper GPU is the test backend (`MOSS_KERNEL_TEST_BACKEND=gpu`, bench/gpu_suite.sh's pytest part)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax.attention import attention
from moss_jax.kernels import common, flash_gpu, flash_mgpu, flash_mgpu_bwd
from tests.kernels.cases import ON_GPU, Case, assert_matches_reference, cuda_text


def _kernels(text: str) -> tuple[int, list[str]]:
    """(how many Mosaic GPU kernels are launched, the Triton kernels' names)."""
    return text.count("@mosaic_gpu_v2("), sorted(re.findall(r'name = "(moss_\w+?)"', text))


def _grad_text(attn, shape, dtype, segments: bool) -> str:
    x = jax.ShapeDtypeStruct(shape, dtype)
    seg = jax.ShapeDtypeStruct(shape[:2], jnp.int32)

    def loss(q, k, v, seg):
        kw = dict(q_segment_ids=seg, kv_segment_ids=seg) if segments else {}
        return jnp.sum(attn(q, k, v, **kw).astype(jnp.float32) ** 2)

    return cuda_text(jax.grad(loss, argnums=(0, 1, 2)), x, x, x, seg)


@pytest.mark.parametrize(
    "dtype,head_dim,length,segments,causal",
    [
        (jnp.bfloat16, 128, 1024, False, True),  # whole tiles, the blocks below the diagonal unmasked
        (jnp.bfloat16, 128, 1000, True, True),  # ragged: padded keys masked; packed rows
        (jnp.float16, 64, 300, False, False),  # bidirectional, ragged
        (jnp.bfloat16, 80, 1000, True, True),  # the 2b's head_dim, padded to 128
        (jnp.bfloat16, 256, 512, False, True),  # MOSS's head_dim: 64-key blocks
        (jnp.bfloat16, 64, 70, True, True),  # one key block: one K/V slot
        (jnp.bfloat16, 128, 1024, False, False),  # nothing to mask at all
    ],
    ids=[
        "bf16-128-causal",
        "bf16-128-packed-ragged",
        "f16-64-bidirectional",
        "bf16-80-packed",
        "bf16-256-causal",
        "bf16-64-one-block",
        "bf16-128-unmasked",
    ],
)
@pytest.mark.parametrize("backward", ["triton", "mosaic"])
def test_mosaic_kernels_lower(dtype, head_dim, length, segments, causal, backward):
    """Forward and backward lower for CUDA; head_dim 256 keeps the Triton backward (registers)."""
    attn = functools.partial(flash_gpu.flash_attention_gpu, causal=causal, forward="mosaic", backward=backward)
    mosaic, triton = _kernels(_grad_text(attn, (2, length, 2, head_dim), dtype, segments))
    if backward == "mosaic" and head_dim <= 128:
        assert (mosaic, triton) == (2, [])
    else:
        assert (mosaic, triton) == (1, ["moss_flash_dkv_gpu", "moss_flash_dq_gpu"])  # no Triton forward


@pytest.mark.parametrize("spec", ["base", "overlap", "shared_dq", "overlap+shared_dq+pipeline+wide_regs", "pipeline"])
@pytest.mark.parametrize("head_dim,length,segments", [(128, 1000, True), (64, 512, False)], ids=["128-packed", "64"])
def test_backward_schedules_lower(spec, head_dim, length, segments):
    """The fused backward's other schedules (the cases above lower its default) lower for CUDA."""
    attn = functools.partial(
        flash_gpu.flash_attention_gpu,
        forward="mosaic",
        backward="mosaic",
        mosaic_bwd=flash_mgpu_bwd.Variant.parse(spec),
    )
    assert _kernels(_grad_text(attn, (2, length, 2, head_dim), jnp.bfloat16, segments)) == (2, [])


@pytest.mark.parametrize("impl", ["pallas_mgpu", "auto"])
def test_impl_routes_training_to_mosaic_and_cache_calls_to_triton(impl):
    x = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    train = cuda_text(lambda q, k, v: attention(q, k, v, impl=impl), x, x, x)
    assert _kernels(train) == (1, [])
    grad = _grad_text(functools.partial(attention, impl=impl), (1, 256, 2, 64), jnp.bfloat16, True)
    assert _kernels(grad) == (2, [])
    prompt = jax.ShapeDtypeStruct((1, 16, 2, 64), jnp.bfloat16)  # a prefill at offset 100 of a cache
    prefill = cuda_text(lambda q, k, v: attention(q, k, v, impl=impl, q_offset=100), prompt, x, x)
    assert _kernels(prefill) == (0, ["moss_flash_fwd_gpu"])
    # the model's cache path: a traced offset (even one that is 0 at run time)
    traced = cuda_text(lambda q, k, v, i: attention(q, k, v, impl=impl, q_offset=i), prompt, x, x, jnp.int32(0))
    assert _kernels(traced) == (0, ["moss_flash_fwd_gpu"])
    fp32 = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.float32)
    assert _kernels(cuda_text(lambda q, k, v: attention(q, k, v, impl=impl), fp32, fp32, fp32)) == (
        0,
        ["moss_flash_fwd_gpu"],
    )


def test_backward_variants_parse_and_apply():
    v = flash_mgpu_bwd.Variant
    assert v() == v.parse("overlap+shared_dq+wide_regs") == v(overlap=True, shared_dq=True, wide_regs=True)
    assert v.parse("base") == v(overlap=False, shared_dq=False, pipeline=False, wide_regs=False)
    assert v.parse("shared_dq") == v(overlap=False, shared_dq=True, wide_regs=False)
    assert v().registers == (240, 24) and v.parse("base").registers == (232, 40)  # 256 * 240 + 128 * 24 <= 64K
    for bad in ("", "fast", "overlap+overlap", "base+overlap"):
        with pytest.raises(ValueError, match="expected 'base' or some of"):
            v.parse(bad)
    assert v().applies(128) == v() and v().applies(64) == v(shared_dq=False)  # halves of 32 columns: no
    # shared_dq trades a second dS^T buffer for half the dQ buffer: the same at head_dim 128
    shared, base = (flash_mgpu_bwd.smem_bytes(128, jnp.bfloat16, True, x) for x in (v(), v.parse("base")))
    assert shared == base - 2 * 64 * 64 * 4 + 2 * 64 * 64 * 2


def test_unsupported_names_the_reason():
    bf16 = jnp.zeros((1, 8, 1, 64), jnp.bfloat16)
    assert flash_mgpu.unsupported(bf16, bf16, bf16, q_offset=0) is None
    fp32 = bf16.astype(jnp.float32)
    assert "float32" in flash_mgpu.unsupported(fp32, fp32, fp32, q_offset=0)
    wide = jnp.zeros((1, 8, 1, 320), jnp.bfloat16)
    assert "320" in flash_mgpu.unsupported(wide, wide, wide, q_offset=0)
    assert "q_offset" in flash_mgpu.unsupported(bf16, bf16, bf16, q_offset=5)
    assert "q_offset" in flash_mgpu.unsupported(bf16, bf16, bf16, q_offset=jnp.int32(0))  # traced: unknown
    big = flash_mgpu.Tiles(block_q=64, block_kv=256, stages=4)
    d256 = jnp.zeros((1, 8, 1, 256), jnp.bfloat16)
    assert "shared memory" in flash_mgpu.unsupported(d256, d256, d256, q_offset=0, tiles=big)
    with pytest.raises(ValueError, match="flash_forward_hopper: .*float32"):
        flash_mgpu.flash_forward_hopper(fp32, fp32, fp32, None, None, causal=True, scale=0.125)
    assert flash_mgpu_bwd.unsupported(bf16) is None
    assert "registers" in flash_mgpu_bwd.unsupported(d256)
    with pytest.raises(ValueError, match="forward must be"):
        flash_gpu.flash_attention_gpu(bf16, bf16, bf16, forward="cudnn")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(block_q=128), "block_q must be 64"),
        (dict(block_kv=96), "block_kv must be"),
        (dict(block_kv=512), "block_kv must be"),
        (dict(stages=1), "stages must be at least 2"),
    ],
)
def test_tiles_validate(kw, match):
    with pytest.raises(ValueError, match=match):
        flash_mgpu.Tiles(**kw)


def test_smem_estimate_matches_the_lowering(monkeypatch):
    """Our shared-memory count is what the Mosaic GPU lowering allocates, within the 4 KiB margin
    `unsupported` keeps (barriers, alignment): an oversized setting is refused with its size."""
    monkeypatch.setattr(flash_mgpu, "_SMEM_BUDGET", 10**9)
    tiles = flash_mgpu.Tiles(block_q=64, block_kv=256, stages=3)
    x = jax.ShapeDtypeStruct((1, 1024, 1, 256), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
    fn = functools.partial(flash_mgpu.flash_forward_hopper, causal=True, scale=1 / 16, tiles=tiles)
    with pytest.raises(Exception, match="exceeds available shared memory") as info:
        cuda_text(fn, x, x, x, seg, seg)
    allocated = int(re.search(r"smem_bytes=(\d+)", str(info.value)).group(1))
    estimate = tiles.smem_bytes(256, jnp.bfloat16, segments=True)
    assert estimate <= allocated <= estimate + 4096, (estimate, allocated)
    with pytest.raises(Exception, match="exceeds available shared memory") as info:
        cuda_text(lambda q, k, v: fn(q, k, v, None, None), x, x, x)
    allocated = int(re.search(r"smem_bytes=(\d+)", str(info.value)).group(1))
    estimate = tiles.smem_bytes(256, jnp.bfloat16, segments=False)
    assert estimate <= allocated <= estimate + 4096, (estimate, allocated)


def test_backward_smem_estimate_matches_the_lowering(monkeypatch):
    """As above for the fused backward, made to overflow at head_dim 256."""
    monkeypatch.setattr(flash_mgpu_bwd, "_MAX_HEAD_DIM", 256)
    monkeypatch.setattr(flash_mgpu_bwd, "_SMEM_BUDGET", 10**9)
    x = jax.ShapeDtypeStruct((1, 256, 1, 256), jnp.bfloat16)
    vec = jax.ShapeDtypeStruct((1, 1, 256), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, 256), jnp.int32)
    fn = functools.partial(flash_mgpu_bwd.flash_backward_hopper, causal=True, scale=1 / 16)
    with pytest.raises(Exception, match="exceeds available shared memory") as info:
        cuda_text(lambda q, k, v, lse, delta, do, s: fn(q, k, v, s, s, lse, delta, do), x, x, x, vec, vec, x, seg)
    allocated = int(re.search(r"smem_bytes=(\d+)", str(info.value)).group(1))
    estimate = flash_mgpu_bwd.smem_bytes(256, jnp.bfloat16, segments=True)
    assert estimate <= allocated <= estimate + 4096, (estimate, allocated)


@pytest.mark.skipif(
    ON_GPU and flash_mgpu.device_unsupported() is None, reason="on a Hopper GPU pallas_mgpu runs the Hopper kernels"
)
def test_off_hopper_the_impl_is_pallas_gpu():
    """Off Hopper (on this CPU host: the Triton path in the interpreter) "pallas_mgpu" is
    "pallas_gpu": same values and gradients, bit for bit (the Hopper kernels replace them on an
    H100/H200 only; there the two differ in rounding, and test_matches_reference_on_hopper checks them)."""
    rng = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(r, (1, 70, 2, 64), jnp.bfloat16) for r in rng)

    def value_and_grads(impl):
        loss = functools.partial(lambda q, k, v, impl: jnp.sum(attention(q, k, v, impl=impl) ** 2), impl=impl)
        return jax.tree.leaves(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v))

    for got, want in zip(value_and_grads("pallas_mgpu"), value_and_grads("pallas_gpu"), strict=True):
        assert bool(jnp.all(got == want))


@pytest.mark.skipif(not ON_GPU or flash_mgpu.device_unsupported() is not None, reason="needs a Hopper GPU test backend")
@pytest.mark.parametrize(
    "case",
    [
        Case("mgpu_causal", q_len=1000, kv_len=1000, head_dim=128, causal=True, segments=0, dtype=jnp.bfloat16),
        Case("mgpu_packed", q_len=1000, kv_len=1000, head_dim=128, causal=True, segments=3, dtype=jnp.bfloat16),
        Case("mgpu_d256", q_len=512, kv_len=512, head_dim=256, causal=True, segments=2, dtype=jnp.bfloat16),
        Case("mgpu_d80", q_len=300, kv_len=300, head_dim=80, causal=False, segments=0, dtype=jnp.bfloat16),
    ],
    ids=str,
)
@pytest.mark.parametrize("backward", ["triton", "mosaic", "mosaic_base"])
def test_matches_reference_on_hopper(case, backward):
    """The Hopper forward with each backward: Triton's, the fused Hopper kernel with its default
    schedule (overlap+shared_dq+wide_regs) and with the base one."""
    kw = {"mosaic_bwd": flash_mgpu_bwd.Variant.parse("base")} if backward == "mosaic_base" else {}
    attn = functools.partial(
        flash_gpu.flash_attention_gpu, forward="mosaic", backward=backward.removesuffix("_base"), **kw
    )
    assert_matches_reference(attn, case)


def _visible(rows, cols, *, causal, kv_real):
    """[rows, cols] visibility by position (causal, padded keys), as `common.visible`."""
    ok = np.ones((len(rows), len(cols)), bool)
    if causal:
        ok &= rows[:, None] >= cols[None, :]
    if kv_real is not None:
        ok &= cols[None, :] < kv_real
    return ok


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("kv_len", [1000, 1024, 70], ids=["ragged", "whole", "one-block"])
def test_forward_loop_bounds_cover_exactly_the_visible_blocks(causal, kv_len):
    """Per compute warpgroup: key blocks >= kv_steps hold no visible score, blocks < kv_whole are
    visible whole (no mask), and the TMA warpgroup streams every block either warpgroup needs."""
    bq, bkv = 64, 128
    q_len, kv_pad = common.round_up(kv_len, 2 * bq), common.round_up(kv_len, bkv)
    geo = flash_mgpu._Geometry(
        causal=causal, segments=False, scale_log2=1.0, block_q=bq, block_kv=bkv, stages=2, q_len=q_len,
        kv_len=kv_pad, kv_real=None if kv_pad == kv_len else kv_len, head_dim=64, dtype=jnp.dtype(jnp.bfloat16),
    )  # fmt: skip
    for tile in range(geo.num_q_tiles):
        program_steps = int(geo.kv_steps(jnp.int32((tile + 1) * 2 * bq)))
        for wg in range(2):
            first = tile * 2 * bq + wg * bq
            steps, whole = int(geo.kv_steps(jnp.int32(first + bq))), int(geo.kv_whole(jnp.int32(first)))
            assert 0 <= whole <= steps <= program_steps <= geo.num_kv
            rows = np.arange(first, first + bq)
            for j in range(geo.num_kv):
                seen = _visible(rows, np.arange(j * bkv, (j + 1) * bkv), causal=causal, kv_real=geo.kv_real)
                if j >= steps:
                    assert not seen.any(), (tile, wg, j)
                if j < whole:
                    assert seen.all(), (tile, wg, j)
                if seen.any():
                    assert j < steps, (tile, wg, j)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("kv_len", [1000, 1024, 70], ids=["ragged", "whole", "one-block"])
def test_backward_loop_bounds_cover_exactly_the_visible_blocks(causal, kv_len):
    """Per compute warpgroup of the fused backward: query blocks < q_start see none of its keys,
    blocks >= q_whole see them whole, and the program streams from the first warpgroup's start
    (where both warpgroups start with shared_dq: q_whole from there holds the same)."""
    block = flash_mgpu_bwd.BLOCK
    q_pad, kv_pad = common.round_up(kv_len, block), common.round_up(kv_len, 2 * block)
    geo = flash_mgpu_bwd._Geometry(
        causal=causal, segments=False, scale=1.0, q_len=q_pad, kv_len=kv_pad,
        kv_real=None if kv_pad == kv_len else kv_len, head_dim=64, dtype=jnp.dtype(jnp.bfloat16),
    )  # fmt: skip
    for tile in range(geo.num_kv_tiles):
        program_start = int(geo.q_start(jnp.int32(tile * 2 * block)))
        for wg in range(2):
            kv_first = tile * 2 * block + wg * block
            start = int(geo.q_start(jnp.int32(kv_first)))
            whole = int(geo.q_whole(jnp.int32(kv_first), jnp.int32(start)))
            assert program_start <= start <= whole <= geo.num_q
            assert int(geo.q_whole(jnp.int32(kv_first), jnp.int32(program_start))) == whole
            cols = np.arange(kv_first, kv_first + block)
            for i in range(geo.num_q):
                seen = _visible(np.arange(i * block, (i + 1) * block), cols, causal=causal, kv_real=geo.kv_real)
                if i < start:
                    assert not seen.any(), (tile, wg, i)
                if i >= whole:
                    assert seen.all(), (tile, wg, i)


def test_device_checks(monkeypatch):
    """A non-Hopper GPU is refused; a CUDA 12.8 or 12.9 runtime is refused for causal masking
    (ptxas 12.8.0-12.9.0 miscompiles it); a Hopper GPU with another runtime, or no GPU, is accepted."""

    class Device:
        def __init__(self, kind, capability):
            self.device_kind, self.compute_capability = kind, capability

    def with_gpu(kind, capability, runtime):
        monkeypatch.setattr(jax, "local_devices", lambda backend=None: [Device(kind, capability)])
        monkeypatch.setattr(flash_mgpu, "_cuda_runtime_version", lambda: runtime)
        flash_mgpu.device_unsupported.cache_clear()

    try:
        with_gpu("NVIDIA A100-SXM4-80GB", "8.0", 13000)
        assert "sm_90" in flash_mgpu.device_unsupported(True)
        with_gpu("NVIDIA H100 80GB HBM3", "9.0", 12085)
        assert "12085" in flash_mgpu.device_unsupported(True)
        assert flash_mgpu.device_unsupported(False) is None
        # 12.9.0 and 12.9.1 both read 12090 (major * 1000 + minor * 10): refused, as 12.8 is.
        with_gpu("NVIDIA H100 80GB HBM3", "9.0", 12090)
        assert "12090" in flash_mgpu.device_unsupported(True)
        with_gpu("NVIDIA H100 80GB HBM3", "9.0", 13000)
        assert flash_mgpu.device_unsupported(True) is None
        monkeypatch.undo()
        flash_mgpu.device_unsupported.cache_clear()
        if not ON_GPU:  # a CPU host: no GPU, so lowering for CUDA targets Hopper
            assert flash_mgpu.device_unsupported(True) is None
    finally:
        flash_mgpu.device_unsupported.cache_clear()
