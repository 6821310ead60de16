import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("gin_file", sorted((ROOT / "experiments" / "models").glob("*.gin")), ids=lambda p: p.name)
def test_model_gin_documented_override_flag_parses(gin_file):
    """The header's example flag is one `python -m moss_jax.main` accepts, and it binds."""
    from moss_jax import configurables
    from moss_jax.main import build_parser

    header = "".join(line[1:] for line in gin_file.read_text().splitlines() if line.startswith("#"))
    example = re.search(r"python -m moss_jax\.main \.\.\. (--\S+=\"[^\"]*\")", header)
    assert example, f'{gin_file.name}: no `python -m moss_jax.main ... --flag="binding"` example in the header'
    args = build_parser().parse_args([f"--gin_file={gin_file}", *shlex.split(example.group(1))])
    assert args.gin_bindings == ["moss_jax.config.get_config.dtype = 'bfloat16'"]
    configurables.clear()
    try:
        configurables.parse(args.gin_file, args.gin_bindings, [str(ROOT)])
        assert configurables.model_config().dtype == "bfloat16"
    finally:
        configurables.clear()


@pytest.mark.slow
def test_tiny_cpu_pretraining_loss_falls(tmp_path):
    """The README's main experiment: loss falls >= 30% within its default step budget. Run as a
    user runs it, on this host's one CPU device: not on the 8 devices this suite's conftest gives
    JAX (XLA_FLAGS), which only slow it down on 2 cores (sharded training has its own tests)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moss_jax.main",
            "--gin_file=experiments/debug/pretrain_tiny_cpu.gin",
            f"--gin_bindings=moss_jax.train.TrainConfig.workdir = '{tmp_path}'",
            "--gin_bindings=moss_jax.train.TrainConfig.progress = False",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["start_step"] == 0 and result["end_step"] == 300
    assert result["loss_drop"] >= 0.30, result
    assert (tmp_path / "checkpoints" / "300").is_dir() and (tmp_path / "metrics.jsonl").is_file()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


DEMO_STAGES = {"pretrain": 150, "sft": 600, "reward_model": 150, "tag": None, "preference_aware": 300, "dpo": 60}


@pytest.mark.parametrize("stage", sorted(DEMO_STAGES))
def test_demo_stage_gin_runs_alone_with_the_demo_settings(stage):
    """`python -m moss_jax.main --gin_file=experiments/demo/<stage>.gin` (docs/alignment.md) parses
    on its own (paths.gin's macros were self-references once: RecursionError), points at the
    default demo workdir, and trains the steps the full demo runs (the demo no longer rebinds them)."""
    import gin

    from moss_jax import configurables
    from moss_jax.stages import demo

    def query(name):
        value = gin.query_parameter(name)
        # A binding to a macro (`= %DPO_DIR`) is a reference to gin.macro: evaluate it.
        return value.scoped_configurable_fn() if isinstance(value, gin.config.ConfigurableReference) else value

    assert demo.SCALES["full"].steps is None
    configurables.clear()
    try:
        configurables.parse([f"experiments/demo/{stage}.gin"], [], [str(ROOT)])
        if stage == "tag":
            assert query("moss_jax.stages.TagConfig.reward_model") == "runs/demo/reward_model/params"
            return
        steps = DEMO_STAGES[stage]
        assert gin.query_parameter("moss_jax.train.TrainConfig.steps") == steps
        assert gin.query_parameter("moss_jax.train.OptimizerConfig.total_steps") == steps
        assert query("moss_jax.train.TrainConfig.workdir") == f"runs/demo/{stage}"
        if stage != "pretrain":
            assert query("moss_jax.train.TrainConfig.init_from").startswith("runs/demo/")
        # Every macro the demo rebinds for another --workdir exists in paths.gin with a real value.
        macros = demo.Paths(Path("runs/demo")).macros()
        for binding in macros:
            name, value = binding.split(" = ")
            assert gin.query_parameter(f"%{name}") == json.loads(value), name
    finally:
        configurables.clear()
