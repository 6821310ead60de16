"""Helpers that build small random HF CodeGen models for parity tests."""

from __future__ import annotations

import numpy as np


def make_hf_model(transformers, torch, *, vocab=1001, d=64, layers=2, heads=8, rotary=8, n_inner=None, seed=0, std=0.3):
    """A random CodeGenForCausalLM with weights large enough that errors show in the logits."""
    torch.manual_seed(seed)
    cfg = transformers.CodeGenConfig(
        vocab_size=vocab,
        n_positions=256,
        n_embd=d,
        n_layer=layers,
        n_head=heads,
        rotary_dim=rotary,
        n_inner=n_inner,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = transformers.CodeGenForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p) / (1.0 if p.ndim == 1 else np.sqrt(p.shape[-1]) * 0.3))
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
