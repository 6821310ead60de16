"""The pure train step `(state, batch[, frozen]) -> (state, metrics)`, shared by every stage.

What is optimised comes from an `Objective` (moss_jax/train/objectives.py): the language-model
loss by default (batch features, t5x names: decoder_input_tokens, decoder_target_tokens,
decoder_segment_ids, decoder_positions, decoder_loss_weights, all [B, L]), the preference model's
Bradley-Terry loss or DPO (chosen_*/rejected_* pair features; DPO also takes the frozen reference
params as `frozen`). Gradient accumulation splits B into `micro_batches` slices and scans over
them; the normaliser is computed on the whole batch, so accumulation equals one full batch.
Accumulation runs in fp32 and the sum is cast back to the params' dtypes before the optimiser,
so the optimiser state keeps its dtypes (bf16 params stay bf16 moments) and the compiled step
can take its own output.
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
from moss_jax.sharding import RULES, mesh_rules
from moss_jax.train.objectives import LM_FEATURES, Objective, feature_dtype, lm_objective
from moss_jax.train.state import TrainState, batch_sharding

FEATURES = LM_FEATURES

log = logging.getLogger(__name__)


def make_train_step(
    model_config: MossConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    micro_batches: int = 1,
    z_loss: float = 0.0,
    objective: Objective | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """The step for `objective` (default: the LM loss with `z_loss`)."""
    objective = objective or lm_objective(z_loss)
    module = objective.make_module(model_config)
    deterministic = not model_config.dropout_rate > 0

    def loss_fn(params, mb, rng, frozen, total):
        loss_sum, metric_sums = objective.loss_sums(module, params, mb, rng, frozen, deterministic)
        return loss_sum / total, metric_sums

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict, frozen: Any = None) -> tuple[TrainState, dict]:
        total = objective.normalizer(batch)
        rng, step_rng = jax.random.split(state.rng)
        if micro_batches == 1:
            grads, sums = grad_fn(state.params, batch, jax.random.wrap_key_data(step_rng), frozen, total)
        else:
            split = jax.tree_util.tree_map(
                lambda x: x.reshape((micro_batches, x.shape[0] // micro_batches) + x.shape[1:]), batch
            )
            rngs = jax.random.wrap_key_data(jax.random.split(step_rng, micro_batches))

            def body(carry, xs):
                g_acc, m_acc = carry
                mb, r = xs
                g, m = grad_fn(state.params, mb, r, frozen, total)
                g_acc = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (g_acc, jax.tree_util.tree_map(jnp.add, m_acc, m)), None

            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            m_shapes = jax.eval_shape(
                grad_fn, state.params, jax.tree_util.tree_map(lambda x: x[0], split), rngs[0], frozen, total
            )[1]
            m_zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), m_shapes)
            (grads, sums), _ = jax.lax.scan(body, (zeros, m_zeros), (split, rngs))
        grad_norm = optax.global_norm(grads)
        # fp32 sums would promote bf16 params' optimiser moments to fp32 (a new state signature).
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        metrics = {k: v / total for k, v in sums.items()}
        metrics.update(
            grad_norm=grad_norm,
            param_norm=optax.global_norm(params),
            learning_rate=schedule(state.step),
            loss_weight=total,
        )
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
    features: tuple[str, ...] = FEATURES,
    abstract_frozen: Any = None,
) -> tuple[Any, dict]:
    """Jits with explicit shardings and donated state, compiles ahead of time, reports memory.

    `abstract_frozen` (ShapeDtypeStructs with shardings) adds the frozen-params argument (DPO's
    reference model), passed on every call and never donated.

    Returns (compiled step, memory/FLOP report dict).
    """
    state_sh = jax.tree_util.tree_map(lambda a: a.sharding, abstract_state)
    b_sh = batch_sharding(mesh)
    abstract_batch = {
        k: jax.ShapeDtypeStruct((global_batch, seq_len), feature_dtype(k), sharding=b_sh) for k in features
    }
    in_shardings = (state_sh, {k: b_sh for k in features})
    args = (abstract_state, abstract_batch)
    if abstract_frozen is not None:
        in_shardings += (jax.tree_util.tree_map(lambda a: a.sharding, abstract_frozen),)
        args += (abstract_frozen,)
    jitted = jax.jit(
        train_step,
        in_shardings=in_shardings,
        out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=(0,),
    )
    with mesh_rules(mesh, rules):
        lowered = jitted.lower(*args)
        check_state_signature(abstract_state, lowered.out_info[0])
        compiled = lowered.compile()
    return compiled, compiled_report(compiled)


def check_state_signature(state_in: Any, state_out: Any) -> None:
    """Raises ValueError naming the first state leaf whose shape or dtype the step changes.

    The step is compiled once for the input state's signature; a state that comes out different
    (e.g. fp32 optimiser moments from bf16 params) would be refused at the next call.
    """
    paths_in, tree_in = jax.tree_util.tree_flatten_with_path(state_in)
    paths_out, tree_out = jax.tree_util.tree_flatten_with_path(state_out)
    if tree_in != tree_out:
        raise ValueError(
            f"the train step returns a state with another tree structure:\n in:  {tree_in}\n out: {tree_out}"
        )
    for (path, a), (_, b) in zip(paths_in, paths_out, strict=True):
        if (tuple(a.shape), jnp.dtype(a.dtype)) != (tuple(b.shape), jnp.dtype(b.dtype)):
            raise ValueError(
                f"the train step changes state{jax.tree_util.keystr(path)} from "
                f"{jnp.dtype(a.dtype).name}{list(a.shape)} to {jnp.dtype(b.dtype).name}{list(b.shape)}; "
                "the compiled step could not take its own output (the state must keep every shape and dtype)"
            )


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
