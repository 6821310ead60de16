import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from moss_jax.config import PRESETS
from moss_jax.model import MossLM, init_params, param_shardings
from moss_jax.sharding import make_mesh, mesh_rules, resolve_axis_sizes

CFG = PRESETS["debug"]


def test_resolve_axis_sizes():
    assert resolve_axis_sizes({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="at most one"):
        resolve_axis_sizes({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="cannot be split"):
        resolve_axis_sizes({"data": 3, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="use 4 devices"):
        resolve_axis_sizes({"data": 2, "fsdp": 2}, 8)


def test_make_mesh_fills_minus_one():
    assert len(jax.devices()) == 8, "tests expect XLA_FLAGS=--xla_force_host_platform_device_count=8"
    mesh = make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    multi = make_mesh(data=1, fsdp=-1, tensor=2, dcn={"data": 2})
    assert dict(multi.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}


def test_sharded_forward_matches_single_device():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    params = init_params(CFG, jax.random.key(0))
    sharded = init_params(CFG, jax.random.key(0), mesh=mesh)
    # Created sharded, with the layout the rules ask for.
    q = sharded["layers"]["attn"]["query"]
    assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert sharded["embedding"].sharding.spec == PartitionSpec("tensor", "fsdp")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, sharded)

    ids = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (4, 16)), jnp.int32)
    ref = jax.jit(lambda p, x: MossLM(CFG).apply({"params": p}, x))(params, ids)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    with mesh_rules(mesh):
        fwd = jax.jit(
            lambda p, x: MossLM(CFG).apply({"params": p}, x),
            in_shardings=(param_shardings(CFG, mesh), batch_sharding),
        )
        out = fwd(sharded, jax.device_put(ids, batch_sharding))
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
