"""Search("..."): top snippets from the configured backend (web API first, else the local index)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Protocol

from moss_jax.tools.config import ToolsConfig, check_text_argument
from moss_jax.tools.errors import ToolError
from moss_jax.tools.search_index import Passage, SearchIndex
from moss_jax.tools.web_search import WebSearchBackend


class SearchBackend(Protocol):
    """Anything with `search(query, k) -> passages, best first` can serve Search."""

    def search(self, query: str, k: int) -> list[Passage]: ...


class LocalIndexBackend:
    """The offline BM25 index; loaded once per directory and index version."""

    def __init__(self, index_dir: str):
        self.index_dir = index_dir

    def search(self, query: str, k: int) -> list[Passage]:
        return _load_index(self.index_dir, _index_stamp(self.index_dir)).search(query, k)


def _index_stamp(index_dir: str) -> int:
    # A rebuilt index rewrites its manifest, so its mtime keys the cache below.
    try:
        return os.stat(Path(index_dir) / "manifest.json").st_mtime_ns
    except OSError:
        raise ToolError(f"no search index at {index_dir}") from None


@functools.lru_cache(maxsize=4)
def _load_index(index_dir: str, stamp: int) -> SearchIndex:
    del stamp  # only part of the cache key
    return SearchIndex.load(index_dir)


def make_backend(config: ToolsConfig) -> SearchBackend:
    """The backend `config` selects: web_search if set, else search_index_dir."""
    if config.web_search is not None:
        return WebSearchBackend(
            config.web_search, timeout_s=config.search_timeout_s, max_bytes=config.max_search_response_bytes
        )
    if config.search_index_dir is not None:
        return LocalIndexBackend(config.search_index_dir)
    raise ToolError("no search backend configured (set ToolsConfig.search_index_dir or web_search)")


def snippet(passage: Passage, max_chars: int) -> str:
    """`title: text` (or just text) on one line, cut to max_chars characters."""
    text = f"{passage.title}: {passage.text}" if passage.title else passage.text
    return " ".join(text.split())[:max_chars]


def search(query: str, *, config: ToolsConfig | None = None, backend: SearchBackend | None = None) -> list[str]:
    """Searches and returns up to `config.search_top_k` snippets of at most `config.snippet_chars`.

    Args:
      query: the model's query (Chinese, English or mixed).
      config: backends and limits; the default has no backend and raises ToolError.
      backend: overrides the backend chosen from config (any SearchBackend).

    Raises:
      ToolError: invalid query, no backend, backend failure.
    """
    config = config or ToolsConfig()
    query = check_text_argument("search query", query, config.max_argument_chars)
    backend = backend or make_backend(config)
    return [snippet(p, config.snippet_chars) for p in backend.search(query, config.search_top_k)]
