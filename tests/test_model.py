import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax.config import PRESETS
from moss_jax.model import KVCache, MossLM, abstract_params, count_params, init_params, positions_from_segments
from moss_jax.sharding import MissingAxisNamesError, check_axis_names

CFG = PRESETS["debug"].replace(n_layers=3)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _ids(shape, seed=0, vocab=CFG.vocab_size):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape), jnp.int32)


def test_moss_moon_003_eval_shape_param_count():
    abstract = abstract_params(PRESETS["moss-moon-003"])
    n = count_params(abstract)
    assert abs(n / 16.7e9 - 1) < 0.005, n
    assert n == PRESETS["moss-moon-003"].num_params
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(nn.unbox(abstract)))


@pytest.mark.parametrize("preset", ["tiny", "125m", "350m", "2b", "6b"])
def test_param_count_formula(preset):
    assert count_params(abstract_params(PRESETS[preset])) == PRESETS[preset].num_params


def test_every_param_has_axis_names():
    abstract = abstract_params(CFG)
    check_axis_names(abstract)
    names = {
        leaf.names for leaf in jax.tree_util.tree_leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    }
    assert ("layers", "embed", "heads", "head_dim") in names
    unnamed = {"w": jax.ShapeDtypeStruct((2, 2), jnp.float32)}
    with pytest.raises(MissingAxisNamesError, match="w"):
        check_axis_names(unnamed)


@pytest.mark.parametrize("layout", ["bshk", "bhsk"])
def test_kv_cache_decoding_matches_full_forward(params, layout):
    cfg = CFG.replace(kv_cache_layout=layout)
    model = MossLM(cfg)
    ids = _ids((2, 14))
    full = model.apply({"params": params}, ids)
    cache = KVCache.init(cfg, batch=2, max_len=32)
    assert cache.k.shape[2 if layout == "bshk" else 3] == cache.max_len == 32
    prompt = 5
    logits, cache = model.apply({"params": params}, ids[:, :prompt], cache=cache)
    np.testing.assert_allclose(logits, full[:, :prompt], atol=1e-5, rtol=0)
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    for t in range(prompt, ids.shape[1]):
        logits, cache = step(params, ids[:, t : t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=0)
    assert int(cache.index) == 14 and cache.lengths.tolist() == [14, 14]


def test_last_logits_only(params):
    model = MossLM(CFG)
    ids = _ids((2, 7), seed=5)
    full = model.apply({"params": params}, ids)
    last = model.apply({"params": params}, ids, last_logits_only=True)
    assert last.shape == (2, 1, CFG.vocab_size)
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["bshk", "bhsk"])
def test_kv_cache_left_padded_batch(params, layout):
    """Rows of different prompt lengths (left-padded) decode like each row alone."""
    cfg = CFG.replace(kv_cache_layout=layout)
    model = MossLM(cfg)
    ids = _ids((2, 10), seed=3)
    seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 10], jnp.int32)
    cache = KVCache.init(cfg, batch=2, max_len=16)
    _, cache = model.apply({"params": params}, ids[:, :7], segment_ids_BxL=seg[:, :7], cache=cache)
    step_logits, _ = model.apply({"params": params}, ids[:, 7:], cache=cache)
    alone = model.apply({"params": params}, ids[:1, 3:])
    np.testing.assert_allclose(step_logits[0], alone[0, 4:], atol=1e-5, rtol=0)


def test_packed_segments_equal_separate_runs(params):
    model = MossLM(CFG)
    a, b, c = _ids((1, 6), 1), _ids((1, 5), 2), _ids((1, 4), 3)
    packed = jnp.concatenate([a, b, c, jnp.zeros((1, 3), jnp.int32)], axis=1)
    seg = jnp.asarray([[1] * 6 + [2] * 5 + [3] * 4 + [0] * 3], jnp.int32)
    out = model.apply({"params": params}, packed, segment_ids_BxL=seg)
    for x, start in ((a, 0), (b, 6), (c, 11)):
        alone = model.apply({"params": params}, x)
        np.testing.assert_allclose(out[0, start : start + x.shape[1]], alone[0], atol=1e-5, rtol=0)
    assert positions_from_segments(seg)[0].tolist() == list(range(6)) + list(range(5)) + list(range(4)) + [0, 1, 2]


def test_scan_and_loop_and_remat_agree(params):
    from moss_jax.convert import unstack_layers

    ids = _ids((2, 9))
    ref = MossLM(CFG).apply({"params": params}, ids)
    loop_cfg = CFG.replace(scan_layers=False)
    loop = MossLM(loop_cfg).apply({"params": unstack_layers(params, CFG.n_layers)}, ids)
    np.testing.assert_allclose(loop, ref, atol=1e-6, rtol=0)

    def loss(p, cfg):
        return MossLM(cfg).apply({"params": p}, ids).mean()

    g_ref = jax.grad(loss)(params, CFG)
    for policy in ("full", "dots", "dots_no_batch", "save_attention_out", "dots_no_batch_attention"):
        g = jax.grad(loss)(params, CFG.replace(remat_policy=policy))
        jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=0), g, g_ref)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_attention_remat_policies_save_the_named_residuals(params, impl):
    """`save_attention_out` keeps the attention output (and, for our kernels, the log-sum-exp the
    backward needs, so the forward kernel does not run twice); `full` keeps neither."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    from moss_jax.convert import unstack_layers

    ids = _ids((2, 16))
    unrolled = unstack_layers(params, CFG.n_layers)  # (a scan's residuals show as scan outputs)

    def saved(policy):
        cfg = CFG.replace(remat_policy=policy, attention_impl=impl, scan_layers=False)
        fn = lambda p: MossLM(cfg).apply({"params": p}, ids).mean()  # noqa: E731
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            print_saved_residuals(fn, unrolled)
        return buf.getvalue()

    kept = saved("save_attention_out")
    assert "named 'attention_out'" in kept
    assert ("named 'attention_lse'" in kept) == (impl == "blockwise")
    both = saved("dots_no_batch_attention")
    assert "named 'attention_out'" in both and "dot_general" in both
    assert "named 'attention" not in saved("full")


def test_bf16_compute_is_close(params):
    ids = _ids((2, 9))
    ref = MossLM(CFG).apply({"params": params}, ids)
    out = MossLM(CFG.replace(dtype="bfloat16")).apply({"params": params}, ids)
    assert out.dtype == jnp.float32  # logits stay fp32
    np.testing.assert_allclose(out, ref, atol=5e-2, rtol=0)


def test_out_of_vocab_ids_are_an_error(params):
    model = MossLM(CFG)
    bad = np.zeros((2, 4), np.int32)
    bad[1, 2] = CFG.vocab_size
    with pytest.raises(ValueError, match=r"input_ids\[1, 2\] = 512 is outside the vocabulary \[0, 512\)"):
        model.apply({"params": params}, bad)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.apply({"params": params}, bad)
    # Under jit the check cannot raise; the bad row becomes NaN instead of a silently clipped id.
    out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(bad))
    assert np.isnan(out[1, 2:]).all() and np.isfinite(out[0]).all()


def test_initial_weights_for_a_seed_are_stable():
    """Flax draws each parameter's init from the module rng in creation order, so reordering
    parameter creation silently changes a seed's initial weights (and every figure of the
    chaotic tiny-model demo). Sums recorded from the debug preset, seed 0, jax 0.10.2."""
    p = nn.unbox(init_params(PRESETS["debug"], jax.random.PRNGKey(0)))["layers"]
    sums = {
        ("attn", "query"): -0.9673088489853399,
        ("attn", "key"): -5.082367340595738,
        ("attn", "value"): -0.2371955966691388,
        ("attn", "out"): -0.3445318590379429,
        ("mlp", "fc_in_kernel"): 0.09905377094139567,
    }
    for (module, name), expected in sums.items():
        got = float(np.asarray(p[module][name], np.float64).sum())
        assert got == pytest.approx(expected, rel=1e-6), f"{module}/{name}: init changed ({got} vs {expected})"


def test_full_kv_cache_is_an_error(params):
    """A chunk past the cache's end would be written over its last slots (clamped) and give
    wrong logits; with a concrete index it raises, naming the cache size, index and chunk."""
    model = MossLM(CFG)
    ids = _ids((1, 10))
    full = model.apply({"params": params}, ids)
    _, cache = model.apply({"params": params}, ids[:, :4], cache=KVCache.init(CFG, batch=1, max_len=6))
    for t in (4, 5):  # the last two slots still fit
        logits, cache = model.apply({"params": params}, ids[:, t : t + 1], cache=cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="1-token chunk at slot index 6 needs 7 slots, the cache has 6"):
        model.apply({"params": params}, ids[:, 6:7], cache=cache)
    # A chunk that straddles the end.
    _, cache = model.apply({"params": params}, ids[:, :4], cache=KVCache.init(CFG, batch=1, max_len=6))
    with pytest.raises(ValueError, match="3-token chunk at slot index 4 needs 7 slots, the cache has 6"):
        model.apply({"params": params}, ids[:, 4:7], cache=cache)


@pytest.mark.parametrize("layout", ["bshk", "bhsk"])
def test_full_kv_cache_under_jit_gives_nan(params, layout):
    """Under jit the index is traced: a chunk that does not fit gives NaN logits, never wrong ones."""
    cfg = CFG.replace(kv_cache_layout=layout)
    model = MossLM(cfg)
    ids = _ids((2, 10))
    full = model.apply({"params": params}, ids)
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    hidden = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c, head=False))
    _, cache = step(params, ids[:, :4], KVCache.init(cfg, batch=2, max_len=6))
    straddle, _ = step(params, ids[:, 4:7], cache)
    assert np.isnan(straddle).all()
    for t in range(4, 9):
        logits, new_cache = step(params, ids[:, t : t + 1], cache)
        if t < 6:
            np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=0)
        else:
            assert np.isnan(logits).all(), t
            assert np.isnan(hidden(params, ids[:, t : t + 1], cache)[0]).all()
        cache = new_cache


def test_misused_cache_errors_name_the_cache(params):
    model = MossLM(CFG)
    with pytest.raises(ValueError, match="8-token chunk does not fit the KV cache of 6 slots"):
        model.apply({"params": params}, _ids((1, 8)), cache=KVCache.init(CFG, batch=1, max_len=6))
    with pytest.raises(ValueError, match="the KV cache holds 3 rows but the input has batch 2"):
        model.apply({"params": params}, _ids((2, 4)), cache=KVCache.init(CFG, batch=3, max_len=8))
    # Static shapes: also an error under jit.
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    with pytest.raises(ValueError, match="does not fit the KV cache of 6 slots"):
        step(params, _ids((1, 8)), KVCache.init(CFG, batch=1, max_len=6))


def test_inputs_past_max_len_are_an_error(params):
    """Rotary positions past max_len were never trained (HF CodeGen fails on them too)."""
    cfg = CFG.replace(max_len=8)  # the parameters do not depend on max_len
    model = MossLM(cfg)
    model.apply({"params": params}, _ids((1, 8)))
    with pytest.raises(ValueError, match="input of 9 tokens is longer than the model's context max_len=8"):
        model.apply({"params": params}, _ids((1, 9)))
    with pytest.raises(ValueError, match="max_len=8"):
        jax.jit(lambda p, x: model.apply({"params": p}, x))(params, _ids((1, 9)))
    with pytest.raises(ValueError, match="position 8 is past the model's context max_len=8"):
        model.apply({"params": params}, _ids((1, 2)), positions_BxL=jnp.asarray([[7, 8]]))
    # A cache larger than the context (a shared-slot serving cache) is allowed, positions are not.
    logits, cache = model.apply({"params": params}, _ids((1, 8)), cache=KVCache.init(cfg, batch=1, max_len=12))
    assert logits.shape == (1, 8, cfg.vocab_size)
    with pytest.raises(ValueError, match="position 8 is past"):
        model.apply({"params": params}, _ids((1, 1)), cache=cache)


def test_layer_norm_matches_two_pass_variance():
    """Rows with a large mean next to their spread: E[x^2] - E[x]^2 in fp32 loses the variance
    (error 0.13 at mean 1000, d 4096); torch's layer_norm subtracts the mean first."""
    from moss_jax.layers import layer_norm

    x = np.random.RandomState(0).randn(3, 4096).astype(np.float32) + np.asarray([[0.0], [100.0], [1000.0]], np.float32)
    ln = layer_norm(CFG, "ln")
    variables = ln.init(jax.random.key(0), jnp.asarray(x))
    got = np.asarray(ln.apply(variables, jnp.asarray(x)))
    x64 = x.astype(np.float64)
    centred = x64 - x64.mean(-1, keepdims=True)
    ref = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + CFG.layer_norm_eps)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)  # the one-pass variance: 0.13


def test_concrete_positions_closed_over_by_jit_are_checked_while_tracing():
    """Positions captured as a constant by a jitted function (as the head-loss tests do) are
    concrete while the function traces: the check must read them without staging a jnp op."""
    cfg = PRESETS["debug"]
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.zeros((2, 8), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    out = jax.jit(lambda p: MossLM(cfg).apply({"params": p}, ids, positions_BxL=positions))(params)
    assert out.shape == (2, 8, cfg.vocab_size)
    late = positions + cfg.max_len
    with pytest.raises(ValueError, match="past the model's context"):
        jax.jit(lambda p: MossLM(cfg).apply({"params": p}, ids, positions_BxL=late))(params)
