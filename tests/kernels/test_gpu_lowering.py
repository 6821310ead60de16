"""The GPU kernels lower to Triton for CUDA on a CPU host.

Lowering runs the Pallas->Triton translation (power-of-two tiles, supported ops, dot shapes);
only PTX compilation needs a GPU, so this catches most of what interpret mode cannot.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from moss_jax.attention import attention
from moss_jax.kernels import decode_gpu, flash_gpu
from tests.kernels.cases import cuda_text


def _triton_kernels(fn, *args) -> list[str]:
    text = cuda_text(fn, *args)
    # Each Triton launch is a custom call whose `name` attribute is the Pallas kernel name.
    assert "__gpu$xla.gpu.triton" in text
    return sorted(re.findall(r'name = "(moss_\w+?)"', text))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [64, 80, 256])
def test_flash_forward_and_backward_lower(dtype, head_dim):
    """head_dim 80 is padded to 128 (Triton tiles are powers of two); length 1000 is ragged."""
    x = jax.ShapeDtypeStruct((2, 1000, 2, head_dim), dtype)
    seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32)

    def loss(q, k, v, seg):
        out = flash_gpu.flash_attention_gpu(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    names = _triton_kernels(jax.grad(loss, argnums=(0, 1, 2)), x, x, x, seg)
    assert names == ["moss_flash_dkv_gpu", "moss_flash_dq_gpu", "moss_flash_fwd_gpu"]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("length", [45, 128], ids=["ragged", "whole"])
def test_flash_lowers_without_segment_ids(causal, length):
    """No segment ids: the unmasked-block bounds are Python ints or traced ints by case. The
    bidirectional ragged case once failed in Triton lowering (i1 vs i32 select operands)."""
    x = jax.ShapeDtypeStruct((2, length, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum(flash_gpu.flash_attention_gpu(q, k, v, causal=causal).astype(jnp.float32) ** 2)

    names = _triton_kernels(jax.grad(loss, argnums=(0, 1, 2)), x, x, x)
    assert names == ["moss_flash_dkv_gpu", "moss_flash_dq_gpu", "moss_flash_fwd_gpu"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
def test_decode_lowers_for_moss_cache(dtype):
    q = jax.ShapeDtypeStruct((4, 24, 256), dtype)
    cache = jax.ShapeDtypeStruct((4, 2048, 24, 256), dtype)
    ids = jax.ShapeDtypeStruct((4,), jnp.int32)
    seg = jax.ShapeDtypeStruct((4, 2048), jnp.int32)

    def fn(q, k, v, lengths, q_seg, kv_seg):
        return decode_gpu.decode_attention_gpu(q, k, v, lengths, q_segment_ids_B=q_seg, kv_segment_ids_BxS=kv_seg)

    assert _triton_kernels(fn, q, cache, cache, ids, ids, seg) == ["moss_decode_gpu"]


def test_auto_picks_the_gpu_kernel_for_cuda():
    """float32 (no Hopper kernel for it) runs the Triton kernel; bf16 training calls run the Hopper
    ones (tests/kernels/test_flash_mgpu.py)."""
    x = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.float32)
    assert _triton_kernels(lambda q, k, v: attention(q, k, v, impl="auto"), x, x, x) == ["moss_flash_fwd_gpu"]


def test_single_query_value_and_grad_lower_for_cuda():
    """A one-token query under "auto": the forward runs the decode kernel, the gradient the flash
    backward kernels (the decode kernel has no VJP of its own)."""
    q, kv = jax.ShapeDtypeStruct((2, 1, 2, 64), jnp.bfloat16), jax.ShapeDtypeStruct((2, 64, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, impl="auto", q_offset=40).astype(jnp.float32))

    def fn(q, k, v):
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    kernels = set(_triton_kernels(fn, q, kv, kv))
    assert {"moss_decode_gpu", "moss_flash_dkv_gpu", "moss_flash_dq_gpu"} <= kernels
