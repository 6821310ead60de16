"""Blockwise XLA attention against the reference, and its memory advantage."""

import functools

import jax
import jax.numpy as jnp
import pytest

from moss_jax.attention import xla_attention
from moss_jax.kernels.blockwise import blockwise_attention
from tests.kernels.cases import Case, assert_matches_reference

CASES = [
    Case("causal_3_segments_k64", q_len=150, kv_len=150, head_dim=64, causal=True, segments=3),
    Case("bidirectional_2_segments_k128", q_len=100, kv_len=100, head_dim=128, causal=False, segments=2),
    Case("causal_k256", q_len=72, kv_len=72, head_dim=256, causal=True, segments=0),
    Case("offset_random_segments", q_len=5, kv_len=140, head_dim=64, causal=True, segments=-1, q_offset=100),
    Case("bf16_causal_3_segments_k256", q_len=90, kv_len=90, head_dim=256, causal=True, segments=3, dtype=jnp.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("blocks", [(16, 24), (512, 512)], ids=["small_blocks", "default_blocks"])
def test_matches_reference(case, blocks):
    assert_matches_reference(functools.partial(blockwise_attention, block_q=blocks[0], block_k=blocks[1]), case)


@pytest.mark.parametrize("blocks, message", [((0, 8), "block_q=0 must be"), ((8, -8), "block_k=-8 must be")])
def test_block_sizes_must_be_positive(blocks, message):
    x = jnp.zeros((1, 16, 1, 64))
    with pytest.raises(ValueError, match=f"{message} a positive int"):
        blockwise_attention(x, x, x, block_q=blocks[0], block_k=blocks[1])


def test_mismatched_shapes_are_rejected():
    q = jnp.zeros((1, 16, 2, 64))
    with pytest.raises(ValueError, match=r"impl='blockwise': v length \(12\) != k length \(16\)"):
        blockwise_attention(q, q, jnp.zeros((1, 12, 2, 64)))


def _temp_bytes(attention_fn, length: int, grad: bool) -> int:
    """XLA's scratch allocation for one call at B=1, H=4, K=64 (compiled, not run)."""
    x = jax.ShapeDtypeStruct((1, length, 4, 64), jnp.float32)
    fn = attention_fn
    if grad:
        fn = jax.grad(lambda q, k, v: jnp.sum(attention_fn(q, k, v)), argnums=(0, 1, 2))
    return jax.jit(fn).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_memory_is_linear_in_length(grad):
    """The reference's scratch grows with L^2 (the score matrix); blockwise stays O(L)."""
    length = 4096
    ref = _temp_bytes(xla_attention, length, grad)
    blockwise = _temp_bytes(blockwise_attention, length, grad)
    scores_bytes = 4 * 4 * length * length  # fp32 [B=1, H=4, L, L]
    assert ref >= scores_bytes
    assert blockwise < scores_bytes / 8, (blockwise, ref)
    # Doubling the length doubles (not quadruples) the blockwise scratch, up to constants.
    assert _temp_bytes(blockwise_attention, 2 * length, grad) < 3 * blockwise
