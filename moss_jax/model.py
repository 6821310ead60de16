"""MossLM: the MOSS/CodeGen decoder in Flax linen.

    logits_BxLxV = MossLM(config).apply({"params": params}, input_ids_BxL)

Optional inputs: `positions` (rotary positions), `segment_ids` (packed sequences
never attend across segments; 0 marks padding), `cache` (a KVCache: prefill then
decode one token at a time; the call then returns `(logits, new_cache)`).
`head=False` returns the final hidden states [B, L, D] instead of the logits (the LM loss
applies the head fused with the cross-entropy, moss_jax/train/head_loss.py);
`last_logits_only=True` the last position's logits [B, 1, V] (a generation prefill).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from moss_jax.config import MossConfig
from moss_jax.kernels.common import ATTENTION_LSE, ATTENTION_OUT
from moss_jax.layers import Block, layer_norm, named_param
from moss_jax.quant import dense
from moss_jax.sharding import RULES, check_axis_names, logical_to_sharding, mesh_rules, with_constraint

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The attention output, and for our kernels (blockwise, pallas_*) the log-sum-exp residual, so
    # the backward pass does not run the attention forward again (moss_jax.kernels.common).
    "save_attention_out": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, ATTENTION_LSE),
    "dots_no_batch_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, ATTENTION_LSE),
    ),
}


@flax.struct.dataclass
class KVCache:
    """Per-layer keys/values for incremental decoding.

    All rows share the write slot `index`; rows of different prompt lengths are
    left-padded (segment id 0), and `lengths` counts each row's real tokens so
    positions stay per-row (like the reference's cumsum(attention_mask) - 1).
    """

    k: jax.Array  # [Y, B, S, H, K], or [Y, B, H, S, K] with config.kv_cache_layout "bhsk"
    v: jax.Array  # same as k
    segment_ids: jax.Array  # [B, S] int32, 0 = empty slot or padding
    lengths: jax.Array  # [B] int32
    index: jax.Array  # [] int32, next slot to write

    @classmethod
    def init(cls, config: MossConfig, batch: int, max_len: int | None = None, dtype: Any = None) -> KVCache:
        max_len = config.max_len if max_len is None else max_len
        dtype = jnp.dtype(config.dtype if dtype is None else dtype)
        shape = (config.n_layers, batch, max_len, config.n_heads, config.head_dim)
        if config.kv_cache_layout == "bhsk":
            shape = (config.n_layers, batch, config.n_heads, max_len, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            segment_ids=jnp.zeros((batch, max_len), jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


def positions_from_segments(segment_ids_BxL: jax.Array) -> jax.Array:
    """Position of each token within its segment (restarts where the segment id changes)."""
    idx_BxL = jnp.broadcast_to(jnp.arange(segment_ids_BxL.shape[1], dtype=jnp.int32), segment_ids_BxL.shape)
    changed = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxL[:, :1], bool), segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1
    )
    start_BxL = lax.cummax(jnp.where(changed, idx_BxL, 0), axis=1)
    return idx_BxL - start_BxL


def check_input_ids(input_ids: Any, vocab_size: int) -> None:
    """Raises ValueError for ids outside [0, vocab_size) when the ids are concrete."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must have shape [batch, length], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        b, i = np.argwhere(bad)[0]
        raise ValueError(
            f"input_ids[{b}, {i}] = {ids[b, i]} is outside the vocabulary [0, {vocab_size}) "
            f"({int(bad.sum())} out-of-range id(s) in total)"
        )


def check_length(input_ids: Any, cache: KVCache | None, max_len: int) -> None:
    """Raises ValueError for an input longer than the context `max_len` or than the cache's room.

    Shapes are always checked; the cache index only when concrete (under jit a chunk past the
    cache's end gives NaN outputs instead, see MossLM).
    """
    b, length = np.shape(input_ids)[:2]
    if cache is None:
        if length > max_len:
            raise ValueError(
                f"input of {length} tokens is longer than the model's context max_len={max_len} "
                "(rotary positions past it were never trained)"
            )
        return
    if cache.segment_ids.shape[0] != b:
        raise ValueError(f"the KV cache holds {cache.segment_ids.shape[0]} rows but the input has batch {b}")
    if length > cache.max_len:
        raise ValueError(f"a {length}-token chunk does not fit the KV cache of {cache.max_len} slots")
    if not isinstance(cache.index, jax.core.Tracer):
        index = int(cache.index)
        if index + length > cache.max_len:
            raise ValueError(
                f"the KV cache is full: a {length}-token chunk at slot index {index} needs "
                f"{index + length} slots, the cache has {cache.max_len}"
            )


def check_positions(positions: Any, max_len: int) -> None:
    """Raises ValueError for a position >= the context `max_len` when the positions are concrete."""
    if isinstance(positions, jax.core.Tracer) or not np.size(positions):
        return
    # np.asarray first: a concrete array closed over by a jitted function would otherwise be
    # reduced by a staged jnp op (a tracer) during tracing.
    top = int(np.max(np.asarray(positions)))
    if top >= max_len:
        raise ValueError(f"position {top} is past the model's context max_len={max_len}")


class MossLM(nn.Module):
    """Decoder-only MOSS/CodeGen language model with an untied, biased head."""

    config: MossConfig

    @nn.compact
    def __call__(
        self,
        input_ids_BxL: jax.Array,
        positions_BxL: jax.Array | None = None,
        segment_ids_BxL: jax.Array | None = None,
        cache: KVCache | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
        head: bool = True,
        last_logits_only: bool = False,
    ):
        cfg = self.config
        check_input_ids(input_ids_BxL, cfg.vocab_size)
        check_length(input_ids_BxL, cache, cfg.max_len)
        # Positions the caller gives, or a cache derives from its rows' lengths, may run past max_len.
        check_positions_later = positions_BxL is not None or cache is not None
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        init = nn.initializers.normal(cfg.initializer_range)

        decode = None
        if cache is not None:
            seg_BxL = (
                jnp.ones_like(input_ids_BxL, jnp.int32)
                if segment_ids_BxL is None
                else segment_ids_BxL.astype(jnp.int32)
            )
            real_BxL = (seg_BxL != 0).astype(jnp.int32)
            if positions_BxL is None:
                positions_BxL = jnp.maximum(cache.lengths[:, None] + jnp.cumsum(real_BxL, axis=1) - 1, 0)
            cache_seg_BxS = lax.dynamic_update_slice(cache.segment_ids, seg_BxL, (0, cache.index))
            decode = (cache_seg_BxS, cache.index)
            segment_ids_BxL = seg_BxL
        elif positions_BxL is None:
            if segment_ids_BxL is None:
                positions_BxL = jnp.broadcast_to(jnp.arange(input_ids_BxL.shape[1]), input_ids_BxL.shape)
            else:
                positions_BxL = positions_from_segments(segment_ids_BxL)
        if check_positions_later:
            check_positions(positions_BxL, cfg.max_len)

        embedding_VxD = named_param(self, "embedding", init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdtype)
        # Out-of-range ids under jit become NaN activations (loud) rather than a clipped row (silent).
        valid_BxL = (input_ids_BxL >= 0) & (input_ids_BxL < cfg.vocab_size)
        # Gather from a replicated table (FSDP-style all-gather); a gather from a vocab-sharded
        # table makes GSPMD fully rematerialise it anyway, with a warning.
        table_VxD = with_constraint(embedding_VxD, (None, None))
        x_BxLxD = jnp.take(table_VxD, jnp.clip(input_ids_BxL, 0, cfg.vocab_size - 1), axis=0)
        x_BxLxD = jnp.where(valid_BxL[..., None], x_BxLxD, jnp.nan).astype(dtype)
        if cfg.dropout_rate:
            x_BxLxD = nn.Dropout(cfg.dropout_rate)(x_BxLxD, deterministic=deterministic)
        x_BxLxD = with_constraint(x_BxLxD, ("batch", "length", "embed"))

        block_cls = Block
        if cfg.remat_policy != "none":
            block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        kv = None if cache is None else (cache.k, cache.v, jnp.zeros((), jnp.int32))
        if cfg.scan_layers:
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            (x_BxLxD, new_kv), _ = stack(cfg, deterministic, name="layers")(
                (x_BxLxD, kv), positions_BxL, segment_ids_BxL, decode
            )
        else:
            carry = (x_BxLxD, kv)
            for i in range(cfg.n_layers):
                carry, _ = block_cls(cfg, deterministic, name=f"layers_{i}")(
                    carry, positions_BxL, segment_ids_BxL, decode
                )
            x_BxLxD, new_kv = carry

        if cache is not None:
            # A chunk past the cache's end would be written clamped over valid slots (wrong logits,
            # no error): where the index is traced (check_length cannot see it) the chunk's outputs
            # become NaN, the way out-of-range ids do.
            fits = cache.index + input_ids_BxL.shape[1] <= cache.max_len
            x_BxLxD = jnp.where(fits, x_BxLxD, jnp.nan).astype(x_BxLxD.dtype)
        x_BxLxD = layer_norm(cfg, "ln_f")(x_BxLxD)
        if cfg.tie_embeddings:
            head_DxV = embedding_VxD.T
        else:
            head_DxV = named_param(
                self, "lm_head_kernel", init, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdtype
            )
        head_bias_V = named_param(self, "lm_head_bias", nn.initializers.zeros, (cfg.vocab_size,), ("vocab",), pdtype)
        if not head:
            # The caller applies the head itself (the LM loss fuses it with the cross-entropy).
            outputs = x_BxLxD
        else:
            # A generation prefill needs the last position's logits only (rows are left-padded).
            head_in_BxLxD = x_BxLxD[:, -1:] if last_logits_only else x_BxLxD
            logits_BxLxV = dense("bld,dv->blv", head_in_BxLxD, head_DxV, jnp.float32)
            logits_BxLxV = logits_BxLxV + head_bias_V.astype(jnp.float32)
            logits_BxLxV = with_constraint(logits_BxLxV, ("batch", "length", "vocab"))
            outputs = (logits_BxLxV, x_BxLxD) if return_hidden else logits_BxLxV
        if cache is None:
            return outputs
        new_cache = KVCache(
            k=new_kv[0],
            v=new_kv[1],
            segment_ids=decode[0],
            lengths=cache.lengths + jnp.sum(segment_ids_BxL != 0, axis=1).astype(jnp.int32),
            index=cache.index + input_ids_BxL.shape[1],
        )
        return outputs, new_cache


# Parameter creation -----------------------------------------------------------------


def head_kernel(params: Any) -> jax.Array:
    """The head's [D, V] kernel: its own param, or the embedding's transpose when tied."""
    if "lm_head_kernel" in params:
        return params["lm_head_kernel"]
    return params["embedding"].T


def _dummy_ids() -> jax.Array:
    return jnp.zeros((1, 1), jnp.int32)


def abstract_params(config: MossConfig) -> Any:
    """Boxed (nn.Partitioned) ShapeDtypeStructs of the parameters; allocates nothing."""
    model = MossLM(config)
    variables = jax.eval_shape(lambda r: model.init(r, _dummy_ids()), jax.random.key(0))
    boxed = variables["params"]
    check_axis_names(boxed)
    return boxed


def count_params(params: Any) -> int:
    """Number of scalars in a (boxed or unboxed, concrete or abstract) parameter tree."""
    leaves = jax.tree_util.tree_leaves(nn.unbox(params))
    return int(sum(np.prod(leaf.shape) for leaf in leaves))


def param_shardings(config: MossConfig, mesh: Mesh, rules=RULES) -> Any:
    """NamedShardings for every parameter, from their logical axis names."""
    return logical_to_sharding(nn.get_partition_spec(abstract_params(config)), mesh, rules)


def init_params(config: MossConfig, rng: jax.Array, *, mesh: Mesh | None = None, rules=RULES) -> Any:
    """Initialises parameters (unboxed); created already sharded when `mesh` is given."""
    model = MossLM(config)

    def init(r):
        return nn.unbox(model.init(r, _dummy_ids())["params"])

    if mesh is None:
        check_axis_names(abstract_params(config))
        return jax.jit(init)(rng)
    shardings = param_shardings(config, mesh, rules)
    with mesh_rules(mesh, rules):
        return jax.jit(init, out_shardings=shardings)(rng)
