"""Fixtures: a byte-level tokenizer and models with designed logits, and a tiny SentencePiece model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax.config import get_config
from moss_jax.eval.lm import EvalModel
from moss_jax.model import init_params

START = 256  # the byte tokenizer's start id


def byte_encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def byte_decode(ids) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


def unigram_model(preferred: str, *, generate_fn=None, max_len: int = 512) -> EvalModel:
    """Logits that ignore the input: every position prefers the byte `preferred` by 3 nats."""
    bias = np.zeros(257, np.float32)
    bias[ord(preferred)] = 3.0

    def logits_fn(ids_BxL, seg_BxL):
        # Written as a function of the ids so XLA does not constant-fold a large array.
        return jnp.where(ids_BxL[..., None] >= 0, jnp.asarray(bias), 0.0)

    return EvalModel(
        logits_fn,
        vocab_size=257,
        max_len=max_len,
        encode=byte_encode,
        decode=byte_decode,
        start_id=START,
        generate_fn=generate_fn,
        batch_size=4,
    )


class ByteTokenizer:
    """The inference Tokenizer interface over UTF-8 bytes (ids 0..255), start id 256."""

    vocab_size = 257
    encode = staticmethod(byte_encode)
    decode = staticmethod(byte_decode)


@pytest.fixture(scope="session")
def byte_debug_model():
    """(config, params): the debug preset with random weights; vocab 512 covers the byte ids."""
    config = get_config("debug", max_len=64)
    return config, init_params(config, jax.random.key(3))
