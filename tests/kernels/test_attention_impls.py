"""Every registered attention implementation, through the dispatcher and through the model."""

import functools
import pathlib
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from moss_jax.attention import attention, available_impls, xla_attention
from moss_jax.config import ATTENTION_IMPLS, PRESETS, ConfigError
from moss_jax.kernels.blockwise import blockwise_attention
from moss_jax.model import KVCache, MossLM, init_params, param_shardings
from moss_jax.sharding import make_mesh, mesh_rules
from tests.kernels.cases import ON_GPU, Case, assert_matches_reference, make_inputs

CFG = PRESETS["debug"]
IMPLS = [impl for impl in ATTENTION_IMPLS if impl not in ("xla", "cudnn")]  # cudnn: tests/kernels/test_cudnn.py
KERNEL_IMPLS = {"pallas_tpu": "tpu", "pallas_gpu": "gpu", "pallas_mgpu": "gpu"}


def _kernel_names(fn, *args) -> set[str]:
    """Names of the Pallas kernels a traced function launches."""
    return set(re.findall(r"moss_[a-z]+_[a-z]+_?[a-z]*", str(jax.make_jaxpr(fn)(*args))))


def test_registry_matches_config():
    assert set(available_impls()) == set(ATTENTION_IMPLS)
    with pytest.raises(ConfigError, match="attention_impl"):
        CFG.replace(attention_impl="flash")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "case",
    [
        Case("packed", q_len=40, kv_len=40, head_dim=64, causal=True, segments=3),
        Case("prefill_into_cache", q_len=6, kv_len=48, head_dim=64, causal=True, segments=-1, q_offset=20),
    ],
    ids=str,
)
def test_dispatcher_matches_reference(impl, case):
    assert_matches_reference(functools.partial(attention, impl=impl), case)


@pytest.mark.parametrize("impl", IMPLS)
def test_dispatcher_single_query(impl):
    """One query per row (the decode step) with segment ids and a traced offset."""
    inputs = make_inputs(Case("decode", q_len=1, kv_len=70, head_dim=64, causal=True, segments=-1))
    q, k, v, kw = inputs["q"], inputs["k"], inputs["v"], inputs["kwargs"]
    for offset in (0, 33, 69):
        kw = kw | {"q_offset": jnp.int32(offset)}
        got = jax.jit(functools.partial(attention, impl=impl, **kw))(q, k, v)
        np.testing.assert_allclose(np.asarray(got), np.asarray(xla_attention(q, k, v, **kw)), atol=2e-5, rtol=0)


@pytest.mark.parametrize("impl", sorted(KERNEL_IMPLS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_single_query_gradients(impl, causal):
    """A one-token query runs the forward-only decode kernel, and its gradient is the flash
    kernel's VJP: output and dq, dk, dv match the reference (segment ids, an offset)."""
    case = Case("decode_grad", q_len=1, kv_len=40, head_dim=64, causal=causal, segments=-1, q_offset=17)
    fn = functools.partial(attention, impl=impl)
    assert_matches_reference(fn, case)
    inputs = make_inputs(case)

    def value_and_grads(q, k, v):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, **inputs["kwargs"])), argnums=(0, 1, 2))(q, k, v)

    names = _kernel_names(value_and_grads, inputs["q"], inputs["k"], inputs["v"])
    platform = KERNEL_IMPLS[impl]
    assert {f"moss_decode_{platform}", f"moss_flash_dq_{platform}", f"moss_flash_dkv_{platform}"} <= names


MISMATCHES = {
    # (k shape, v shape, error) against q [1, L, 4, 64]
    "gqa": ((1, 8, 2, 64), (1, 8, 2, 64), r"k heads \(2\) != q heads \(4\): grouped-query"),
    "v_head_dim": ((1, 8, 4, 64), (1, 8, 4, 32), r"v head_dim \(32\) != q head_dim \(64\)"),
    "v_length": ((1, 8, 4, 64), (1, 6, 4, 64), r"v length \(6\) != k length \(8\)"),
    "k_batch": ((2, 8, 4, 64), (2, 8, 4, 64), r"k batch \(2\) != q batch \(1\)"),
}


@pytest.mark.parametrize("mismatch", sorted(MISMATCHES))
@pytest.mark.parametrize("q_len", [8, 1], ids=["flash", "decode"])
@pytest.mark.parametrize("impl", IMPLS)
def test_mismatched_shapes_are_rejected(impl, q_len, mismatch):
    """k/v that are not [B, S, H, K] with q's B, H and K raise, naming the impl (no GQA support)."""
    k_shape, v_shape, message = MISMATCHES[mismatch]
    q = jnp.zeros((1, q_len, 4, 64))
    with pytest.raises(ValueError, match=f"impl='{impl}': {message}"):
        attention(q, jnp.zeros(k_shape), jnp.zeros(v_shape), impl=impl)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _packed_batch():
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, CFG.vocab_size, (2, 40)), jnp.int32)
    seg = jnp.asarray([[1] * 13 + [2] * 9 + [3] * 12 + [0] * 6, [1] * 40], jnp.int32)
    return ids, seg


def _loss(logits, seg):
    """Mean log-probability of one token over real positions (gradients of order 1)."""
    real = (seg != 0).astype(jnp.float32)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 7] * real) / jnp.sum(real)


def _logits_and_grads(impl, params, ids, seg):
    model = MossLM(CFG.replace(attention_impl=impl))

    def loss(p):
        logits = model.apply({"params": p}, ids, segment_ids_BxL=seg)
        return _loss(logits, seg), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


@pytest.mark.parametrize("impl", IMPLS)
def test_model_logits_and_gradients_match_xla(impl, params):
    ids, seg = _packed_batch()
    want_logits, want_grads = _logits_and_grads("xla", params, ids, seg)
    logits, grads = _logits_and_grads(impl, params, ids, seg)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=2e-5, rtol=0)
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(want_grads), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), atol=2e-5, rtol=0, err_msg=jax.tree_util.keystr(path)
        )


@pytest.mark.parametrize("impl", sorted(KERNEL_IMPLS))
def test_kv_cache_decode_runs_the_decode_kernel(impl, params):
    """Prefill uses the flash kernel, each one-token step the decode kernel; both match no-cache logits."""
    platform = KERNEL_IMPLS[impl]
    model = MossLM(CFG.replace(attention_impl=impl))
    rng = np.random.RandomState(3)
    ids = jnp.asarray(rng.randint(0, CFG.vocab_size, (2, 12)), jnp.int32)
    seg = jnp.asarray([[0, 0, 0] + [1] * 9, [1] * 12], jnp.int32)  # row 0 left-padded
    prefill = jax.jit(lambda p, t, s, c: model.apply({"params": p}, t, segment_ids_BxL=s, cache=c))
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    cache = KVCache.init(CFG, batch=2, max_len=24)
    assert f"moss_flash_fwd_{platform}" in _kernel_names(prefill, params, ids[:, :8], seg[:, :8], cache)
    _, cache = prefill(params, ids[:, :8], seg[:, :8], cache)
    assert f"moss_decode_{platform}" in _kernel_names(step, params, ids[:, 8:9], cache)
    full = [MossLM(CFG).apply({"params": params}, ids[:1, 3:]), MossLM(CFG).apply({"params": params}, ids[1:])]
    for t in range(8, 12):
        logits, cache = step(params, ids[:, t : t + 1], cache)
        np.testing.assert_allclose(logits[0, 0], full[0][0, t - 3], atol=1e-5, rtol=0)
        np.testing.assert_allclose(logits[1, 0], full[1][0, t], atol=1e-5, rtol=0)


@pytest.mark.skipif(ON_GPU, reason="on a GPU auto is the Pallas kernel")
def test_auto_is_blockwise_on_cpu():
    """On CPU "auto" lowers to exactly the blockwise path (same numbers, bit for bit)."""
    inputs = make_inputs(Case("auto", q_len=70, kv_len=70, head_dim=64, causal=True, segments=2))
    args = (inputs["q"], inputs["k"], inputs["v"])
    auto = jax.jit(functools.partial(attention, impl="auto", **inputs["kwargs"]))(*args)
    blockwise = jax.jit(functools.partial(blockwise_attention, **inputs["kwargs"]))(*args)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(blockwise))


def test_sharded_kernel_matches_single_device(params):
    """On an 8-device mesh the kernel runs per device under shard_map (batch over data+fsdp,
    heads over tensor) and gives the single-device logits and gradients."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    ids, seg = _packed_batch()
    ids, seg = jnp.tile(ids, (2, 1)), jnp.tile(seg, (2, 1))
    want_logits, want_grads = _logits_and_grads("xla", params, ids, seg)
    model = MossLM(CFG.replace(attention_impl="pallas_tpu"))
    batch_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))

    def loss(p, x, s):
        logits = model.apply({"params": p}, x, segment_ids_BxL=s)
        return _loss(logits, s), logits

    with mesh_rules(mesh):
        fn = jax.jit(
            jax.value_and_grad(loss, has_aux=True), in_shardings=(param_shardings(CFG, mesh), batch_sh, batch_sh)
        )
        sharded = init_params(CFG, jax.random.key(0), mesh=mesh)
        assert "shard_map" in str(jax.make_jaxpr(fn)(sharded, ids, seg))
        (_, logits), grads = fn(sharded, jax.device_put(ids, batch_sh), jax.device_put(seg, batch_sh))
    # Sharded matmuls sum in a different order: fp32 rounding relative to the logits' size (~100).
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=2e-5, rtol=1e-6)
    for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)


def test_gin_binding_selects_impl():
    configurables = pytest.importorskip("moss_jax.configurables")
    debug_gin = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "models" / "debug.gin"
    gin.clear_config()
    try:
        configurables.parse([str(debug_gin)], ["moss_jax.config.get_config.attention_impl = 'auto'"])
        assert configurables.model_config() == PRESETS["debug"].replace(attention_impl="auto")
    finally:
        gin.clear_config()
