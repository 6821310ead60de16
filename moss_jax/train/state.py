"""Train state, created already sharded: eval_shape -> logical specs -> jit(init, out_shardings)."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moss_jax.config import MossConfig
from moss_jax.model import MossLM
from moss_jax.sharding import RULES, check_axis_names, logical_to_sharding, mesh_rules


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32, number of optimiser updates applied
    params: Any
    opt_state: Any
    rng: jax.Array  # [2] uint32 raw key (checkpointable); split per step for dropout


def _init_fn(model_config: MossConfig, tx: optax.GradientTransformation, module: type[nn.Module] = MossLM):
    model = module(model_config)

    def init(rng: jax.Array) -> TrainState:
        param_rng, state_rng = jax.random.split(rng)
        boxed = model.init(param_rng, jnp.zeros((1, 1), jnp.int32))["params"]
        # Initialising the optimiser on boxed params gives its moments the params' axis names.
        return TrainState(step=jnp.zeros((), jnp.int32), params=boxed, opt_state=tx.init(boxed), rng=state_rng)

    return init


def state_shardings(
    model_config: MossConfig, tx: optax.GradientTransformation, mesh: Mesh, rules=RULES, module=MossLM
) -> Any:
    """NamedShardings of every TrainState leaf (scalars and the rng replicated).

    `module` is the trained flax module class (MossLM, or RewardModel for the preference model).
    """
    abstract = jax.eval_shape(_init_fn(model_config, tx, module), jax.random.PRNGKey(0))
    check_axis_names(abstract.params)
    return logical_to_sharding(nn.get_partition_spec(abstract), mesh, rules)


def abstract_state(
    model_config: MossConfig, tx: optax.GradientTransformation, mesh: Mesh, rules=RULES, module=MossLM
) -> Any:
    """ShapeDtypeStructs of the (unboxed) TrainState carrying their shardings; allocates nothing."""
    abstract = nn.unbox(jax.eval_shape(_init_fn(model_config, tx, module), jax.random.PRNGKey(0)))
    shardings = state_shardings(model_config, tx, mesh, rules, module)
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def init_train_state(
    model_config: MossConfig, tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh, rules=RULES, module=MossLM
) -> TrainState:
    """A fresh TrainState, every leaf created directly with its sharding."""
    shardings = state_shardings(model_config, tx, mesh, rules, module)
    init = _init_fn(model_config, tx, module)
    with mesh_rules(mesh, rules):
        return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)


def state_from_params(
    params: Any,
    model_config: MossConfig,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    mesh: Mesh,
    rules=RULES,
    module=MossLM,
) -> TrainState:
    """A TrainState at step 0 around given params (e.g. a converted HF checkpoint)."""
    shardings = state_shardings(model_config, tx, mesh, rules, module)
    params = jax.device_put(params, shardings.params)

    def build(p, r):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=r)

    with mesh_rules(mesh, rules):
        return jax.jit(build, out_shardings=shardings)(params, rng)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows split over data and fsdp; length over sequence."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "sequence"))
