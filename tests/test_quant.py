"""Quantisation: int8 error bounds, dequantised matmuls, chunked head, int8 decode, W8A8 (int8_dynamic)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax import quant
from moss_jax.config import get_config
from moss_jax.inference import generate
from moss_jax.kernels import int8_cpu
from moss_jax.model import MossLM, init_params
from moss_jax.quant import (
    DynamicQuantizedWeight,
    QuantizedWeight,
    dense,
    quantize_int8,
    quantize_int8_dynamic,
    quantize_params,
)


@pytest.fixture(scope="module")
def model():
    config = get_config("debug")
    return config, init_params(config, jax.random.PRNGKey(0))


def test_int8_rounding_error_is_at_most_half_a_step():
    w = jnp.asarray(np.random.RandomState(0).randn(3, 16, 4, 8), jnp.float32)  # stacked [Y, D, H, K]
    qw = quantize_int8(w, n_contract=1, stacked=True)
    assert qw.q.dtype == jnp.int8 and qw.q.shape == w.shape and qw.scale.shape == (3, 4, 8)
    err = jnp.abs(qw.q.astype(jnp.float32) * qw.scale[:, None] - w)
    assert float(jnp.max(err / qw.scale[:, None])) <= 0.5 + 1e-6
    # Each output channel uses its whole range: its largest |w| maps to +-127.
    assert int(jnp.max(jnp.abs(qw.q.astype(jnp.int32)))) == 127


@pytest.mark.parametrize(
    "spec, x_shape, w_shape, n_contract",
    [
        ("bld,dhk->blhk", (2, 5, 16), (16, 4, 8), 1),
        ("blhk,hkd->bld", (2, 5, 4, 8), (4, 8, 16), 2),
        ("bld,df->blf", (2, 5, 16), (16, 64), 1),
    ],
)
def test_dense_matches_the_dequantised_matmul(spec, x_shape, w_shape, n_contract):
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(*x_shape), jnp.float32)
    w = jnp.asarray(rng.randn(*w_shape) * 0.1, jnp.float32)
    qw = quantize_int8(w, n_contract)
    got = dense(spec, x, qw, jnp.float32)
    want = jnp.einsum(spec, x, qw.dequantize())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # And the quantisation error against fp32 stays within its bound: sum |x| * scale / 2.
    exact = jnp.einsum(spec, x, w)
    bound = jnp.einsum(spec, jnp.abs(x), jnp.ones_like(w)) * qw.scale / 2
    assert bool(jnp.all(jnp.abs(got - exact) <= bound + 1e-5))


def test_chunked_int8_head_equals_unchunked(monkeypatch):
    rng = np.random.RandomState(2)
    x = jnp.asarray(rng.randn(2, 3, 16), jnp.float32)
    qw = quantize_int8(jnp.asarray(rng.randn(16, 64), jnp.float32), 1)
    whole = dense("bld,dv->blv", x, qw, jnp.float32)
    monkeypatch.setattr(quant, "HEAD_CHUNK", 16)
    chunked = dense("bld,dv->blv", x, qw, jnp.float32)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 64])
def test_int8_dense_sums_in_fp32_in_half_precision(monkeypatch, chunk):
    """float16: the unscaled sum x @ q is ~127 / max|w| times the output (here ~1.3e5, past
    65504), so it is summed and scaled in fp32, then cast; plain fp16 weights stay finite too."""
    if chunk:
        monkeypatch.setattr(quant, "HEAD_CHUNK", chunk)  # the chunked head path
    rng = np.random.RandomState(0)
    x = rng.randn(1, 4, 16384).astype(np.float32) * 8
    w = rng.randn(16384, 128).astype(np.float32) * 0.01
    qw = quantize_int8(w, 1)
    want = np.einsum("bld,dv->blv", x.astype(np.float64), np.asarray(qw.dequantize(), np.float64))
    got = np.asarray(dense("bld,dv->blv", jnp.asarray(x, jnp.float16), qw, jnp.float16), np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=0.5, rtol=0)  # fp16 input rounding; |y| ~ 40


@pytest.mark.parametrize("chunk", [None, 16])
def test_int8_dense_bf16_scale_is_not_rounded(monkeypatch, chunk):
    """bfloat16: the per-channel scale stays fp32 (rounded to bf16 it is off by up to 2^-9,
    the same way for a whole channel); the output is the exact product rounded once."""
    if chunk:
        monkeypatch.setattr(quant, "HEAD_CHUNK", chunk)
    rng = np.random.RandomState(3)
    x = rng.randint(-3, 4, (2, 3, 16)).astype(np.float32)  # exact in bf16; sums exact in fp32
    qw = quantize_int8(rng.randn(16, 64).astype(np.float32), 1)
    exact = np.einsum("bld,dv->blv", x.astype(np.float64), np.asarray(qw.q, np.float64))
    exact = exact * np.asarray(qw.scale, np.float64)
    got = np.asarray(dense("bld,dv->blv", jnp.asarray(x, jnp.bfloat16), qw, jnp.bfloat16), np.float64)
    rel = np.abs(got - exact) / np.maximum(np.abs(exact), 1e-30)
    assert rel.max() <= 2.0**-8 * 1.001  # one bf16 rounding (unit roundoff 2^-8); the old path: 8e-3


def test_quantize_params_modes(model):
    config, params = model
    q8 = quantize_params(params, "int8")
    bf = quantize_params(params, "bfloat16")
    assert quantize_params(params, "float32") is params
    assert isinstance(q8["layers"]["attn"]["query"], QuantizedWeight)
    assert isinstance(q8["lm_head_kernel"], QuantizedWeight)
    assert q8["embedding"].dtype == jnp.float32 and q8["layers"]["mlp"]["fc_in_bias"].dtype == jnp.float32
    assert bf["layers"]["mlp"]["fc_out_kernel"].dtype == jnp.bfloat16
    assert quant.weight_bytes(q8) < quant.weight_bytes(bf) < quant.weight_bytes(params)
    with pytest.raises(ValueError, match="weights mode"):
        quantize_params(params, "int4")


@pytest.mark.parametrize("mode, tol", [("int8", 0.05), ("int8_dynamic", 0.05), ("bfloat16", 0.02)])
def test_quantised_model_logits_close_to_fp32(model, mode, tol):
    config, params = model
    ids = jnp.asarray(np.random.RandomState(3).randint(0, config.vocab_size, (2, 12)))
    ref = MossLM(config).apply({"params": params}, ids)
    got = MossLM(config).apply({"params": quantize_params(params, mode)}, ids)
    assert float(jnp.max(jnp.abs(got - ref))) <= tol * float(jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("mode", ["int8", "int8_dynamic"])
def test_int8_greedy_decode_equals_int8_full_forward(model, monkeypatch, mode):
    config, params = model
    monkeypatch.setattr(quant, "HEAD_CHUNK", 128)  # debug vocab 512: exercise the chunked head
    q8 = quantize_params(params, mode)
    prompt = [int(t) for t in np.random.RandomState(4).randint(0, config.vocab_size, 7)]
    out = generate(q8, config, np.asarray([prompt]), 6)[0, len(prompt) :]
    forward = jax.jit(lambda p, x: MossLM(config).apply({"params": p}, x))
    tokens = list(prompt)
    for _ in range(6):
        tokens.append(int(jnp.argmax(forward(q8, jnp.asarray([tokens]))[0, -1])))
    assert list(out) == tokens[len(prompt) :]


def test_load_model_with_int8_weights(model, tmp_path):
    from moss_jax.convert.checkpoint_io import save_params
    from moss_jax.inference.local import load_model

    config, params = model
    path = save_params(tmp_path / "ckpt", params, config)
    _, loaded = load_model(path, weights="int8")
    assert isinstance(loaded["layers"]["mlp"]["fc_in_kernel"], QuantizedWeight)
    with pytest.raises(ValueError, match="weights="):
        load_model(path, weights="int4")


# W8A8 (int8_dynamic) ------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, x_shape, w_shape, n_contract",
    [
        ("bld,dhk->blhk", (2, 5, 16), (16, 4, 8), 1),
        ("blhk,hkd->bld", (2, 5, 4, 8), (4, 8, 16), 2),
        ("bld,df->blf", (2, 5, 16), (16, 64), 1),
        ("bld,dv->blv", (1, 1, 16), (16, 64), 1),  # one row: padded to two for the int8 dot
    ],
)
def test_dynamic_dense_within_the_activation_rounding_bound(spec, x_shape, w_shape, n_contract):
    rng = np.random.RandomState(5)
    x = jnp.asarray(rng.randn(*x_shape), jnp.float32)
    w = jnp.asarray(rng.randn(*w_shape) * 0.1, jnp.float32)
    qw = quantize_int8_dynamic(w, n_contract)
    assert qw.q.shape == w.shape and qw.q.dtype == jnp.int8 and qw.n_out == len(w_shape) - n_contract
    # Same values and scales as the weight-only int8, only laid out [N, K].
    np.testing.assert_array_equal(qw.dequantize(), quantize_int8(w, n_contract).dequantize())
    got = dense(spec, x, qw, jnp.float32)
    want = jnp.einsum(spec, x, qw.dequantize())
    # Each row of x is rounded to a multiple of its scale max|x| / 127, so the error against the
    # dequantised matmul is at most scale / 2 * sum |w| over the contracted dims.
    k = int(np.prod(w_shape[:n_contract]))
    row_scale = jnp.max(jnp.abs(x.reshape(-1, k)), axis=-1).reshape(x_shape[: len(x_shape) - n_contract]) / 127
    col_abs = jnp.sum(jnp.abs(qw.dequantize()).reshape(k, -1), axis=0).reshape(w_shape[n_contract:])
    bound = row_scale.reshape(row_scale.shape + (1,) * (len(w_shape) - n_contract)) / 2 * col_abs
    assert got.shape == want.shape
    assert bool(jnp.all(jnp.abs(got - want) <= bound * 1.001 + 1e-5))


def test_dynamic_dense_rows_are_independent():
    """A row's result does not depend on its neighbours (per-row scales; one row padded to two)."""
    rng = np.random.RandomState(6)
    x = jnp.asarray(rng.randn(3, 1, 16) * np.array([1.0, 10.0, 0.1])[:, None, None], jnp.float32)
    qw = quantize_int8_dynamic(jnp.asarray(rng.randn(16, 32), jnp.float32), 1)
    whole = dense("bld,df->blf", x, qw, jnp.float32)
    for b in range(3):
        np.testing.assert_allclose(dense("bld,df->blf", x[b : b + 1], qw, jnp.float32), whole[b : b + 1], rtol=1e-6)


def test_dynamic_stacked_layers_and_zero_rows():
    w = jnp.asarray(np.random.RandomState(7).randn(3, 16, 4, 8), jnp.float32)
    qw = quantize_int8_dynamic(w, 1, stacked=True)
    ref = quantize_int8(w, 1, stacked=True)
    np.testing.assert_array_equal(qw.dequantize(), ref.q.astype(jnp.float32) * ref.scale[:, None])
    layer = jax.tree.map(lambda a: a[1], qw)  # what nn.scan / the decoder's per-layer copies see
    assert isinstance(layer, DynamicQuantizedWeight) and layer.n_out == 2
    np.testing.assert_array_equal(layer.dequantize(), qw.dequantize()[1])
    out = dense("bld,dhk->blhk", jnp.zeros((2, 3, 16)), layer, jnp.float32)
    assert bool(jnp.all(out == 0))  # an all-zero row gets scale 1, not a division by zero


def test_dynamic_dense_rejects_other_contractions():
    qw = quantize_int8_dynamic(jnp.ones((16, 8)), 1)
    with pytest.raises(ValueError, match="int8_dynamic"):
        dense("bd,fd->bf", jnp.ones((2, 8)), qw, jnp.float32)


def test_quantize_params_int8_dynamic(model):
    config, params = model
    qd = quantize_params(params, "int8_dynamic")
    assert isinstance(qd["layers"]["attn"]["out"], DynamicQuantizedWeight)
    assert isinstance(qd["lm_head_kernel"], DynamicQuantizedWeight)
    assert quant.weight_bytes(qd) == quant.weight_bytes(quantize_params(params, "int8"))
    with pytest.raises(ValueError, match="weights mode"):
        quantize_params(params, "int8_static")


def test_int8_dynamic_fuses_query_key_value_fc_in(model, monkeypatch):
    """One block-level [3D + F, D] weight; the model's outputs equal the four separate weights'."""
    config, params = model
    fused = quantize_params(params, "int8_dynamic")
    w = fused["layers"][quant.FUSED_IN]
    n = 3 * config.d_model + config.mlp_dim
    assert w.q.shape == (config.n_layers, config.d_model, n) and w.scale.shape == (config.n_layers, n)
    assert set(fused["layers"]["attn"]) == {"out"} and "fc_in_kernel" not in fused["layers"]["mlp"]
    parts = [
        quantize_int8_dynamic(params["layers"][sub][name], 1, stacked=True) for sub, name in quant.FUSED_IN_KERNELS
    ]
    np.testing.assert_array_equal(w.dequantize(), quant.fuse_dynamic(parts, stacked=True).dequantize())
    monkeypatch.setattr(quant, "FUSED_IN_KERNELS", (("attn", "none"),))
    separate = quantize_params(params, "int8_dynamic")
    assert quant.FUSED_IN not in separate["layers"]
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 12))
    np.testing.assert_array_equal(
        MossLM(config).apply({"params": fused}, ids), MossLM(config).apply({"params": separate}, ids)
    )
    unrolled = config.replace(scan_layers=False)
    layers = {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], fused["layers"]) for i in range(config.n_layers)}
    unstacked = {**{k: v for k, v in fused.items() if k != "layers"}, **layers}
    np.testing.assert_allclose(  # the per-layer copies the CPU decoder makes (scan vs unrolled: last-ulp rounding)
        MossLM(unrolled).apply({"params": unstacked}, ids),
        MossLM(config).apply({"params": fused}, ids),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.skipif(not int8_cpu.available(), reason="int8 CPU kernel not built or no AVX512-VNNI")
@pytest.mark.parametrize(
    "spec, x_shape, w_shape, n_contract",
    [
        ("bld,dhk->blhk", (1, 1, 16), (16, 4, 8), 1),
        ("blhk,hkd->bld", (2, 3, 4, 8), (4, 8, 16), 2),
        ("bld,df->blf", (8, 1, 96), (96, 200), 1),
        ("bld,df->blf", (2, 16, 16), (16, 8), 1),  # 32 rows: past MAX_ROWS, the XLA dot
    ],
)
def test_dynamic_dense_kernel_equals_the_xla_dot(monkeypatch, spec, x_shape, w_shape, n_contract):
    """Few-row W8A8 dense through the FFI int8 dot gives the XLA dot's outputs bit for bit."""
    rng = np.random.RandomState(8)
    x = jnp.asarray(rng.randn(*x_shape), jnp.float32)
    qw = quantize_int8_dynamic(jnp.asarray(rng.randn(*w_shape), jnp.float32), n_contract)
    f = lambda x: dense(spec, x, qw, jnp.float32)
    with_kernel = jax.jit(f)(x)
    assert ('custom_call_target="' + int8_cpu.TARGET in jax.jit(f).lower(x).as_text(dialect="hlo")) == (
        np.prod(x_shape[: len(x_shape) - n_contract]) <= int8_cpu.MAX_ROWS
    )
    monkeypatch.setenv("MOSS_JAX_INT8_KERNEL", "0")
    np.testing.assert_array_equal(with_kernel, jax.jit(f)(x))


@pytest.mark.skipif(not int8_cpu.available(), reason="int8 CPU kernel not built or no AVX512-VNNI")
@pytest.mark.parametrize("batch", [1, 3])
def test_int8_dynamic_decode_same_tokens_with_and_without_kernel(model, monkeypatch, batch):
    from moss_jax.inference.generate import get_decoder

    config, params = model
    qd = quantize_params(params, "int8_dynamic")
    ids = np.random.RandomState(9).randint(0, config.vocab_size, (batch, 5))
    get_decoder.cache_clear()  # each Decoder traces (and picks the dot) once
    with_kernel = generate(qd, config, ids, 8)
    monkeypatch.setenv("MOSS_JAX_INT8_KERNEL", "0")
    get_decoder.cache_clear()
    np.testing.assert_array_equal(with_kernel, generate(qd, config, ids, 8))
    get_decoder.cache_clear()
