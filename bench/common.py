"""Shared pieces of the benchmarks: thread setup, the HF peer model, alternating timing.

Speed is judged by ratios measured in one process: ours and the peer run alternately
(A, B, A, B, ...) after a warm-up, so machine load hits both sides alike.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def set_threads(threads: int, device: str = "cpu") -> None:
    """Same CPU thread count for XLA and PyTorch; call before importing jax or torch.

    XLA sizes its CPU thread pool from the process's CPU affinity (no flag sets it), so fewer
    threads than the process may use means pinning the process to its first `threads` CPUs, as
    `taskset` would; `torch_threads` then sets PyTorch's count. `cpu_affinity()` reports the
    result for the JSON lines. On a GPU nothing is pinned.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if device != "cpu":
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    allowed = cpu_affinity()
    if threads < 1:
        raise SystemExit(f"error: --threads {threads}: must be >= 1")
    if threads > len(allowed):
        raise SystemExit(f"error: --threads {threads}: this process may use only {len(allowed)} CPUs {allowed}")
    if threads < len(allowed):
        os.sched_setaffinity(0, allowed[:threads])


def default_threads() -> int:
    """All the CPUs this process may use (os.cpu_count() counts CPUs outside its affinity too)."""
    return len(os.sched_getaffinity(0))


def cpu_affinity() -> list[int]:
    """The CPUs this process runs on (XLA's CPU thread pool has one thread per CPU here)."""
    return sorted(os.sched_getaffinity(0))


def torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved round-robin after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def hf_codegen(config, seed: int = 0):
    """A random transformers CodeGenForCausalLM (fp32, eval) of `config`'s architecture, and our params of it."""
    import torch
    import transformers

    from moss_jax.convert import params_from_hf

    torch.manual_seed(seed)
    hf = {"bos_token_id": None, "eos_token_id": None, **config.to_hf(), "torch_dtype": "float32"}
    hf_config = transformers.CodeGenConfig(**hf)
    model = transformers.CodeGenForCausalLM(hf_config).eval()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = params_from_hf(state, config)
    return model, params


def peer_name() -> str:
    import torch
    import transformers

    return f"transformers {transformers.__version__} / torch {torch.__version__}"


def machine() -> dict:
    """What ran the benchmark: CPU model, logical cores, load average at the start."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}


def mosaic_gpu_kernels(hlo_text: str) -> int:
    """How many Mosaic GPU (Pallas Hopper) kernels a lowered program launches (0: none ran, e.g. a
    Hopper setting that fell back to Triton, or a CPU host)."""
    return hlo_text.count("@mosaic_gpu_v2(")
