"""The TPU kernels, and a sharded model train step using them, compile for a TPU topology.

Runs on a CPU host: libtpu (`pip install "jax[tpu]==0.10.2"`, the `tpu` extra) compiles for a
described topology without TPU hardware; `TPU_WORKER_HOSTNAMES=localhost` (tests/conftest.py)
keeps it from probing for workers. These compiles run Mosaic's full pipeline, so they catch
what interpret mode cannot: tile-layout rules, unsupported ops and VMEM overflows.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

pytest.importorskip("libtpu", reason='libtpu is not installed (pip install "jax[tpu]==0.10.2")')

from jax.experimental import topologies  # noqa: E402

from moss_jax.attention import attention  # noqa: E402
from moss_jax.config import MossConfig  # noqa: E402
from moss_jax.kernels import decode_tpu, flash_tpu  # noqa: E402
from moss_jax.model import KVCache, MossLM, abstract_params  # noqa: E402
from moss_jax.sharding import make_mesh  # noqa: E402
from moss_jax.train.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from moss_jax.train.state import abstract_state  # noqa: E402
from moss_jax.train.step import compile_train_step, make_train_step  # noqa: E402

TOPOLOGY = "v5p:2x2x2"  # 8 TensorCores: enough for a data x fsdp x tensor mesh


@pytest.fixture(scope="module")
def topology():
    return topologies.get_topology_desc(TOPOLOGY, "tpu")


def _kernels(text: str) -> set[str]:
    return set(re.findall(r"moss_(?:flash_(?:fwd|dkv|dq)|decode)_tpu", text))


def _abstract(shape, dtype, device):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(device))


FP32_SLOW = [jnp.bfloat16, pytest.param(jnp.float32, marks=pytest.mark.slow)]


@pytest.mark.parametrize("dtype", FP32_SLOW, ids=["bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [64, 256])
def test_flash_forward_and_backward_compile(topology, dtype, head_dim):
    """Default (512-row) tiles at MOSS's head_dim 256 fit VMEM in fp32 too; ragged length 1000."""
    dev = topology.devices[0]
    x = _abstract((2, 1000, 2, head_dim), dtype, dev)
    seg = _abstract((2, 1000), jnp.int32, dev)

    def loss(q, k, v, seg, offset):
        out = flash_tpu.flash_attention_tpu(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_offset=offset)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, seg, _abstract((), jnp.int32, dev))
    assert _kernels(lowered.as_text()) == {"moss_flash_fwd_tpu", "moss_flash_dkv_tpu", "moss_flash_dq_tpu"}
    lowered.compile()


@pytest.mark.parametrize("dtype", FP32_SLOW, ids=["bf16", "fp32"])
def test_decode_compiles_for_moss_cache(topology, dtype):
    """moss-moon-003's per-layer cache: 24 heads x 256, 2048 slots, per-row lengths and segments."""
    dev = topology.devices[0]
    batch, slots, heads, head_dim = 4, 2048, 24, 256
    lowered = jax.jit(
        lambda q, k, v, lengths, q_seg, kv_seg: decode_tpu.decode_attention_tpu(
            q, k, v, lengths, q_segment_ids_B=q_seg, kv_segment_ids_BxS=kv_seg
        )
    ).lower(
        _abstract((batch, heads, head_dim), dtype, dev),
        _abstract((batch, slots, heads, head_dim), dtype, dev),
        _abstract((batch, slots, heads, head_dim), dtype, dev),
        _abstract((batch,), jnp.int32, dev),
        _abstract((batch,), jnp.int32, dev),
        _abstract((batch, slots), jnp.int32, dev),
    )
    assert _kernels(lowered.as_text()) == {"moss_decode_tpu"}
    lowered.compile()


# head_dim 256 as in MOSS; two layers keep the compile short.
MODEL = MossConfig(vocab_size=512, d_model=512, n_layers=2, n_heads=2, mlp_dim=1024, rotary_dim=64, dtype="bfloat16")


@pytest.mark.parametrize("impl", ["pallas_tpu", pytest.param("auto", marks=pytest.mark.slow)])
def test_sharded_train_step_compiles(topology, impl):
    """The real train step (remat, AdamW, donation) on a data x fsdp x tensor mesh of the topology.

    "auto" must pick the TPU kernel because the program is lowered for TPU, although the
    host's default backend is the CPU.
    """
    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=topology.devices)
    cfg = MODEL.replace(attention_impl=impl, remat_policy="full")
    tx, schedule = make_optimizer(OptimizerConfig())
    step = make_train_step(cfg, tx, schedule)
    compiled, report = compile_train_step(step, abstract_state(cfg, tx, mesh), global_batch=8, seq_len=512, mesh=mesh)
    assert _kernels(compiled.as_text()) == {"moss_flash_fwd_tpu", "moss_flash_dkv_tpu", "moss_flash_dq_tpu"}
    assert report["temp_size_in_bytes"] > 0


def test_kv_cache_decode_step_compiles(topology):
    """The model's one-token step with a KV cache runs the decode kernel when compiled for TPU."""
    dev = topology.devices[0]
    cfg = MODEL.replace(attention_impl="pallas_tpu")
    model = MossLM(cfg)
    params = jax.tree_util.tree_map(
        lambda a: _abstract(a.shape, a.dtype, dev), jax.eval_shape(lambda: abstract_params(cfg))
    )
    cache = jax.tree_util.tree_map(
        lambda a: _abstract(a.shape, a.dtype, dev), jax.eval_shape(lambda: KVCache.init(cfg, batch=4, max_len=1024))
    )
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    lowered = step.lower(params, _abstract((4, 1), jnp.int32, dev), cache)
    assert _kernels(lowered.as_text()) == {"moss_decode_tpu"}
    lowered.compile()


def test_single_query_value_and_grad_lower_for_tpu():
    """A one-token query under "auto" lowered for TPU: the forward runs the decode kernel, the
    gradient the flash backward kernels (the decode kernel has no VJP of its own)."""
    q, kv = jax.ShapeDtypeStruct((2, 1, 2, 64), jnp.bfloat16), jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, impl="auto", q_offset=200).astype(jnp.float32))

    def fn(q, k, v):
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    text = jax.jit(fn).trace(q, kv, kv).lower(lowering_platforms=("tpu",)).as_text()
    assert {"moss_decode_tpu", "moss_flash_dkv_tpu", "moss_flash_dq_tpu"} <= _kernels(text)
