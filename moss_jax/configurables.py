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
from moss_jax.stages import tagging
from moss_jax.train import objectives
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
gin.external_configurable(seqio_input.sft_data, module="data_pipelines.seqio_input")
gin.external_configurable(seqio_input.preference_pairs_data, module="data_pipelines.seqio_input")
gin.external_configurable(objectives.lm_objective, module="moss_jax.train")
gin.external_configurable(objectives.reward_objective, module="moss_jax.train")
gin.external_configurable(objectives.dpo_objective, module="moss_jax.train")
gin.external_configurable(tagging.TagConfig, module="moss_jax.stages")

# The objective each stage trains, unless the run gin binds `moss_jax.experiment.objective`.
STAGE_OBJECTIVES = {
    "pretrain": "lm",
    "sft": "lm",
    "preference_aware": "lm",
    "reward_model": "reward_model",
    "dpo": "dpo",
}
STAGES = tuple(STAGE_OBJECTIVES) + ("tag",)


@gin.configurable(module="moss_jax")
def model_config(config: config_lib.MossConfig = gin.REQUIRED) -> config_lib.MossConfig:
    """The model an experiment uses; bind `moss_jax.model_config.config` in a model gin."""
    if not isinstance(config, config_lib.MossConfig):
        raise TypeError(f"moss_jax.model_config.config must be a MossConfig, got {type(config).__name__}")
    return config


@gin.configurable(module="moss_jax")
def experiment(
    stage: str = "pretrain",
    optimizer: optimizer_lib.OptimizerConfig | None = None,
    train: trainer_lib.TrainConfig | None = None,
    data: Callable[..., Any] | None = None,
    mesh: trainer_lib.MeshConfig | None = None,
    objective: objectives.Objective | None = None,
    tag: tagging.TagConfig | None = None,
    preference_tags: str | None = None,
) -> dict:
    """Everything one run needs, bound by an experiment gin (model gin + run gin + overrides).

    Training stages need optimizer, train and data; their objective defaults to the stage's
    (`STAGE_OBJECTIVES`). The `tag` stage needs only `tag`. `preference_tags` (the tag stage's
    preference_tags.json) is copied next to the exported params of a preference-aware run, so
    chat and serve ask for the best tag by default.
    """
    if stage not in STAGES:
        raise ValueError(f"moss_jax.experiment.stage {stage!r} is not one of {STAGES}")
    if stage == "tag":
        if tag is None:
            raise ValueError("the tag stage needs moss_jax.experiment.tag = @moss_jax.stages.TagConfig()")
        return {"stage": stage, "tag": tag}
    missing = [n for n, v in (("optimizer", optimizer), ("train", train), ("data", data)) if v is None]
    if missing:
        raise ValueError(f"stage {stage!r} needs moss_jax.experiment.{', '.join(missing)} bound")
    want = STAGE_OBJECTIVES[stage]
    if objective is None:
        objective = {
            "lm": lambda: objectives.lm_objective(train.z_loss),
            "reward_model": objectives.reward_objective,
            "dpo": objectives.dpo_objective,
        }[want]()
    if objective.name != want:
        raise ValueError(f"stage {stage!r} trains the {want!r} objective, but the gin binds {objective.name!r}")
    return {
        "stage": stage,
        "model": model_config(),
        "optimizer": optimizer,
        "train": train,
        "data": data,
        "mesh": mesh or trainer_lib.MeshConfig(),
        "objective": objective,
        "preference_tags": preference_tags,
    }


def clear() -> None:
    """Forgets every binding (between the stages of one process)."""
    gin.clear_config()


def parse(gin_files: Sequence[str] = (), bindings: Sequence[str] = (), search_paths: Sequence[str] = ()) -> Any:
    """Parses gin files and bindings (e.g. "moss_jax.config.get_config.name = 'tiny'")."""
    for path in search_paths:
        gin.add_config_file_search_path(path)
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings))
