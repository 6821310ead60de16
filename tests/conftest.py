"""Test setup: 8 fake CPU devices for sharding tests (must be set before jax is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower checks (still run in CI)")


# The longest tests (1.5 to 4 minutes each under `pytest -n 2`, --durations of 2026-11-26) start
# first: with xdist a long test that starts near the end sets the suite's wall time. Tests that
# share an expensive module fixture must not be listed (xdist may split them across workers,
# each running the fixture): the demo pipeline is one test for that reason.
LONGEST_FIRST = (
    "tests/stages/test_demo_pipeline.py::test_reduced_pipeline_artifacts_report_and_resume",
    "tests/train/test_experiments.py::test_tiny_cpu_pretraining_loss_falls",
    "tests/test_install.py::test_launch_extra_resolves_and_imports",
    "tests/kernels/test_flash_mgpu_interpret.py::test_the_async_checks_run_on_jax_011_too",
    "tests/kernels/test_flash_mgpu_interpret.py::test_hopper_kernels_match_reference_in_the_interpreter",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        for i, prefix in enumerate(LONGEST_FIRST):
            if item.nodeid.startswith(prefix):
                return i
        return len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: everything else keeps its collection order


@pytest.fixture(scope="session")
def hf_reference():
    """(transformers, torch) for parity tests."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    return transformers, torch
