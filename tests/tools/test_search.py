"""Search: bilingual tokenizer, offline BM25 index and its CLI, and the web-search HTTP backend."""

import dataclasses
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from moss_jax.tools import ToolError, WebSearchConfig, http_util, search
from moss_jax.tools.config import ToolConfigError, ToolsConfig
from moss_jax.tools.search_index import Passage, SearchIndex, main, read_documents, split_passages
from moss_jax.tools.text_tokenize import tokenize
from tests.tools.conftest import CORPUS, LABELLED_QUERIES, write_corpus


def test_tokenize_chinese_english_and_full_width():
    assert tokenize("长城有多长？") == ["长城", "多长"]
    assert tokenize("What is the capital of France?") == ["capital", "france"]
    assert tokenize("Ｐｙｔｈｏｎ cities") == ["python", "city"]
    assert "首都" in tokenize("中华人民共和国的首都")
    assert tokenize("？！。,.") == []


@pytest.mark.parametrize("query, title", LABELLED_QUERIES.items())
def test_labelled_queries_rank_the_relevant_document_first(corpus_index, query, title):
    results = SearchIndex.load(corpus_index).search(query, k=3)
    assert results and results[0].title == title, [r.title for r in results]


def test_index_holds_every_document(corpus_index):
    index = SearchIndex.load(corpus_index)
    assert len(index) == len(CORPUS)
    assert index.search("qwertyuiop", k=3) == []  # no word in common: nothing, not noise


def test_search_returns_top3_snippets_cut_to_400(corpus_index):
    config = ToolsConfig(search_index_dir=str(corpus_index))
    snippets = search("tea leaves hot water", config=config)
    assert snippets[0].startswith("Tea: Tea is an aromatic beverage")
    assert len(snippets[0]) == 400
    assert len(search("France", config=config)) <= 3
    short = search("tea", config=ToolsConfig(search_index_dir=str(corpus_index), snippet_chars=20, search_top_k=1))
    assert short == ["Tea: Tea is an aroma"]


def test_search_without_backend_is_an_error():
    with pytest.raises(ToolError, match="no search backend"):
        search("anything")
    with pytest.raises(ToolError, match="no search index"):
        search("anything", config=ToolsConfig(search_index_dir="/nonexistent/index"))


def test_split_passages_respects_the_limit():
    text = "第一段。" * 50 + "\n\n" + "Short paragraph.\n\nAnother one."
    chunks = split_passages(text, max_chars=60)
    assert all(0 < len(c) <= 60 for c in chunks)
    assert "".join(chunks).replace(" ", "") == text.replace("\n", "").replace(" ", "")
    assert split_passages("a\n\nb", max_chars=60) == ["a b"]
    assert split_passages("长城很长。\n\n长城很老。", max_chars=60) == ["长城很长。长城很老。"]
    assert split_passages("It is 21196.18 km long. " * 5, max_chars=30)[0] == "It is 21196.18 km long."


def test_read_documents_formats(tmp_path):
    (tmp_path / "doc.md").write_text("# Title here\n\nBody text.\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("plain text file", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    (tmp_path / "d.jsonl").write_text('{"text": "json text", "url": "https://example.org/x"}\n', encoding="utf-8")
    assert list(read_documents([tmp_path])) == [
        Passage("json text", "", "https://example.org/x"),
        Passage("Body text.", "Title here", str(tmp_path / "doc.md")),
        Passage("plain text file", "", str(tmp_path / "notes.txt")),
    ]
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        list(read_documents([tmp_path / "bad.jsonl"]))


def test_cli_builds_and_queries(tmp_path, capsys):
    docs = write_corpus(tmp_path / "docs")
    assert (
        main(["build", "--input", str(docs / "zh.jsonl"), str(docs / "eiffel.md"), "--out", str(tmp_path / "i")]) == 0
    )
    assert "indexed 7 passages" in capsys.readouterr().out
    assert main(["query", "--index", str(tmp_path / "i"), "-k", "1", "埃菲尔 Eiffel tower"]) == 0
    assert "Eiffel Tower: The Eiffel Tower" in capsys.readouterr().out
    assert main(["build", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "j")]) == 1


def test_cli_runs_as_module(tmp_path):
    docs = write_corpus(tmp_path / "docs")
    out = tmp_path / "index"
    cmd = [sys.executable, "-m", "moss_jax.tools.search_index", "build", "--input", str(docs), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # The package does not import the module before runpy runs it as __main__ (no RuntimeWarning).
    assert "Warning" not in proc.stderr, proc.stderr
    assert SearchIndex.load(out).search("大熊猫", k=1)[0].title == "大熊猫"


def test_index_from_another_version_is_refused(corpus_index, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in corpus_index.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": "old"}))
    with pytest.raises(ToolError, match="rebuild"):
        SearchIndex.load(copy)


def _web_config(url, **kwargs):
    fields = dict(url=url + "/api/search", api_key="sk-test", results_path="data.items", snippet_field="body")
    return ToolsConfig(enable_search=True, web_search=WebSearchConfig(**{**fields, **kwargs}), search_timeout_s=2.0)


def test_web_backend_get(http_server):
    answer = {
        "data": {
            "items": [
                {"title": "长城", "body": "长城总长度约为  21196.18千米。"},
                {"title": "broken", "body": 42},  # wrong type: skipped
                "not an object",
                {"title": "Great Wall", "body": "x" * 1000},
                {"body": "third"},
                {"body": "fourth, beyond top 3"},
            ]
        }
    }
    url, requests = http_server(lambda req: (200, "application/json", json.dumps(answer).encode()))
    snippets = search("长城 长度", config=_web_config(url, title_field="title"))
    assert snippets == ["长城: 长城总长度约为 21196.18千米。", "Great Wall: " + "x" * 388, "third"]
    (request,) = requests
    assert request["method"] == "GET" and request["headers"]["authorization"] == "Bearer sk-test"
    params = urllib.parse.parse_qs(urllib.parse.urlsplit(request["path"]).query)
    assert params == {"q": ["长城 长度"], "count": ["3"]}


def test_web_backend_post_with_custom_fields(http_server):
    url, requests = http_server(lambda req: (200, "application/json", b'{"organic": [{"snippet": "ok"}]}'))
    config = _web_config(
        url,
        method="POST",
        query_param="query",
        count_param=None,
        api_key_header="X-API-KEY",
        api_key_prefix="",
        results_path="organic",
        snippet_field="snippet",
        extra_params=(("gl", "cn"),),
    )
    assert search("q", config=config) == ["ok"]
    assert json.loads(requests[0]["body"]) == {"query": "q", "gl": "cn"}
    assert requests[0]["headers"]["x-api-key"] == "sk-test"


@pytest.mark.parametrize(
    "status, body, reason",
    [
        (500, b"{}", "HTTP 500"),
        (200, b"<html>not json</html>", "not JSON"),
        (200, b'{"data": {}}', "no 'data.items' list"),
        (200, b'{"data": {"items": {}}}', "not a list"),
        (200, b'{"data": {"items": ["' + b"x" * 3_000_000 + b'"]}}', "limit"),
    ],
)
def test_web_backend_errors(http_server, status, body, reason):
    url, _ = http_server(lambda req: (status, "application/json", body))
    with pytest.raises(ToolError, match=reason):
        search("q", config=_web_config(url))


def test_web_backend_timeout(http_server):
    url, _ = http_server(lambda req: (req["stop"].wait(10), (200, "application/json", b"{}"))[1])
    config = dataclasses.replace(_web_config(url), search_timeout_s=0.5)
    start = time.perf_counter()
    with pytest.raises(ToolError, match="127.0.0.1"):
        search("q", config=config)
    assert time.perf_counter() - start < 2.0


def test_web_config_checks():
    with pytest.raises(ToolConfigError, match="http"):
        WebSearchConfig(url="file:///etc/passwd")
    with pytest.raises(ToolConfigError, match="method"):
        WebSearchConfig(url="https://api.example.org", method="DELETE")
    assert "sk-secret" not in repr(WebSearchConfig(url="https://api.example.org", api_key="sk-secret"))
    with pytest.raises(ToolConfigError, match="search_index_dir or web_search"):
        ToolsConfig(enable_search=True)


def _redirect_to(target):
    return lambda req: (302, "text/plain", b"", {"Location": target + req["path"]})


@pytest.mark.parametrize(
    "header, prefix", [("Authorization", "Bearer "), ("X-API-KEY", "")], ids=["authorization", "custom-header"]
)
def test_the_api_key_is_not_sent_to_another_origin_after_a_redirect(http_server, header, prefix):
    answer = (200, "application/json", b'{"data": {"items": [{"body": "found"}]}}')
    other, other_requests = http_server(lambda req: answer)
    # Same machine, other host name: urllib follows the redirect, the key must stay behind.
    url, requests = http_server(_redirect_to(other.replace("127.0.0.1", "localhost")))
    config = _web_config(url, api_key_header=header, api_key_prefix=prefix)
    assert search("q", config=config) == ["found"]
    assert requests[0]["headers"][header.lower()] == prefix + "sk-test"  # the API itself got it
    (followed,) = other_requests
    assert header.lower() not in followed["headers"] and "sk-test" not in json.dumps(followed["headers"])
    # A redirect within the same origin keeps it.
    moved = (302, "text/plain", b"", {"Location": "/moved"})
    url2, requests2 = http_server(lambda req: moved if req["path"].startswith("/api/search") else answer)
    assert search("q", config=_web_config(url2, api_key_header=header, api_key_prefix=prefix)) == ["found"]
    assert [r["path"] for r in requests2][1] == "/moved"
    assert [r["headers"][header.lower()] for r in requests2] == [prefix + "sk-test"] * 2


@pytest.mark.parametrize(
    "new_url, kept",
    [
        ("https://api.example.org/v2/search", True),
        ("http://api.example.org/search", False),  # https -> http
        ("https://api.example.org:8443/search", False),
        ("https://evil.example/search", False),
        ("https://API.example.org:443/other", True),
    ],
)
def test_redirect_handler_drops_credentials_when_the_origin_changes(new_url, kept):
    handler = http_util._OriginBoundRedirects(frozenset({"x-api-key"}))
    request = urllib.request.Request("https://api.example.org/search")
    for name, value in (("X-API-KEY", "k"), ("Authorization", "Bearer k"), ("Cookie", "s=1"), ("Accept", "json")):
        request.add_header(name, value)
    new = handler.redirect_request(request, None, 302, "Found", {}, new_url)
    names = {name.lower() for name in new.headers}
    assert ({"x-api-key", "authorization", "cookie"} <= names) == kept
    assert kept or not names & {"x-api-key", "authorization", "cookie"}
    assert "accept" in names  # other headers always follow
