import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax.config import PRESETS
from moss_jax.model import init_params
from moss_jax.sharding import make_mesh
from moss_jax.train.loss import normalizer, weighted_cross_entropy
from moss_jax.train.optimizer import OptimizerConfig, make_optimizer, make_schedule, weight_decay_mask
from moss_jax.train.state import TrainState, abstract_state, init_train_state
from moss_jax.train.step import check_batch_shape, compile_train_step, make_train_step

CFG = PRESETS["debug"]


def _batch(b=8, length=16, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, CFG.vocab_size, (b, length + 1))
    weights = (rng.rand(b, length) > 0.3).astype(np.float32)
    return {
        "decoder_input_tokens": jnp.asarray(ids[:, :-1], jnp.int32),
        "decoder_target_tokens": jnp.asarray(ids[:, 1:], jnp.int32),
        "decoder_segment_ids": jnp.ones((b, length), jnp.int32),
        "decoder_positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length)),
        "decoder_loss_weights": jnp.asarray(weights),
    }


def _state(cfg, tx):
    params = init_params(cfg, jax.random.PRNGKey(0))
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(1)
    )


def test_weighted_cross_entropy_matches_naive():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 7))
    targets = jnp.asarray([[0, 1, 2], [3, 4, 6]])
    w = jnp.asarray([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    ce, z = weighted_cross_entropy(logits, targets, w, z_loss=1e-2)
    logp = jax.nn.log_softmax(logits)
    naive = -sum(float(logp[b, t, targets[b, t]]) * float(w[b, t]) for b in range(2) for t in range(3))
    np.testing.assert_allclose(ce, naive, rtol=1e-6)
    lz = jax.nn.logsumexp(logits, -1)
    np.testing.assert_allclose(z, 1e-2 * float(jnp.sum(lz**2 * w)), rtol=1e-6)
    assert float(normalizer(jnp.zeros((2, 3)))) == 1.0


def test_grad_accumulation_equals_full_batch():
    tx, schedule = make_optimizer(OptimizerConfig(total_steps=10, warmup_steps=0))
    batch = _batch()
    full_state, full_m = jax.jit(make_train_step(CFG, tx, schedule))(_state(CFG, tx), batch)
    acc_state, acc_m = jax.jit(make_train_step(CFG, tx, schedule, micro_batches=4))(_state(CFG, tx), batch)
    np.testing.assert_allclose(acc_m["loss"], full_m["loss"], atol=1e-6)
    np.testing.assert_allclose(acc_m["grad_norm"], full_m["grad_norm"], rtol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), acc_state.params, full_state.params
    )


def test_remat_gives_equal_gradients():
    tx, schedule = make_optimizer(OptimizerConfig(total_steps=10, warmup_steps=0))
    batch = _batch()
    _, ref = jax.jit(make_train_step(CFG, tx, schedule))(_state(CFG, tx), batch)
    for policy in ("full", "dots"):
        cfg = CFG.replace(remat_policy=policy)
        _, m = jax.jit(make_train_step(cfg, tx, schedule))(_state(cfg, tx), batch)
        np.testing.assert_allclose(m["grad_norm"], ref["grad_norm"], rtol=1e-6)
        np.testing.assert_allclose(m["loss"], ref["loss"], rtol=1e-6)


def test_bf16_compute_keeps_fp32_master_weights():
    cfg = CFG.replace(dtype="bfloat16")
    tx, schedule = make_optimizer(OptimizerConfig(total_steps=10, warmup_steps=0))
    state, m = jax.jit(make_train_step(cfg, tx, schedule))(_state(cfg, tx), _batch())
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    assert np.isfinite(float(m["loss"]))


def test_weight_decay_mask_skips_biases_and_norms():
    params = init_params(CFG, jax.random.PRNGKey(0))
    mask = weight_decay_mask(params)
    assert mask["layers"]["attn"]["query"] and mask["embedding"] and mask["lm_head_kernel"]
    assert not mask["layers"]["ln"]["scale"] and not mask["layers"]["ln"]["bias"]
    assert not mask["layers"]["mlp"]["fc_in_bias"] and not mask["lm_head_bias"] and not mask["ln_f"]["scale"]
    # Decay really is skipped: with zero gradients only decayed tensors move.
    tx, _ = make_optimizer(OptimizerConfig(total_steps=10, warmup_steps=0, weight_decay=0.5, clip_norm=None))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["layers"]["ln"]["scale"]).max()) == 0.0
    assert float(jnp.abs(updates["layers"]["attn"]["query"]).max()) > 0.0


def test_schedules():
    warm = make_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, end_lr_ratio=0.1))
    assert float(warm(0)) == 0.0 and abs(float(warm(10)) - 1.0) < 1e-6 and abs(float(warm(110)) - 0.1) < 1e-6
    lin = make_schedule(
        OptimizerConfig(learning_rate=1.0, warmup_steps=0, total_steps=100, schedule="linear", end_lr_ratio=0.0)
    )
    assert abs(float(lin(50)) - 0.5) < 1e-6
    with pytest.raises(ValueError, match="schedule"):
        OptimizerConfig(schedule="step")
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimizerConfig(warmup_steps=20, total_steps=10)


def test_batch_shape_errors():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    check_batch_shape(8, 16, mesh, 2)
    with pytest.raises(ValueError, match="not divisible by the data axes data\\*fsdp = 4"):
        check_batch_shape(6, 16, mesh, 1)
    with pytest.raises(ValueError, match="micro_batches=3"):
        check_batch_shape(8, 16, mesh, 3)


def _run_compiled(cfg, micro_batches, steps=3):
    """`steps` calls of the AOT-compiled step, each on the previous call's output state."""
    mesh = make_mesh(fsdp=1, devices=jax.devices()[:1])
    tx, schedule = make_optimizer(OptimizerConfig(total_steps=10, warmup_steps=0))
    step = make_train_step(cfg, tx, schedule, micro_batches=micro_batches)
    compiled, _ = compile_train_step(step, abstract_state(cfg, tx, mesh), 8, 16, mesh)
    state = init_train_state(cfg, tx, jax.random.PRNGKey(0), mesh)
    losses = []
    for i in range(steps):
        state, m = compiled(state, _batch(seed=i))
        losses.append(float(m["loss"]))
    return state, losses


def test_bf16_params_with_grad_accumulation():
    """fp32 accumulated gradients must not promote the bf16 optimiser moments (the compiled step
    would refuse its own output at step 2)."""
    cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    state, acc = _run_compiled(cfg, micro_batches=2)
    _, full = _run_compiled(cfg, micro_batches=1)
    assert {x.dtype for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_allclose(acc, full, rtol=2e-3)


def test_compile_refuses_a_step_that_changes_the_state_signature():
    mesh = make_mesh(fsdp=1, devices=jax.devices()[:1])
    tx, schedule = make_optimizer(OptimizerConfig(total_steps=10, warmup_steps=0))
    step = make_train_step(CFG, tx, schedule)

    def widening(state, batch):
        new, m = step(state, batch)
        return new.replace(params=jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), new.params)), m

    with pytest.raises(ValueError, match=r"changes state\.params\['embedding'\] from float32\[512, 64\] to bfloat16"):
        compile_train_step(widening, abstract_state(CFG, tx, mesh), 8, 16, mesh)
