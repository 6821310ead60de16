"""The OpenAI-compatible server over real HTTP on loopback (uvicorn + httpx)."""

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from moss_jax.inference.decoder import Decoder
from moss_jax.inference.engine import BatchEngine
from moss_jax.inference.server_app import create_app


@pytest.fixture(scope="module")
def server(chat_model, tokenizer):
    config, params = chat_model
    # The weights do not depend on max_len: a longer context leaves room for long replies after the
    # ~380-token meta instruction of this small vocabulary. One 1024-slot cache holds a 512 prompt
    # bucket plus up to 512 new tokens.
    config = config.replace(max_len=1024)
    decoder = Decoder(config, batch_size=16, cache_len=1024, chunk_size=4)
    engine = BatchEngine(decoder, params, tokenizer.decode).start()
    app = create_app(engine, tokenizer, config.max_len, "moss-test", default_max_tokens=16)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    srv.should_exit = True
    thread.join(10)
    engine.shutdown()


def _body(i, **kw):
    return {"messages": [{"role": "user", "content": f"Request number {i}: tell me about {i * 7}."}], **kw}


async def _stream(client, url, body):
    """(content, finish_reason, chunk ids) of one streamed completion, checking the SSE framing."""
    parts, finish, ids = [], None, set()
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        assert chunk["object"] == "chat.completion.chunk"
        ids.add(chunk["id"])
        choice = chunk["choices"][0]
        parts.append(choice["delta"].get("content", ""))
        finish = choice["finish_reason"] or finish
    return "".join(parts), finish, ids


def test_sixteen_concurrent_streams(server):
    url, engine = server

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            kw = dict(stream=True, max_tokens=24, temperature=0)
            streamed = await asyncio.gather(*[_stream(client, url, _body(i, **kw)) for i in range(16)])
            # The same requests one at a time, not streamed: the reference for each stream.
            alone = []
            for i in range(16):
                r = await client.post(url + "/v1/chat/completions", json=_body(i, max_tokens=24, temperature=0))
                assert r.status_code == 200
                alone.append(r.json())
            return streamed, alone

    admitted_before = engine.stats["admitted"]
    streamed, alone = asyncio.run(main())
    assert engine.stats["admitted"] - admitted_before == 32
    completion_ids = set()
    for (text, finish, ids), ref in zip(streamed, alone, strict=True):
        assert len(ids) == 1  # every chunk of a stream belongs to one completion
        completion_ids |= ids
        message = ref["choices"][0]
        assert text == message["message"]["content"]  # no token lost, none from another request
        assert finish == message["finish_reason"] in ("stop", "length")
        assert 0 < ref["usage"]["completion_tokens"] <= 24
    assert len(completion_ids) == 16
    assert len({t for t, _, _ in streamed}) > 1  # not one answer copied to every stream


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages"),
        (_body(0, temperature=3), "temperature"),
        (_body(0, max_tokens=0), "max_tokens"),
        (_body(0, max_tokens=100_000), "max_tokens"),
        (_body(0, n=2), "n"),
        (_body(0, stream="yes"), "stream"),
        (_body(0, stop=[1]), "stop"),
        (_body(0, tools=[]), "tools"),
        ([1, 2], None),
    ],
)
def test_bad_requests_get_400_with_a_message(server, body, param):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param


def test_other_errors_are_json(server):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/chat/completions", timeout=30)
    assert r.status_code == 405 and r.json()["error"]["message"]
    r = httpx.get(url + "/nowhere", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", content=b"x" * (2 << 20), timeout=30)
    assert r.status_code == 413


def test_models_and_health(server):
    url, _ = server
    models = httpx.get(url + "/v1/models", timeout=30).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "moss-test"
    assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok", "active": 0, "pending": 0}


def test_disconnect_mid_stream_frees_the_slot(server):
    url, engine = server
    cancelled = engine.stats["finished_cancelled"]

    async def read_one_chunk_and_leave():
        async with httpx.AsyncClient(timeout=60) as client:
            body = _body(99, stream=True, max_tokens=500, ignore_eos=True)
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if '"content": "' in line and '"content": ""' not in line:
                        break  # leave while the server is still generating

    asyncio.run(read_one_chunk_and_leave())
    deadline = time.time() + 30
    while engine.load()["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert engine.load() == {"active": 0, "pending": 0}
    assert engine.stats["finished_cancelled"] == cancelled + 1
