"""Mesh construction and the logical-axis rules table.

Every parameter and constrained activation carries logical axis names from one
small vocabulary; `RULES` maps them onto the four mesh axes. Library code only
ever names logical axes, so changing the parallelism layout is a data change.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
LOGICAL_AXES = ("vocab", "embed", "heads", "head_dim", "mlp", "layers", "batch", "length", "kv_length")

# (logical name, mesh axis or axes). Flax takes the first rule whose mesh axis is still
# unused within one array, so activations (batch, length, embed) shard batch over
# data+fsdp and leave embed replicated, while parameters shard embed over fsdp.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("kv_length", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("head_dim", None),
    ("layers", None),
)


def resolve_axis_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fills a single -1 entry so the product of sizes equals `num_devices`."""
    unknown = [k for k, v in sizes.items() if v == -1]
    if len(unknown) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {unknown}")
    bad = [k for k, v in sizes.items() if v != -1 and (not isinstance(v, int) or v < 1)]
    if bad:
        raise ValueError(f"mesh axis sizes must be positive ints or -1, bad: { {k: sizes[k] for k in bad} }")
    known = math.prod(v for v in sizes.values() if v != -1)
    out = dict(sizes)
    if unknown:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices cannot be split into mesh sizes {sizes}")
        out[unknown[0]] = num_devices // known
    if math.prod(out.values()) != num_devices:
        raise ValueError(f"mesh sizes {out} use {math.prod(out.values())} devices, but {num_devices} are present")
    return out


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    sequence: int = 1,
    *,
    dcn: dict[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a mesh with axes (data, fsdp, tensor, sequence).

    Sizes are per-slice (ICI) sizes; one may be -1 to take what is left. `dcn`
    gives the across-slice sizes for multi-slice runs (e.g. {"data": 2}).
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = {k: 1 for k in MESH_AXES} | (dcn or {})
    unknown = set(dcn) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown DCN mesh axes {sorted(unknown)}; axes are {MESH_AXES}")
    num_slices = math.prod(dcn.values())
    if len(devices) % num_slices:
        raise ValueError(f"{len(devices)} devices do not split into {num_slices} slices")
    ici = resolve_axis_sizes(
        {"data": data, "fsdp": fsdp, "tensor": tensor, "sequence": sequence}, len(devices) // num_slices
    )
    ici_shape = [ici[a] for a in MESH_AXES]
    dcn_shape = [dcn[a] for a in MESH_AXES]
    if num_slices > 1:
        from jax.experimental import mesh_utils

        if hasattr(devices[0], "slice_index"):
            device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices=devices)
        else:  # CPU / single-slice emulation: slices are consecutive runs of devices, DCN axis major.
            n = len(MESH_AXES)
            grid = np.asarray(devices).reshape(dcn_shape + ici_shape)
            grid = grid.transpose([j for i in range(n) for j in (i, n + i)])
            device_array = grid.reshape([d * i for d, i in zip(dcn_shape, ici_shape, strict=True)])
    else:
        try:
            from jax.experimental import mesh_utils

            device_array = mesh_utils.create_device_mesh(ici_shape, devices=devices)
        except (NotImplementedError, ValueError, AssertionError):
            device_array = np.asarray(devices).reshape(ici_shape)
    return Mesh(device_array, MESH_AXES)


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules=RULES) -> Any:
    """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def with_constraint(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Constrains an activation by logical names (a no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, PartitionSpec(*names))


class MissingAxisNamesError(ValueError):
    """A parameter was created without logical axis names."""


def check_axis_names(boxed_params: Any) -> None:
    """Raises if any parameter leaf is not annotated with logical axis names."""
    unnamed = []

    def visit(path, leaf):
        if isinstance(leaf, nn.Partitioned):
            names = leaf.names
            if len(names) != len(leaf.value.shape):
                unnamed.append(f"{jax.tree_util.keystr(path)} (names {names} for rank {len(leaf.value.shape)})")
            for n in names:
                if n is not None and n not in LOGICAL_AXES:
                    unnamed.append(f"{jax.tree_util.keystr(path)} (unknown axis {n!r})")
        else:
            unnamed.append(jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(visit, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    if unnamed:
        raise MissingAxisNamesError("parameters without valid logical axis names: " + ", ".join(unnamed))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules=RULES):
    """Context in which logical constraints resolve on `mesh` (jax.set_mesh + flax rules)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield
