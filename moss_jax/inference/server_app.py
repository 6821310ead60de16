"""The HTTP app: OpenAI-compatible chat completions over the batching engine (Starlette/ASGI).

    POST /v1/chat/completions   (stream: true -> server-sent events, ends with `data: [DONE]`)
    GET  /v1/models
    GET  /health

Every error is a JSON body `{"error": {"message", "type", "param", "code"}}`: 400 for a
malformed request, 404/405 for a wrong path or method, 413 for an oversized body. A streaming
client that disconnects cancels its request, which frees its batch slot.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from data_pipelines import specials as sp
from moss_jax.inference.engine import BatchEngine, Event, Request
from moss_jax.inference.openai_api import (
    RequestError,
    chunk_object,
    completion_object,
    error_body,
    new_completion_id,
    parse_request,
)
from moss_jax.inference.prompt import IDENTITY, PromptTooLongError, build_prompt, meta_instruction
from moss_jax.tools.registry import TOOLS

MAX_BODY_BYTES = 1 << 20


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, param, kind), status_code=status)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(
    engine: BatchEngine, tokenizer: Any, max_len: int, model_name: str, default_max_tokens: int = 512
) -> Starlette:
    """The ASGI app. `engine` must be started; `max_len` is the model's context length."""
    created = int(time.time())
    eom_id = tokenizer.eom_id

    async def chat_completions(http: HTTPRequest):
        declared = http.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return _error(413, f"request body over {MAX_BODY_BYTES} bytes")
        raw = await http.body()
        if len(raw) > MAX_BODY_BYTES:
            return _error(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"the request body is not valid JSON: {e}")
        try:
            req = parse_request(body)
            max_tokens = req.max_tokens or min(default_max_tokens, max_len // 2)
            if max_tokens >= max_len:
                raise RequestError(f"'max_tokens' must be below the context length {max_len}", "max_tokens")
            identity = IDENTITY if req.system is None else req.system.rstrip("\n") + "\n"
            # Tool calls are a chat-CLI feature; the server's model is told every tool is off.
            meta = meta_instruction([f"{t.label}: disabled." for t in TOOLS], False, identity=identity)
            text, _ = build_prompt(
                req.turns,
                meta=meta,
                tools=False,
                count_tokens=lambda s: len(tokenizer.encode(s)),
                max_tokens=max_len - max_tokens,
            )
            prompt_ids = tokenizer.encode(text)
            request = Request(
                prompt_ids=prompt_ids,
                max_new_tokens=max_tokens,
                sampling=req.sampling,
                stop_ids=() if req.ignore_eos else (eom_id,),
                stop_strings=req.stop + (sp.ROLE_HUMAN,),
            )
            engine.check(request)
        except PromptTooLongError as e:
            return _error(400, str(e), "messages")
        except RequestError as e:
            return _error(400, str(e), e.param)
        except ValueError as e:
            return _error(400, str(e))

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        handle = engine.submit(request, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        completion_id = new_completion_id()
        model = req.model or model_name

        if req.stream:

            async def stream():
                try:
                    yield _sse(chunk_object(completion_id, model, created, {"role": "assistant", "content": ""}, None))
                    started = False
                    while True:
                        ev = await events.get()
                        content = ev.text if started else ev.text.lstrip()
                        started = started or bool(content)
                        if content:
                            yield _sse(chunk_object(completion_id, model, created, {"content": content}, None))
                        if ev.finish_reason is not None:
                            if ev.error is not None:
                                yield _sse(error_body(ev.error, kind="server_error"))
                            else:
                                yield _sse(chunk_object(completion_id, model, created, {}, ev.finish_reason))
                            yield "data: [DONE]\n\n"
                            return
                finally:
                    handle.cancel()  # a no-op when finished; frees the slot when the client left

            return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        try:
            parts = []
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=1.0)
                except TimeoutError:
                    if await http.is_disconnected():
                        return _error(499, "client closed the request")
                    continue
                parts.append(ev.text)
                if ev.finish_reason is not None:
                    break
        finally:
            handle.cancel()
        if ev.error is not None:
            return _error(500, ev.error, kind="server_error")
        text = "".join(parts).lstrip()
        return JSONResponse(
            completion_object(completion_id, model, text, ev.finish_reason, len(prompt_ids), len(handle.stream.tokens))
        )

    async def models(_: HTTPRequest):
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "moss_jax"}],
            }
        )

    async def health(_: HTTPRequest):
        return JSONResponse({"status": "ok", **engine.load()})

    async def http_error(_: HTTPRequest, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
