"""Model configuration: one frozen dataclass, size presets as data.

Shape letters used across the codebase (see docs/architecture.md):
B batch, L query length, S key/value length, D d_model, H heads, K head dim,
F MLP width, V vocab, Y layers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

ACTIVATIONS = ("gelu_new", "gelu", "relu", "silu")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention_out", "dots_no_batch_attention")
ATTENTION_IMPLS = ("xla", "blockwise", "pallas_tpu", "pallas_gpu", "pallas_mgpu", "cudnn", "auto")
# KV cache layouts: [Y, B, S, H, K] (what the Pallas decode kernels read) or [Y, B, H, S, K]
# (XLA:CPU's batched dots read it without a copy; cached attention then runs `xla_attention(kv_layout="bhsk")`).
KV_CACHE_LAYOUTS = ("bshk", "bhsk")


class ConfigError(ValueError):
    """A MossConfig field is invalid or inconsistent with another field."""


# HF CodeGen (and the MOSS remote code) compute rotary frequencies with a fixed base of 10000;
# their config.json has no field for it.
HF_ROTARY_BASE = 10000.0
# MOSS GPTQ releases (moss-moon-003-sft-int4/-int8) mark their config.json with these fields.
GPTQ_FIELDS = ("wbits", "groupsize", "quantization_config")


def _is_real(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class MossConfig:
    """Architecture and numerics of a MOSS/CodeGen model.

    Sizes are fields; derived sizes (head_dim, param counts) are properties.
    `dtype` is the activation/compute dtype; `param_dtype` the storage dtype of
    parameters (fp32 master weights by default).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    mlp_dim: int
    rotary_dim: int
    max_len: int = 2048
    rotary_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    initializer_range: float = 0.02
    dropout_rate: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "xla"
    kv_cache_layout: str = "bshk"
    # True: the head's kernel is the embedding's transpose (no `lm_head_kernel` param; the head
    # keeps its bias). Not MOSS/CodeGen (untied); an option for small models, where it gives
    # in-context copying of any token a prior (docs/architecture.md). HF export writes a copy.
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim", "rotary_dim", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"MossConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"MossConfig.d_model={self.d_model} is not divisible by MossConfig.n_heads={self.n_heads}"
            )
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(
                f"MossConfig.rotary_dim={self.rotary_dim} must be even and at most head_dim="
                f"{self.head_dim} (d_model {self.d_model} / n_heads {self.n_heads})"
            )
        for name in ("rotary_base", "layer_norm_eps", "initializer_range", "dropout_rate"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise ConfigError(f"MossConfig.{name} must be a finite number, got {value!r}")
        for name in ("rotary_base", "layer_norm_eps", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"MossConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(f"MossConfig.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        for name, allowed in (
            ("activation", ACTIVATIONS),
            ("dtype", DTYPES),
            ("param_dtype", DTYPES),
            ("remat_policy", REMAT_POLICIES),
            ("attention_impl", ATTENTION_IMPLS),
            ("kv_cache_layout", KV_CACHE_LAYOUTS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"MossConfig.{name}={getattr(self, name)!r} is not one of {allowed}")
        for name in ("scan_layers", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"MossConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"MossConfig.{name} must be an int or None, got {value!r}")
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"MossConfig.{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    # Derived sizes ---------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def params_per_layer(self) -> int:
        d, f = self.d_model, self.mlp_dim
        attn = 3 * d * d + d * d  # fused qkv + out projection, no biases
        mlp = d * f + f + f * d + d  # fc_in and fc_out with biases
        norm = 2 * d
        return attn + mlp + norm

    @property
    def num_params(self) -> int:
        """Total parameter count (embedding, layers, final norm, head: its kernel unless tied, bias)."""
        d, v = self.d_model, self.vocab_size
        head = v if self.tie_embeddings else d * v + v
        return v * d + self.n_layers * self.params_per_layer + 2 * d + head

    @property
    def num_non_embedding_params(self) -> int:
        return self.num_params - self.vocab_size * self.d_model

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * (params excluding the embedding lookup) plus attention.

        Attention adds 12 * n_layers * d_model * seq_len (QK^T and AV, forward and backward,
        full square; halve it yourself if counting only the causal half).
        """
        matmul_params = self.num_non_embedding_params + (self.d_model * self.vocab_size if self.tie_embeddings else 0)
        return 6.0 * matmul_params + 12.0 * self.n_layers * self.d_model * seq_len

    def replace(self, **changes: Any) -> MossConfig:
        return dataclasses.replace(self, **changes)

    # HF CodeGen / MOSS config.json -------------------------------------------
    @classmethod
    def from_hf(cls, config_dict: Mapping[str, Any], **overrides: Any) -> MossConfig:
        """Builds a config from a HF CodeGen or MOSS `config.json` dict."""
        model_type = config_dict.get("model_type", "codegen")
        if model_type not in ("codegen", "moss"):
            raise ConfigError(f"config.json model_type={model_type!r}: expected 'codegen' or 'moss'")
        if config_dict.get("tie_word_embeddings", False):
            raise ConfigError(
                "config.json tie_word_embeddings=true: MOSS/CodeGen heads are untied (a moss_jax "
                "tie_embeddings model exports an untied copy of its head)"
            )
        gptq = [k for k in GPTQ_FIELDS if config_dict.get(k) is not None]
        if gptq:
            raise ConfigError(
                f"config.json has quantisation field(s) {gptq}: GPTQ-quantized checkpoints are not "
                "supported; use the fp16 release (e.g. fnlp/moss-moon-003-sft) and moss_jax.quant"
            )
        missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if k not in config_dict]
        if missing:
            raise ConfigError(f"config.json is missing field(s) {missing}")
        d_model = config_dict["n_embd"]
        n_heads = config_dict["n_head"]
        n_inner = config_dict.get("n_inner")
        rotary_dim = config_dict.get("rotary_dim")
        # One dropout_rate covers the embedding and the residual branch (to_hf writes it to both).
        embd_pdrop, resid_pdrop = config_dict.get("embd_pdrop"), config_dict.get("resid_pdrop")
        if "dropout_rate" not in overrides and None not in (embd_pdrop, resid_pdrop) and embd_pdrop != resid_pdrop:
            raise ConfigError(
                f"config.json embd_pdrop={embd_pdrop} differs from resid_pdrop={resid_pdrop}: moss_jax has one "
                "dropout_rate for both; pass dropout_rate= to from_hf"
            )
        dropout_rate = resid_pdrop if resid_pdrop is not None else embd_pdrop
        kwargs = dict(
            vocab_size=config_dict["vocab_size"],
            d_model=d_model,
            n_layers=config_dict["n_layer"],
            n_heads=n_heads,
            mlp_dim=4 * d_model if n_inner is None else n_inner,
            rotary_dim=(d_model // n_heads) if rotary_dim is None else rotary_dim,
            max_len=config_dict.get("n_positions", 2048),
            layer_norm_eps=config_dict.get("layer_norm_epsilon", 1e-5),
            activation=config_dict.get("activation_function", "gelu_new"),
            initializer_range=config_dict.get("initializer_range", 0.02),
            dropout_rate=0.0 if dropout_rate is None else dropout_rate,
            bos_token_id=config_dict.get("bos_token_id"),
            eos_token_id=config_dict.get("eos_token_id"),
            pad_token_id=config_dict.get("pad_token_id"),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self, model_type: str = "codegen") -> dict[str, Any]:
        """The HF `config.json` dict for this architecture (CodeGenForCausalLM or MOSS).

        Unset token ids are written as null (HF would otherwise fill in CodeGen's 50256). Raises
        ConfigError for a rotary_base other than 10000, which HF CodeGen/MOSS cannot express.
        """
        if self.rotary_base != HF_ROTARY_BASE:
            raise ConfigError(
                f"MossConfig.rotary_base={self.rotary_base} cannot be exported: HF CodeGen/MOSS fix the "
                f"rotary base at {HF_ROTARY_BASE:g} and config.json has no field for it, so the exported "
                "model would compute different logits"
            )
        out = {
            "architectures": ["CodeGenForCausalLM" if model_type == "codegen" else "MossForCausalLM"],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "n_embd": self.d_model,
            "n_layer": self.n_layers,
            "n_head": self.n_heads,
            "n_inner": self.mlp_dim,
            "rotary_dim": self.rotary_dim,
            "n_positions": self.max_len,
            "n_ctx": self.max_len,
            "layer_norm_epsilon": self.layer_norm_eps,
            "activation_function": self.activation,
            "initializer_range": self.initializer_range,
            "embd_pdrop": self.dropout_rate,
            "resid_pdrop": self.dropout_rate,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": False,
            "torch_dtype": self.param_dtype,
        }
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            out[name] = getattr(self, name)
        return out


def _preset(**kw: Any) -> MossConfig:
    return MossConfig(**kw)


# Sizes as data. CodeGen numbers follow the Salesforce CodeGen-mono/multi releases
# (vocab 51200); moss-moon-003 follows MOSS_SPEC section 1.
PRESETS: dict[str, MossConfig] = {
    "moss-moon-003": _preset(
        vocab_size=107008,
        d_model=6144,
        n_layers=34,
        n_heads=24,
        mlp_dim=24576,
        rotary_dim=64,
        bos_token_id=106028,
        eos_token_id=106068,
        pad_token_id=106068,
    ),
    "6b": _preset(
        vocab_size=51200,
        d_model=4096,
        n_layers=33,
        n_heads=16,
        mlp_dim=16384,
        rotary_dim=64,
        bos_token_id=50256,
        eos_token_id=50256,
    ),
    "2b": _preset(
        vocab_size=51200,
        d_model=2560,
        n_layers=32,
        n_heads=32,
        mlp_dim=10240,
        rotary_dim=64,
        bos_token_id=50256,
        eos_token_id=50256,
    ),
    "350m": _preset(
        vocab_size=51200,
        d_model=1024,
        n_layers=20,
        n_heads=16,
        mlp_dim=4096,
        rotary_dim=32,
        bos_token_id=50256,
        eos_token_id=50256,
    ),
    "125m": _preset(
        vocab_size=51200,
        d_model=768,
        n_layers=12,
        n_heads=12,
        mlp_dim=3072,
        rotary_dim=32,
        bos_token_id=50256,
        eos_token_id=50256,
    ),
    # CPU sizes for debugging and tests; vocab fits the default SentencePiece vocabulary.
    "tiny": _preset(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, mlp_dim=1024, rotary_dim=16, max_len=1024),
    "debug": _preset(vocab_size=512, d_model=64, n_layers=2, n_heads=4, mlp_dim=256, rotary_dim=8, max_len=256),
}


def get_config(name: str, **overrides: Any) -> MossConfig:
    """Looks up a preset by name, applying field overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
