"""Search backend for a JSON web-search API, configured by WebSearchConfig (no vendor SDK).

The request and the JSON field mapping are data, so one client covers SearXNG, Brave, Bing,
Serper or an in-house service; docs/tools.md gives the settings for each. The API's answer is
untrusted too: only string fields are used, entries of the wrong shape are skipped, and the
size and time of the answer are bounded by `http_util`.
"""

from __future__ import annotations

from typing import Any

from moss_jax.tools.config import WebSearchConfig
from moss_jax.tools.errors import ToolError
from moss_jax.tools.http_util import request_json
from moss_jax.tools.search_index import Passage


class WebSearchBackend:
    """`search(query, k)` against a configured web-search API."""

    def __init__(self, config: WebSearchConfig, *, timeout_s: float, max_bytes: int):
        self.config = config
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes

    def search(self, query: str, k: int) -> list[Passage]:
        cfg = self.config
        fields: dict[str, Any] = {cfg.query_param: query, **dict(cfg.extra_params)}
        if cfg.count_param:
            fields[cfg.count_param] = k
        headers = {}
        if cfg.api_key:
            headers[cfg.api_key_header] = cfg.api_key_prefix + cfg.api_key
        answer = request_json(
            cfg.url,
            method=cfg.method,
            params=fields if cfg.method == "GET" else None,
            body=fields if cfg.method == "POST" else None,
            headers=headers,
            timeout_s=self.timeout_s,
            max_bytes=self.max_bytes,
        )
        return extract_results(answer, cfg)[:k]


def extract_results(answer: Any, cfg: WebSearchConfig) -> list[Passage]:
    """Follows `results_path` in a JSON answer and reads snippet (and title) fields."""
    node = answer
    for key in cfg.results_path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise ToolError(f"web search answer has no {cfg.results_path!r} list")
        node = node[key]
    if not isinstance(node, list):
        raise ToolError(f"web search answer's {cfg.results_path!r} is not a list")
    results = []
    for item in node:
        if not isinstance(item, dict) or not isinstance(item.get(cfg.snippet_field), str):
            continue
        title = item.get(cfg.title_field) if cfg.title_field else ""
        text = " ".join(item[cfg.snippet_field].split())
        if text:
            results.append(Passage(text, " ".join(title.split()) if isinstance(title, str) else "", ""))
    return results
