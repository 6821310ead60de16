"""Pieces shared by every attention implementation in this package.

Masking follows `moss_jax.attention` exactly: query row i (absolute key index `q_offset + i`)
sees key j iff `q_offset + i >= j` (when causal) and the segment ids match (when given).
Sequences are padded to whole blocks inside the wrappers; a padded key column is hidden by
`kv_len` (the real key count) and a padded query row is sliced off the output, so its
cotangent is zero and it adds nothing to dK/dV.

The online softmax keeps a running row max `m`, a running sum `row_sum` and an unnormalised fp32
accumulator. Masked scores are set to -inf and `m` starts at a large finite negative value,
so a masked entry contributes exactly 0 and a fully masked row ends with row_sum == 0, which we map
to an output of 0: the reference's convention for a query with no visible key.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

# Start value of the running max: finite, so exp(m_prev - m_next) never computes inf - inf.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes: query rows x key columns for the forward and for both backward kernels."""

    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_block(block: int, *, name: str, kernel: str, align: int = 1) -> None:
    """Raises ValueError unless `block` (the field `name`, e.g. "BlockSizes.block_k") is a positive
    int and a multiple of `align`, naming both in the message."""
    if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
        raise ValueError(f"{name}={block!r} must be a positive int for the {kernel}")
    if block % align:
        raise ValueError(f"{name}={block} must be a multiple of {align} for the {kernel}")


def fit_block(block: int, length: int, align: int, *, name: str, kernel: str) -> int:
    """The block actually used: `block`, or the aligned length when the sequence is shorter.

    Raises:
      ValueError: `block` (the field `name` of the `kernel`) is not a positive multiple of `align`.
    """
    check_block(block, name=name, kernel=kernel, align=align)
    return min(block, round_up(length, align))


def check_shapes(q: Any, k: Any, v: Any, *, impl: str, decode: bool = False) -> None:
    """Raises ValueError unless q is [B, L, H, K] (or [B, H, K] with `decode`) and k, v are both
    [B, S, H, K] with q's B, H and K: the layout every kernel here assumes (no grouped-query
    attention, v's head_dim and length those of k). `impl` names the caller in the message."""
    q_shape, k_shape, v_shape = tuple(q.shape), tuple(k.shape), tuple(v.shape)
    q_layout = "[B, H, K]" if decode else "[B, L, H, K]"
    if len(q_shape) != len(q_layout.split(",")) or len(k_shape) != 4 or len(v_shape) != 4:
        raise ValueError(
            f"impl={impl!r}: takes q {q_layout} and k, v [B, S, H, K]; got q {q_shape}, k {k_shape}, v {v_shape}"
        )
    batch, heads, head_dim = q_shape[0], q_shape[-2], q_shape[-1]
    for name, shape in (("k", k_shape), ("v", v_shape)):
        if shape[0] != batch:
            raise ValueError(f"impl={impl!r}: {name} batch ({shape[0]}) != q batch ({batch})")
        if shape[2] != heads:
            raise ValueError(
                f"impl={impl!r}: {name} heads ({shape[2]}) != q heads ({heads}): grouped-query attention "
                "is not supported (repeat the k/v heads to q's count first)"
            )
        if shape[3] != head_dim:
            raise ValueError(f"impl={impl!r}: {name} head_dim ({shape[3]}) != q head_dim ({head_dim})")
    if v_shape[1] != k_shape[1]:
        raise ValueError(f"impl={impl!r}: v length ({v_shape[1]}) != k length ({k_shape[1]})")


def pad_axis(x: jax.Array, axis: int, size: int, value: int | float = 0) -> jax.Array:
    """Pads `x` along `axis` at the end up to `size`."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def pad_tokens(x_BxLxHxK: jax.Array, seq_len: int, head_dim: int) -> jax.Array:
    """[B, L, H, K] zero-padded to `seq_len` tokens and `head_dim` columns (zeros change neither
    q.k nor the kept output columns; padded tokens are masked or sliced off by the caller)."""
    return pad_axis(pad_axis(x_BxLxHxK, 1, seq_len), 3, head_dim)


def pad_segment_ids(q_seg: jax.Array, kv_seg: jax.Array, q_len: int, kv_len: int) -> tuple[jax.Array, jax.Array]:
    """[B, L] / [B, S] segment ids as int32, padded with 0 to `q_len` / `kv_len`."""
    return pad_axis(q_seg.astype(jnp.int32), 1, q_len), pad_axis(kv_seg.astype(jnp.int32), 1, kv_len)


def check_segment_ids(q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None) -> bool:
    """True when segment ids are given; both or neither, as in `moss_jax.attention.make_mask`."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    return q_segment_ids is not None


def offset_array(q_offset: jax.Array | int) -> jax.Array:
    """`q_offset` as int32[1]: a scalar-prefetch operand on TPU, a 1-element ref on GPU."""
    return jnp.reshape(jnp.asarray(q_offset, jnp.int32), (1,))


def visible(
    row_pos: jax.Array,
    col_pos: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    *,
    causal: bool,
    kv_len: int | None,
) -> jax.Array | None:
    """Which (query, key) pairs may attend; positions are absolute key indices. None = all."""
    mask = None

    def both(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if causal:
        mask = both(mask, row_pos >= col_pos)
    if q_seg is not None:
        mask = both(mask, q_seg == kv_seg)
    if kv_len is not None:
        mask = both(mask, col_pos < kv_len)
    return mask


def softmax_update(
    m_prev: jax.Array, l_prev: jax.Array, s: jax.Array, mask: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One online-softmax step on fp32 scores `s` [..., rows, cols] with state [..., rows, 1].

    Returns (m_next, l_next, p, alpha): the caller rescales its accumulator by `alpha` and
    adds `p @ v`.
    """
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next)
    l_next = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
    return m_next, l_next, p, alpha


def softmax_finish(m: jax.Array, row_sum: jax.Array, acc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(normalised output, log-sum-exp); a row that saw no key gets output 0."""
    l_safe = jnp.where(row_sum == 0.0, 1.0, row_sum)
    return acc / l_safe, m + jnp.log(l_safe)


def softmax_grad(
    s: jax.Array, mask: jax.Array | None, lse: jax.Array, dp: jax.Array, delta: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Recomputed probabilities and dScores from fp32 scores, saved lse and delta = rowsum(dO * O).

    Returns (p, ds) with ds = p * (dp - delta), the gradient w.r.t. the scaled scores.
    """
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    p = jnp.exp(s - lse)
    return p, p * (dp - delta)


def dot_precision(dtype: jnp.dtype) -> jax.lax.Precision | None:
    """fp32 inputs ask for full fp32 matmuls (TPU would otherwise use one bf16 pass)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# The names a remat policy can save (moss_jax.model.REMAT_POLICIES): the attention output and, for
# our kernels, the log-sum-exp their backward needs. Saving both spares the backward pass a second
# run of the forward kernel.
ATTENTION_OUT = "attention_out"
ATTENTION_LSE = "attention_lse"


def name_residuals(out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Tags a kernel forward's `out` and `lse` residuals for `jax.checkpoint` policies."""
    return checkpoint_name(out, ATTENTION_OUT), checkpoint_name(lse, ATTENTION_LSE)


_MOSAIC_INTERPRET = contextvars.ContextVar("moss_jax_mosaic_interpret", default=None)


@contextlib.contextmanager
def interpret_mosaic(params: Any):
    """Within (while tracing): `on_platform` runs the `compiled` alternative (the Mosaic GPU
    kernels) wherever one is given, on any platform, and those kernels take `params` as their
    `interpret` (`mgpu_interpret` runs the Hopper kernels in JAX's Mosaic GPU interpreter this way)."""
    if params is None:
        raise ValueError("interpret_mosaic needs the interpreter's parameters")
    token = _MOSAIC_INTERPRET.set(params)
    try:
        yield
    finally:
        _MOSAIC_INTERPRET.reset(token)


def mosaic_interpret() -> Any:
    """The `interpret` argument for Mosaic GPU kernels: None outside `interpret_mosaic`."""
    return _MOSAIC_INTERPRET.get()


def on_platform(fn, *args, platform: str, interpret: bool | None, compiled=None):
    """Runs `fn(*args, interpret=...)`: compiled where the program is lowered for `platform`,
    interpreted elsewhere, unless `interpret` forces one. `compiled`, if given, runs instead of
    the compiled `fn` on `platform` (another kernel for the same result), and everywhere inside
    `interpret_mosaic()`.

    The choice is made at lowering time (`lax.platform_dependent`), not from the host's
    default backend, so a CPU host compiling ahead of time for a TPU topology gets the
    compiled kernel.
    """
    if compiled is not None and mosaic_interpret() is not None:
        return compiled(*args)
    if interpret is not None:
        return fn(*args, interpret=interpret)
    on_target = functools.partial(fn, interpret=False) if compiled is None else compiled
    return jax.lax.platform_dependent(*args, default=functools.partial(fn, interpret=True), **{platform: on_target})
