"""Shared fixtures: a tiny SentencePiece tokenizer and a random `debug` model that matches it."""

import jax
import pytest

from data_pipelines import corpus as corpus_lib
from data_pipelines.vocab import train_sentencepiece
from moss_jax.config import get_config
from moss_jax.inference.tokenizer import load_tokenizer
from moss_jax.model import init_params


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory):
    """English + code only keeps the character set small enough for a 1024-piece vocabulary."""
    docs = corpus_lib.gather(max_chars=100_000)
    return train_sentencepiece(docs["en"] + docs["code"], tmp_path_factory.mktemp("vocab") / "sp", vocab_size=1024)


@pytest.fixture(scope="session")
def tokenizer(sp_model_path):
    return load_tokenizer(sp_model_path)


@pytest.fixture(scope="session")
def chat_model(tokenizer):
    """(config, params): the debug preset, random weights, vocabulary of the test tokenizer."""
    config = get_config("debug", vocab_size=tokenizer.vocab_size, max_len=512)
    return config, init_params(config, jax.random.key(0))


@pytest.fixture(scope="session")
def debug_model():
    config = get_config("debug")
    return config, init_params(config, jax.random.key(1))
