"""A checkpoint written on other devices (another device count, or two processes) exports and
loads in a one-device process: orbax must not rebuild the saved shardings, which name devices
this process does not have."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Writes a training-run checkpoint (the Checkpointer layout the trainer uses: state with params,
# optimiser state, rng and step; data; model) and a params checkpoint, both sharded over every
# device of the run (fsdp), plus the parameter values as .npy files for comparison.
SAVE = """
import sys
from pathlib import Path

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from moss_jax.config import MossConfig
from moss_jax.convert.checkpoint_io import save_params
from moss_jax.model import init_params
from moss_jax.sharding import make_mesh
from moss_jax.train.checkpoint import Checkpointer

out, port, rank, nproc = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if nproc > 1:
    from moss_jax import distributed

    distributed.initialize(f"localhost:{port}", nproc, rank, timeout_s=60)
config = MossConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_dim=64, rotary_dim=4, max_len=64)
mesh = make_mesh(fsdp=-1)
params = init_params(config, jax.random.key(0), mesh=mesh)
assert len(jax.tree_util.tree_leaves(params)[0].sharding.device_set) == jax.device_count() > 1
replicated = NamedSharding(mesh, P())
init_opt = optax.adam(1e-3).init
opt_shardings = jax.tree.map(lambda _: replicated, jax.eval_shape(init_opt, params))
opt_state = jax.jit(init_opt, out_shardings=opt_shardings)(params)
state = {
    "step": jax.device_put(np.int32(3), replicated),
    "params": params,
    "opt_state": opt_state,
    "rng": jax.device_put(np.asarray(jax.random.key_data(jax.random.key(1))), replicated),
}
ckpt = Checkpointer(out / "run" / "checkpoints", save_every=1)
ckpt.save(3, state, {"position": 0}, config, {"loss": 1.0}, force=True)
ckpt.close()
save_params(out / "params", params, config)
(out / "npy").mkdir(exist_ok=True)
for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "-".join(str(getattr(k, "key", k)) for k in path)
    whole = multihost_utils.process_allgather(leaf, tiled=True)  # a collective: every process
    if rank == 0:
        np.save(out / "npy" / f"{name}.npy", np.asarray(whole))
print("SAVED", jax.device_count(), flush=True)
"""

# On one device: the CLI export, then load_params of the export and of the sharded params checkpoint.
LOAD = """
import sys
from pathlib import Path

import jax
import numpy as np

from moss_jax.convert.__main__ import main
from moss_jax.convert.checkpoint_io import load_params

out = Path(sys.argv[1])
assert jax.device_count() == 1
assert main(["export", "--run_dir", str(out / "run"), "--out_dir", str(out / "export")]) == 0
for ckpt in ("export", "params"):
    config, params = load_params(out / ckpt)
    assert config.d_model == 32, config
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "-".join(str(getattr(k, "key", k)) for k in path)
        np.testing.assert_array_equal(np.asarray(leaf), np.load(out / "npy" / f"{name}.npy"), err_msg=f"{ckpt} {name}")
print("LOADED", flush=True)
"""


def _env(devices: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env |= {"JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost"}
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("devices,processes", [(4, 1), (1, 2)], ids=["4_devices", "2_processes"])
def test_checkpoint_from_other_devices_exports_and_loads_on_one(tmp_path, devices, processes):
    port = str(_free_port())
    savers = [
        subprocess.Popen(
            [sys.executable, "-c", SAVE, str(tmp_path), port, str(rank), str(processes)],
            cwd=ROOT,
            env=_env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(processes)
    ]
    try:
        for proc in savers:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0 and f"SAVED {devices * processes}" in out, err[-3000:]
    finally:
        for proc in savers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    load = subprocess.run(
        [sys.executable, "-c", LOAD, str(tmp_path)],
        cwd=ROOT,
        env=_env(None),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert load.returncode == 0 and "LOADED" in load.stdout, load.stderr[-3000:]
