"""The Pallas flash kernels (TPU and GPU variants, run in interpret mode) against the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax.attention import xla_attention
from moss_jax.kernels import common, flash_gpu, flash_tpu
from tests.kernels.cases import GPU_INTERPRET, Case, assert_matches_reference, make_inputs

# Small tiles so every case spans several query and key blocks, with ragged last blocks.
KERNELS = {
    "tpu": functools.partial(
        flash_tpu.flash_attention_tpu, block_sizes=common.BlockSizes(16, 128, 32, 128), interpret=True
    ),
    "gpu": functools.partial(
        flash_gpu.flash_attention_gpu, block_sizes=common.BlockSizes(32, 16, 16, 32), interpret=GPU_INTERPRET
    ),
}

CASES = [
    Case("causal_3_segments_k64", q_len=150, kv_len=150, head_dim=64, causal=True, segments=3),
    Case("bidirectional_2_segments_k128", q_len=100, kv_len=100, head_dim=128, causal=False, segments=2),
    Case("causal_k256", q_len=72, kv_len=72, head_dim=256, causal=True, segments=0),
    Case("bidirectional_k64", q_len=45, kv_len=45, head_dim=64, causal=False, segments=0),
    # No segment ids: the GPU kernels skip the mask on blocks below the diagonal (ragged last block).
    Case("causal_ragged_k128", q_len=100, kv_len=100, head_dim=128, causal=True, segments=0),
    Case("offset_causal", q_len=37, kv_len=140, head_dim=64, causal=True, segments=0, q_offset=100),
    # A prompt written into a longer KV cache: queries start at key index 100; random segment
    # ids leave some queries with no visible key (their output must be 0, their gradient 0).
    Case("offset_random_segments", q_len=5, kv_len=140, head_dim=64, causal=True, segments=-1, q_offset=100),
    Case("bf16_causal_3_segments_k256", q_len=90, kv_len=90, head_dim=256, causal=True, segments=3, dtype=jnp.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_matches_reference(kernel, case):
    assert_matches_reference(KERNELS[kernel], case)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_default_block_sizes(kernel):
    """The tuned defaults (one block at this length) take the same path as the model does."""
    fn = {"tpu": flash_tpu.flash_attention_tpu, "gpu": flash_gpu.flash_attention_gpu}[kernel]
    assert_matches_reference(fn, Case("defaults", q_len=33, kv_len=33, head_dim=64, causal=True, segments=2))


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_queries_without_visible_keys_get_zeros(kernel):
    case = Case("no_visible", q_len=8, kv_len=130, head_dim=64, causal=True, segments=0, q_offset=0)
    inputs = make_inputs(case)
    q_seg = jnp.asarray([[1, 1, 2, 2, 3, 3, 1, 1]] * 2, jnp.int32)
    kv_seg = jnp.ones((2, 130), jnp.int32)  # segments 2 and 3 have no keys
    out = KERNELS[kernel](inputs["q"], inputs["k"], inputs["v"], q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    ref = xla_attention(inputs["q"], inputs["k"], inputs["v"], q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    np.testing.assert_array_equal(np.asarray(out[:, 2:6]), 0.0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=0)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_traced_offset_under_jit(kernel):
    """q_offset may be a traced scalar (the KV-cache write index): one compile, several offsets."""
    case = Case("traced_offset", q_len=6, kv_len=64, head_dim=64, causal=True, segments=0)
    inputs = make_inputs(case)
    fn = jax.jit(lambda q, k, v, off: KERNELS[kernel](q, k, v, q_offset=off))
    for offset in (0, 17, 58):
        want = xla_attention(inputs["q"], inputs["k"], inputs["v"], q_offset=offset)
        got = fn(inputs["q"], inputs["k"], inputs["v"], jnp.int32(offset))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)


def test_segment_ids_both_or_neither():
    x = jnp.zeros((1, 8, 1, 64))
    for fn in KERNELS.values():
        with pytest.raises(ValueError, match="both"):
            fn(x, x, x, q_segment_ids=jnp.ones((1, 8), jnp.int32))


def test_block_size_validation():
    with pytest.raises(ValueError, match="positive"):
        common.BlockSizes(0, 128, 128, 128)
    x = jnp.zeros((1, 8, 1, 64))
    with pytest.raises(ValueError, match="multiple of 128"):
        flash_tpu.flash_attention_tpu(x, x, x, block_sizes=common.BlockSizes(16, 100, 16, 128), interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        flash_gpu.flash_attention_gpu(x, x, x, block_sizes=common.BlockSizes(48, 16, 16, 16), interpret=True)


@pytest.mark.parametrize(
    "kernel, blocks, message",
    [
        ("tpu", (16, 100, 16, 128), r"BlockSizes\.block_k=100 must be a multiple of 128 for the TPU"),
        ("tpu", (24, 128, 16, 128), r"BlockSizes\.block_q=24 must be a multiple of 16 for the TPU"),
        # The backward's blocks are checked by a forward-only call too, not first under jax.grad.
        ("tpu", (16, 128, 24, 128), r"BlockSizes\.block_q_bwd=24 must be a multiple of 16"),
        ("tpu", (16, 128, 16, 100), r"BlockSizes\.block_k_bwd=100 must be a multiple of 128"),
        ("gpu", (16, 16, 48, 16), r"BlockSizes\.block_q_bwd=48 must be a power of two"),
        ("gpu", (16, 16, 16, 24), r"BlockSizes\.block_k_bwd=24 must be a power of two"),
        # Triton's tl.dot needs M, N, K >= 16: smaller tiles would fail to compile on a GPU.
        ("gpu", (8, 16, 16, 16), r"BlockSizes\.block_q=8 must be at least 16"),
        ("gpu", (16, 16, 16, 8), r"BlockSizes\.block_k_bwd=8 must be at least 16"),
    ],
)
def test_block_sizes_are_checked_up_front_naming_the_field(kernel, blocks, message):
    fn = {"tpu": flash_tpu.flash_attention_tpu, "gpu": flash_gpu.flash_attention_gpu}[kernel]
    x = jnp.zeros((1, 8, 1, 64))
    with pytest.raises(ValueError, match=message):
        fn(x, x, x, block_sizes=common.BlockSizes(*blocks), interpret=True)


@pytest.mark.parametrize(
    "k_shape, v_shape, message",
    [
        ((1, 8, 2, 64), (1, 8, 2, 64), r"k heads \(2\) != q heads \(4\): grouped-query"),
        ((1, 8, 4, 64), (1, 8, 4, 32), r"v head_dim \(32\) != q head_dim \(64\)"),
        ((1, 8, 4, 32), (1, 8, 4, 32), r"k head_dim \(32\) != q head_dim \(64\)"),
        ((1, 8, 4, 64), (1, 6, 4, 64), r"v length \(6\) != k length \(8\)"),
        ((1, 8, 64), (1, 8, 64), r"takes q \[B, L, H, K\] and k, v \[B, S, H, K\]"),
    ],
)
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_mismatched_shapes_are_rejected(kernel, k_shape, v_shape, message):
    impl = {"tpu": "flash_attention_tpu", "gpu": "flash_attention_gpu"}[kernel]
    q = jnp.zeros((1, 8, 4, 64))
    with pytest.raises(ValueError, match=f"impl='{impl}': {message}"):
        KERNELS[kernel](q, jnp.zeros(k_shape), jnp.zeros(v_shape))
