"""What a stage optimises: the trained module, the batch features it reads, and its loss.

One train step (moss_jax/train/step.py) runs every objective:

- `lm_objective`: weighted next-token cross-entropy (pre-training, SFT, preference-aware
  training), normalised by the total loss weight (moss_jax/train/loss.py);
- `reward_objective`: Bradley-Terry on chosen/rejected pairs with the scalar-head
  `RewardModel`, `-log sigmoid(r_chosen - r_rejected)`, normalised by the number of pairs;
- `dpo_objective`: DPO (Rafailov et al. 2023) against a frozen reference model, on the
  log-probability of the whole final reply under policy and reference, beta applied once.

`loss_sums(module, params, batch, rng, frozen, deterministic)` returns the sum of the loss over the
(micro-)batch and a dict of metric sums; the step divides both by `normalizer(full batch)` once,
so gradient accumulation equals the full batch for every objective.

Throughput accounting (tokens/s and MFU in the trainer): an objective runs its model on
`sequences_per_example` rows of L tokens per batch example (pairs: 2), and spends
`flops_multiplier` times one forward and backward pass per token (MossConfig.flops_per_token:
6 N + attention); DPO adds a forward pass of the frozen reference (1/3 of forward + backward,
so 4/3). The reward model never runs the LM head, so its head FLOPs are left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moss_jax.config import MossConfig
from moss_jax.model import MossLM, head_kernel
from moss_jax.reward_model import RewardModel, last_token_scores
from moss_jax.train.head_loss import DEFAULT_CHUNK_TOKENS, head_cross_entropy
from moss_jax.train.loss import normalizer as weight_normalizer
from moss_jax.train.loss import weighted_cross_entropy

LM_FEATURES = (
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_segment_ids",
    "decoder_positions",
    "decoder_loss_weights",
)
PAIR_FEATURES = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in LM_FEATURES)


def feature_dtype(name: str) -> Any:
    return jnp.float32 if name.endswith("loss_weights") else jnp.int32


@dataclasses.dataclass(frozen=True)
class Objective:
    """A stage's optimisation problem (see the module docstring).

    Attributes:
      name: for logs and checkpoints.
      features: the batch features the loss reads, all [B, L].
      make_module: the trained flax module for a model config.
      loss_sums: (module, params, batch, rng, frozen, deterministic) -> (loss sum, metric sums).
      normalizer: batch -> the denominator of the loss and the metrics.
      init_subtree: where an `init_from` language-model checkpoint goes in the params (None: the
        whole tree is an LM; "lm": the reward model's backbone, its head starts fresh).
      needs_reference: the step takes frozen reference params (DPO).
      sequences_per_example: [L] rows the model runs per batch example (chosen + rejected: 2).
      flops_multiplier: FLOPs per processed token in units of one forward + backward pass.
      lm_head: whether the LM head's matmul runs (False: the reward model reads hidden states).
    """

    name: str
    features: tuple[str, ...]
    make_module: Callable[[MossConfig], nn.Module]
    loss_sums: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    normalizer: Callable[[dict], jax.Array]
    init_subtree: str | None = None
    needs_reference: bool = False
    sequences_per_example: int = 1
    flops_multiplier: float = 1.0
    lm_head: bool = True

    def __post_init__(self):
        if self.sequences_per_example < 1 or not self.flops_multiplier > 0:
            raise ValueError(
                f"Objective {self.name!r}: sequences_per_example={self.sequences_per_example} must be >= 1 "
                f"and flops_multiplier={self.flops_multiplier} > 0"
            )

    def tokens_per_step(self, batch_size: int, seq_len: int) -> int:
        """Tokens the model processes per step (every position of every row, padding included)."""
        return self.sequences_per_example * batch_size * seq_len

    def flops_per_step(self, config: MossConfig, batch_size: int, seq_len: int) -> float:
        """Model FLOPs of one train step (the MFU numerator)."""
        per_token = config.flops_per_token(seq_len)
        if not self.lm_head:  # 6 * (head kernel + bias), counted in MossConfig.flops_per_token
            per_token -= 6.0 * (config.d_model * config.vocab_size + config.vocab_size)
        return self.flops_multiplier * per_token * self.tokens_per_step(batch_size, seq_len)


def _apply(module, params, batch, prefix, rng, deterministic, **kwargs):
    train = not deterministic
    return module.apply(
        {"params": params},
        batch[f"{prefix}decoder_input_tokens"],
        positions_BxL=batch[f"{prefix}decoder_positions"],
        segment_ids_BxL=batch[f"{prefix}decoder_segment_ids"],
        deterministic=deterministic,
        rngs={"dropout": rng} if train else None,
        **kwargs,
    )


def lm_objective(z_loss: float = 0.0, head_chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> Objective:
    """The LM loss. `head_chunk_tokens`: the head runs fused with the cross-entropy in chunks of
    about that many tokens (moss_jax/train/head_loss.py: same loss and gradients, no [B, L, V]
    logits); None computes the full logits and `weighted_cross_entropy` (the reference path)."""

    def loss_sums(module, params, batch, rng, frozen, deterministic):
        del frozen
        targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        if head_chunk_tokens is None:
            logits = _apply(module, params, batch, "", rng, deterministic)
            ce_sum, z_sum = weighted_cross_entropy(logits, targets, weights, z_loss)
            return ce_sum + z_sum, {"loss": ce_sum, "z_loss": z_sum}
        hidden = _apply(module, params, batch, "", rng, deterministic, head=False)
        total, ce_sum, z_sum = head_cross_entropy(
            hidden, head_kernel(params), params["lm_head_bias"], targets, weights, z_loss, head_chunk_tokens
        )
        return total, {"loss": ce_sum, "z_loss": z_sum}

    return Objective(
        name="lm",
        features=LM_FEATURES,
        make_module=MossLM,
        loss_sums=loss_sums,
        normalizer=lambda batch: weight_normalizer(batch["decoder_loss_weights"]),
    )


def _pair_batch(batch: dict) -> dict:
    """Chosen and rejected rows stacked into one [2B, L] batch (one forward pass for both)."""
    return {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0) for k in LM_FEATURES}


def _pair_mask(batch: dict) -> jax.Array:
    """[B] 1.0 for real pairs (a trained reply on both sides), 0.0 for padding rows."""
    has = lambda side: jnp.sum(batch[f"{side}_decoder_loss_weights"], axis=1) > 0
    return (has("chosen") & has("rejected")).astype(jnp.float32)


def _pair_normalizer(batch: dict) -> jax.Array:
    return jnp.maximum(jnp.sum(_pair_mask(batch)), 1.0)


def reward_objective() -> Objective:
    def loss_sums(module, params, batch, rng, frozen, deterministic):
        del frozen
        both = _pair_batch(batch)
        scores_2B = last_token_scores(_apply(module, params, both, "", rng, deterministic), both["decoder_segment_ids"])
        chosen_B, rejected_B = jnp.split(scores_2B, 2)
        mask_B = _pair_mask(batch)
        diff_B = chosen_B - rejected_B
        loss = -jnp.sum(jax.nn.log_sigmoid(diff_B) * mask_B)
        metrics = {
            "loss": loss,
            "accuracy": jnp.sum((diff_B > 0) * mask_B),
            "margin": jnp.sum(diff_B * mask_B),
            "score_chosen": jnp.sum(chosen_B * mask_B),
        }
        return loss, metrics

    return Objective(
        name="reward_model",
        features=PAIR_FEATURES,
        make_module=RewardModel,
        loss_sums=loss_sums,
        normalizer=_pair_normalizer,
        init_subtree="lm",
        sequences_per_example=2,
        lm_head=False,
    )


def sequence_logprobs(logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array) -> jax.Array:
    """[B] sum of log p(target) over the weighted tokens (the reply's log-probability)."""
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    tok_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(tok_BxL * weights_BxL.astype(jnp.float32), axis=1)


def dpo_objective(beta: float = 0.1, label_smoothing: float = 0.0) -> Objective:
    """DPO loss -[(1-eps) log sigmoid(beta*m) + eps log sigmoid(-beta*m)] with
    m = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)); eps = label smoothing
    (conservative DPO). Metrics: the implicit-reward pair accuracy (m > 0) and beta*m."""
    if beta <= 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"DPO label_smoothing must be in [0, 0.5), got {label_smoothing}")

    def logps(module, params, both, rng, deterministic):
        logits = _apply(module, params, both, "", rng, deterministic)
        return jnp.split(sequence_logprobs(logits, both["decoder_target_tokens"], both["decoder_loss_weights"]), 2)

    def loss_sums(module, params, batch, rng, frozen, deterministic):
        if frozen is None:
            raise ValueError("the DPO objective needs the frozen reference params")
        both = _pair_batch(batch)
        pi_w, pi_l = logps(module, params, both, rng, deterministic)
        ref_w, ref_l = jax.lax.stop_gradient(logps(module, frozen, both, rng, True))
        margin_B = beta * ((pi_w - ref_w) - (pi_l - ref_l))
        mask_B = _pair_mask(batch)
        per_pair = -(1 - label_smoothing) * jax.nn.log_sigmoid(margin_B) - label_smoothing * jax.nn.log_sigmoid(
            -margin_B
        )
        loss = jnp.sum(per_pair * mask_B)
        metrics = {
            "loss": loss,
            "accuracy": jnp.sum((margin_B > 0) * mask_B),
            "margin": jnp.sum(margin_B * mask_B),
            "reward_chosen": jnp.sum(beta * (pi_w - ref_w) * mask_B),
            "reward_rejected": jnp.sum(beta * (pi_l - ref_l) * mask_B),
        }
        return loss, metrics

    return Objective(
        name="dpo",
        features=PAIR_FEATURES,
        make_module=MossLM,
        loss_sums=loss_sums,
        normalizer=_pair_normalizer,
        needs_reference=True,
        sequences_per_example=2,
        flops_multiplier=4.0 / 3.0,  # policy forward + backward, reference forward
    )
