"""Reading and writing checkpoints: HF directories (safetensors or PyTorch .bin, single
or sharded) and our orbax parameter checkpoints.

Both directions stream: HF -> ours holds our parameters plus one HF shard at a time;
ours -> HF writes one safetensors shard at a time. Output directories are written
under a temporary name and renamed into place at the end, so an interrupted
conversion never leaves a half-written checkpoint at the destination.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from moss_jax.config import DTYPES, MossConfig
from moss_jax.convert.mapping import CheckpointError, ParamsBuilder, iter_hf_tensors, tensor_rules

CONFIG_NAME = "moss_config.json"
PARAMS_NAME = "params"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"

logger = logging.getLogger(__name__)


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json in the HF checkpoint directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def hf_weight_files(hf_dir: str | os.PathLike) -> list[Path]:
    """The weight files of a HF checkpoint directory, in index order."""
    hf_dir = Path(hf_dir)
    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        index = hf_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (hf_dir / f).is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists shard file(s) that do not exist: {missing}")
            return [hf_dir / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / single).is_file():
            return [hf_dir / single]
    raise CheckpointError(
        f"{hf_dir}: no weights found (expected {SAFETENSORS_INDEX}, {TORCH_INDEX}, model.safetensors "
        "or pytorch_model.bin)"
    )


def iter_weight_file(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, numpy array) from one safetensors or PyTorch weight file."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        return
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CheckpointError(f"{path}: reading PyTorch .bin files needs torch (pip install 'moss_jax[test]')") from e
    import ml_dtypes

    # Files torch.save wrote with _use_new_zipfile_serialization=False (torch < 1.6 and some old
    # exports) cannot be memory-mapped: those are read whole.
    legacy = not zipfile.is_zipfile(path)
    if legacy:
        logger.warning(
            "%s: a legacy (pre-zip) PyTorch file cannot be memory-mapped; reading all %.1f MiB into memory",
            path,
            path.stat().st_size / 2**20,
        )
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=not legacy)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch state dict: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    for name in list(state):
        tensor = state.pop(name)
        if tensor.dtype == torch.bfloat16:  # numpy has no bf16; reinterpret the bits exactly
            yield name, tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
        else:
            yield name, tensor.numpy()


def load_hf_checkpoint(
    hf_dir: str | os.PathLike, config: MossConfig | None = None, dtype: Any = None, progress: bool = True
) -> tuple[MossConfig, dict]:
    """Reads a HF CodeGen/MOSS checkpoint directory into (config, MossLM params).

    The returned config's `param_dtype` is the dtype the params are stored in (the file's, or
    `dtype`), so a saved checkpoint's config says what it holds.
    """
    config = config or MossConfig.from_hf(read_hf_config(hf_dir))
    builder = ParamsBuilder(config, dtype=dtype, source=str(hf_dir))
    total = len(tensor_rules(config))
    with tqdm(total=total, desc="reading HF tensors", unit="tensor", disable=not progress) as bar:
        for path in hf_weight_files(hf_dir):
            for name, array in iter_weight_file(path):
                builder.add(name, array, where=str(path))
                bar.update(1)
    params = builder.finish()
    stored = np.dtype(_first_leaf(params).dtype).name
    if stored not in DTYPES:  # only a file's own dtype can get here: ParamsBuilder checks `dtype`
        raise CheckpointError(
            f"{hf_dir}: the weights are stored as {stored}, which MossLM parameters cannot be; "
            f"convert with dtype= (--dtype) one of {DTYPES}"
        )
    if stored != config.param_dtype:
        config = config.replace(param_dtype=stored)
    return config, params


@contextlib.contextmanager
def _atomic_dir(out_dir: str | os.PathLike, overwrite: bool):
    """Yields a temporary sibling directory that is renamed to `out_dir` on success."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_params(out_dir: str | os.PathLike, params: Any, config: MossConfig, overwrite: bool = False) -> Path:
    """Writes params (orbax) and the MossConfig (JSON) to `out_dir`, atomically.

    With several processes (a TPU pod) every process must call this with the same `out_dir`:
    orbax writes each process's shards and commits the checkpoint atomically itself, and
    process 0 writes the config after it.
    """
    import jax
    import orbax.checkpoint as ocp

    if jax.process_count() > 1:
        out = Path(out_dir).absolute()
        if (out / PARAMS_NAME).exists() and not overwrite:
            raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(out / PARAMS_NAME, params, force=overwrite)
            ckptr.wait_until_finished()
        if jax.process_index() == 0:
            tmp = out / (CONFIG_NAME + ".tmp")
            tmp.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
            os.replace(tmp, out / CONFIG_NAME)
        return out
    with _atomic_dir(out_dir, overwrite) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_NAME, params)
            ckptr.wait_until_finished()
        (tmp / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    return Path(out_dir)


def load_config(ckpt_dir: str | os.PathLike) -> MossConfig:
    path = Path(ckpt_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; is {ckpt_dir} a moss_jax checkpoint?")
    fields = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(MossConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"{path}: unknown MossConfig field(s) {unknown}")
    return MossConfig(**fields)


def load_params(ckpt_dir: str | os.PathLike, target: Any = None) -> tuple[MossConfig, Any]:
    """Reads (config, params) written by `save_params`; `target` may carry shardings.

    Without a target each array keeps the sharding it was saved with where this process has
    those devices; a checkpoint written on other devices (another device count, or several
    processes) is read whole onto this process's first device instead.
    """
    import jax
    import orbax.checkpoint as ocp

    config = load_config(ckpt_dir)
    args = ocp.args.StandardRestore(target, fallback_sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        params = ckptr.restore(Path(ckpt_dir).absolute() / PARAMS_NAME, args=args)
    return config, params


def save_hf_checkpoint(
    out_dir: str | os.PathLike,
    params: Any,
    config: MossConfig,
    max_shard_bytes: int = 2 * 1024**3,
    model_type: str = "codegen",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Writes a HF checkpoint (config.json + sharded safetensors + index), one shard in memory."""
    from safetensors.numpy import save_file

    # Before any tensor is written: raises for a config HF cannot express (e.g. its rotary base).
    hf_config = config.to_hf(model_type)
    rules = tensor_rules(config)
    # Plan shard boundaries from shapes alone, so each shard is written as soon as it is full.
    itemsize = np.dtype(_first_leaf(params).dtype).itemsize
    plan, size, total = [[]], 0, 0
    for rule in rules:
        nbytes = int(np.prod(rule.hf_shape)) * itemsize
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(rule.hf_name)
        size += nbytes
        total += nbytes
    n = len(plan)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors" for i in range(n)]
    shard_of = {name: i for i, shard in enumerate(plan) for name in shard}
    with _atomic_dir(out_dir, overwrite) as tmp:
        buffer: dict[str, np.ndarray] = {}
        current = 0
        for name, array in tqdm(
            iter_hf_tensors(params, config),
            total=len(rules),
            desc="writing HF tensors",
            unit="tensor",
            disable=not progress,
        ):
            if shard_of[name] != current:
                save_file(buffer, str(tmp / names[current]))
                buffer, current = {}, shard_of[name]
            buffer[name] = array
        save_file(buffer, str(tmp / names[current]))
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in shard_of.items()}}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        hf_config["torch_dtype"] = str(np.dtype(_first_leaf(params).dtype))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return Path(out_dir)


def _first_leaf(params: Any):
    import jax

    return jax.tree_util.tree_leaves(params)[0]


def export_params_from_run(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None, overwrite: bool = False
) -> tuple[int, Path]:
    """Copies the parameters of a training run's checkpoint (latest, or `step`) into a
    params checkpoint (`save_params` layout) that chat, serve, eval and `init_from` read.

    Only the parameters are read (not the optimiser state), each array whole into host memory,
    so a checkpoint written on any mesh (another device count, several processes) exports
    from one process."""
    import jax
    import orbax.checkpoint as ocp

    ckpt_dir = Path(run_dir).absolute() / "checkpoints"
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: no checkpoints directory (is {run_dir} a training workdir?)")
    handlers = {
        "state": ocp.PyTreeCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "model": ocp.JsonCheckpointHandler(),
    }
    with ocp.CheckpointManager(ckpt_dir, item_handlers=handlers) as manager:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise CheckpointError(f"{ckpt_dir}: no checkpoint for step {step}; have {sorted(manager.all_steps())}")
        where = ckpt_dir / str(step) / "state"
        try:
            saved = manager.item_metadata(step)["state"]
        except (KeyError, FileNotFoundError, ValueError) as e:
            raise CheckpointError(f"{where}: unreadable TrainState metadata ({e})") from e
        saved = getattr(saved, "tree", saved)
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), dict):
            raise CheckpointError(f"{where}: holds no 'params' subtree (is {run_dir} a moss_jax training run?)")
        # The saved shardings name the devices the run had; read every parameter whole onto one
        # host device instead, so the export does not depend on this process's devices.
        sharding = _host_sharding()
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved["params"])
        restore_args = jax.tree.map(
            lambda m: ocp.ArrayRestoreArgs(sharding=sharding, global_shape=m.shape, dtype=m.dtype), saved["params"]
        )
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
                ),
                model=ocp.args.JsonRestore(),
            ),
        )
    config = MossConfig(**restored["model"])
    return step, save_params(out_dir, restored["state"]["params"], config, overwrite=overwrite)


def _host_sharding():
    """One device in host memory: the CPU backend where it is loaded, else the first local device."""
    import jax

    try:
        device = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS leaves the CPU backend out
        device = jax.local_devices()[0]
    return jax.sharding.SingleDeviceSharding(device)
