"""Tool configuration: frozen dataclasses, plain Python (gin binds them from outside, if at all)."""

from __future__ import annotations

import dataclasses
import unicodedata
from urllib.parse import urlsplit

from moss_jax.tools.errors import ToolError


class ToolConfigError(ValueError):
    """A ToolsConfig / WebSearchConfig field is invalid or inconsistent with another field."""


def _check_http_url(owner: str, url: str) -> None:
    parts = urlsplit(url)
    # urllib also opens file:// and ftp:// URLs; a tool backend is only ever an HTTP service.
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ToolConfigError(f"{owner} must be an http(s) URL with a host, got {url!r}")


@dataclasses.dataclass(frozen=True)
class WebSearchConfig:
    """How to call a JSON web-search API and where the snippets are in its answer.

    The request is `GET url?{query_param}=...&{count_param}=k&extra...` (or the same fields as a
    JSON body with method="POST"), with header `{api_key_header}: {api_key_prefix}{api_key}` when
    a key is set. The answer must be a JSON object; `results_path` (dot-separated keys) leads to a
    list of objects whose `snippet_field` holds the snippet text and, optionally, `title_field`
    a title that is put in front of it. docs/tools.md lists mappings for common APIs.
    """

    url: str
    api_key: str | None = dataclasses.field(default=None, repr=False)  # never in logs or reprs
    method: str = "GET"
    query_param: str = "q"
    count_param: str | None = "count"
    api_key_header: str = "Authorization"
    api_key_prefix: str = "Bearer "
    results_path: str = "results"
    snippet_field: str = "snippet"
    title_field: str | None = None
    extra_params: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        _check_http_url("WebSearchConfig.url", self.url)
        if self.method not in ("GET", "POST"):
            raise ToolConfigError(f"WebSearchConfig.method must be GET or POST, got {self.method!r}")
        if not self.query_param or not self.results_path or not self.snippet_field:
            raise ToolConfigError("WebSearchConfig.query_param, results_path and snippet_field must be non-empty")
        if any(not part for part in self.results_path.split(".")):
            raise ToolConfigError(f"WebSearchConfig.results_path has an empty key: {self.results_path!r}")
        if not all(isinstance(kv, tuple) and len(kv) == 2 for kv in self.extra_params):
            raise ToolConfigError("WebSearchConfig.extra_params must be a tuple of (name, value) pairs")


@dataclasses.dataclass(frozen=True)
class ToolsConfig:
    """Which tools the model may call, their backends, and the limits that keep them safe.

    Calculate and Solve need nothing external and are on by default. Search needs a local index
    (`search_index_dir`, built with `python -m moss_jax.tools.search_index build`) or a web API
    (`web_search`, tried first when both are set); Text2Image needs an AUTOMATIC1111-compatible
    server (`txt2img_url`). Enabling one of those without its backend is a ToolConfigError.
    """

    enable_search: bool = False
    enable_calculate: bool = True
    enable_solve: bool = True
    enable_text2image: bool = False
    # The deployed MOSS service ran at most 2 commands a turn; extra commands are dropped (logged).
    max_commands: int = 2
    # Search.
    search_index_dir: str | None = None
    web_search: WebSearchConfig | None = None
    search_top_k: int = 3
    snippet_chars: int = 400
    # Text2Image: base URL of the server (`/sdapi/v1/txt2img` is appended) and where PNGs go.
    txt2img_url: str | None = None
    image_dir: str = "moss_images"
    txt2img_steps: int = 20
    txt2img_width: int = 512
    txt2img_height: int = 512
    txt2img_negative_prompt: str = ""
    # Wall-clock limit of one call of each tool, in seconds.
    calculate_timeout_s: float = 1.0
    solve_timeout_s: float = 5.0
    search_timeout_s: float = 10.0
    text2image_timeout_s: float = 120.0
    # Size caps on untrusted text in and out.
    max_commands_chars: int = 8000
    max_argument_chars: int = 1000
    max_result_chars: int = 2000
    max_search_response_bytes: int = 2 * 1024 * 1024
    max_image_bytes: int = 32 * 1024 * 1024

    def __post_init__(self):
        for name in (
            "max_commands",
            "search_top_k",
            "snippet_chars",
            "txt2img_steps",
            "txt2img_width",
            "txt2img_height",
            "max_commands_chars",
            "max_argument_chars",
            "max_result_chars",
            "max_search_response_bytes",
            "max_image_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ToolConfigError(f"ToolsConfig.{name} must be a positive int, got {value!r}")
        for name in ("calculate_timeout_s", "solve_timeout_s", "search_timeout_s", "text2image_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ToolConfigError(f"ToolsConfig.{name} must be a positive number of seconds, got {value!r}")
        if self.txt2img_url is not None:
            _check_http_url("ToolsConfig.txt2img_url", self.txt2img_url)
        if self.enable_search and self.search_index_dir is None and self.web_search is None:
            raise ToolConfigError("ToolsConfig.enable_search needs search_index_dir or web_search")
        if self.enable_text2image and self.txt2img_url is None:
            raise ToolConfigError("ToolsConfig.enable_text2image needs txt2img_url")
        if not self.image_dir:
            raise ToolConfigError("ToolsConfig.image_dir must be non-empty")


def check_text_argument(kind: str, text: str, max_chars: int) -> str:
    """Rejects a non-string, empty, oversized or control-character argument; returns it stripped.

    Shared by the tools that take free text (search queries, image descriptions). Newlines and
    tabs become spaces; any other control character (NUL included) is an error, since no search
    engine or image model needs one and they are a classic way to smuggle data into logs and URLs.
    """
    if not isinstance(text, str):
        raise ToolError(f"{kind} must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise ToolError(f"{kind} is {len(text)} characters; the limit is {max_chars}")
    text = text.replace("\n", " ").replace("\t", " ").replace("\r", " ").strip()
    for ch in text:
        if unicodedata.category(ch) == "Cc":
            raise ToolError(f"{kind} contains control character U+{ord(ch):04X}")
    if not text:
        raise ToolError(f"{kind} is empty")
    return text
