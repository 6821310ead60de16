"""The one place where gin meets the library.

Library modules never import gin; entry points import this module, which registers the
constructors experiments may bind (`gin.external_configurable`). Gin files live in
`experiments/` in tiers: a model gin (sizes), later run gins (stage, data, optimiser) and
experiment gins that include one of each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gin

from data_pipelines import byte_text, seqio_input
from moss_jax import config as config_lib
from moss_jax import sharding
from moss_jax.train import optimizer as optimizer_lib
from moss_jax.train import trainer as trainer_lib

gin.external_configurable(config_lib.get_config, module="moss_jax.config")
gin.external_configurable(config_lib.MossConfig, module="moss_jax.config")
gin.external_configurable(sharding.make_mesh, module="moss_jax.sharding")
gin.external_configurable(optimizer_lib.OptimizerConfig, module="moss_jax.train")
gin.external_configurable(trainer_lib.TrainConfig, module="moss_jax.train")
gin.external_configurable(trainer_lib.MeshConfig, module="moss_jax.train")
gin.external_configurable(byte_text.stdlib_byte_text, module="data_pipelines.byte_text")
gin.external_configurable(seqio_input.embedded_pretrain_data, module="data_pipelines.seqio_input")


@gin.configurable(module="moss_jax")
def model_config(config: config_lib.MossConfig = gin.REQUIRED) -> config_lib.MossConfig:
    """The model an experiment uses; bind `moss_jax.model_config.config` in a model gin."""
    if not isinstance(config, config_lib.MossConfig):
        raise TypeError(f"moss_jax.model_config.config must be a MossConfig, got {type(config).__name__}")
    return config


@gin.configurable(module="moss_jax")
def experiment(
    stage: str = "pretrain",
    optimizer: optimizer_lib.OptimizerConfig = gin.REQUIRED,
    train: trainer_lib.TrainConfig = gin.REQUIRED,
    data: Callable[..., Any] = gin.REQUIRED,
    mesh: trainer_lib.MeshConfig | None = None,
) -> dict:
    """Everything one run needs, bound by an experiment gin (model gin + run gin + overrides)."""
    return {
        "stage": stage,
        "model": model_config(),
        "optimizer": optimizer,
        "train": train,
        "data": data,
        "mesh": mesh or trainer_lib.MeshConfig(),
    }


def parse(gin_files: Sequence[str] = (), bindings: Sequence[str] = (), search_paths: Sequence[str] = ()) -> Any:
    """Parses gin files and bindings (e.g. "moss_jax.config.get_config.name = 'tiny'")."""
    for path in search_paths:
        gin.add_config_file_search_path(path)
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings))
