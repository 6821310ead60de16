"""Weight-only quantisation for decoding: int8 with one fp32 scale per output channel, or bf16.

    qparams = quantize_params(params, "int8")        # every matmul kernel; the embedding stays fp32
    logits = MossLM(config).apply({"params": qparams}, ids)    # generate/Decoder take qparams too

A quantised kernel is a `QuantizedWeight(q, scale)`: `q` int8 of the kernel's shape and
`scale` fp32 of its output dims (the dims after the contracting ones), symmetric, with
`w ~= q * scale` and |w - q * scale| <= scale / 2. Activations stay in the compute dtype: a
matmul converts `q` to it and multiplies the output by the scale (exact, the scale is per
output channel). Layers call `dense` for every kernel, so fp32, bf16 and int8 weights share one
code path.

On XLA:CPU a matmul whose weight is converted on the fly streams the weight from memory at its
stored width only when the converted operand stays cache-sized: the layer kernels are, the
vocabulary-sized head is split into `HEAD_CHUNK`-column slices (a loop over column blocks) for
that reason. bf16 weights are stored for completeness (half the memory) but XLA:CPU converts
bf16 slowly, so on CPU they decode slower than fp32 (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

WEIGHT_MODES = ("float32", "bfloat16", "int8")

# Kernel name -> number of contracting (input) dims after the optional stacked-layers axis.
KERNELS = {
    "query": 1,
    "key": 1,
    "value": 1,
    "out": 2,
    "fc_in_kernel": 1,
    "fc_out_kernel": 1,
    "lm_head_kernel": 1,
}
# Output columns per slice of a chunked int8 matmul (see module docstring).
HEAD_CHUNK = 2048


@flax.struct.dataclass
class QuantizedWeight:
    """int8 kernel `q` (first leaf: flax checks its shape against the parameter's) and its scales."""

    q: jax.Array  # int8, the kernel's shape
    scale: jax.Array  # fp32, the kernel's output dims

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    def dequantize(self) -> jax.Array:
        n_contract = self.q.ndim - self.scale.ndim
        return self.q.astype(jnp.float32) * self.scale.reshape((1,) * n_contract + self.scale.shape)


def quantize_int8(w: Any, n_contract: int, stacked: bool = False) -> QuantizedWeight:
    """Symmetric per-output-channel int8: scale = max |w| over the contracting dims / 127.

    Args:
      w: the kernel, contracting dims first ([Y] + contracting + output when `stacked`).
      n_contract: how many contracting dims follow the optional stacked axis.
      stacked: whether axis 0 stacks layers (each layer gets its own scales).
    """
    w = jnp.asarray(w, jnp.float32)
    lead = 1 if stacked else 0
    axes = tuple(range(lead, lead + n_contract))
    amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return QuantizedWeight(q=q, scale=jnp.squeeze(scale, axis=axes))


def quantize_params(params: Mapping, mode: str = "int8") -> dict:
    """A copy of a MossLM parameter tree with every matmul kernel stored as `mode`.

    "float32" returns the tree unchanged; "bfloat16" casts the kernels; "int8" replaces them
    with `QuantizedWeight`s. Norms, biases and the embedding table stay as they are.
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weights mode {mode!r} is not one of {WEIGHT_MODES}")
    if mode == "float32":
        return params

    def walk(tree: Mapping, stacked: bool) -> dict:
        out = {}
        for name, value in tree.items():
            if isinstance(value, Mapping):
                out[name] = walk(value, stacked or name == "layers")
            elif name in KERNELS:
                if mode == "int8":
                    out[name] = quantize_int8(value, KERNELS[name], stacked)
                else:
                    out[name] = jnp.asarray(value).astype(jnp.bfloat16)
            else:
                out[name] = value
        return out

    return walk(params, False)


def weight_bytes(params: Any) -> int:
    """Bytes of every array in a (possibly quantised) parameter tree."""
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)))


def dense(spec: str, x: jax.Array, w: Any, dtype: Any) -> jax.Array:
    """`einsum(spec, x, w)` in `dtype` for a plain or quantised kernel.

    `spec` contracts the kernel's leading dims and puts its output dims last, e.g.
    "bld,dhk->blhk" or "blhk,hkd->bld".
    """
    dtype = jnp.dtype(dtype)
    if not isinstance(w, QuantizedWeight):
        return jnp.einsum(spec, x.astype(dtype), w.astype(dtype))
    cols = w.q.shape[-1]
    if w.scale.ndim == 1 and cols > HEAD_CHUNK and cols % HEAD_CHUNK == 0:
        return _chunked_dense(spec, x.astype(dtype), w, dtype)
    return jnp.einsum(spec, x.astype(dtype), w.q.astype(dtype)) * w.scale.astype(dtype)


def _chunked_dense(spec: str, x: jax.Array, w: QuantizedWeight, dtype: Any) -> jax.Array:
    """The int8 matmul one `HEAD_CHUNK`-column slice at a time (converted slice stays in cache)."""
    n = w.q.shape[-1] // HEAD_CHUNK

    def one(i):
        q = jax.lax.dynamic_slice_in_dim(w.q, i * HEAD_CHUNK, HEAD_CHUNK, axis=w.q.ndim - 1)
        s = jax.lax.dynamic_slice_in_dim(w.scale, i * HEAD_CHUNK, HEAD_CHUNK, axis=0)
        return jnp.einsum(spec, x, q.astype(dtype)) * s.astype(dtype)

    out_NxBx_xC = jax.lax.map(one, jnp.arange(n))
    out = jnp.moveaxis(out_NxBx_xC, 0, -2)  # [..., N, C]
    return out.reshape(out.shape[:-2] + (n * HEAD_CHUNK,))
