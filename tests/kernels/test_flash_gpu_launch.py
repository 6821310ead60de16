"""The GPU flash kernel's tile choice: shared-memory estimate, defaults per head_dim and dtype."""

import jax.numpy as jnp
import pytest

from moss_jax.kernels import common, flash_gpu
from tests.kernels.cases import GPU_INTERPRET, Case, assert_matches_reference

HOPPER, A100, SMALL = 232448, 166912, 101376


def test_estimate_covers_the_h200_failure():
    """fp32, head_dim 256, 64 x 64 tiles, 2 stages asked Triton for 278784 bytes of 232448."""
    for kernel in ("fwd", "dq"):
        assert flash_gpu.smem_estimate(kernel, 64, 64, 256, jnp.float32, 2) >= 278784
    # Settings that compiled on the H200 stay within its limit.
    assert flash_gpu.smem_estimate("fwd", 128, 64, 128, jnp.float32, 2) <= HOPPER
    assert flash_gpu.smem_estimate("dkv", 64, 64, 128, jnp.float32, 2) <= HOPPER
    assert flash_gpu.smem_estimate("dkv", 64, 64, 256, jnp.bfloat16, 2) <= HOPPER


@pytest.mark.parametrize("limit", [HOPPER, A100, SMALL])
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
def test_default_launch_fits(dtype, head_dim, limit):
    launch = flash_gpu.default_launch(head_dim, dtype, smem_bytes=limit)
    b = launch.blocks
    assert launch.num_stages >= 2 and launch.num_stages_bwd >= 2
    assert flash_gpu.smem_estimate("fwd", b.block_q, b.block_k, head_dim, dtype, launch.num_stages) <= limit
    for kernel in ("dq", "dkv"):
        est = flash_gpu.smem_estimate(kernel, b.block_q_bwd, b.block_k_bwd, head_dim, dtype, launch.num_stages_bwd)
        assert est <= limit


def test_defaults_on_hopper():
    """bf16 head_dim 128: the H200 sweep's fastest setting; fp32 head_dim 256 shrinks until it fits."""
    assert flash_gpu.default_launch(128, jnp.bfloat16, HOPPER) == flash_gpu.Launch(
        common.BlockSizes(64, 64, 64, 64), num_warps=4, num_stages=3, num_stages_bwd=3
    )
    launch = flash_gpu.default_launch(256, jnp.float32, HOPPER)
    assert launch.blocks == common.BlockSizes(64, 32, 32, 32) and launch.num_warps == 8
    assert launch.num_stages == launch.num_stages_bwd == 2


def test_given_settings_are_kept():
    blocks = common.BlockSizes(128, 64, 128, 64)
    launch = flash_gpu.resolve_launch(128, jnp.bfloat16, blocks, num_warps=8, num_stages=None)
    assert launch.blocks == blocks and launch.num_warps == 8 and launch.num_stages >= 2
    launch = flash_gpu.resolve_launch(128, jnp.bfloat16, blocks, num_warps=None, num_stages=2)
    assert launch.num_stages == launch.num_stages_bwd == 2 and launch.num_warps == 4


def test_fp32_k256_default_tiles_match_reference():
    """The shape that exceeded shared memory on the H200, with the tiles now chosen for it."""
    case = Case("fp32_k256_defaults", q_len=100, kv_len=100, head_dim=256, causal=True, segments=0)
    assert_matches_reference(lambda *a, **kw: flash_gpu.flash_attention_gpu(*a, interpret=GPU_INTERPRET, **kw), case)
