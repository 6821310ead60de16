"""Decoder's size arguments: a bad one is refused naming every value."""

import pytest

from moss_jax.config import MossConfig
from moss_jax.inference.decoder import Decoder

CONFIG = MossConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, mlp_dim=64, rotary_dim=4, max_len=64)


@pytest.mark.parametrize(
    "batch_size,cache_len,chunk_size",
    [(8, 128, 0), (0, 128, 16), (8, 1, 16), (8, 128, -3)],
)
def test_bad_sizes_are_named_with_their_values(batch_size, cache_len, chunk_size):
    with pytest.raises(ValueError) as e:
        Decoder(CONFIG, batch_size=batch_size, cache_len=cache_len, chunk_size=chunk_size)
    assert str(e.value) == (
        "Decoder: need batch_size >= 1, cache_len >= 2, chunk_size >= 1; "
        f"got batch_size={batch_size}, cache_len={cache_len}, chunk_size={chunk_size}"
    )
