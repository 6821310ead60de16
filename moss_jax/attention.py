"""The model's single attention entry point.

`attention` is the only function the model calls; faster implementations (Pallas
kernels, blockwise XLA) plug in behind `impl`. Masking semantics, shared by all
implementations:

* query i (at absolute index `q_offset + i` in the key sequence) may attend key j
  only if `q_offset + i >= j` when `causal`;
* and only if `q_segment_ids[b, i] == kv_segment_ids[b, j]` when segment ids are
  given (0 marks padding; packed sequences use 1, 2, ...).

Scores and softmax are computed in float32; the output has the dtype of `v`. k and v are
[B, S, H, K] with q's B, H and K: every implementation but the reference raises a ValueError for
other shapes (`kernels.common.check_shapes`; no grouped-query attention).

Implementations (`impl`, also `MossConfig.attention_impl`):

* "xla": the reference below; materialises the [B, H, L, S] scores.
* "blockwise": XLA loops over key blocks with an online softmax (moss_jax/kernels/blockwise.py).
* "pallas_tpu" / "pallas_gpu": Pallas flash-attention kernels (Mosaic / Triton); a one-token
  query (the KV-cache decode step) uses the decode kernel instead, whose gradient, when one is
  taken, is the flash kernel's. Off their platform they run in the Pallas interpreter, which is how
  the tests check them on CPU.
* "pallas_mgpu": "pallas_gpu" whose forward and backward passes are Hopper kernels written in Pallas
  Mosaic GPU (warp-specialised, TMA, wgmma; moss_jax/kernels/flash_mgpu.py, flash_mgpu_bwd.py) for
  bf16/fp16 training calls (`q_offset` 0) on an H100/H200 (the backward for head_dim <= 128);
  elsewhere exactly "pallas_gpu".
* "cudnn": cuDNN's flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`,
  bf16/fp16 on a CUDA GPU only. Segment ids become a boolean [B, 1, L, S] mask (cuDNN takes it as
  a bias: correct, O(L^2) memory and slower than without); a call with a `q_offset` (the KV-cache
  prefill and decode steps) runs "pallas_gpu", since cuDNN's causal mask starts at key 0.
* "auto": "pallas_tpu" when lowered for TPU, "pallas_mgpu" for CUDA (the Hopper kernels for
  training calls on an H100/H200, "pallas_gpu" otherwise), "blockwise" elsewhere, chosen at
  lowering time (so an ahead-of-time TPU compile on a CPU host gets the kernel).

See docs/kernels.md for the design and measurements.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moss_jax.kernels import blockwise, common, decode_gpu, decode_tpu, flash_gpu, flash_tpu, partition

_IMPLS: dict[str, Callable[..., jax.Array]] = {}


def register(name: str):
    """Registers an attention implementation under `name`."""

    def wrap(fn):
        _IMPLS[name] = fn
        return fn

    return wrap


def make_mask(
    q_len: int,
    kv_len: int,
    *,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    causal: bool,
    q_offset: jax.Array | int = 0,
) -> jax.Array | None:
    """Boolean mask [B or 1, 1, L, S] (True = may attend), or None when unmasked."""
    mask = None
    if causal:
        q_idx = jnp.arange(q_len)[:, None] + q_offset
        kv_idx = jnp.arange(kv_len)[None, :]
        mask = (q_idx >= kv_idx)[None, None]
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None:
        seg = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
        mask = seg if mask is None else jnp.logical_and(mask, seg)
    return mask


@register("xla")
def xla_attention(
    q_BxLxHxK: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
    kv_layout: str = "bshk",
) -> jax.Array:
    """Reference attention: materialises the [B, H, L, S] score matrix in fp32.

    `kv_layout`: keys/values as [B, S, H, K] ("bshk") or [B, H, S, K] ("bhsk", the CPU KV cache:
    the two dots then batch over (B, H) with S and K in place, so XLA:CPU reads the cache as it
    is; with [B, S, H, K] it copies each layer's cache to [B, H, ...] first, on every token).
    """
    if kv_layout not in ("bshk", "bhsk"):
        raise ValueError(f"kv_layout must be 'bshk' or 'bhsk', got {kv_layout!r}")
    head_dim = q_BxLxHxK.shape[-1]
    scores_BxHxLxS = jnp.einsum(f"blhk,{kv_layout}->bhls", q_BxLxHxK.astype(jnp.float32), k.astype(jnp.float32)) * (
        1.0 / jnp.sqrt(jnp.float32(head_dim))
    )
    mask = make_mask(
        q_BxLxHxK.shape[1],
        scores_BxHxLxS.shape[-1],
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        causal=causal,
        q_offset=q_offset,
    )
    if mask is not None:
        scores_BxHxLxS = jnp.where(mask, scores_BxHxLxS, jnp.finfo(jnp.float32).min)
    probs_BxHxLxS = jax.nn.softmax(scores_BxHxLxS, axis=-1)
    # A fully masked row (a padding query with no visible key) gets zeros, not a uniform average.
    if mask is not None:
        probs_BxHxLxS = jnp.where(mask, probs_BxHxLxS, 0.0)
    out = jnp.einsum(f"bhls,{kv_layout}->blhk", probs_BxHxLxS, v.astype(jnp.float32))
    return out.astype(v.dtype)


def _kernel_attention(
    flash: Callable[..., jax.Array], decode: Callable[..., jax.Array], name: str
) -> Callable[..., jax.Array]:
    """A Pallas implementation (registered as `name`): the flash kernel, or the decode kernel for
    one query per row, whose gradient is the flash kernel's (the decode kernel has no VJP)."""

    def run_flash(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, q_segment_ids, kv_segment_ids, offset, causal):
        return flash(
            q_BxLxHxK,
            k_BxSxHxK,
            v_BxSxHxK,
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            causal=causal,
            q_offset=offset,
        )

    def run_decode(q_Bx1xHxK, k_BxSxHxK, v_BxSxHxK, q_segment_ids, kv_segment_ids, offset, causal):
        # Causal with one query at absolute index `offset`: keys 0..offset are visible.
        length = offset + 1 if causal else k_BxSxHxK.shape[1]
        out_BxHxK = decode(
            q_Bx1xHxK[:, 0],
            k_BxSxHxK,
            v_BxSxHxK,
            jnp.broadcast_to(jnp.asarray(length, jnp.int32), (q_Bx1xHxK.shape[0],)),
            q_segment_ids_B=None if q_segment_ids is None else q_segment_ids[:, 0],
            kv_segment_ids_BxS=kv_segment_ids,
        )
        return out_BxHxK[:, None]

    # The decode kernel forward, the flash kernel's VJP backward (it recomputes the one-row forward:
    # O(S), like the decode step itself), so a one-token query can be differentiated too.
    one_query = jax.custom_vjp(run_decode, nondiff_argnums=(6,))

    def one_query_fwd(q, k, v, q_segment_ids, kv_segment_ids, offset, causal):
        out = run_decode(q, k, v, q_segment_ids, kv_segment_ids, offset, causal)
        return out, (q, k, v, q_segment_ids, kv_segment_ids, offset)

    def one_query_bwd(causal, res, do):
        q, k, v, q_segment_ids, kv_segment_ids, offset = res
        _, vjp = jax.vjp(lambda q, k, v: run_flash(q, k, v, q_segment_ids, kv_segment_ids, offset, causal), q, k, v)
        return (*vjp(do), None, None, None)

    one_query.defvjp(one_query_fwd, one_query_bwd)

    def local(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, q_segment_ids, kv_segment_ids, offset, *, causal):
        run = run_flash if q_BxLxHxK.shape[1] > 1 else one_query
        return run(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, q_segment_ids, kv_segment_ids, offset, causal)

    def impl(
        q_BxLxHxK: jax.Array,
        k_BxSxHxK: jax.Array,
        v_BxSxHxK: jax.Array,
        *,
        q_segment_ids: jax.Array | None = None,
        kv_segment_ids: jax.Array | None = None,
        causal: bool = True,
        q_offset: jax.Array | int = 0,
    ) -> jax.Array:
        common.check_shapes(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, impl=name)
        common.check_segment_ids(q_segment_ids, kv_segment_ids)
        return partition.shard_map_attention(
            functools.partial(local, causal=causal),
            q_BxLxHxK,
            k_BxSxHxK,
            v_BxSxHxK,
            q_segment_ids,
            kv_segment_ids,
            q_offset,
        )

    return impl


register("blockwise")(blockwise.blockwise_attention)
pallas_tpu_attention = register("pallas_tpu")(
    _kernel_attention(flash_tpu.flash_attention_tpu, decode_tpu.decode_attention_tpu, "pallas_tpu")
)
pallas_gpu_attention = register("pallas_gpu")(
    _kernel_attention(flash_gpu.flash_attention_gpu, decode_gpu.decode_attention_gpu, "pallas_gpu")
)


def _hopper_flash(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, *, q_segment_ids, kv_segment_ids, causal, q_offset):
    del q_offset  # zero: `pallas_mgpu_attention` routes only static-zero offsets here
    return flash_gpu.flash_attention_gpu(
        q_BxLxHxK,
        k_BxSxHxK,
        v_BxSxHxK,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        causal=causal,
        forward="mosaic",
        backward="mosaic",
    )


_pallas_hopper_attention = _kernel_attention(_hopper_flash, decode_gpu.decode_attention_gpu, "pallas_mgpu")


@register("pallas_mgpu")
def pallas_mgpu_attention(
    q_BxLxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
) -> jax.Array:
    """The Hopper (Mosaic GPU) forward and backward kernels where they apply
    (`flash_gpu.flash_attention_gpu(forward="mosaic", backward="mosaic")`), else "pallas_gpu";
    KV-cache calls (a `q_offset`) run "pallas_gpu" unchanged."""
    common.check_shapes(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, impl="pallas_mgpu")
    kw = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal)
    if isinstance(q_offset, int) and q_offset == 0 and q_BxLxHxK.shape[1] > 1:
        return _pallas_hopper_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, **kw)
    return pallas_gpu_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, q_offset=q_offset, **kw)


def dot_product_attention(
    q_BxLxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    *,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    causal: bool,
    implementation: str,
) -> jax.Array:
    """`jax.nn.dot_product_attention` with this module's masking, for `q_offset` 0 (its causal mask
    starts at key 0): segment ids as a boolean mask, and zeros for a query that sees no key."""
    mask = None
    if common.check_segment_ids(q_segment_ids, kv_segment_ids):
        mask = make_mask(
            q_BxLxHxK.shape[1],
            k_BxSxHxK.shape[1],
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            causal=False,
        )
    out = jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask, is_causal=causal, implementation=implementation
    )
    if mask is not None:  # a fully masked row would average every value; the reference gives 0
        causal_mask = make_mask(
            q_BxLxHxK.shape[1], k_BxSxHxK.shape[1], q_segment_ids=None, kv_segment_ids=None, causal=causal
        )
        seen = mask if causal_mask is None else jnp.logical_and(mask, causal_mask)
        seen_BxLx1x1 = jnp.any(seen, axis=-1).transpose(0, 2, 1)[..., None]
        out = jnp.where(seen_BxLx1x1, out, jnp.zeros((), out.dtype))
    return out


@register("cudnn")
def cudnn_attention(
    q_BxLxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
) -> jax.Array:
    """cuDNN flash attention (bf16/fp16, CUDA GPU); KV-cache calls (a `q_offset`) run "pallas_gpu"."""
    kw = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal)
    if not (isinstance(q_offset, int) and q_offset == 0):
        return pallas_gpu_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, q_offset=q_offset, **kw)
    if jax.default_backend() != "gpu":
        raise ValueError(
            f"attention impl 'cudnn' needs a CUDA GPU (this host's backend is {jax.default_backend()!r}); "
            "use 'pallas_gpu', 'auto' or 'xla'"
        )
    dtypes = {jnp.dtype(x.dtype) for x in (q_BxLxHxK, k_BxSxHxK, v_BxSxHxK)}
    if not dtypes <= {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)}:
        raise ValueError(
            f"attention impl 'cudnn' takes bfloat16 or float16 q/k/v, got {sorted(d.name for d in dtypes)}; "
            "use 'pallas_gpu' for float32 (MossConfig.dtype='bfloat16' computes in bf16)"
        )
    return dot_product_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, implementation="cudnn", **kw)


@register("auto")
def auto_attention(
    q_BxLxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
) -> jax.Array:
    """The TPU kernel on TPU, the GPU kernels on CUDA ("pallas_mgpu": the Hopper kernels for
    training calls on an H100/H200, the Triton ones otherwise), blockwise XLA elsewhere (chosen at
    lowering time)."""
    common.check_shapes(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, impl="auto")
    # A Python-int offset stays static (the Hopper kernels take only the int 0); a traced one is an operand.
    static_offset = isinstance(q_offset, int)

    def branch(fn):
        def run(q, k, v, q_seg, kv_seg, *offset):
            offset = q_offset if static_offset else offset[0]
            return fn(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal, q_offset=offset)

        return run

    operands = (q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, q_segment_ids, kv_segment_ids)
    if not static_offset:
        operands += (jnp.asarray(q_offset, jnp.int32),)
    return jax.lax.platform_dependent(
        *operands,
        tpu=branch(pallas_tpu_attention),
        cuda=branch(pallas_mgpu_attention),
        default=branch(blockwise.blockwise_attention),
    )


def available_impls() -> tuple[str, ...]:
    return tuple(sorted(_IMPLS))


def attention(
    q_BxLxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
    impl: str = "xla",
) -> jax.Array:
    """Multi-head attention [B, L, H, K] x [B, S, H, K] -> [B, L, H, K] (see module doc)."""
    if impl not in _IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; available: {available_impls()}")
    return _IMPLS[impl](
        q_BxLxHxK,
        k_BxSxHxK,
        v_BxSxHxK,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        causal=causal,
        q_offset=q_offset,
    )
