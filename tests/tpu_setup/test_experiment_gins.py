"""The 16B pod experiment gins: each parses, trains the LM step of its stage and has a mesh and
batch that split over the chips of the topology it names (the compiles themselves are in docs/tpu.md)."""

import re
from pathlib import Path

import gin
import pytest

from moss_jax import configurables
from moss_jax.sharding import resolve_axis_sizes
from tpu_setup import aot_compile
from tpu_setup.topology import parse_topology

ROOT = Path(__file__).resolve().parents[2]
STAGE_DIRS = {"pretrain": "pretrain", "sft": "sft", "preference_aware": "preference_aware"}
# Pod gins name the topology they were compiled for in their check command; base gins do not.
POD_GINS = sorted(
    p
    for d in STAGE_DIRS.values()
    for p in (ROOT / "experiments" / d).glob("moss_16b*.gin")
    if "--topology=" in p.read_text()
)


def test_every_stage_has_v4_v5e_and_v5p_pod_gins():
    generations = {(p.parent.name, parse_topology(_topology(p)).generation.name) for p in POD_GINS}
    assert generations == {(d, g) for d in STAGE_DIRS.values() for g in ("v4", "v5e", "v5p")}


def _topology(path: Path) -> str:
    match = re.search(r"--topology=(\S+)", path.read_text())
    assert match, f"{path} names no --topology in its check command"
    return match.group(1)


@pytest.fixture
def parsed(monkeypatch):
    monkeypatch.chdir(ROOT)

    def parse(path: Path) -> dict:
        files = [str(path.relative_to(ROOT))]
        gin.clear_config()
        configurables.parse(files, [], ["."])
        data_ref = gin.query_parameter("moss_jax.experiment.data")
        # As aot_compile does: the data factory (corpora on the pod's disks) is never built here.
        gin.clear_config()
        configurables.parse(files, ["moss_jax.experiment.data = @tpu_setup.aot_compile.no_data"], ["."])
        return configurables.experiment() | {"data_ref": data_ref}

    yield parse
    gin.clear_config()


@pytest.mark.parametrize("path", POD_GINS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_pod_gin_splits_over_its_topology(parsed, path):
    exp = parsed(path)
    topology = parse_topology(_topology(path))
    assert exp["stage"] in aot_compile.TRAIN_STEP_STAGES and STAGE_DIRS[exp["stage"]] == path.parent.name
    model, train, m = exp["model"], exp["train"], exp["mesh"]
    assert (model.n_layers, model.d_model, model.vocab_size, model.dtype) == (34, 6144, 107008, "bfloat16")
    assert train.seq_len == 2048
    sizes = resolve_axis_sizes(
        {"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor, "sequence": m.sequence}, topology.chips
    )
    assert (train.batch_size // train.micro_batches) % (sizes["data"] * sizes["fsdp"]) == 0
    assert train.batch_size % train.micro_batches == 0
    factory = exp["data_ref"].configurable.name
    if exp["stage"] == "pretrain":
        assert factory == "embedded_pretrain_data" and train.init_from is None
    else:
        assert factory == "sft_data" and train.init_from
        mixture = gin.query_parameter("data_pipelines.seqio_input.sft_data.mixture")
        # MOSS's SFT trains both the plain and the plugin conversations (MOSS_SPEC section 4).
        assert mixture == ("moss_sft_tagged" if exp["stage"] == "preference_aware" else "moss_sft_and_plugin")


def test_docs_table_has_every_pod_gin():
    docs = (ROOT / "docs" / "tpu.md").read_text()
    missing = [p.stem for p in POD_GINS if f"| {p.stem} |" not in docs]
    assert not missing, f"docs/tpu.md has no compile result for {missing}"
