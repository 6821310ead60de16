"""Multi-host start-up: `jax.distributed.initialize` with clear errors, and which process writes.

On a TPU pod every worker runs the same command; `jax.distributed.initialize()` finds the
coordinator, process count and index from the TPU VM metadata. Elsewhere (CPU debugging with
several local processes, GPU clusters) pass them explicitly or set `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`.

Ownership of writes: every process takes part in checkpoint saves (orbax coordinates them and
the primary host finalises the directory); process 0 alone writes logs, metrics, TensorBoard
events and summaries. Other processes log warnings and errors only, prefixed with their index.
"""

from __future__ import annotations

import dataclasses
import logging
import os

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


class DistributedInitError(RuntimeError):
    """The multi-host runtime could not be started; the message says what to set."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    index: int
    count: int
    local_devices: int
    devices: int

    @property
    def is_chief(self) -> bool:
        return self.index == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedInitError(f"{name}={value!r} is not an integer") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
) -> ProcessInfo:
    """Starts the multi-host runtime (before anything touches a device) and returns this process's place.

    Args:
      coordinator_address: host:port of process 0; None = from `JAX_COORDINATOR_ADDRESS` or the TPU metadata.
      num_processes / process_id: None = from `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` or the TPU metadata.
      timeout_s: how long to wait for every process to join.
    """
    import jax

    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise DistributedInitError(f"process id {process_id} is outside [0, {num_processes}) processes")
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise DistributedInitError(
            "give all of coordinator address, process count and process id (or set all of "
            f"{', '.join(ENV)}), or none of them on a TPU VM; got coordinator_address={coordinator_address!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}"
        )
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s,
        )
    except (RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = (
            "it must run before any JAX computation and only once"
            if "once" in first or "before" in first
            else "on a TPU VM run the same command on every worker (tpu_setup/tpu.sh run); elsewhere set "
            + ", ".join(ENV)
        )
        raise DistributedInitError(f"jax.distributed.initialize failed: {first} ({hint})") from e
    return process_info()


def process_info() -> ProcessInfo:
    import jax

    return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def is_chief() -> bool:
    """Whether this process owns logs, metrics and summaries (process 0)."""
    import jax

    return jax.process_index() == 0


def configure_logging(level: int = logging.INFO) -> None:
    """Process 0 logs at `level`; the others log warnings and errors, every line tagged with the process."""
    import jax

    index, count = jax.process_index(), jax.process_count()
    tag = f"[p{index}/{count}] " if count > 1 else ""
    logging.basicConfig(
        level=level if index == 0 else max(level, logging.WARNING),
        format=f"{tag}%(levelname)s %(name)s: %(message)s",
        force=True,
    )
