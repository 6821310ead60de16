"""The OpenAI chat-completions wire format: request validation and response objects.

Supported request fields: `messages` (system / user / assistant, string content or a list of
text parts), `model`, `stream`, `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`,
`seed`, `stop` (string or up to 4 strings), `n` (1 only), `user`, `stream_options`
(`include_usage`, with `stream` only); extensions `top_k`, `repetition_penalty` and
`ignore_eos`. Settings not given default to MOSS's (MOSS_SPEC section 5), not OpenAI's.
Fields that change behaviour and are not implemented (tools, logprobs, n > 1, ...) are
rejected with 400 rather than silently ignored, in a message too: a message has `role` and
`content` only (an assistant message also `moss_tool_pass`), so `name` or `tool_calls` is a
400. So is a string anywhere in the body that is not valid Unicode (JSON's `\\ud800` escape
decodes to a lone surrogate, which no tokenizer encodes): the error names where it is.

MOSS extensions: `moss_tools` ({"search", "calculate", "solve", "text2image"} -> bool) runs
MOSS's own tool loop on the server (not OpenAI function calling; the result comes back in a
`moss_tool_pass` field, see `tool_pass_object`); an assistant message may carry its
`moss_tool_pass` ({"thoughts", "commands"}) back so the history keeps them; `moss_tag`
("best", "none", "auto" or an index) picks the preference tag written after `<|MOSS|>:`.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from moss_jax.inference.prompt import Turn
from moss_jax.inference.sampling import MOSS_DEFAULTS, SamplingParams
from moss_jax.inference.tags import TagChoice, TagError, parse_tag_choice
from moss_jax.inference.tokenizer import check_unicode

# Accepted but without effect here (they only describe the client or its billing).
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier"}
KNOWN_FIELDS = {
    "messages",
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "stop",
    "n",
    "ignore_eos",
    "moss_tools",
    "moss_tag",
} | IGNORED_FIELDS
# moss_tools keys -> ToolsConfig enable fields.
TOOL_SWITCHES = {
    "search": "enable_search",
    "calculate": "enable_calculate",
    "solve": "enable_solve",
    "text2image": "enable_text2image",
}
ROLES = ("system", "user", "assistant")
# The fields a message may have, by role (`moss_tool_pass`: an earlier reply's tool pass, sent back).
MESSAGE_FIELDS = {
    "system": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "moss_tool_pass"},
}


class RequestError(ValueError):
    """A malformed request (answered with HTTP 400 and this message)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    system: str | None
    turns: list[Turn]  # the last one pending
    stream: bool
    max_tokens: int | None
    sampling: SamplingParams
    stop: tuple[str, ...]
    ignore_eos: bool
    model: str | None
    tools: dict[str, bool] | None = None  # moss_tools; None: plain chat, no tool loop
    tag: TagChoice | None = None  # moss_tag; None: the server's default
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


def _number(body: Mapping, name: str, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"'{name}' must be {kind} in [{lo}, {hi}], got {value!r}", name)
    return value


def _check_unicode(value: Any, where: str, param: str | None) -> None:
    """RequestError naming the first string (or object key) under `value` that is not valid
    Unicode: JSON's `\\ud800` escapes decode to lone surrogates, which no tokenizer encodes and
    no response can echo. Walks without recursion (the body may be nested deeply)."""
    stack = [(value, where, param)]
    while stack:
        item, path, param = stack.pop()
        if isinstance(item, str):
            try:
                check_unicode(item, path)
            except ValueError as e:
                raise RequestError(str(e), param) from None
        elif isinstance(item, Mapping):
            for key, sub in reversed(list(item.items())):
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    raise RequestError(
                        f"a field name in {path or 'the request body'} is not valid Unicode", param
                    ) from None
                # `param` of a top-level field is its name (checked just above).
                stack.append((sub, f"{path}.{key}" if path else key, param or key))
        elif isinstance(item, list):
            stack.extend((sub, f"{path}[{i}]", param) for i, sub in reversed(list(enumerate(item))))


def _content(message: Mapping, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": "..."}]
        parts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"messages[{i}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts", "messages")


def parse_messages(messages: Any) -> tuple[str | None, list[Turn]]:
    """(system text, turns): each user message opens a turn, an assistant message closes it."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    _check_unicode(messages, "messages", "messages")
    system_parts: list[str] = []
    turns: list[Turn] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise RequestError(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {ROLES}, got {role!r}", "messages")
        unsupported = sorted(set(m) - MESSAGE_FIELDS[role])
        if unsupported:
            raise RequestError(
                f"messages[{i}]: unsupported field(s) {unsupported} (a message with role {role!r} has only "
                f"{sorted(MESSAGE_FIELDS[role])})",
                "messages",
            )
        text = _content(m, i)
        if role == "system":
            if turns:
                raise RequestError(f"messages[{i}]: system messages must come first", "messages")
            system_parts.append(text)
        elif role == "user":
            if turns and turns[-1].moss is None:  # two user messages in a row: one turn
                turns[-1].human += "\n" + text
            else:
                turns.append(Turn(human=text))
        else:
            if not turns or turns[-1].moss is not None:
                raise RequestError(f"messages[{i}]: an assistant message must follow a user message", "messages")
            turns[-1].moss = text
            tool_pass = m.get("moss_tool_pass")  # an earlier reply's thoughts and commands, sent back
            if tool_pass is not None:
                fields = ("thoughts", "commands")
                if not isinstance(tool_pass, Mapping) or not all(
                    isinstance(tool_pass.get(f), str | None) for f in fields
                ):
                    raise RequestError(
                        f"messages[{i}].moss_tool_pass must be an object with string 'thoughts' and 'commands'",
                        "messages",
                    )
                turns[-1].thoughts, turns[-1].commands = (tool_pass.get(f) for f in fields)
    if not turns or turns[-1].moss is not None:
        raise RequestError("the last message must be from the user", "messages")
    return ("\n".join(system_parts) if system_parts else None), turns


def parse_request(body: Any) -> ChatRequest:
    """Validates a chat-completions request body; raises RequestError."""
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    # Before anything else, as an error message may echo a string.
    _check_unicode(body, "", None)
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise RequestError(f"unsupported field(s) {unknown}", unknown[0])
    system, turns = parse_messages(body.get("messages"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", "stream")
    include_usage = _stream_options(body.get("stream_options"), stream)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError(f"only n=1 is supported, got {n!r}", "n")
    max_tokens = _number(body, "max_completion_tokens", 1, 1 << 20, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 1 << 20, integer=True)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    if top_p == 0:
        raise RequestError("'top_p' must be > 0", "top_p")
    top_k = _number(body, "top_k", 0, 1 << 20, integer=True)
    penalty = _number(body, "repetition_penalty", 0.01, 100)
    seed = _number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise RequestError("'stop' must be a string or a list of at most 4 strings", "stop")
    if any(not s for s in stops):
        raise RequestError("'stop' strings must be non-empty", "stop")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError("'ignore_eos' must be a boolean", "ignore_eos")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", "model")
    tools = body.get("moss_tools")
    if tools is not None:
        if not isinstance(tools, Mapping) or not all(isinstance(v, bool) for v in tools.values()):
            raise RequestError("'moss_tools' must be an object of booleans", "moss_tools")
        unknown_tools = sorted(set(tools) - set(TOOL_SWITCHES))
        if unknown_tools:
            known = list(TOOL_SWITCHES)
            raise RequestError(f"'moss_tools': unknown tool(s) {unknown_tools}; known: {known}", "moss_tools")
        if ignore_eos:
            raise RequestError("'ignore_eos' cannot be combined with 'moss_tools'", "ignore_eos")
        tools = {name: bool(tools.get(name, False)) for name in TOOL_SWITCHES}
    tag = body.get("moss_tag")
    if tag is not None:
        try:
            tag = parse_tag_choice(tag)
        except TagError as e:
            raise RequestError(f"'moss_tag': {e}", "moss_tag") from None
    sampling = SamplingParams(
        temperature=float(MOSS_DEFAULTS.temperature if temperature is None else temperature),
        top_k=int(MOSS_DEFAULTS.top_k if top_k is None else top_k),
        top_p=float(MOSS_DEFAULTS.top_p if top_p is None else top_p),
        repetition_penalty=float(MOSS_DEFAULTS.repetition_penalty if penalty is None else penalty),
        seed=int(seed) if seed is not None else uuid.uuid4().int % (1 << 31),
    )
    return ChatRequest(system, turns, stream, max_tokens, sampling, stops, ignore_eos, model, tools, tag, include_usage)


def _stream_options(options: Any, stream: bool) -> bool:
    """`include_usage` of `stream_options` ({"include_usage": bool}, with `stream: true` only)."""
    if options is None:
        return False
    if not stream:
        raise RequestError("'stream_options' is only allowed with 'stream': true", "stream_options")
    if not isinstance(options, Mapping):
        raise RequestError("'stream_options' must be an object", "stream_options")
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:
        raise RequestError(f"'stream_options': unsupported field(s) {unknown}", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise RequestError("'stream_options.include_usage' must be a boolean", "stream_options")
    return include_usage


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def chunk_object(completion_id: str, model: str, created: int, delta: dict, finish_reason: str | None) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def completion_object(
    completion_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": usage_object(prompt_tokens, completion_tokens),
    }


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


_SNIPPET_LINE = re.compile(r"<\|(\d+)\|>: (.*)")


def _snippets(call_text: str) -> list[dict]:
    """[{"ref": n, "text": ...}] from a Search result block (`<|n|>: 'snippet'` lines, Python-repr quoted)."""
    out = []
    for line in call_text.split("\n")[1:]:
        m = _SNIPPET_LINE.fullmatch(line)
        if m is None:
            continue
        try:
            text = ast.literal_eval(m.group(2))  # a string literal only; literal_eval never runs code
        except (ValueError, SyntaxError):
            continue
        if isinstance(text, str):
            out.append({"ref": int(m.group(1)), "text": text})
    return out


def _image_data_uri(path: Any) -> str | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")
    except OSError:
        return None


def tool_pass_object(turn: Turn, tool_result: Any) -> dict:
    """The `moss_tool_pass` extension: what the model thought and ran, and what the tools gave back.

    {"thoughts", "commands", "results" (the <|Results|> body the model read), "error" (unparsable
    commands, else null), "calls": [{"name", "argument", "ok", "error", "text", "snippets":
    [{"ref", "text"}], "image": "data:image/png;base64,..." or null}]}. A failed call's "error"
    is the tool's reason (the model itself only reads "No result.").
    """
    calls = []
    for call in getattr(tool_result, "calls", ()):
        calls.append(
            {
                "name": call.command.name,
                "argument": call.command.argument,
                "ok": call.ok,
                "error": call.error,
                "text": call.text,
                "snippets": _snippets(call.text) if call.ok and call.command.name == "Search" else [],
                "image": _image_data_uri(call.image_path),
            }
        )
    return {
        "thoughts": turn.thoughts,
        "commands": turn.commands,
        "results": turn.results,
        "error": getattr(tool_result, "parse_error", None),
        "calls": calls,
    }
