"""generate(): exact greedy decoding, stops, streaming, seeds, buckets, sharded decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax.inference import generate, get_decoder
from moss_jax.model import MossLM, param_shardings
from moss_jax.sharding import make_mesh

NEW = 12


@pytest.fixture(scope="module")
def batch(debug_model):
    config, _ = debug_model
    rng = np.random.RandomState(0)
    ids = rng.randint(3, config.vocab_size, (3, 9)).astype(np.int32)
    seg = np.ones_like(ids)
    seg[1, :4] = 0
    seg[2, :7] = 0
    ids[seg == 0] = 2  # a pad id that never appears among the real tokens
    return ids, seg


def _reference(params, config, prompt, steps, penalty=1.0):
    """Argmax over a full forward pass at every step (no cache), optional repetition penalty."""
    model = MossLM(config)
    width = 32  # right-padded to one width: causal attention keeps position n-1 exact, one compile
    forward = jax.jit(lambda p, x, n: model.apply({"params": p}, x)[0, n - 1])
    tokens = list(prompt)
    for _ in range(steps):
        padded = jnp.asarray([tokens + [0] * (width - len(tokens))])
        logits = np.asarray(forward(params, padded, len(tokens)), np.float64)
        seen = np.zeros(config.vocab_size, bool)
        seen[tokens] = True  # every id in the context: prompt and generated
        logits = np.where(seen, np.where(logits < 0, logits * penalty, logits / penalty), logits)
        tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt) :]


def test_greedy_equals_full_forward_argmax(debug_model, batch):
    config, params = debug_model
    ids, seg = batch
    out = generate(params, config, ids, NEW, segment_ids_BxL=seg)
    assert out.shape == (3, 9 + NEW) and out.dtype == np.int32
    np.testing.assert_array_equal(out[:, :9], ids)
    for b in range(3):
        assert out[b, 9:].tolist() == _reference(params, config, ids[b][seg[b] != 0], NEW), f"row {b}"


@pytest.mark.parametrize("weights", ["float32", "int8", "int8_dynamic"])
def test_unrolled_token_loop_equals_scanned(debug_model, batch, weights):
    """The CPU decode loop's per-layer weight copies (Decoder unroll_layers) change nothing."""
    from moss_jax.inference.decoder import Decoder
    from moss_jax.inference.sampling import SamplingParams
    from moss_jax.quant import quantize_params

    config, params = debug_model
    params = quantize_params(params, weights)
    ids, seg = batch
    prompts = [[int(t) for t in row[m != 0]] for row, m in zip(ids, seg, strict=True)]
    out = {}
    for unroll in (False, True):
        decoder = Decoder(config, batch_size=4, cache_len=32, chunk_size=8, unroll_layers=unroll)
        state, first = decoder.insert(
            params, decoder.init_state(), prompts, [0, 1, 2], 16, [NEW] * 3, [[]] * 3, [SamplingParams()] * 3
        )
        state, tokens = decoder.decode_chunk(params, state)
        out[unroll] = (first, tokens)
    np.testing.assert_array_equal(out[True][0], out[False][0])
    np.testing.assert_array_equal(out[True][1], out[False][1])


def test_cache_layouts_decode_the_same_tokens(debug_model, batch):
    """The CPU default [Y, B, H, S, K] KV cache and the kernels' [Y, B, S, H, K] one agree."""
    from moss_jax.inference.decoder import Decoder
    from moss_jax.inference.sampling import SamplingParams

    config, params = debug_model
    ids, seg = batch
    prompts = [[int(t) for t in row[m != 0]] for row, m in zip(ids, seg, strict=True)]
    out = {}
    for layout in ("bshk", "bhsk"):
        decoder = Decoder(config, batch_size=4, cache_len=32, chunk_size=8, cache_layout=layout)
        state = decoder.init_state()
        assert state.cache.k.shape[2 if layout == "bshk" else 3] == 32
        state, first = decoder.insert(
            params, state, prompts, [0, 2, 3], 16, [NEW] * 3, [[]] * 3, [SamplingParams()] * 3
        )
        state, tokens = decoder.decode_chunk(params, state)
        out[layout] = np.concatenate([first[:, None], tokens[[0, 2, 3]]], axis=1)
    np.testing.assert_array_equal(out["bhsk"], out["bshk"])
    for b in range(3):
        assert out["bhsk"][b, :9].tolist() == _reference(params, config, prompts[b], 9), f"row {b}"


def test_repetition_penalty_over_the_whole_context(debug_model, batch):
    config, params = debug_model
    # Larger embedding/head weights make greedy decoding loop over a few ids, so the penalty matters.
    params = dict(params, embedding=params["embedding"] * 10, lm_head_kernel=params["lm_head_kernel"] * 10)
    ids, seg = batch
    out = generate(params, config, ids, NEW, segment_ids_BxL=seg, repetition_penalty=1.8)
    plain = generate(params, config, ids, NEW, segment_ids_BxL=seg)
    assert (out != plain).any()  # the penalty changes the greedy path on this model
    for b in range(3):
        assert out[b, 9:].tolist() == _reference(params, config, ids[b][seg[b] != 0], NEW, penalty=1.8), f"row {b}"


def test_stop_token_and_pad(debug_model, batch):
    config, params = debug_model
    ids, seg = batch
    free = generate(params, config, ids, NEW, segment_ids_BxL=seg)
    stop = int(free[0, 9 + 3])
    first_hit = [next((i for i, t in enumerate(row[9:]) if t == stop), None) for row in free]
    out = generate(params, config, ids, NEW, segment_ids_BxL=seg, stop_token_ids=[stop], pad_id=-7)
    for b in range(3):
        n = NEW if first_hit[b] is None else first_hit[b] + 1  # the stop token is kept
        assert out[b, 9 : 9 + n].tolist() == free[b, 9 : 9 + n].tolist()
        assert (out[b, 9 + n :] == -7).all()
    assert out.shape[1] == 9 + max(NEW if h is None else h + 1 for h in first_hit)


def test_stop_strings_and_streaming_callback(debug_model, batch):
    config, params = debug_model
    ids, seg = batch
    decode = lambda toks: "".join(f"<{t}>" for t in toks)  # noqa: E731
    free = generate(params, config, ids, NEW, segment_ids_BxL=seg)
    stop_text = f"<{free[1, 9 + 5]}>"
    updates = []
    out = generate(
        params,
        config,
        ids,
        NEW,
        segment_ids_BxL=seg,
        stop_strings=[stop_text],
        decode_fn=decode,
        callback=updates.append,
        chunk_size=4,
    )
    pad = config.pad_token_id or 0
    for b in range(3):
        row = free[b, 9:].tolist()
        cut = next((i + 1 for i, t in enumerate(row) if f"<{t}>" == stop_text), NEW)
        assert out[b, 9 : 9 + cut].tolist() == row[:cut]
        streamed = [t for u in updates for t in u.tokens[b]]
        assert streamed == row[:cut]  # every token once, in order, none after the stop
        text = "".join(u.texts[b] for u in updates)
        assert text == decode(row[:cut]).split(stop_text)[0]  # the stop string itself is not shown
        assert (out[b, 9 + cut :] == pad).all()
    assert updates[-1].finished == [True, True, True]
    assert len(updates) > 2  # first token, then one update per chunk of 4


def test_seeded_sampling_reproduces(debug_model, batch):
    config, params = debug_model
    ids, seg = batch
    kw = dict(segment_ids_BxL=seg, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.02)
    a = generate(params, config, ids, NEW, seed=11, **kw)
    b = generate(params, config, ids, NEW, seed=11, **kw)
    c = generate(params, config, ids, NEW, seed=12, **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_buckets_do_not_recompile(debug_model):
    config, params = debug_model
    rng = np.random.RandomState(3)
    for batch_size, length, new in [(3, 9, 10), (4, 12, 16), (3, 16, 11)]:
        generate(params, config, rng.randint(0, config.vocab_size, (batch_size, length)), new)
    decoder = get_decoder(config, 4, 32, None, 16)  # batch bucket 4, prompt bucket 16 + new bucket 16
    assert decoder._chunk_fn._cache_size() == 1
    assert decoder._insert_fn._cache_size() == 1


def test_bad_inputs(debug_model):
    config, params = debug_model
    with pytest.raises(ValueError, match="max_len"):
        generate(params, config, np.zeros((1, config.max_len - 3), np.int32), 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(params, config, np.asarray([[1, config.vocab_size]]), 4)
    with pytest.raises(ValueError, match="no real token"):
        generate(params, config, np.asarray([[1, 2]]), 4, segment_ids_BxL=np.asarray([[0, 0]]))
    with pytest.raises(ValueError, match="decode function"):
        generate(params, config, np.asarray([[1, 2]]), 4, stop_strings=["x"])


def test_a_prompt_longer_than_the_cache_is_a_clear_error(debug_model):
    """Not numpy's "could not broadcast (20,) into (4,)": the prompt length and cache size."""
    from moss_jax.inference.decoder import Decoder
    from moss_jax.inference.sampling import SamplingParams

    config, params = debug_model
    decoder = Decoder(config, batch_size=1, cache_len=4, chunk_size=2)
    with pytest.raises(ValueError, match="prompt of 20 tokens does not fit the KV cache of 4 slots"):
        decoder.insert(params, decoder.init_state(), [list(range(3, 23))], [0], 4, [1], [[]], [SamplingParams()])


def test_tensor_parallel_decode_matches_single_device(debug_model, batch):
    config, params = debug_model
    ids, seg = batch
    mesh = make_mesh(data=1, fsdp=1, tensor=4, devices=jax.devices()[:4])
    sharded = jax.device_put(params, param_shardings(config, mesh))
    assert "tensor" in str(sharded["layers"]["attn"]["query"].sharding.spec)
    out = generate(sharded, config, ids, NEW, segment_ids_BxL=seg, mesh=mesh)
    np.testing.assert_array_equal(out, generate(params, config, ids, NEW, segment_ids_BxL=seg))
    decoder = get_decoder(config, 4, 32, mesh, 16)
    heads_axis = 3 if decoder.config.kv_cache_layout == "bshk" else 2
    assert decoder.init_state().cache.k.sharding.spec[heads_axis] == "tensor"  # the KV cache is split over heads too
