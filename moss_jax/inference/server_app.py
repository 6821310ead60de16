"""The HTTP app: OpenAI-compatible chat completions over the batching engine (Starlette/ASGI).

    POST /v1/chat/completions   (stream: true -> server-sent events, ends with `data: [DONE]`)
    GET  /v1/models
    GET  /health
    GET  /moss/info             (what the web page needs: tools available, tags, defaults)
    GET  /                      (the web chat page, static/index.html)

Every error is a JSON body `{"error": {"message", "type", "param", "code"}}`: 400 for a
malformed request, 404/405 for a wrong path or method, 413 for an oversized body (refused as
soon as the bytes read pass MAX_BODY_BYTES, chunked uploads included), 429 when
`max_tool_requests` tool-loop requests already run, 503 when `max_pending` requests already
wait, 500 (`server_error`) for an exception no handler expected (its traceback goes to the
log). `create_app` warns when the engine's cache cannot hold a request without `max_tokens`
whose prompt takes the rest of the context. A streaming client that disconnects cancels its
request, which frees its batch slot.

A request with `moss_tools` runs MOSS's tool loop here (ChatSession on a worker thread, its
generations batched by the engine through EngineGenerator): inner thoughts and commands to
`<eoc>`, the tools, `<|Results|>`, the reply to `<eom>`. Streaming sends the first pass as
`moss_tool_pass: {"stage": "thoughts", "delta"}` chunks and the tool results as one
`moss_tool_pass: {"stage": "results", ...}` chunk before the reply's content deltas; a
non-streaming answer carries `moss_tool_pass` next to `choices`. A tool request is checked
whole before anything runs (ChatSession.first_pass: the prompt plus room for the tool pass
and the reply), so a request that cannot fit is a 400, never a failure after its tools ran.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from data_pipelines import specials as sp
from moss_jax.inference.chat_session import ChatSession
from moss_jax.inference.engine import BatchEngine, EngineGenerator, Event, GenerationCancelled, Request
from moss_jax.inference.openai_api import (
    TOOL_SWITCHES,
    ChatRequest,
    RequestError,
    chunk_object,
    completion_object,
    error_body,
    new_completion_id,
    parse_request,
    tool_pass_object,
    usage_object,
)
from moss_jax.inference.prompt import IDENTITY, PromptTooLongError, build_prompt, meta_instruction, reply_budget_why
from moss_jax.inference.sampling import MOSS_DEFAULTS
from moss_jax.inference.tags import PreferenceTags, TagChoice, TagError, check_tag_token, resolve_tag
from moss_jax.tools import ToolRegistry, ToolsConfig
from moss_jax.tools.registry import TOOLS
from moss_jax.tools.search_tool import make_backend

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
# Retry-After (seconds) of a 429 or 503.
RETRY_AFTER_S = 5
STATIC_DIR = Path(__file__).parent / "static"


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, param, kind), status_code=status)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _busy(status: int, message: str) -> JSONResponse:
    response = _error(status, message, kind="server_overloaded")
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


async def _read_body(http: HTTPRequest, limit: int) -> bytes | None:
    """The request body, read chunk by chunk; None as soon as it is longer than `limit` bytes
    (a chunked upload has no Content-Length to check first, so count what arrives)."""
    parts, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


class _Chunks:
    """The SSE `chat.completion.chunk` events of one completion.

    With `stream_options.include_usage` every chunk carries `"usage": null` and `usage()` is the
    extra chunk before `[DONE]` with no choices and the request's usage, as OpenAI's API does.
    """

    def __init__(self, completion_id: str, model: str, created: int, include_usage: bool):
        self.completion_id, self.model, self.created = completion_id, model, created
        self.include_usage = include_usage

    def __call__(self, delta: dict, finish: str | None = None, **extra: Any) -> str:
        obj = {**chunk_object(self.completion_id, self.model, self.created, delta, finish), **extra}
        if self.include_usage:
            obj["usage"] = None
        return _sse(obj)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        obj = chunk_object(self.completion_id, self.model, self.created, {}, None)
        obj["choices"] = []
        obj["usage"] = usage_object(prompt_tokens, completion_tokens)
        return _sse(obj)


def _warn_if_default_requests_cannot_fit(engine: BatchEngine, max_len: int, default_max_tokens: int) -> None:
    """Warns when a request without `max_tokens` whose prompt takes the rest of the context
    (`max_len - default_max_tokens` tokens) could never be scheduled: its prompt bucket plus
    its reply need more slots than the engine's cache has, so it would be refused (400)."""
    decoder = engine.decoder
    longest = max_len - default_max_tokens
    need = decoder.prompt_bucket(longest) + default_max_tokens
    if need > decoder.cache_len:
        logger.warning(
            "the %d-slot cache is smaller than a %d-token prompt (padded to %d) plus the default %d reply "
            "tokens (%d slots): requests without max_tokens and with long prompts will be refused; use a "
            "cache of at least %d slots (serve's --cache_len; its default, 2 x max_len, always fits)",
            decoder.cache_len,
            longest,
            decoder.prompt_bucket(longest),
            default_max_tokens,
            need,
            need,
        )


def create_app(
    engine: BatchEngine,
    tokenizer: Any,
    max_len: int,
    model_name: str,
    default_max_tokens: int = 512,
    *,
    tools_config: ToolsConfig | None = None,
    preference_tags: PreferenceTags | None = None,
    default_tag: TagChoice = "auto",
    max_pending: int | None = None,
    max_tool_requests: int | None = 16,
    make_generator: Callable[[], EngineGenerator] | None = None,
) -> Starlette:
    """The ASGI app. `engine` must be started; `max_len` is the model's context length.

    Args:
      tools_config: the tools requests may switch on (`moss_tools`); default Calculate and Solve.
      preference_tags: the checkpoint's preference_tags.json (tags.load_preference_tags), if any.
      default_tag: the tag choice of requests without `moss_tag` ("auto": best when tags exist).
      max_pending: answer 503 while this many requests already wait for a slot (None: no limit).
      max_tool_requests: answer 429 while this many `moss_tools` requests already run (each holds
        a worker thread from its first pass to its reply, and its tools may start solver
        processes, none of which `max_pending` counts; None: no limit).
      make_generator: the tool loop's generator per request (default `EngineGenerator(engine)`).
    """
    eom_id = tokenizer.eom_id
    base_tools = tools_config or ToolsConfig()
    available = {name: bool(getattr(base_tools, field)) for name, field in TOOL_SWITCHES.items()}
    search_backend = make_backend(base_tools) if base_tools.enable_search else None
    default_tag_token = resolve_tag(default_tag, preference_tags)  # TagError at start-up, not per request
    check_tag_token(default_tag_token, tokenizer)
    make_generator = make_generator or (lambda: EngineGenerator(engine))
    if max_tool_requests is not None and max_tool_requests < 1:
        raise ValueError(f"max_tool_requests must be >= 1 or None, got {max_tool_requests}")
    tool_slots = threading.BoundedSemaphore(max_tool_requests) if max_tool_requests is not None else None
    _warn_if_default_requests_cannot_fit(engine, max_len, min(default_max_tokens, max_len // 2))

    def request_tag(req: ChatRequest) -> str | None:
        if req.tag is None:
            return default_tag_token
        tag = resolve_tag(req.tag, preference_tags)
        check_tag_token(tag, tokenizer)
        return tag

    def request_tools(req: ChatRequest) -> ToolRegistry:
        missing = [name for name, on in req.tools.items() if on and not available[name]]
        if missing:
            raise RequestError(
                f"'moss_tools': {missing} not available on this server (Search needs --search_index_dir, "
                "Text2Image --txt2img_url)",
                "moss_tools",
            )
        config = dataclasses.replace(base_tools, **{TOOL_SWITCHES[name]: on for name, on in req.tools.items()})
        return ToolRegistry(config, search_backend=search_backend)

    async def chat_completions(http: HTTPRequest):
        created = int(time.time())
        if max_pending is not None and engine.load()["pending"] >= max_pending:
            return _busy(503, "the server is overloaded: too many requests are waiting; try again shortly")
        declared = http.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return _error(413, f"request body over {MAX_BODY_BYTES} bytes")
        raw = await _read_body(http, MAX_BODY_BYTES)
        if raw is None:
            return _error(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except RecursionError:
            return _error(400, "the request body is not valid JSON: nested too deeply")
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of over 4300 digits
            return _error(400, f"the request body is not valid JSON: {e}")
        try:
            req = parse_request(body)
            max_tokens = req.max_tokens or min(default_max_tokens, max_len // 2)
            if max_tokens >= max_len:
                raise RequestError(f"'max_tokens' must be below the context length {max_len}", "max_tokens")
            identity = IDENTITY if req.system is None else req.system.rstrip("\n") + "\n"
            tag = request_tag(req)
            if req.tools is not None:
                return await _tool_completion(http, req, identity, max_tokens, tag, request_tools(req), created)
            # Without `moss_tools` the model is told every tool is off.
            meta = meta_instruction([f"{t.label}: disabled." for t in TOOLS], False, identity=identity)
            prompt_ids = build_prompt(
                req.turns,
                meta=meta,
                tools=False,
                encode=tokenizer.encode_parts,
                max_tokens=max_len - max_tokens,
                tag=tag,
                why=reply_budget_why(max_len, max_tokens),
            ).ids
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
        except TagError as e:
            return _error(400, f"'moss_tag': {e}", "moss_tag")
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
            chunk = _Chunks(completion_id, model, created, req.include_usage)

            async def stream():
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    started = False
                    while True:
                        ev = await events.get()
                        content = ev.text if started else ev.text.lstrip()
                        started = started or bool(content)
                        if content:
                            yield chunk({"content": content})
                        if ev.finish_reason is not None:
                            if ev.error is not None:
                                yield _sse(error_body(ev.error, kind="server_error"))
                            else:
                                yield chunk({}, ev.finish_reason)
                                if req.include_usage:
                                    yield chunk.usage(len(prompt_ids), len(handle.stream.tokens))
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

    async def _tool_completion(
        http: HTTPRequest,
        req: ChatRequest,
        identity: str,
        max_tokens: int,
        tag: str | None,
        registry: ToolRegistry,
        created: int,
    ):
        """The tool loop for one request: ChatSession on a worker thread, events to this coroutine."""
        generator = make_generator()
        session = ChatSession(
            generator,
            tokenizer,
            max_len,
            tools=registry,
            tools_on=True,
            sampling=req.sampling,
            max_new_tokens=max_tokens,
            tag=tag,
            stop_strings=req.stop,
            identity=identity,
        )
        session.history = list(req.turns[:-1])
        message = req.turns[-1].human
        # Both generations are checked before anything runs (PromptTooLongError, ValueError -> 400):
        # the first pass as it is, the reply at the longest prompt the session may give it.
        first_ids, first_cap = session.first_pass(message)
        engine.check(Request(first_ids, first_cap))
        engine.check(Request([eom_id] * session.reply_prompt_limit, max_tokens))
        if tool_slots is not None and not tool_slots.acquire(blocking=False):
            return _busy(429, f"the server is busy: {max_tool_requests} tool requests already run; try again shortly")

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(kind: str, payload: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
            except RuntimeError:  # the event loop is gone (server shutting down)
                generator.cancel()

        def work() -> None:
            try:
                reply = session.send(
                    message,
                    on_text=lambda delta: put("text", delta),
                    on_thoughts=lambda delta: put("thoughts", delta),
                    on_tools=lambda turn, result: put("tools", tool_pass_object(turn, result)),
                )
                put("done", reply)
            except GenerationCancelled:
                put("cancelled", None)
            except Exception as e:  # noqa: BLE001 -- becomes an error event for this request only
                logger.exception("tool loop failed")
                put("error", f"{type(e).__name__}: {e}")
            finally:
                if tool_slots is not None:
                    tool_slots.release()  # only now: a tool still running after a disconnect counts

        try:
            threading.Thread(target=work, name="moss-tool-loop", daemon=True).start()
        except RuntimeError:  # "can't start new thread": give the slot back before failing
            if tool_slots is not None:
                tool_slots.release()
            raise
        completion_id = new_completion_id()
        model = req.model or model_name
        chunk = _Chunks(completion_id, model, created, req.include_usage)

        if req.stream:

            async def stream():
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    while True:
                        kind, payload = await events.get()
                        if kind == "text":
                            yield chunk({"content": payload})
                        elif kind == "thoughts":
                            yield chunk({}, moss_tool_pass={"stage": "thoughts", "delta": payload})
                        elif kind == "tools":
                            yield chunk({}, moss_tool_pass={"stage": "results", **payload})
                        else:
                            if kind == "done":
                                yield chunk({}, payload.finish_reason)
                                if req.include_usage:
                                    yield chunk.usage(generator.prompt_tokens, generator.completion_tokens)
                            elif kind == "error":
                                yield _sse(error_body(payload, kind="server_error"))
                            yield "data: [DONE]\n\n"
                            return
                finally:
                    generator.cancel()  # a no-op when finished; frees the slot when the client left

            return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        tool_pass = None
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(events.get(), timeout=1.0)
                except TimeoutError:
                    if await http.is_disconnected():
                        return _error(499, "client closed the request")
                    continue
                if kind == "tools":
                    tool_pass = payload
                elif kind in ("done", "error", "cancelled"):
                    break
        finally:
            generator.cancel()
        if kind != "done":
            return _error(500, payload or "the request was cancelled", kind="server_error")
        used = (generator.prompt_tokens, generator.completion_tokens)
        body = completion_object(completion_id, model, payload.text, payload.finish_reason, *used)
        body["moss_tool_pass"] = tool_pass
        return JSONResponse(body)

    async def info(_: HTTPRequest):
        return JSONResponse(
            {
                "model": model_name,
                "max_len": max_len,
                "default_max_tokens": min(default_max_tokens, max_len // 2),
                "sampling_defaults": {"temperature": MOSS_DEFAULTS.temperature, "top_p": MOSS_DEFAULTS.top_p},
                "tools": available,
                "tags": {
                    "tokens": list(preference_tags.tokens) if preference_tags else None,
                    "best": preference_tags.best if preference_tags else None,
                    "default": default_tag_token,
                },
            }
        )

    async def index(_: HTTPRequest):
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def models(_: HTTPRequest):
        created = int(time.time())
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

    async def server_error(_: HTTPRequest, exc: Exception):
        # Starlette's ServerErrorMiddleware sends this, then re-raises: uvicorn logs the traceback.
        return _error(500, f"internal server error ({type(exc).__name__}); see the server log", kind="server_error")

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/moss/info", info, methods=["GET"]),
            Route("/", index, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
