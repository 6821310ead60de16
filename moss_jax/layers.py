"""The GPT-J parallel block of MOSS/CodeGen: rotary attention and MLP off one LayerNorm.

    h = x + attn(ln(x)) + mlp(ln(x))

Every parameter is created with logical axis names (see moss_jax/sharding.py). Kernels go
through `moss_jax.quant.dense`, so the same layers run fp32, bf16 or int8 (weight-only) kernels.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from moss_jax.attention import attention, xla_attention
from moss_jax.config import MossConfig
from moss_jax.kernels.common import ATTENTION_OUT
from moss_jax.quant import FUSED_IN, dense
from moss_jax.sharding import with_constraint

ACTIVATION_FNS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def named_param(module: nn.Module, name: str, init, shape: tuple[int, ...], names: tuple[str, ...], dtype):
    """Creates a parameter annotated with logical axis names."""
    if len(names) != len(shape):
        raise ValueError(f"{module.name}/{name}: {len(names)} axis names {names} for shape {shape}")
    return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def layer_norm(config: MossConfig, name: str) -> nn.LayerNorm:
    """LayerNorm computed in fp32, output in the compute dtype.

    Two-pass variance (mean of squared deviations, as torch): flax's default E[x^2] - E[x]^2
    loses the variance of rows whose mean is large next to their spread.
    """
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=jnp.float32,
        use_fast_variance=False,
        param_dtype=jnp.dtype(config.param_dtype),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def apply_rotary(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, rotary_dim: int, base: float) -> jax.Array:
    """GPT-J interleaved rotary ("rotate every two") on the first `rotary_dim` dims, in fp32."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    angles_BxLxR = positions_BxL.astype(jnp.float32)[:, :, None] * inv_freq  # R = rotary_dim / 2
    sin = jnp.sin(angles_BxLxR)[:, :, None, :]
    cos = jnp.cos(angles_BxLxR)[:, :, None, :]
    x_rot = x_BxLxHxK[..., :rotary_dim].astype(jnp.float32)
    x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x_rot.shape)
    return jnp.concatenate([rotated.astype(x_BxLxHxK.dtype), x_BxLxHxK[..., rotary_dim:]], axis=-1)


class Attention(nn.Module):
    """Multi-head self-attention with partial rotary; optional KV cache.

    The cache is the whole stacked [Y, B, S, H, K] pair ([Y, B, H, S, K] with `kv_cache_layout`
    "bhsk") plus this layer's index: the layer writes its new keys/values into its own slot in
    place (a carried buffer, so XLA updates it without copying the cache every step) and reads
    its slice back for attention.
    """

    config: MossConfig

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        positions_BxL: jax.Array,
        segment_ids_BxL: jax.Array | None,
        kv_cache: tuple[jax.Array, jax.Array, jax.Array] | None,
        decode: tuple[jax.Array, jax.Array] | None,
        qkv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array] | None]:
        """`qkv`: the projections already computed by the block (fused int8_dynamic weight)."""
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d, h, k = cfg.d_model, cfg.n_heads, cfg.head_dim
        init = nn.initializers.normal(cfg.initializer_range)
        # Parameters are created query, key, value, out: flax draws each one's init from the module's
        # rng in creation order, so this order keeps a seed's initial weights unchanged.
        if qkv is None:
            w_q, w_k, w_v = (
                named_param(self, n, init, (d, h, k), ("embed", "heads", "head_dim"), pdtype)
                for n in ("query", "key", "value")
            )
        w_o = named_param(self, "out", init, (h, k, d), ("heads", "head_dim", "embed"), pdtype)

        if qkv is None:
            x_BxLxD = x_BxLxD.astype(dtype)
            q_BxLxHxK = dense("bld,dhk->blhk", x_BxLxD, w_q, dtype)
            k_BxLxHxK = dense("bld,dhk->blhk", x_BxLxD, w_k, dtype)
            v_BxLxHxK = dense("bld,dhk->blhk", x_BxLxD, w_v, dtype)
        else:
            q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = qkv
        q_BxLxHxK = apply_rotary(q_BxLxHxK, positions_BxL, cfg.rotary_dim, cfg.rotary_base)
        k_BxLxHxK = apply_rotary(k_BxLxHxK, positions_BxL, cfg.rotary_dim, cfg.rotary_base)
        q_BxLxHxK = with_constraint(q_BxLxHxK, ("batch", "length", "heads", "head_dim"))

        if kv_cache is None:
            out_BxLxHxK = attention(
                q_BxLxHxK,
                k_BxLxHxK,
                v_BxLxHxK,
                q_segment_ids=segment_ids_BxL,
                kv_segment_ids=segment_ids_BxL,
                causal=True,
                impl=cfg.attention_impl,
            )
            # A remat policy may save it (moss_jax.model.REMAT_POLICIES).
            out_BxLxHxK = checkpoint_name(out_BxLxHxK, ATTENTION_OUT)
            new_cache = None
        else:
            # Write this chunk's keys/values at the shared slot index of this layer, attend over
            # the layer's whole cache.
            cache_segment_ids_BxS, index = decode
            k_cache, v_cache, layer = kv_cache
            if cfg.kv_cache_layout == "bhsk":
                k_new, v_new = k_BxLxHxK.transpose(0, 2, 1, 3), v_BxLxHxK.transpose(0, 2, 1, 3)
                start, cached_attention = (layer, 0, 0, index, 0), functools.partial(xla_attention, kv_layout="bhsk")
            else:
                k_new, v_new = k_BxLxHxK, v_BxLxHxK
                start, cached_attention = (layer, 0, index, 0, 0), functools.partial(attention, impl=cfg.attention_impl)
            k_cache = lax.dynamic_update_slice(k_cache, k_new.astype(k_cache.dtype)[None], start)
            v_cache = lax.dynamic_update_slice(v_cache, v_new.astype(v_cache.dtype)[None], start)
            out_BxLxHxK = cached_attention(
                q_BxLxHxK,
                lax.dynamic_index_in_dim(k_cache, layer, keepdims=False).astype(dtype),
                lax.dynamic_index_in_dim(v_cache, layer, keepdims=False).astype(dtype),
                q_segment_ids=segment_ids_BxL,
                kv_segment_ids=cache_segment_ids_BxS,
                causal=True,
                q_offset=index,
            )
            new_cache = (k_cache, v_cache, layer + 1)
        y_BxLxD = dense("blhk,hkd->bld", out_BxLxHxK, w_o, dtype)
        return y_BxLxD, new_cache


class Mlp(nn.Module):
    """fc_in -> activation -> fc_out, with biases."""

    config: MossConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, fc_in_BxLxF: jax.Array | None = None) -> jax.Array:
        """`fc_in_BxLxF`: x @ fc_in_kernel already computed by the block (fused int8_dynamic weight)."""
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        init = nn.initializers.normal(cfg.initializer_range)
        zeros = nn.initializers.zeros
        if fc_in_BxLxF is None:
            w_in = named_param(self, "fc_in_kernel", init, (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), pdtype)
            fc_in_BxLxF = dense("bld,df->blf", x_BxLxD, w_in, dtype)
        b_in = named_param(self, "fc_in_bias", zeros, (cfg.mlp_dim,), ("mlp",), pdtype)
        w_out = named_param(self, "fc_out_kernel", init, (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"), pdtype)
        b_out = named_param(self, "fc_out_bias", zeros, (cfg.d_model,), ("embed",), pdtype)
        h_BxLxF = fc_in_BxLxF + b_in.astype(dtype)
        h_BxLxF = ACTIVATION_FNS[cfg.activation](h_BxLxF)
        h_BxLxF = with_constraint(h_BxLxF, ("batch", "length", "mlp"))
        return dense("blf,fd->bld", h_BxLxF, w_out, dtype) + b_out.astype(dtype)


class Block(nn.Module):
    """One GPT-J parallel block. Signature fits `nn.scan`: (carry, *broadcast) -> (carry, None),
    with carry = (x, cache), cache = None or (stacked k, stacked v, layer index)."""

    config: MossConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, carry: Any, positions_BxL: jax.Array, segment_ids_BxL: jax.Array | None, decode: Any):
        cfg = self.config
        x_BxLxD, kv_cache = carry
        x_BxLxD = with_constraint(x_BxLxD, ("batch", "length", "embed"))
        h_BxLxD = layer_norm(cfg, "ln")(x_BxLxD).astype(jnp.dtype(cfg.dtype))
        qkv = fc_in_BxLxF = None
        if self.has_variable("params", FUSED_IN):
            # int8_dynamic weights (moss_jax.quant): query, key, value and fc_in read the same
            # input, so they are one [3D + F, D] weight: one activation quantisation, one dot.
            fused_BxLxN = dense("bld,dn->bln", h_BxLxD, self.get_variable("params", FUSED_IN), jnp.dtype(cfg.dtype))
            d = cfg.d_model
            qkv_shape = h_BxLxD.shape[:2] + (cfg.n_heads, cfg.head_dim)
            qkv = tuple(fused_BxLxN[..., i * d : (i + 1) * d].reshape(qkv_shape) for i in range(3))
            fc_in_BxLxF = fused_BxLxN[..., 3 * d :]
        attn_BxLxD, new_cache = Attention(cfg, name="attn")(
            h_BxLxD, positions_BxL, segment_ids_BxL, kv_cache, decode, qkv
        )
        mlp_BxLxD = Mlp(cfg, name="mlp")(h_BxLxD, fc_in_BxLxF)
        branch_BxLxD = attn_BxLxD + mlp_BxLxD
        if cfg.dropout_rate:
            branch_BxLxD = nn.Dropout(cfg.dropout_rate)(branch_BxLxD, deterministic=self.deterministic)
        out_BxLxD = (x_BxLxD + branch_BxLxD).astype(jnp.dtype(cfg.dtype))
        return (with_constraint(out_BxLxD, ("batch", "length", "embed")), new_cache), None
