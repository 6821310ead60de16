"""One JSON line describing the accelerator machine: GPU, driver, library versions, jax devices.

    python bench/gpu_env.py

The first line of bench/gpu_suite.sh's results, so every figure after it is tied to a machine.
Missing pieces (no nvidia-smi, no torch) are reported as null, not as errors.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys


def _nvidia_smi() -> list[dict] | None:
    query = "name,driver_version,memory.total,clocks.max.sm,power.limit,compute_cap"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    keys = query.split(",")
    return [dict(zip(keys, (v.strip() for v in line.split(",")), strict=False)) for line in out.splitlines() if line]


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> int:
    import flax
    import jax

    row = {
        "bench": "env",
        "python": platform.python_version(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "nvidia_smi": _nvidia_smi(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "packages": {
            name: _version(name)
            for name in (
                "jaxlib",
                "jax-cuda13-plugin",
                "jax-cuda13-pjrt",
                "jax-cuda12-plugin",
                "flax",
                "optax",
                "numpy",
                "torch",
                "transformers",
                "triton",
                "gin-config",
            )
        },
        "flax_file": flax.__file__,  # the carried wheel (/tmp/site) or the machine's own
    }
    try:
        from jax._src.lib import cuda_versions

        row["cudnn"] = None if cuda_versions is None else cuda_versions.cudnn_get_version()
    except Exception as e:  # private API: report, do not fail
        row["cudnn"] = f"unknown ({type(e).__name__})"
    if jax.default_backend() == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        row["bytes_limit_gib"] = round(stats.get("bytes_limit", 0) / 2**30, 1)
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
