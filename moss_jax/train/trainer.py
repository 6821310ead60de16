"""The training loop shared by every stage: sharded state, AOT-compiled step, checkpoints,
progress bar, TensorBoard and JSONL metrics, NaN guard."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from moss_jax.config import MossConfig
from moss_jax.sharding import make_mesh
from moss_jax.train.checkpoint import ARCH_FIELDS, Checkpointer, CheckpointMismatchError
from moss_jax.train.objectives import Objective, lm_objective
from moss_jax.train.optimizer import OptimizerConfig, make_optimizer
from moss_jax.train.state import abstract_state, batch_sharding, init_train_state, state_from_params
from moss_jax.train.step import check_batch_shape, compile_train_step, make_train_step

log = logging.getLogger(__name__)

# Peak dense bf16 FLOP/s per chip, for MFU. CPU has no entry (bench/mfu.py measures it).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p chips report device_kind "TPU v5" (after the "TPU v5 lite" prefix above)
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}

# Fault injection for tests: SIGKILL the process right after the async save of this step starts.
KILL_DURING_SAVE_ENV = "MOSS_JAX_KILL_DURING_SAVE"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    sequence: int = 1
    dcn_data: int = 1  # multi-slice: data-parallel copies across slices
    num_devices: int | None = None  # use only the first n devices (default: all)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    workdir: str
    steps: int
    batch_size: int
    seq_len: int
    micro_batches: int = 1
    z_loss: float = 0.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    init_from: str | None = None  # a moss_jax params checkpoint (python -m moss_jax.convert hf2orbax)
    reference_from: str | None = None  # DPO's frozen reference model (default: init_from)
    peak_flops_per_device: float | None = None  # default: looked up from the device kind
    progress: bool = True

    def __post_init__(self):
        # keep_checkpoints >= 1: the latest checkpoint is what a restarted run resumes from.
        counts = (
            "steps",
            "batch_size",
            "seq_len",
            "micro_batches",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        )
        for name in counts:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        if not self.z_loss >= 0:
            raise ValueError(f"TrainConfig.z_loss must be >= 0, got {self.z_loss!r}")
        if self.peak_flops_per_device is not None and not self.peak_flops_per_device > 0:
            raise ValueError(
                f"TrainConfig.peak_flops_per_device must be > 0 or None, got {self.peak_flops_per_device!r}"
            )


def device_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    for prefix, flops in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    return None


def model_flops_utilization(flops_per_step: float, seconds: float, peak_per_device: float, num_devices: int) -> float:
    """Model FLOPs per second over the peak of the `num_devices` chips that run the step (the mesh's)."""
    return flops_per_step / max(seconds, 1e-9) / (peak_per_device * num_devices)


class NonFiniteError(FloatingPointError):
    """Loss or gradient norm became NaN/inf."""


class Preempted(RuntimeError):
    """The run stopped early at a preemption (a preemption sync point on a multi-host run, or
    SIGTERM on a single process) after writing a checkpoint at `step`; rerunning the same
    command resumes from it. A preempted run is not a finished one: nothing is exported."""

    def __init__(self, step: int, directory: Path):
        self.step, self.directory = step, directory
        super().__init__(f"preempted: checkpoint saved at step {step} in {directory}; rerun the same command to resume")


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop reads after each step, so the step's checkpoint is
    written before the process ends. Installed only in a single-process run's main thread: with
    `jax.distributed` JAX's preemption notifier owns SIGTERM, and orbax's sync point reports it."""

    def __init__(self):
        self.event = threading.Event()
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            from jax._src import distributed as jax_distributed  # no public query for this

            if getattr(jax_distributed.global_state, "preemption_sync_manager", None) is None:
                self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.event.set())
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def _global_batch(
    local: dict[str, np.ndarray], sharding, global_batch: int, features: tuple[str, ...]
) -> dict[str, jax.Array]:
    out = {}
    for k in features:
        if k not in local:
            raise KeyError(f"data pipeline batch is missing feature {k!r} (has {sorted(local)})")
        x = local[k]
        out[k] = jax.make_array_from_process_local_data(sharding, x, (global_batch,) + x.shape[1:])
    return out


def _load_lm_params(ckpt_dir: str, model_config: MossConfig, target: Any) -> Any:
    """Params of a moss_jax params checkpoint, refused before any compute if its model differs."""
    from moss_jax.convert.checkpoint_io import load_config, load_params

    saved = load_config(ckpt_dir)
    diffs = [f for f in ARCH_FIELDS if getattr(saved, f) != getattr(model_config, f)]
    if diffs:
        shown = ", ".join(f"{f}: checkpoint {getattr(saved, f)} vs run {getattr(model_config, f)}" for f in diffs)
        raise CheckpointMismatchError(f"{ckpt_dir} holds params of a different model ({shown})")
    return load_params(ckpt_dir, target=target)[1]


def _check_vocabulary(data: Any, model_config: MossConfig) -> None:
    """The data's token ids must fit the model's embedding: a larger vocabulary would index past
    it (NaN loss under jit, with no hint why). Data sources that know their vocabulary expose
    `vocabulary` = (source, size)."""
    vocab = getattr(data, "vocabulary", None)
    if vocab is None:
        return
    source, size = vocab
    if size > model_config.vocab_size:
        raise ValueError(
            f"the data's vocabulary {source} has {size} pieces, more than the model's vocab_size "
            f"{model_config.vocab_size} (token ids up to {size - 1} would index past the embedding); "
            f"use a model whose vocab_size is at least {size}, or a vocabulary of at most "
            f"{model_config.vocab_size} pieces"
        )


def _trim_metrics(path: Path, last_step: int) -> None:
    """Keeps the rows of `path` (metrics.jsonl) up to `last_step`, the step training (re)starts
    after: rows of later steps, left by a run that crashed or was killed after its last
    checkpoint, would otherwise appear twice once those steps are trained again. Rewritten
    atomically (temporary file and rename); what was removed is printed."""
    if not path.is_file():
        return
    kept, later, unreadable = [], 0, []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
            if isinstance(step, bool) or not isinstance(step, int):
                raise TypeError(f"step is {step!r}")
        except (json.JSONDecodeError, KeyError, TypeError):
            unreadable.append(lineno)  # e.g. a row cut short by the crash
            continue
        if step <= last_step:
            kept.append(line)
        else:
            later += 1
    if not later and not unreadable:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    print(
        f"[train] {path}: removed {later} row(s) of steps after {last_step} (trained again now)"
        + (f" and unreadable line(s) {unreadable}" if unreadable else "")
    )


def train(
    model_config: MossConfig,
    optimizer: OptimizerConfig,
    cfg: TrainConfig,
    data_factory: Callable[..., Any],
    mesh_config: MeshConfig = MeshConfig(),
    objective: Objective | None = None,
) -> dict:
    """Runs (or resumes) training of `objective` (default: the LM loss); returns a summary with
    the loss history and the final state.

    Whatever way it ends (finished, preempted, or an error such as a malformed data line), the
    data source is closed (its `close()`, when it has one), the last checkpoint save is waited
    for and the metric writers are flushed and closed before it returns or raises.
    """
    with contextlib.ExitStack() as cleanup:
        return _train(model_config, optimizer, cfg, data_factory, mesh_config, objective, cleanup)


def _train(
    model_config: MossConfig,
    optimizer: OptimizerConfig,
    cfg: TrainConfig,
    data_factory: Callable[..., Any],
    mesh_config: MeshConfig,
    objective: Objective | None,
    cleanup: contextlib.ExitStack,
) -> dict:
    objective = objective or lm_objective(cfg.z_loss)
    module = objective.make_module
    workdir = Path(cfg.workdir)
    is_chief = jax.process_index() == 0
    # Everything that can be wrong is checked before any compute.
    mesh = make_mesh(
        data=mesh_config.data,
        fsdp=mesh_config.fsdp,
        tensor=mesh_config.tensor,
        sequence=mesh_config.sequence,
        dcn={"data": mesh_config.dcn_data},
        devices=jax.devices()[: mesh_config.num_devices] if mesh_config.num_devices else None,
    )
    check_batch_shape(cfg.batch_size, cfg.seq_len, mesh, cfg.micro_batches)
    if cfg.seq_len > model_config.max_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_len {model_config.max_len}")
    if optimizer.total_steps < cfg.steps:
        log.warning(
            "optimizer.total_steps=%d < steps=%d: the lr stays at its end value afterwards",
            optimizer.total_steps,
            cfg.steps,
        )
    ckpt = Checkpointer(
        workdir / "checkpoints",
        save_every=cfg.checkpoint_every,
        keep=cfg.keep_checkpoints,
        async_save=cfg.async_checkpoint,
    )
    cleanup.callback(ckpt.close)  # waits for the last save
    ckpt.check_model(model_config)
    latest = ckpt.latest_step()
    if latest is not None and latest > cfg.steps:
        raise ValueError(
            f"{ckpt.directory} has a checkpoint at step {latest}, beyond TrainConfig.steps={cfg.steps}: "
            "nothing to train; raise steps to continue that run, or use another workdir"
        )
    tx, schedule = make_optimizer(optimizer)
    abstract = abstract_state(model_config, tx, mesh, module=module)
    ckpt.check_state(abstract)
    reference_dir = cfg.reference_from or cfg.init_from
    if objective.needs_reference and not reference_dir:
        raise ValueError(f"objective {objective.name!r} needs a reference model: set reference_from or init_from")
    data = data_factory(
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if callable(getattr(data, "close", None)):
        cleanup.callback(data.close)
    _check_vocabulary(data, model_config)

    start = ckpt.latest_step()
    if start is not None:
        start, state, data_state = ckpt.restore(abstract)
        data.set_state(data_state)
        print(f"[train] resumed from {ckpt.directory / str(start)}")
        if start == cfg.steps:
            print(f"[train] the checkpoint is already at TrainConfig.steps={cfg.steps}: nothing to train")
    elif cfg.init_from:
        sub = objective.init_subtree
        loaded = _load_lm_params(cfg.init_from, model_config, abstract.params[sub] if sub else abstract.params)
        if sub:  # e.g. the reward model: backbone from the checkpoint, the rest freshly initialised
            fresh = init_train_state(model_config, tx, jax.random.PRNGKey(cfg.seed), mesh, module=module).params
            params = dict(fresh) | {sub: loaded}
        else:
            params = loaded
        state = state_from_params(params, model_config, tx, jax.random.PRNGKey(cfg.seed), mesh, module=module)
        start = 0
        print(f"[train] initialised from {cfg.init_from}" + (f" (into {sub!r})" if sub else ""))
    else:
        state = init_train_state(model_config, tx, jax.random.PRNGKey(cfg.seed), mesh, module=module)
        start = 0
    frozen, abstract_frozen = None, None
    if objective.needs_reference:
        abstract_frozen = abstract.params
        frozen = _load_lm_params(reference_dir, model_config, abstract_frozen)
        print(f"[train] frozen reference model from {reference_dir}")

    step_fn = make_train_step(model_config, tx, schedule, micro_batches=cfg.micro_batches, objective=objective)
    t0 = time.perf_counter()
    compiled, report = compile_train_step(
        step_fn,
        abstract,
        cfg.batch_size,
        cfg.seq_len,
        mesh,
        features=objective.features,
        abstract_frozen=abstract_frozen,
    )
    mem = {k: v for k, v in report.items() if k.endswith("bytes")}
    print(
        f"[train] step compiled in {time.perf_counter() - t0:.1f}s; per-device memory: "
        + ", ".join(
            f"{k.replace('_size_in_bytes', '').replace('_bytes', '')}={v / 2**20:.1f}MiB" for k, v in mem.items()
        )
    )

    peak = cfg.peak_flops_per_device or device_peak_flops()
    # Pair objectives run 2 rows per example, DPO also the reference forward (objectives.py).
    flops_per_step = objective.flops_per_step(model_config, cfg.batch_size, cfg.seq_len)
    tokens_per_step = objective.tokens_per_step(cfg.batch_size, cfg.seq_len)
    b_sharding = batch_sharding(mesh)
    history: list[dict] = []
    writer, jsonl = None, None
    if is_chief:
        workdir.mkdir(parents=True, exist_ok=True)
        from clu import metric_writers

        writer = metric_writers.create_default_writer(str(workdir / "tensorboard"), asynchronous=True)
        cleanup.callback(writer.close)  # flushes
        _trim_metrics(workdir / "metrics.jsonl", start)
        jsonl = cleanup.enter_context(open(workdir / "metrics.jsonl", "a", encoding="utf-8"))
        (workdir / "compile_report.json").write_text(json.dumps(report, indent=2))
    kill_at = int(os.environ.get(KILL_DURING_SAVE_ENV, "-1"))

    def finish_step(step: int, metrics: Any, seconds: float) -> dict:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            ckpt.wait()
            raise NonFiniteError(
                f"step {step}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite; "
                f"last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}"
            )
        m["step"] = step
        m["tokens_per_s"] = tokens_per_step / max(seconds, 1e-9)
        if peak:
            m["mfu"] = model_flops_utilization(flops_per_step, seconds, peak, mesh.devices.size)
        history.append(m)
        if is_chief and (step % cfg.log_every == 0 or step == cfg.steps):
            writer.write_scalars(step, {k: v for k, v in m.items() if k != "step"})
            jsonl.write(json.dumps(m) + "\n")
            jsonl.flush()
        return m

    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not (cfg.progress and is_chief))
    cleanup.callback(bar.close)
    pending = None
    last = time.perf_counter()
    preempted_at = None
    with _SigtermFlag() as sigterm:
        for step in range(start, cfg.steps):
            try:
                local = next(data)
            except StopIteration:
                raise ValueError(
                    f"step {step + 1}: the data source ({type(data).__name__}) has no examples left; training "
                    f"needs an endless stream for TrainConfig.steps={cfg.steps}"
                ) from None
            batch = _global_batch(local, b_sharding, cfg.batch_size, objective.features)
            state, metrics = compiled(state, batch) if frozen is None else compiled(state, batch, frozen)
            # Read step t-1's metrics after launching step t: the host never stalls the device.
            if pending is not None:
                m = finish_step(*pending)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
            now = time.perf_counter()
            pending, last = (step + 1, metrics, now - last), now
            bar.update(1)
            done = step + 1
            # orbax's should_save is true at a multi-host preemption sync point (all hosts agree).
            preempt = ckpt.reached_preemption(done) or sigterm.event.is_set()
            if preempt or ckpt.should_save(done) or done == cfg.steps:
                m = finish_step(*pending)  # a checkpoint is only written for a finite state
                pending = None
                ckpt.save(done, state, data.get_state(), model_config, m, force=True)
                if done == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            if preempt and done < cfg.steps:
                preempted_at = done
                break
        if pending is not None:
            finish_step(*pending)
    # Everything written (the last save included) before the run is reported finished or preempted.
    cleanup.close()
    if preempted_at is not None:
        print(f"[train] preempted after step {preempted_at}; checkpoint saved in {ckpt.directory / str(preempted_at)}")
        raise Preempted(preempted_at, ckpt.directory)
    losses = [m["loss"] for m in history]
    head, tail = losses[: max(len(losses) // 10, 1)], losses[-max(len(losses) // 10, 1) :]
    summary = {
        "start_step": start,
        "end_step": cfg.steps,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "history": history,  # every step's metrics (in-process callers)
        # Mean of the first and last tenth of the run's losses (single steps are noisy).
        "loss_drop": (1 - float(np.mean(tail)) / float(np.mean(head))) if losses else None,
        "tokens_per_s": float(np.median([m["tokens_per_s"] for m in history[1:]])) if len(history) > 1 else None,
        # What tokens_per_s and mfu count (the objective's rows and passes, docs/training.md).
        "tokens_per_step": tokens_per_step,
        "flops_per_step": flops_per_step,
        "compile_report": report,
        "state": state,  # the final TrainState (in-process callers; not written to summary.json)
    }
    if is_chief:
        (workdir / "summary.json").write_text(
            json.dumps({k: v for k, v in summary.items() if k not in ("losses", "history", "state")}, indent=2)
        )
    return summary
