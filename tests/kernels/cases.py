"""Inputs and the reference comparison shared by the kernel tests."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from moss_jax.attention import xla_attention

# bf16 keeps 8 mantissa bits; the kernels also round p and dS to bf16 before the MXU/tensor-core
# matmuls, the reference does not, so a few bf16 ulps of the output scale is the honest bound;
# fp16 keeps 11, so a quarter of it.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 4e-2, jnp.float16: 1e-2}

# Set by MOSS_KERNEL_TEST_BACKEND=gpu (tests/kernels/conftest.py): the GPU kernels compile for the
# CUDA device (interpret=None) instead of running in the interpreter.
ON_GPU = os.environ.get("MOSS_KERNEL_TEST_BACKEND") == "gpu"
GPU_INTERPRET = None if ON_GPU else True

# Newer jax asks which GPU it lowers for (compute capability) instead of assuming sm_90 when the
# host has none; an abstract device on a one-device abstract mesh names it.
H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")


def cuda_text(fn, *args) -> str:
    """StableHLO of `fn(*args)` lowered for CUDA on this host (an H100 named as the target)."""
    mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=H100)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem: lengths, head_dim, masking and dtype."""

    name: str
    q_len: int
    kv_len: int
    head_dim: int
    causal: bool
    segments: int  # segments per row (packed, trailing padding); 0 = no segment ids; -1 = random ids
    dtype: type = jnp.float32
    q_offset: int = 0
    batch: int = 2
    heads: int = 2

    def __str__(self) -> str:
        return self.name


def packed_segment_ids(batch: int, length: int, segments: int, seed: int) -> np.ndarray:
    """Rows of `segments` packed sequences of random lengths followed by padding (id 0)."""
    rng = np.random.RandomState(seed)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length - 2), segments, replace=False))
        ids = np.zeros(length, np.int32)
        start = 0
        for seg, end in enumerate(cuts, start=1):
            ids[start:end] = seg
            start = end
        rows.append(ids)  # the tail after the last cut stays 0: padding
    return np.stack(rows)


def make_inputs(case: Case, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    b, h, k = case.batch, case.heads, case.head_dim

    def normal(shape):
        return jnp.asarray(rng.randn(*shape), jnp.float32).astype(case.dtype)

    kw = dict(causal=case.causal, q_offset=case.q_offset)
    if case.segments > 0:
        assert case.q_len == case.kv_len, "packed segments are for self-attention cases"
        seg = jnp.asarray(packed_segment_ids(b, case.q_len, case.segments, seed))
        kw.update(q_segment_ids=seg, kv_segment_ids=seg)
    elif case.segments < 0:
        # Random ids also leave some queries with no visible key at all.
        kw.update(
            q_segment_ids=jnp.asarray(rng.randint(0, 2, (b, case.q_len)), jnp.int32),
            kv_segment_ids=jnp.asarray(rng.randint(0, 2, (b, case.kv_len)), jnp.int32),
        )
    return dict(
        q=normal((b, case.q_len, h, k)),
        k=normal((b, case.kv_len, h, k)),
        v=normal((b, case.kv_len, h, k)),
        cotangent=normal((b, case.q_len, h, k)),
        kwargs=kw,
    )


def outputs_and_grads(fn, inputs: dict) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """fn's output and the VJP of a fixed random cotangent w.r.t. q, k, v, under jit."""

    def run(q, k, v, ct):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **inputs["kwargs"]), q, k, v)
        return out, vjp(ct)

    return jax.jit(run)(inputs["q"], inputs["k"], inputs["v"], inputs["cotangent"])


def assert_matches_reference(fn, case: Case, seed: int = 0) -> dict[str, float]:
    """fn's output and dq, dk, dv equal the XLA reference's within the dtype's tolerance; returns
    the max |error| of each."""
    inputs = make_inputs(case, seed)
    out, grads = outputs_and_grads(fn, inputs)
    ref_out, ref_grads = outputs_and_grads(xla_attention, inputs)
    tol = TOLERANCE[case.dtype]
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    errors = {}
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), strict=True):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.all(np.isfinite(got)), f"{case}: {name} has non-finite values"
        np.testing.assert_allclose(got, want, atol=tol, rtol=0, err_msg=f"{case}: {name}")
        errors[name] = float(np.max(np.abs(got - want)))
    return errors
