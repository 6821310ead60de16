"""moss_jax: MOSS (Fudan) rebuilt in JAX/Flax for TPU pods, GPUs and CPU debugging."""

from setuptools import find_packages, setup

# The set below was installed and tested together on Python 3.11 (see docs/install.md).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    "gin-config==0.5.0",
    "numpy>=2.0",
    "ml_dtypes>=0.5",
    "safetensors>=0.4",
    "tqdm>=4.66",
]

EXTRAS = {
    # Parity references and test tools. torch is pinned to the CPU build available offline;
    # an unpinned torch would pull a multi-GB CUDA build.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "torch==2.13.0",
        "transformers==5.24.0",
        "ruff>=0.6",
    ],
    # libtpu matching the pinned jax: runs on TPU VMs, and compiles (not runs) TPU programs on CPU hosts.
    "tpu": ["jax[tpu]==0.10.2"],
    "notebook": ["jupyter", "nbclient>=0.10", "nbformat>=5.10", "matplotlib>=3.8"],
}

setup(
    name="moss_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["moss_jax", "moss_jax.*", "data_pipelines", "data_pipelines.*",
                                    "tpu_setup", "tpu_setup.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
