"""The pure train step `(state, batch) -> (state, metrics)`, shared by every stage.

Batch features (t5x names): decoder_input_tokens, decoder_target_tokens, decoder_segment_ids,
decoder_positions, decoder_loss_weights, all [B, L]. Gradient accumulation splits B into
`micro_batches` slices and scans over them; the loss normaliser is the total weight of the
whole batch (see moss_jax/train/loss.py), so accumulation equals one full batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moss_jax.config import MossConfig
from moss_jax.model import MossLM
from moss_jax.sharding import RULES, mesh_rules
from moss_jax.train.loss import normalizer, weighted_cross_entropy
from moss_jax.train.state import TrainState, batch_sharding

FEATURES = (
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_segment_ids",
    "decoder_positions",
    "decoder_loss_weights",
)

log = logging.getLogger(__name__)


def make_train_step(
    model_config: MossConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    micro_batches: int = 1,
    z_loss: float = 0.0,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    model = MossLM(model_config)
    train = model_config.dropout_rate > 0

    def loss_fn(params, mb, rng, total_weight):
        logits = model.apply(
            {"params": params},
            mb["decoder_input_tokens"],
            positions_BxL=mb["decoder_positions"],
            segment_ids_BxL=mb["decoder_segment_ids"],
            deterministic=not train,
            rngs={"dropout": rng} if train else None,
        )
        ce_sum, z_sum = weighted_cross_entropy(logits, mb["decoder_target_tokens"], mb["decoder_loss_weights"], z_loss)
        return (ce_sum + z_sum) / total_weight, (ce_sum, z_sum)

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        total_weight = normalizer(batch["decoder_loss_weights"])
        rng, step_rng = jax.random.split(state.rng)
        if micro_batches == 1:
            grads, (ce_sum, z_sum) = grad_fn(state.params, batch, jax.random.wrap_key_data(step_rng), total_weight)
        else:
            split = jax.tree_util.tree_map(
                lambda x: x.reshape((micro_batches, x.shape[0] // micro_batches) + x.shape[1:]), batch
            )
            rngs = jax.random.split(step_rng, micro_batches)

            def body(carry, xs):
                g_acc, ce_acc, z_acc = carry
                mb, r = xs
                g, (ce, z) = grad_fn(state.params, mb, jax.random.wrap_key_data(r), total_weight)
                g_acc = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (g_acc, ce_acc + ce, z_acc + z), None

            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            (grads, ce_sum, z_sum), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), (split, rngs))
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        metrics = {
            "loss": ce_sum / total_weight,
            "z_loss": z_sum / total_weight,
            "grad_norm": grad_norm,
            "param_norm": optax.global_norm(params),
            "learning_rate": schedule(state.step),
            "loss_weight": jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32)),
        }
        return new_state, metrics

    return train_step


def check_batch_shape(global_batch: int, seq_len: int, mesh: Mesh, micro_batches: int) -> None:
    """Clear errors for batch sizes that cannot be split over the mesh or into micro-batches."""
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % micro_batches:
        raise ValueError(f"batch size {global_batch} is not divisible by micro_batches={micro_batches}")
    if (global_batch // micro_batches) % data_ways:
        raise ValueError(
            f"micro-batch size {global_batch // micro_batches} (batch {global_batch} / micro_batches "
            f"{micro_batches}) is not divisible by the data axes data*fsdp = {data_ways}"
        )
    if seq_len % mesh.shape["sequence"]:
        raise ValueError(f"sequence length {seq_len} is not divisible by the sequence axis {mesh.shape['sequence']}")


def compile_train_step(
    train_step: Callable,
    abstract_state: Any,
    global_batch: int,
    seq_len: int,
    mesh: Mesh,
    rules=RULES,
) -> tuple[Any, dict]:
    """Jits with explicit shardings and donated state, compiles ahead of time, reports memory.

    Returns (compiled step, memory/FLOP report dict).
    """
    state_sh = jax.tree_util.tree_map(lambda a: a.sharding, abstract_state)
    b_sh = batch_sharding(mesh)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(
            (global_batch, seq_len), jnp.float32 if k == "decoder_loss_weights" else jnp.int32, sharding=b_sh
        )
        for k in FEATURES
    }
    jitted = jax.jit(
        train_step,
        in_shardings=(state_sh, {k: b_sh for k in FEATURES}),
        out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=(0,),
    )
    with mesh_rules(mesh, rules):
        compiled = jitted.lower(abstract_state, abstract_batch).compile()
    return compiled, compiled_report(compiled)


def compiled_report(compiled: Any) -> dict:
    """Per-device memory (bytes) and FLOPs of a compiled program, where the backend reports them."""
    report: dict = {}
    try:
        mem = compiled.memory_analysis()
    except Exception:  # backends without memory analysis
        mem = None
    if mem is not None:
        for field in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "alias_size_in_bytes",
            "generated_code_size_in_bytes",
        ):
            report[field] = int(getattr(mem, field, 0) or 0)
        report["total_bytes"] = (
            report["argument_size_in_bytes"]
            + report["output_size_in_bytes"]
            + report["temp_size_in_bytes"]
            - report["alias_size_in_bytes"]
        )
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and "flops" in cost:
            report["flops"] = float(cost["flops"])
    except Exception:
        pass
    return report
