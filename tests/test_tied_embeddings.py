"""MossConfig.tie_embeddings: the head's kernel is the embedding's transpose (no lm_head_kernel)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax.config import PRESETS, MossConfig
from moss_jax.convert import CheckpointError, params_from_hf, params_to_hf
from moss_jax.inference import generate
from moss_jax.model import MossLM, count_params, head_kernel, init_params
from moss_jax.quant import quantize_params
from moss_jax.train.objectives import lm_objective

CFG = PRESETS["debug"].replace(n_layers=2, tie_embeddings=True)


@pytest.fixture(scope="module")
def params():
    p = init_params(CFG, jax.random.key(0))
    # A non-zero head bias, so the tests see it used.
    return dict(p, lm_head_bias=0.1 * jax.random.normal(jax.random.key(1), p["lm_head_bias"].shape))


def _ids(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, CFG.vocab_size, shape), jnp.int32)


def test_tied_params_have_no_head_kernel_and_count(params):
    assert "lm_head_kernel" not in params and "lm_head_bias" in params
    assert count_params(params) == CFG.num_params
    untied = CFG.replace(tie_embeddings=False)
    assert untied.num_params - CFG.num_params == CFG.d_model * CFG.vocab_size
    # The head matmul still runs: FLOPs per token are the untied model's.
    assert CFG.flops_per_token(64) == untied.flops_per_token(64)
    with pytest.raises(ValueError, match="tie_embeddings must be a bool"):
        CFG.replace(tie_embeddings=1)


def test_logits_use_the_embedding_transpose(params):
    ids = _ids((2, 9))
    logits, hidden = MossLM(CFG).apply({"params": params}, ids, return_hidden=True)
    want = hidden @ params["embedding"].T + params["lm_head_bias"]
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(head_kernel(params), params["embedding"].T)


def test_fused_head_loss_and_gradients_equal_the_full_logits_path(params):
    ids = _ids((2, 17), seed=1)
    batch = {
        "decoder_input_tokens": ids[:, :-1],
        "decoder_target_tokens": ids[:, 1:],
        "decoder_segment_ids": jnp.ones((2, 16), jnp.int32),
        "decoder_positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
        "decoder_loss_weights": jnp.ones((2, 16), jnp.float32),
    }
    module = MossLM(CFG)

    def loss(objective, p):
        return objective.loss_sums(module, p, batch, None, None, True)[0]

    fused, reference = lm_objective(head_chunk_tokens=8), lm_objective(head_chunk_tokens=None)
    lf, gf = jax.value_and_grad(lambda p: loss(fused, p))(params)
    lr, gr = jax.value_and_grad(lambda p: loss(reference, p))(params)
    np.testing.assert_allclose(lf, lr, rtol=1e-5)
    # The embedding's gradient has both parts: the input lookup and the head.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), gf, gr)
    head_only = jax.grad(lambda e: loss(reference, dict(params, embedding=e)))(params["embedding"])
    assert float(jnp.abs(head_only[np.setdiff1d(np.arange(CFG.vocab_size), np.asarray(ids))]).max()) > 0


def test_export_is_an_untied_hf_model_with_the_same_logits(params, hf_reference):
    transformers, torch = hf_reference
    sd = params_to_hf(params, CFG)
    np.testing.assert_array_equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    hf_cfg = transformers.CodeGenConfig(**CFG.to_hf())
    assert hf_cfg.tie_word_embeddings is False
    model = transformers.CodeGenForCausalLM(hf_cfg).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=False)
    ids = _ids((2, 11), seed=2)
    with torch.no_grad():
        ref = model(torch.tensor(np.asarray(ids))).logits.numpy()
    np.testing.assert_allclose(MossLM(CFG).apply({"params": params}, ids), ref, atol=1e-4, rtol=0)
    # Loading it back gives an untied model with the same values; a tied config refuses HF tensors.
    untied = params_from_hf(sd, CFG.replace(tie_embeddings=False))
    np.testing.assert_array_equal(untied["lm_head_kernel"], np.asarray(params["embedding"]).T)
    with pytest.raises(CheckpointError, match="tie_embeddings=True"):
        params_from_hf(sd, CFG)
    with pytest.raises(ValueError, match="tie_word_embeddings=true"):
        MossConfig.from_hf(dict(CFG.to_hf(), tie_word_embeddings=True))


@pytest.mark.parametrize("mode", ["int8", "int8_dynamic"])
def test_quantised_tied_model_decodes_like_its_full_forward(params, mode):
    q = quantize_params(params, mode)
    prompt = [int(t) for t in _ids((7,), seed=3)]
    out = generate(q, CFG, np.asarray([prompt]), 5)[0, len(prompt) :]
    forward = jax.jit(lambda p, x: MossLM(CFG).apply({"params": p}, x))
    tokens = list(prompt)
    for _ in range(5):
        tokens.append(int(jnp.argmax(forward(q, jnp.asarray([tokens]))[0, -1])))
    assert list(out) == tokens[len(prompt) :]
