"""The "cudnn" attention impl: its masking through jax.nn.dot_product_attention, and its errors off a GPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax.attention import attention, dot_product_attention, xla_attention
from moss_jax.config import PRESETS
from tests.kernels.cases import ON_GPU, Case, assert_matches_reference, make_inputs

# The same masking with jax's XLA implementation, which runs anywhere: values and gradients.
XLA_DPA = functools.partial(dot_product_attention, implementation="xla")


@pytest.mark.parametrize(
    "case",
    [
        Case("causal", q_len=40, kv_len=40, head_dim=64, causal=True, segments=0),
        Case("packed", q_len=40, kv_len=40, head_dim=64, causal=True, segments=3),
        Case("bidirectional_packed", q_len=33, kv_len=33, head_dim=32, causal=False, segments=2),
        # Random ids leave queries with no visible key: 0, as the reference.
        Case("random_segments", q_len=24, kv_len=24, head_dim=64, causal=True, segments=-1),
    ],
    ids=str,
)
def test_dot_product_attention_masking_matches_reference(case):
    def fn(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal=True, q_offset=0):
        assert q_offset == 0
        return XLA_DPA(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal)

    assert_matches_reference(fn, case)


@pytest.mark.skipif(ON_GPU, reason="the errors of a host without a GPU")
def test_cudnn_needs_a_gpu():
    """A valid config value, that fails with a clear message where it runs on no GPU."""
    assert PRESETS["debug"].replace(attention_impl="cudnn").attention_impl == "cudnn"
    x = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        attention(x, x, x, impl="cudnn")


def test_cudnn_with_an_offset_runs_the_pallas_kernel():
    """KV-cache calls (a q_offset) go to pallas_gpu: interpreted on CPU, same numbers."""
    inputs = make_inputs(Case("prefill", q_len=6, kv_len=48, head_dim=64, causal=True, segments=-1, q_offset=20))
    q, k, v, kw = inputs["q"], inputs["k"], inputs["v"], inputs["kwargs"]
    got = jax.jit(functools.partial(attention, impl="cudnn", **kw))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(xla_attention(q, k, v, **kw)), atol=2e-5, rtol=0)


@pytest.mark.skipif(not ON_GPU, reason="cuDNN runs on a CUDA GPU only")
def test_cudnn_on_gpu():
    case = Case("bf16_packed", q_len=128, kv_len=128, head_dim=64, causal=True, segments=2, dtype=jnp.bfloat16)
    assert_matches_reference(functools.partial(attention, impl="cudnn"), case)
    x = jnp.zeros((1, 16, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        attention(x, x, x, impl="cudnn")
