"""Preference-model and DPO objectives: against direct computations, accumulation, shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax.config import PRESETS
from moss_jax.model import MossLM, init_params
from moss_jax.reward_model import RewardModel, last_token_scores
from moss_jax.sharding import check_axis_names, make_mesh
from moss_jax.train.objectives import (
    PAIR_FEATURES,
    Objective,
    dpo_objective,
    lm_objective,
    reward_objective,
    sequence_logprobs,
)
from moss_jax.train.optimizer import OptimizerConfig, make_optimizer
from moss_jax.train.state import TrainState, abstract_state
from moss_jax.train.step import compile_train_step, make_train_step

CFG = PRESETS["debug"]
L = 12


def _pair_batch(b=4, seed=0):
    """Right-padded pairs; the reply is the last 4 real tokens of each side; last row is padding."""
    rng = np.random.RandomState(seed)
    out = {}
    for side, lengths in (("chosen", [12, 9, 7, 0]), ("rejected", [10, 12, 8, 0])):
        ids = rng.randint(1, CFG.vocab_size, (b, L + 1))
        seg = np.zeros((b, L), np.int32)
        w = np.zeros((b, L), np.float32)
        for r, n in enumerate(lengths[:b]):
            seg[r, :n] = 1
            w[r, max(n - 4, 0) : n] = 1.0
        out[f"{side}_decoder_input_tokens"] = ids[:, :-1] * seg
        out[f"{side}_decoder_target_tokens"] = ids[:, 1:] * seg
        out[f"{side}_decoder_segment_ids"] = seg
        out[f"{side}_decoder_positions"] = np.arange(L)[None, :] * seg
        out[f"{side}_decoder_loss_weights"] = w
    assert set(out) == set(PAIR_FEATURES)
    return {k: jnp.asarray(v) for k, v in out.items()}


def _rm_params(seed=0):
    params = nn.unbox(RewardModel(CFG).init(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))["params"])
    # A non-zero head, so scores differ between sequences.
    params["reward_head_kernel"] = jax.random.normal(jax.random.PRNGKey(seed + 1), (CFG.d_model,))
    return params


def test_reward_model_has_named_axes_and_lm_backbone():
    boxed = jax.eval_shape(lambda r: RewardModel(CFG).init(r, jnp.zeros((1, 1), jnp.int32)), jax.random.PRNGKey(0))
    check_axis_names(boxed["params"])
    lm = jax.eval_shape(lambda r: MossLM(CFG).init(r, jnp.zeros((1, 1), jnp.int32)), jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(nn.unbox(boxed["params"]["lm"])) == jax.tree_util.tree_structure(
        nn.unbox(lm["params"])
    )


def test_last_token_scores_picks_last_real_position():
    scores = jnp.arange(12.0).reshape(2, 6)
    seg = jnp.asarray([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(last_token_scores(scores, seg), [2.0, 11.0])


def test_bradley_terry_loss_matches_direct_computation():
    params, batch = _rm_params(), _pair_batch()
    obj = reward_objective()
    loss_sum, m = obj.loss_sums(RewardModel(CFG), params, batch, None, None, True)
    model = RewardModel(CFG)

    def score(side):
        s = model.apply(
            {"params": params},
            batch[f"{side}_decoder_input_tokens"],
            positions_BxL=batch[f"{side}_decoder_positions"],
            segment_ids_BxL=batch[f"{side}_decoder_segment_ids"],
        )
        seg = np.asarray(batch[f"{side}_decoder_segment_ids"])
        return np.array([float(s[r, seg[r].sum() - 1]) for r in range(3)])  # row 3 is padding

    diff = score("chosen") - score("rejected")
    expected = float(np.sum(np.log1p(np.exp(-diff))))
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-4)
    assert float(obj.normalizer(batch)) == 3.0  # the padding row does not count
    np.testing.assert_allclose(float(m["accuracy"]), float(np.sum(diff > 0)))


def _direct_logp(params, batch, side):
    logits = MossLM(CFG).apply(
        {"params": params},
        batch[f"{side}_decoder_input_tokens"],
        positions_BxL=batch[f"{side}_decoder_positions"],
        segment_ids_BxL=batch[f"{side}_decoder_segment_ids"],
    )
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
    t, w = np.asarray(batch[f"{side}_decoder_target_tokens"]), np.asarray(batch[f"{side}_decoder_loss_weights"])
    return np.array([sum(logp[b, i, t[b, i]] * w[b, i] for i in range(L)) for b in range(t.shape[0])])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_loss_matches_direct_computation(label_smoothing):
    beta = 0.5
    policy, ref = init_params(CFG, jax.random.PRNGKey(0)), init_params(CFG, jax.random.PRNGKey(7))
    batch = _pair_batch()
    obj = dpo_objective(beta=beta, label_smoothing=label_smoothing)
    loss_sum, m = obj.loss_sums(MossLM(CFG), policy, batch, None, ref, True)
    margin = (
        beta
        * (
            (_direct_logp(policy, batch, "chosen") - _direct_logp(ref, batch, "chosen"))
            - (_direct_logp(policy, batch, "rejected") - _direct_logp(ref, batch, "rejected"))
        )[:3]
    )
    log_sig = lambda x: -np.log1p(np.exp(-x))
    expected = np.sum(-(1 - label_smoothing) * log_sig(margin) - label_smoothing * log_sig(-margin))
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-4)
    np.testing.assert_allclose(float(m["accuracy"]), float(np.sum(margin > 0)))
    np.testing.assert_allclose(float(m["margin"]), float(np.sum(margin)), rtol=1e-4, atol=1e-5)


def test_dpo_against_itself_is_log2():
    params, batch = init_params(CFG, jax.random.PRNGKey(0)), _pair_batch()
    loss_sum, m = dpo_objective(beta=0.1).loss_sums(MossLM(CFG), params, batch, None, params, True)
    np.testing.assert_allclose(float(loss_sum) / 3, np.log(2.0), rtol=1e-6)
    assert float(m["accuracy"]) == 0.0


def test_dpo_checks_its_settings():
    with pytest.raises(ValueError, match="beta"):
        dpo_objective(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_objective(label_smoothing=0.5)


def test_sequence_logprobs_sums_weighted_tokens():
    logits = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 5))
    out = sequence_logprobs(logits, jnp.asarray([[1, 2, 3]]), jnp.asarray([[0.0, 1.0, 1.0]]))
    logp = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(out[0], logp[0, 1, 2] + logp[0, 2, 3], rtol=1e-6)


@pytest.mark.parametrize("objective", ["reward", "dpo"])
def test_pair_objectives_accumulate_exactly(objective):
    tx, schedule = make_optimizer(OptimizerConfig(total_steps=10, warmup_steps=0))
    batch = _pair_batch()
    if objective == "reward":
        obj, params, frozen = reward_objective(), _rm_params(), None
    else:
        obj, params = dpo_objective(beta=0.3), init_params(CFG, jax.random.PRNGKey(0))
        frozen = init_params(CFG, jax.random.PRNGKey(3))

    def state():
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(1))

    full_s, full_m = jax.jit(make_train_step(CFG, tx, schedule, objective=obj))(state(), batch, frozen)
    acc_s, acc_m = jax.jit(make_train_step(CFG, tx, schedule, objective=obj, micro_batches=2))(state(), batch, frozen)
    for k in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(acc_m[k], full_m[k], rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), acc_s.params, full_s.params)
    assert float(full_m["loss"]) > 0 and np.isfinite(float(full_m["grad_norm"]))


def test_throughput_accounting_per_objective():
    """Pair objectives run 2 rows per example; DPO adds the reference forward; the reward model
    skips the LM head. Against XLA's FLOP count of the compiled step (layers unrolled, so the
    count is not of one scan iteration only; XLA also counts elementwise work, hence a few %)."""
    cfg = CFG.replace(scan_layers=False)
    b, length = 4, 32
    mesh = make_mesh(fsdp=1, devices=jax.devices()[:1])
    tx, schedule = make_optimizer(OptimizerConfig(total_steps=10, warmup_steps=0))
    for obj, rows in ((lm_objective(), 1), (reward_objective(), 2), (dpo_objective(), 2)):
        assert obj.tokens_per_step(b, length) == rows * b * length, obj.name
        abstract = abstract_state(cfg, tx, mesh, module=obj.make_module)
        _, report = compile_train_step(
            make_train_step(cfg, tx, schedule, objective=obj),
            abstract,
            b,
            length,
            mesh,
            features=obj.features,
            abstract_frozen=abstract.params if obj.needs_reference else None,
        )
        ratio = report["flops"] / obj.flops_per_step(cfg, b, length)
        assert 0.95 < ratio < 1.12, (obj.name, ratio)
    per_token = CFG.flops_per_token(length)
    assert dpo_objective().flops_per_step(CFG, 1, 1) == pytest.approx(2 * 4 / 3 * CFG.flops_per_token(1))
    assert lm_objective().flops_per_step(CFG, b, length) == pytest.approx(per_token * b * length)


def test_objective_checks_its_accounting_fields():
    lm = lm_objective()
    with pytest.raises(ValueError, match="sequences_per_example=0"):
        Objective(lm.name, lm.features, lm.make_module, lm.loss_sums, lm.normalizer, sequences_per_example=0)
