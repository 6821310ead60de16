"""Running a Pallas attention kernel on a device mesh.

XLA cannot partition a Pallas custom call (Mosaic refuses outright on a multi-device
program), so the kernels run inside `jax.shard_map` over the mesh set by `jax.set_mesh`
(`moss_jax.sharding.mesh_rules` sets it): batch and heads are split the way the logical rules
split the activations ("batch", "heads"), and each device runs the kernel on its own rows and
heads. Attention needs whole sequences, so the length axes are gathered (a "sequence" mesh axis
would need ring attention, which we do not have). A dimension that does not divide evenly is
left whole on every device rather than failing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def fit_axes(entry, dim: int, mesh) -> tuple[str, ...] | None:
    """The mesh axes of `entry` that exist, are not already manual, and divide `dim`."""
    usable = {n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t != jax.sharding.AxisType.Manual}
    axes = tuple(a for a in _axes(entry) if a in usable)
    if not axes or dim % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes


def shard_map_attention(
    fn: Callable[..., jax.Array],
    q_BxLxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    q_offset: jax.Array | int,
) -> jax.Array:
    """Calls `fn(q, k, v, q_seg, kv_seg, offset)` per device when a multi-device mesh is set."""
    offset = jnp.asarray(q_offset, jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, q_segment_ids, kv_segment_ids, offset)
    batch, _, heads, _ = q_BxLxHxK.shape
    logical = nn.logical_to_mesh_axes(("batch", "heads"))
    batch_axes, head_axes = fit_axes(logical[0], batch, mesh), fit_axes(logical[1], heads, mesh)
    if batch_axes and head_axes and set(batch_axes) & set(head_axes):
        head_axes = None
    act = PartitionSpec(batch_axes, None, head_axes, None)
    seg = None if q_segment_ids is None else PartitionSpec(batch_axes, None)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(act, act, act, seg, seg, PartitionSpec()),
        out_specs=act,
        # Pallas outputs carry no varying-axes annotation; the specs above are the contract.
        check_vma=False,
    )(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, q_segment_ids, kv_segment_ids, offset)
