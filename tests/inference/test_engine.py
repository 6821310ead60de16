"""BatchEngine: concurrent requests, joining a running batch, cancellation."""

import threading

import numpy as np
import pytest

from moss_jax.inference import generate
from moss_jax.inference.decoder import Decoder
from moss_jax.inference.engine import BatchEngine, Request
from moss_jax.inference.sampling import SamplingParams


@pytest.fixture()
def engine(debug_model):
    config, params = debug_model
    decoder = Decoder(config, batch_size=4, cache_len=128, chunk_size=4)
    eng = BatchEngine(decoder, params, decode=lambda ids: " ".join(map(str, ids))).start()
    yield eng
    eng.shutdown()


def _collect(engine, request):
    events = []
    handle = engine.submit(request, events.append)
    return handle, events


def test_concurrent_requests_match_single_generation(engine, debug_model):
    config, params = debug_model
    rng = np.random.RandomState(5)
    requests = []
    for i in range(10):
        prompt = rng.randint(0, config.vocab_size, rng.randint(3, 40)).tolist()
        sampling = SamplingParams(temperature=0.8, seed=i) if i % 3 == 0 else SamplingParams()
        requests.append(Request(prompt, int(rng.randint(5, 30)), sampling))
    submitted = [_collect(engine, r) for r in requests]  # 10 requests, 4 slots
    for handle, _ in submitted:
        assert handle.done.wait(120)
    for (handle, events), r in zip(submitted, requests, strict=True):
        kw = {} if r.sampling.greedy else dict(temperature=r.sampling.temperature, seed=r.sampling.seed)
        ref = generate(params, config, np.asarray([r.prompt_ids]), r.max_new_tokens, **kw)[0, len(r.prompt_ids) :]
        tokens = [t for e in events for t in e.tokens]
        assert tokens == ref.tolist() == handle.stream.tokens
        assert "".join(e.text for e in events) == " ".join(map(str, tokens))
        assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
    assert engine.stats["admitted"] == 10
    assert engine.stats["joined_running_batch"] > 0  # continuous batching, not waves
    assert engine.load() == {"active": 0, "pending": 0}


def test_cancel_frees_the_slot(engine):
    first = threading.Event()
    events = []

    def on_event(ev):
        events.append(ev)
        first.set()

    handle = engine.submit(Request([5, 6, 7], 100), on_event)
    assert first.wait(60)
    handle.cancel()
    assert handle.done.wait(60)
    assert handle.finish_reason == "cancelled" and events[-1].finish_reason == "cancelled"
    assert len(handle.stream.tokens) < 100
    assert engine.load() == {"active": 0, "pending": 0}
    # The freed slot serves the next request.
    h2, ev2 = _collect(engine, Request([1, 2], 5))
    assert h2.done.wait(60) and len([t for e in ev2 for t in e.tokens]) == 5


def test_requests_that_cannot_fit_are_refused(engine):
    with pytest.raises(ValueError, match=r"^60 prompt tokens \(padded to 64\) \+ 100 new tokens need 164 of the 128"):
        engine.submit(Request(list(range(60)), 100), lambda ev: None)
    with pytest.raises(ValueError, match="empty"):
        engine.submit(Request([], 5), lambda ev: None)
