"""Shared tiny training setup for the trainer and checkpoint tests."""

import functools

from data_pipelines.byte_text import stdlib_byte_text
from moss_jax.config import PRESETS
from moss_jax.train.optimizer import OptimizerConfig
from moss_jax.train.trainer import MeshConfig, TrainConfig

CFG = PRESETS["debug"]
OPT = OptimizerConfig(learning_rate=1e-3, warmup_steps=2, total_steps=20)
DATA = functools.partial(stdlib_byte_text, max_bytes=300_000)
ONE = MeshConfig(fsdp=1, num_devices=1)


def train_config(workdir, **kw) -> TrainConfig:
    """3 synchronous steps of batch 8 x 32, logged every step, no periodic checkpoint."""
    base = dict(
        workdir=str(workdir),
        steps=3,
        batch_size=8,
        seq_len=32,
        log_every=1,
        checkpoint_every=100,
        progress=False,
        async_checkpoint=False,
    )
    return TrainConfig(**(base | kw))
