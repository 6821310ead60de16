"""Fixtures: a byte-level tokenizer and models with designed logits, and a tiny SentencePiece model."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import specials
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


class SpecialByteTokenizer(ByteTokenizer):
    """ByteTokenizer plus MOSS's end tokens as single ids 257.. (as in our SentencePiece model)."""

    vocab_size = 257 + len(specials.END_TOKENS)
    SPECIAL_IDS = {s: 257 + i for i, s in enumerate(specials.END_TOKENS)}
    _SPLIT = re.compile("(" + "|".join(map(re.escape, specials.END_TOKENS)) + ")")

    def encode(self, text: str) -> list[int]:
        ids = []
        for part in self._SPLIT.split(text):
            ids += [self.SPECIAL_IDS[part]] if part in self.SPECIAL_IDS else byte_encode(part)
        return ids

    def decode(self, ids) -> str:
        names = {i: s for s, i in self.SPECIAL_IDS.items()}
        out, run = [], []
        for i in [*ids, None]:
            if i is None or i in names:
                out.append(byte_decode(run))
                run = []
                if i is not None:
                    out.append(names[i])
            else:
                run.append(i)
        return "".join(out)


def two_step_params(config, params, first: int, then: int):
    """Weights zero except embedding, final norm and head: after any token but `first` the model
    emits `first`, after `first` it emits `then` (greedy, whatever the context)."""
    d = config.d_model
    v = np.tile([1.0, -1.0], d // 2).astype(np.float32)  # layer norm leaves +-v as it is
    out = jax.tree.map(lambda a: np.zeros(np.shape(a), np.float32), params)
    out["embedding"] = np.tile(-v, (config.vocab_size, 1))
    out["embedding"][first] = v
    out["ln_f"]["scale"] = np.ones(d, np.float32)
    out["lm_head_kernel"][:, then] = v * 0.5  # the residual stream is +v after `first`
    out["lm_head_kernel"][:, first] = -v * 0.5  # and -v after anything else
    return out


@pytest.fixture(scope="session")
def byte_debug_model():
    """(config, params): the debug preset with random weights; vocab 512 covers the byte ids."""
    config = get_config("debug", max_len=64)
    return config, init_params(config, jax.random.key(3))
