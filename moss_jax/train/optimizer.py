"""AdamW with warmup + decay, weight-decay masks and global-norm clipping (optax)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimiser hyper-parameters. `total_steps` is where the decay ends."""

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 10_000
    schedule: str = "cosine"
    end_lr_ratio: float = 0.1  # final lr = learning_rate * end_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimizerConfig.schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.warmup_steps < 0 or self.total_steps <= 0:
            raise ValueError(
                f"OptimizerConfig: warmup_steps={self.warmup_steps} must be >= 0 and total_steps={self.total_steps} > 0"
            )
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"OptimizerConfig.warmup_steps={self.warmup_steps} exceeds total_steps={self.total_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}")


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0, then cosine / linear decay to `end_lr_ratio`, or constant."""
    end = cfg.learning_rate * cfg.end_lr_ratio
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.learning_rate, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.learning_rate)
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def _decays(path) -> bool:
    name = str(getattr(path[-1], "key", path[-1]))
    # No decay on biases or LayerNorm parameters (the MOSS SFT script decayed everything).
    return not (name == "bias" or name.endswith("_bias") or name == "scale")


def weight_decay_mask(params: Any) -> Any:
    """True where weight decay applies: kernels and embeddings; False for biases and norms."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _decays(path), params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def make_optimizer(cfg: OptimizerConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain (clip -> AdamW with masked decay) and its learning-rate schedule."""
    schedule = make_schedule(cfg)
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    )
    return optax.chain(*parts), schedule
