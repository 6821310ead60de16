"""TPU generations as data: HBM and peak FLOP/s per chip, and topology descriptions for
ahead-of-time compilation on a host without TPUs (libtpu + `jax.experimental.topologies`).

A topology is `GENERATION:AxBxC` (v4, v5p: 3-D tori; v5e, v6e: 2-D), as `gcloud compute tpus`
and libtpu name them: `v5p:4x4x4` is 64 chips (the v5p-128 slice, 128 TensorCores), `v4:4x4x4`
64 chips (v4-128), `v5e:16x16` 256 chips (v5litepod-256).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str
    hbm_bytes: int  # per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    dims: int  # topology rank (3-D torus or 2-D)
    chip_config: str  # "megacore": one JAX device per chip (two TensorCores), as on the TPU VMs
    accelerator_prefix: str  # gcloud --accelerator-type prefix; the suffix counts TensorCores (v4, v5p) or chips
    cores_per_chip: int  # for the accelerator-type suffix


GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", 32 * 2**30, 275e12, 1.2e12, 3, "megacore", "v4", 2),
    "v5p": Generation("v5p", 95 * 2**30, 459e12, 2.765e12, 3, "megacore", "v5p", 2),
    "v5e": Generation("v5e", 16 * 2**30, 197e12, 0.819e12, 2, "default", "v5litepod", 1),
    "v6e": Generation("v6e", 32 * 2**30, 918e12, 1.64e12, 2, "default", "v6e", 1),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


class TopologyError(ValueError):
    """A topology string that names no known TPU generation or has a malformed shape."""


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: Generation
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def accelerator_type(self) -> str:
        """The gcloud `--accelerator-type` of this slice, e.g. v5p-128 for v5p:4x4x4."""
        g = self.generation
        return f"{g.accelerator_prefix}-{self.chips * g.cores_per_chip}"


def parse_topology(text: str) -> Topology:
    """`v5p:4x4x4` -> Topology; clear errors for unknown generations and malformed shapes."""
    gen_name, sep, shape_text = text.strip().partition(":")
    gen_name = ALIASES.get(gen_name.lower(), gen_name.lower())
    if not sep or gen_name not in GENERATIONS:
        raise TopologyError(
            f"unknown TPU topology {text!r}: expected GENERATION:AxB[xC] with GENERATION one of "
            f"{sorted(GENERATIONS)} (e.g. v5p:4x4x4, v4:4x4x4, v5e:16x16)"
        )
    gen = GENERATIONS[gen_name]
    if not re.fullmatch(r"\d+(x\d+)*", shape_text) or any(int(d) < 1 for d in shape_text.split("x")):
        raise TopologyError(f"topology {text!r}: bad shape {shape_text!r}; expected e.g. 4x4x4")
    shape = tuple(int(d) for d in shape_text.split("x"))
    if len(shape) != gen.dims:
        raise TopologyError(f"topology {text!r}: {gen.name} topologies have {gen.dims} dimensions, got {len(shape)}")
    return Topology(gen, shape)


def topology_devices(topology: Topology) -> list:
    """The JAX devices of a TPU slice of this shape (compile-only: nothing runs on them)."""
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            topology_name=topology.name, platform="tpu", chip_config_name=topology.generation.chip_config
        )
    except Exception as e:  # libtpu rejects shapes it cannot build (e.g. not a multiple of the host bounds)
        raise TopologyError(f"libtpu cannot describe topology {topology.name!r}: {str(e).splitlines()[0]}") from e
    return list(desc.devices)
