"""Greedy generation equals transformers' CodeGen `generate` on the same converted weights."""

import numpy as np
import pytest

from moss_jax.config import MossConfig
from moss_jax.convert import params_from_hf
from moss_jax.inference import generate
from tests.hf_utils import make_hf_model, state_dict_numpy


@pytest.mark.parametrize(
    "spec,scan",
    [
        (dict(vocab=1001, d=64, layers=2, heads=4, rotary=8), True),
        (dict(vocab=515, d=96, layers=3, heads=8, rotary=4), False),
    ],
)
def test_greedy_matches_hf_generate(hf_reference, spec, scan):
    transformers, torch = hf_reference
    model = make_hf_model(transformers, torch, **spec)
    config = MossConfig.from_hf(model.config.to_dict(), scan_layers=scan)
    params = params_from_hf(state_dict_numpy(model), config)
    rng = np.random.RandomState(1)
    ids = rng.randint(2, spec["vocab"], (3, 12))
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :2] = 0
    new = 24
    with torch.no_grad():
        ref = model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=None,  # never stop early: compare all 24 steps
            pad_token_id=0,
        ).numpy()
    ours = generate(params, config, ids, new, segment_ids_BxL=mask)
    assert ref.shape == ours.shape == (3, 12 + new)
    np.testing.assert_array_equal(ours, ref)
    assert len(set(ref[:, 12:].ravel().tolist())) > 3  # not a degenerate repeat of one token
