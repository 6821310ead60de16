"""Conversion between HF CodeGen/MOSS PyTorch checkpoints and MossLM parameters."""

from moss_jax.convert.mapping import (
    CheckpointError,
    ParamsBuilder,
    iter_hf_tensors,
    params_from_hf,
    params_to_hf,
    stack_layers,
    tensor_rules,
    unstack_layers,
)

__all__ = [
    "CheckpointError",
    "ParamsBuilder",
    "iter_hf_tensors",
    "params_from_hf",
    "params_to_hf",
    "stack_layers",
    "tensor_rules",
    "unstack_layers",
]
