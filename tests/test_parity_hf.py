"""Numerical parity with transformers.CodeGenForCausalLM (the MOSS architecture)."""

import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax.config import MossConfig
from moss_jax.convert import params_from_hf
from moss_jax.model import MossLM
from tests.hf_utils import make_hf_model, state_dict_numpy

CONFIGS = [
    # heads divisible by 4, rotary_dim < head_dim, >1 layer, vocab not a multiple of 128
    dict(vocab=1001, d=64, layers=2, heads=4, rotary=8),
    dict(vocab=777, d=96, layers=3, heads=8, rotary=4, n_inner=200),
    dict(vocab=515, d=128, layers=2, heads=4, rotary=32),
]


@pytest.mark.parametrize("spec", CONFIGS, ids=lambda s: f"d{s['d']}h{s['heads']}r{s['rotary']}v{s['vocab']}")
@pytest.mark.parametrize("scan", [True, False])
def test_logits_match_hf(hf_reference, spec, scan):
    transformers, torch = hf_reference
    model = make_hf_model(transformers, torch, **spec)
    config = MossConfig.from_hf(model.config.to_dict(), scan_layers=scan)
    params = params_from_hf(state_dict_numpy(model), config)
    ids = np.random.RandomState(1).randint(0, spec["vocab"], (3, 19))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(MossLM(config).apply({"params": params}, jnp.asarray(ids)))
    assert ours.shape == (3, 19, spec["vocab"]) and ours.dtype == np.float32
    assert np.abs(ref).max() > 1.0  # the comparison is not trivially small
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_left_padding_with_attention_mask(hf_reference):
    transformers, torch = hf_reference
    spec = CONFIGS[0]
    model = make_hf_model(transformers, torch, **spec)
    config = MossConfig.from_hf(model.config.to_dict())
    params = params_from_hf(state_dict_numpy(model), config)
    rng = np.random.RandomState(2)
    ids = rng.randint(0, spec["vocab"], (3, 12))
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :2] = 0
    position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # the reference generation recipe
    with torch.no_grad():
        ref = model(
            torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(position_ids)
        ).logits.numpy()
    ours = np.asarray(MossLM(config).apply({"params": params}, jnp.asarray(ids), segment_ids_BxL=jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
    # Each padded row equals the same row run alone without padding.
    alone = np.asarray(MossLM(config).apply({"params": params}, jnp.asarray(ids[:1, 5:])))
    np.testing.assert_allclose(ours[0, 5:], alone[0], atol=1e-5, rtol=0)
