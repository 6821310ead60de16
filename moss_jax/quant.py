"""Quantisation for decoding: int8 weights with one fp32 scale per output channel, or bf16.

    qparams = quantize_params(params, "int8")        # every matmul kernel; the embedding stays fp32
    logits = MossLM(config).apply({"params": qparams}, ids)    # generate/Decoder take qparams too

Modes: "float32" (unchanged), "bfloat16" (kernels cast), "int8" (weight-only, W8A16: activations
stay in the compute dtype) and "int8_dynamic" (W8A8: each matmul also quantises its input rows
to int8 on the fly, one scale per row, and runs an int8 x int8 -> int32 dot).

A quantised kernel is a `QuantizedWeight(q, scale)`: `q` int8 of the kernel's shape and `scale`
fp32 of its output dims (the dims after the contracting ones), symmetric, with `w ~= q * scale`
and |w - q * scale| <= scale / 2. Activations stay in the compute dtype: a matmul converts `q`
to it, sums in fp32 and multiplies the output by the fp32 scale before the cast back (exact,
the scale is per output channel; the unscaled sum would overflow float16). Layers call `dense`
for every kernel, so fp32, bf16 and int8 weights share one code path.

On XLA:CPU a matmul whose weight is converted on the fly streams the weight from memory at its
stored width only when the converted operand stays cache-sized: the layer kernels are, the
vocabulary-sized head is split into `HEAD_CHUNK`-column slices (a loop over column blocks) for
that reason. bf16 weights are stored for completeness (half the memory) but XLA:CPU converts
bf16 slowly, so on CPU they decode slower than fp32 (docs/performance.md).

"int8_dynamic" stores a `DynamicQuantizedWeight`: the same int8 values and scales, but `q` holds
the [N, K] transpose (output channels major, contraction minor). XLA:CPU hands an s8 x s8 -> s32
dot to YNNPACK, which streams the int8 kernel without widening it; it is fastest with the
contraction minor on both sides, and it takes no dot with a single row, so a one-row input is
padded to two (docs/performance.md). YNNPACK repacks the weight on every call, so dots of up to
`int8_cpu.MAX_ROWS` rows (decoding) go to an FFI kernel that streams the weight once
(moss_jax/kernels/int8_cpu.py: AVX512-VNNI, built with the host's C++ compiler at first use, the
same int32 sums bit for bit; the XLA dot when it is unavailable or under a multi-device mesh).
The GPT-J block feeds one layer-norm output to query, key, value and fc_in, so "int8_dynamic"
stores those four as one block-level `FUSED_IN` weight ([3D + F, D]: one activation quantisation
and one dot per layer instead of four; per-channel scales make it the same values as four
separate weights); `Block` uses it when present. The activation scale is max |x| / 127 per row,
so the error grows with a row's outliers; bench/quant_quality.py measures the perplexity cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from moss_jax.kernels import int8_cpu

WEIGHT_MODES = ("float32", "bfloat16", "int8", "int8_dynamic")

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
# int8_dynamic: block-level fused [3D + F, D] weight replacing these kernels, in this order.
FUSED_IN = "fused_in"
FUSED_IN_KERNELS = (("attn", "query"), ("attn", "key"), ("attn", "value"), ("mlp", "fc_in_kernel"))
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


@flax.struct.dataclass
class DynamicQuantizedWeight:
    """int8 kernel for W8A8 matmuls: `q` is the [N, K] transpose of the int8 kernel (N output
    channels, K contracted), stored reshaped to the kernel's shape (flax checks the first leaf's
    shape against the parameter's; a reshape of a row-major array is free), `scale` as in
    `QuantizedWeight`. With stacked layers both carry the leading layer axis."""

    q: jax.Array  # int8, [Y] + kernel shape, holding [Y] + [N, K] row-major
    scale: jax.Array  # fp32, [Y] + output dims
    n_out: int = flax.struct.field(pytree_node=False, default=1)  # output dims of the kernel

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    def transposed(self) -> jax.Array:
        """The int8 [Y..., N, K] matrix (N output channels, K contracted)."""
        lead = self.scale.ndim - self.n_out
        n = int(np.prod(self.scale.shape[lead:]))
        return self.q.reshape(self.q.shape[:lead] + (n, -1))

    def dequantize(self) -> jax.Array:
        lead = self.scale.ndim - self.n_out
        n_contract = self.q.ndim - self.scale.ndim
        kernel_KxN = jnp.swapaxes(self.transposed(), -1, -2).reshape(self.q.shape)
        scale = self.scale.reshape(self.scale.shape[:lead] + (1,) * n_contract + self.scale.shape[lead:])
        return kernel_KxN.astype(jnp.float32) * scale


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


def quantize_int8_dynamic(w: Any, n_contract: int, stacked: bool = False) -> DynamicQuantizedWeight:
    """`quantize_int8`'s values and scales in the W8A8 layout (`DynamicQuantizedWeight`)."""
    qw = quantize_int8(w, n_contract, stacked)
    lead = 1 if stacked else 0
    shape = qw.q.shape
    k = int(np.prod(shape[lead : lead + n_contract]))
    q_KxN = qw.q.reshape(shape[:lead] + (k, -1))
    q_NxK = jnp.swapaxes(q_KxN, -1, -2).reshape(shape)
    return DynamicQuantizedWeight(q=q_NxK, scale=qw.scale, n_out=len(shape) - lead - n_contract)


def quantize_params(params: Mapping, mode: str = "int8") -> dict:
    """A copy of a MossLM parameter tree with every matmul kernel stored as `mode`.

    "float32" returns the tree unchanged; "bfloat16" casts the kernels; "int8" replaces them
    with `QuantizedWeight`s, "int8_dynamic" with `DynamicQuantizedWeight`s, query/key/value/fc_in
    fused into each block's `FUSED_IN` weight. Norms, biases and the embedding table stay as they are.
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
                elif mode == "int8_dynamic":
                    out[name] = quantize_int8_dynamic(value, KERNELS[name], stacked)
                else:
                    out[name] = jnp.asarray(value).astype(jnp.bfloat16)
            else:
                out[name] = value
        if mode == "int8_dynamic" and all(name in tree.get(sub, {}) for sub, name in FUSED_IN_KERNELS):
            out[FUSED_IN] = fuse_dynamic([out[sub].pop(name) for sub, name in FUSED_IN_KERNELS], stacked)
        return out

    return walk(params, False)


def fuse_dynamic(weights: list[DynamicQuantizedWeight], stacked: bool = False) -> DynamicQuantizedWeight:
    """Kernels with the same contraction as one [N1 + N2 + ..., K] W8A8 weight (output dims flattened).

    A dense with it computes every kernel's output, concatenated along the last axis, from one
    quantisation of the input rows; the values equal the separate weights' (per-channel scales).
    """
    lead = 1 if stacked else 0
    q_NxK = jnp.concatenate([w.transposed() for w in weights], axis=-2)
    scale = jnp.concatenate([w.scale.reshape(w.scale.shape[:lead] + (-1,)) for w in weights], axis=-1)
    # Stored reshaped to the [K, N] kernel shape, as every DynamicQuantizedWeight (a free reshape).
    q = q_NxK.reshape(q_NxK.shape[:lead] + q_NxK.shape[lead:][::-1])
    return DynamicQuantizedWeight(q=q, scale=scale, n_out=1)


def weight_bytes(params: Any) -> int:
    """Bytes of every array in a (possibly quantised) parameter tree."""
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)))


def dense(spec: str, x: jax.Array, w: Any, dtype: Any) -> jax.Array:
    """`einsum(spec, x, w)` in `dtype` for a plain or quantised kernel.

    `spec` contracts the kernel's leading dims and puts its output dims last, e.g.
    "bld,dhk->blhk" or "blhk,hkd->bld".
    """
    dtype = jnp.dtype(dtype)
    if isinstance(w, DynamicQuantizedWeight):
        return _dynamic_dense(spec, x, w, dtype)
    if not isinstance(w, QuantizedWeight):
        return jnp.einsum(spec, x.astype(dtype), w.astype(dtype))
    cols = w.q.shape[-1]
    if w.scale.ndim == 1 and cols > HEAD_CHUNK and cols % HEAD_CHUNK == 0:
        return _chunked_dense(spec, x.astype(dtype), w, dtype)
    return _int8_einsum(spec, x.astype(dtype), w.q, w.scale, dtype)


def _int8_einsum(spec: str, x: jax.Array, q: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
    """`einsum(spec, x, q) * scale`, summed and scaled in fp32, then cast to `dtype`.

    The unscaled sum is about 127 / max|w| times the real output, past float16's 65504 for wide
    contractions; and a scale rounded to bfloat16 would be off by up to 2^-9 per channel.
    """
    y = jnp.einsum(spec, x, q.astype(dtype), preferred_element_type=jnp.float32)
    return (y * scale.astype(jnp.float32)).astype(dtype)


def _chunked_dense(spec: str, x: jax.Array, w: QuantizedWeight, dtype: Any) -> jax.Array:
    """The int8 matmul one `HEAD_CHUNK`-column slice at a time (converted slice stays in cache)."""
    n = w.q.shape[-1] // HEAD_CHUNK

    def one(i):
        q = jax.lax.dynamic_slice_in_dim(w.q, i * HEAD_CHUNK, HEAD_CHUNK, axis=w.q.ndim - 1)
        s = jax.lax.dynamic_slice_in_dim(w.scale, i * HEAD_CHUNK, HEAD_CHUNK, axis=0)
        return _int8_einsum(spec, x, q, s, dtype)

    out_NxBx_xC = jax.lax.map(one, jnp.arange(n))
    out = jnp.moveaxis(out_NxBx_xC, 0, -2)  # [..., N, C]
    return out.reshape(out.shape[:-2] + (n * HEAD_CHUNK,))


def quantize_rows(x_MxK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-row int8 of activations: (int8 [M, K], fp32 scale [M, 1]), x ~= q * scale."""
    x_MxK = x_MxK.astype(jnp.float32)
    amax_Mx1 = jnp.max(jnp.abs(x_MxK), axis=-1, keepdims=True)
    scale_Mx1 = jnp.where(amax_Mx1 > 0, amax_Mx1 / 127.0, 1.0)
    return jnp.clip(jnp.round(x_MxK / scale_Mx1), -127, 127).astype(jnp.int8), scale_Mx1


def _dynamic_dense(spec: str, x: jax.Array, w: DynamicQuantizedWeight, dtype: Any) -> jax.Array:
    """W8A8: rows of x quantised to int8, an int8 x int8 -> int32 dot, both scales applied after."""
    inputs, out_letters = spec.replace(" ", "").split("->")
    x_letters, w_letters = inputs.split(",")
    n_out = w.n_out
    n_contract = len(w_letters) - n_out
    if (
        len(w_letters) != w.q.ndim
        or x_letters[len(x_letters) - n_contract :] != w_letters[:n_contract]
        or out_letters != x_letters[: len(x_letters) - n_contract] + w_letters[n_contract:]
    ):
        raise ValueError(f"int8_dynamic dense needs 'lead+contract,contract+out->lead+out', got {spec!r}")
    lead_shape = x.shape[: x.ndim - n_contract]
    k = int(np.prod(x.shape[x.ndim - n_contract :]))
    out_shape = w.scale.shape
    x_MxK = x.reshape(-1, k)
    m = x_MxK.shape[0]
    xq_MxK, xs_Mx1 = quantize_rows(x_MxK)
    if m <= int8_cpu.MAX_ROWS and _use_int8_kernel():
        # Few rows (decoding): the FFI dot streams the weight once, same int32 sums as the XLA dot.
        acc_MxN = int8_cpu.int8_dot_nt(xq_MxK, w.transposed())
    else:
        # YNNPACK takes no single-row dot; XLA's own int8 matrix-vector loop is several times slower.
        xq_PxK = jnp.concatenate([xq_MxK, xq_MxK], axis=0) if m == 1 else xq_MxK
        dims = (((1,), (1,)), ((), ()))
        acc_MxN = jax.lax.dot_general(xq_PxK, w.transposed(), dims, preferred_element_type=jnp.int32)[:m]
    y_MxN = acc_MxN.astype(jnp.float32) * xs_Mx1 * w.scale.reshape(-1)
    return y_MxN.reshape(lead_shape + out_shape).astype(dtype)


def _use_int8_kernel() -> bool:
    """Whether to use the FFI int8 dot: on CPU, outside a multi-device mesh (it has no sharding rule)."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() == "cpu" and (mesh.empty or mesh.size == 1) and int8_cpu.available()
