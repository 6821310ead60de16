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
from moss_jax.inference.server_app import MAX_BODY_BYTES, create_app


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


def _raw_post(url, head_extra, body_chunks, timeout=10):
    """Sends a POST by hand (chunked body, never terminated); returns the first bytes of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        conn.sendall(head_extra)
        for chunk in body_chunks:
            conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = conn.recv(4096)  # socket.timeout here: the server waited for the rest of the body
            if not data:
                break
            answer += data
        return answer


def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(server):
    url, _ = server
    chunk = b"a" * (64 << 10)
    chunks = [chunk] * (MAX_BODY_BYTES // len(chunk) + 1)  # just over 1 MiB, and the body never ends
    answer = _raw_post(url, b"Transfer-Encoding: chunked\r\n\r\n", chunks)
    assert answer.startswith(b"HTTP/1.1 413") and b"request body over 1048576 bytes" in answer
    # A chunked body under the limit is read whole and handled as usual.
    body = json.dumps(_body(0, max_tokens=2, temperature=0)).encode()
    r = httpx.post(url + "/v1/chat/completions", content=iter([body[:10], body[10:]]), timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    "content,reason",
    [(b"[" * 100_000, "nested too deeply"), (b'{"seed": ' + b"1" * 5000 + b"}", "4300 digits")],
    ids=["deep-nesting", "5000-digit-int"],
)
def test_json_the_parser_refuses_is_a_400_not_a_500(server, content, reason):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", content=content, timeout=30)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert "not valid JSON" in r.json()["error"]["message"] and reason in r.json()["error"]["message"]


def test_created_is_the_request_time(server):
    url, _ = server
    time.sleep(1.1)  # the app was created at least a second before this request
    before = int(time.time())
    assert httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["created"] >= before
    with httpx.stream("POST", url + "/v1/chat/completions", json=_body(1, stream=True, max_tokens=2), timeout=60) as r:
        chunks = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line and "[DONE]" not in line]
    assert chunks and all(c["created"] >= before for c in chunks)


def test_stream_options_include_usage(server):
    url, _ = server
    body = _body(2, stream=True, max_tokens=5, temperature=0, stream_options={"include_usage": True})
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    *content, usage = chunks
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in content)
    assert usage["choices"] == [] and usage["object"] == "chat.completion.chunk"
    alone = httpx.post(url + "/v1/chat/completions", json=_body(2, max_tokens=5, temperature=0), timeout=60).json()
    assert usage["usage"] == alone["usage"] and 0 < usage["usage"]["completion_tokens"] <= 5
    # Without include_usage no chunk has a usage field (as before).
    plain = [json.loads(line.removeprefix("data: ")) for line in _lines(url, _body(2, stream=True, max_tokens=2))]
    assert not any("usage" in c for c in plain)
    for bad in ({"include_usage": "yes"}, {"include_obfuscation": True}, ["include_usage"]):
        r = httpx.post(url + "/v1/chat/completions", json=_body(2, stream=True, stream_options=bad), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    r = httpx.post(url + "/v1/chat/completions", json=_body(2, stream_options={"include_usage": True}), timeout=30)
    assert r.status_code == 400 and "only allowed with 'stream': true" in r.json()["error"]["message"]


def _lines(url, body):
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        return [line for line in r.iter_lines() if line and line != "data: [DONE]"]
