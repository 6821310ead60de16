"""The preference (reward) model: the MossLM backbone with a scalar head read at the last real token.

    params = {"lm": <MossLM params>, "reward_head_kernel": [D], "reward_head_bias": []}

The backbone keeps the language model's parameter tree under "lm", so a reward model starts from
any moss_jax LM checkpoint (the SFT stage's) and its head starts at zero (every score 0, the
Bradley-Terry loss at log 2). The LM head stays in the tree unused: under jit its logits are
dead code and cost nothing.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moss_jax.config import MossConfig
from moss_jax.layers import named_param
from moss_jax.model import MossLM


class RewardModel(nn.Module):
    config: MossConfig

    @nn.compact
    def __call__(
        self,
        input_ids_BxL: jax.Array,
        positions_BxL: jax.Array | None = None,
        segment_ids_BxL: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Per-position scores [B, L]; the sequence's score is the one at its last real token."""
        cfg = self.config
        _, hidden_BxLxD = MossLM(cfg, name="lm")(
            input_ids_BxL,
            positions_BxL=positions_BxL,
            segment_ids_BxL=segment_ids_BxL,
            deterministic=deterministic,
            return_hidden=True,
        )
        pdtype = jnp.dtype(cfg.param_dtype)
        w_D = named_param(self, "reward_head_kernel", nn.initializers.zeros, (cfg.d_model,), ("embed",), pdtype)
        b = named_param(self, "reward_head_bias", nn.initializers.zeros, (), (), pdtype)
        return jnp.einsum("bld,d->bl", hidden_BxLxD.astype(jnp.float32), w_D.astype(jnp.float32)) + b


def last_token_scores(scores_BxL: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
    """The score at each row's last real (segment id != 0) token; rows must be right-padded."""
    real_BxL = segment_ids_BxL != 0
    last_B = jnp.maximum(jnp.sum(real_BxL, axis=1) - 1, 0)
    return jnp.take_along_axis(scores_BxL, last_B[:, None], axis=1)[:, 0]
