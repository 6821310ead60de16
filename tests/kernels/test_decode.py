"""The decode kernels (TPU and GPU variants, interpret mode) against the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax.attention import xla_attention
from moss_jax.kernels import decode_gpu, decode_tpu
from tests.kernels.cases import GPU_INTERPRET

KERNELS = {
    "tpu": functools.partial(decode_tpu.decode_attention_tpu, interpret=True),
    "gpu": functools.partial(decode_gpu.decode_attention_gpu, interpret=GPU_INTERPRET),
}


def _cache(batch, kv_len, heads, head_dim, dtype, seed=0):
    rng = np.random.RandomState(seed)
    return tuple(
        jnp.asarray(rng.randn(*s), jnp.float32).astype(dtype)
        for s in [(batch, heads, head_dim)] + [(batch, kv_len, heads, head_dim)] * 2
    )


def _reference(q, k, v, lengths, q_seg=None, kv_seg=None):
    """Reference with the decode contract: key j visible iff j < lengths[b] (and segments match)."""
    kv_len = k.shape[1]
    valid_BxS = jnp.arange(kv_len)[None, :] < lengths[:, None]
    # Hide keys past the length by giving them a segment id no query has.
    q_ids = jnp.zeros((q.shape[0], 1), jnp.int32) if q_seg is None else q_seg[:, None]
    kv_ids = jnp.zeros_like(valid_BxS, jnp.int32) if kv_seg is None else kv_seg
    kv_ids = jnp.where(valid_BxS, kv_ids, -1)
    return xla_attention(q[:, None], k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids, causal=False)[:, 0]


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize(
    "kv_len,head_dim,block_k,dtype",
    [(300, 64, 128, jnp.float32), (40, 256, None, jnp.float32), (260, 128, 128, jnp.bfloat16)],
)
def test_per_row_lengths(kernel, kv_len, head_dim, block_k, dtype):
    """Rows of different lengths, a cache length that is not a multiple of the block."""
    q, k, v = _cache(3, kv_len, 2, head_dim, dtype)
    lengths = jnp.asarray([1, kv_len // 2 + 3, kv_len], jnp.int32)
    kw = {} if block_k is None else {"block_k": block_k if kernel == "tpu" else 64}
    got = KERNELS[kernel](q, k, v, lengths, **kw)
    want = _reference(q, k, v, lengths)
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    assert got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=0)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_left_padded_rows_and_segments(kernel):
    """The model's cache: left padding has segment 0, a query of segment 0 sees nothing real."""
    kv_len = 200
    q, k, v = _cache(3, kv_len, 2, 64, jnp.float32, seed=1)
    kv_seg = np.ones((3, kv_len), np.int32)
    kv_seg[0, :37] = 0  # row 0 was left-padded by 37 slots
    kv_seg[1, 150:] = 2  # row 1 holds a second segment
    kv_seg, q_seg = jnp.asarray(kv_seg), jnp.asarray([1, 2, 1], jnp.int32)
    lengths = jnp.asarray([180, 170, 99], jnp.int32)
    got = KERNELS[kernel](
        q, k, v, lengths, q_segment_ids_B=q_seg, kv_segment_ids_BxS=kv_seg, block_k=128 if kernel == "tpu" else 32
    )
    want = _reference(q, k, v, lengths, q_seg, kv_seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_keys_past_the_length_are_never_read_into_the_result(kernel):
    """Changing cache slots at or after lengths[b] leaves the output unchanged, bit for bit."""
    q, k, v = _cache(2, 256, 2, 64, jnp.float32, seed=2)
    lengths = jnp.asarray([10, 130], jnp.int32)
    fn = jax.jit(lambda k, v: KERNELS[kernel](q, k, v, lengths, block_k=128 if kernel == "tpu" else 32))
    before = fn(k, v)
    stale = jnp.arange(256)[None, :, None, None] >= lengths[:, None, None, None]
    after = fn(jnp.where(stale, 1e4, k), jnp.where(stale, -1e4, v))
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))


def test_no_visible_key_gives_zeros():
    q, k, v = _cache(1, 64, 2, 64, jnp.float32)
    for fn in KERNELS.values():
        out = fn(q, k, v, jnp.asarray([0], jnp.int32))
        np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize(
    "kernel, block_k, message",
    [
        ("tpu", -128, "block_k=-128 must be a positive int"),
        ("tpu", 0, "block_k=0 must be a positive int"),  # not silently the default
        ("tpu", 96, "block_k=96 must be a multiple of 128"),
        ("gpu", 0, "block_k=0 must be a positive int"),
        ("gpu", 48, "block_k=48 must be a power of two"),  # Triton's arange needs one
    ],
)
def test_block_k_validation(kernel, block_k, message):
    q, k, v = _cache(1, 256, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match=message):
        KERNELS[kernel](q, k, v, jnp.asarray([10], jnp.int32), block_k=block_k)


@pytest.mark.parametrize(
    "k_shape, v_shape, message",
    [
        ((1, 32, 1, 64), (1, 32, 1, 64), r"k heads \(1\) != q heads \(2\): grouped-query"),
        ((1, 32, 2, 64), (1, 32, 2, 32), r"v head_dim \(32\) != q head_dim \(64\)"),
        ((1, 32, 2, 64), (1, 24, 2, 64), r"v length \(24\) != k length \(32\)"),
    ],
)
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_mismatched_shapes_are_rejected(kernel, k_shape, v_shape, message):
    q = jnp.zeros((1, 2, 64))
    with pytest.raises(ValueError, match=f"impl='decode_attention_{kernel}': {message}"):
        KERNELS[kernel](q, jnp.zeros(k_shape), jnp.zeros(v_shape), jnp.asarray([10], jnp.int32))
