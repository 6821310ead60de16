import pathlib

import gin
import pytest

from moss_jax import configurables
from moss_jax.config import PRESETS, ConfigError

MODELS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "models"
GIN_TO_PRESET = {
    "moss_moon_003": "moss-moon-003",
    "codegen_6b": "6b",
    "codegen_2b": "2b",
    "codegen_350m": "350m",
    "125m": "125m",
    "tiny": "tiny",
    "debug": "debug",
}


@pytest.fixture(autouse=True)
def clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.parametrize("stem", sorted(GIN_TO_PRESET))
def test_model_gins_build_their_preset(stem):
    configurables.parse([str(MODELS / f"{stem}.gin")])
    assert configurables.model_config() == PRESETS[GIN_TO_PRESET[stem]]


def test_every_model_gin_is_covered():
    assert {p.stem for p in MODELS.glob("*.gin")} == set(GIN_TO_PRESET)


def test_binding_overrides_a_field():
    configurables.parse([str(MODELS / "tiny.gin")], ["moss_jax.config.get_config.dtype = 'bfloat16'"])
    assert configurables.model_config() == PRESETS["tiny"].replace(dtype="bfloat16")


def test_bad_binding_names_field():
    configurables.parse([str(MODELS / "tiny.gin")], ["moss_jax.config.get_config.rotary_dim = 7"])
    with pytest.raises(ConfigError, match="rotary_dim"):
        configurables.model_config()
