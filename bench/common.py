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

    On a GPU the XLA CPU thread flags are left out: they do not apply there.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if device != "cpu":
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
    )


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
