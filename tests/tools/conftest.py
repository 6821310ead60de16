"""Shared fixtures for the tool tests: a labelled bilingual corpus and index, a loopback HTTP server."""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from moss_jax.tools import search_index

# (file, title, text). Each labelled query below must rank its document first; the distractors
# share words with some queries (北京, France, language) so the ranking has something to decide.
CORPUS = [
    ("zh.jsonl", "长城", "长城是中国古代的军事防御工程，东起山海关，西至嘉峪关，明长城总长度约为8851.8千米。"),
    ("zh.jsonl", "大熊猫", "大熊猫是中国特有的熊科动物，主要栖息在四川、陕西和甘肃的山区，以竹子为主要食物。"),
    ("zh.jsonl", "北京烤鸭", "北京烤鸭是北京的传统名菜，用果木炭火烤制，色泽红润，肉质肥而不腻。"),
    ("zh.jsonl", "故宫", "故宫位于北京中轴线的中心，是明清两代的皇家宫殿，旧称紫禁城。"),
    ("zh.jsonl", "量子计算", "量子计算利用量子比特的叠加和纠缠进行运算，在某些问题上比经典计算机快得多。"),
    ("zh.jsonl", "春节", "春节是中国最重要的传统节日，人们贴春联、放鞭炮、吃饺子、给压岁钱。"),
    ("photosynthesis.md", "Photosynthesis", "Photosynthesis is the process by which green plants use sunlight, "
     "water and carbon dioxide to produce glucose and release oxygen."),
    ("eiffel.md", "Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in "
     "1889 and about 330 metres tall."),
    ("paris.md", "Paris", "Paris is the capital and largest city of France, on the river Seine."),
    ("en.jsonl", "Python", "Python is a high-level programming language created by Guido van Rossum and first "
     "released in 1991."),
    ("en.jsonl", "French", "French is a Romance language spoken in France, Belgium, Switzerland and Canada."),
    ("en.jsonl", "Mount Everest", "Mount Everest, on the border of Nepal and China, is the highest mountain on "
     "Earth above sea level at 8,849 metres."),
    ("en.jsonl", "Jupiter", "Jupiter is the largest planet in the Solar System, a gas giant famous for its "
     "Great Red Spot storm."),
    ("tea.md", "Tea", " ".join(
        ["Tea is an aromatic beverage prepared by pouring hot water over cured leaves of Camellia sinensis."] * 5
    )),
]  # fmt: skip

# query -> title of the relevant document.
LABELLED_QUERIES = {
    "长城有多长？": "长城",
    "大熊猫吃什么": "大熊猫",
    "北京烤鸭是怎么烤的": "北京烤鸭",
    "什么是量子计算": "量子计算",
    "春节有哪些习俗": "春节",
    "How do plants make oxygen from sunlight?": "Photosynthesis",
    "How tall is the Eiffel Tower?": "Eiffel Tower",
    "who created the Python programming language": "Python",
    "highest mountain in the world": "Mount Everest",
    "largest planet in the solar system": "Jupiter",
    "capital of France": "Paris",
    "Ｐｙｔｈｏｎ 编程语言": "Python",  # full-width letters fold to ASCII in search queries
}


def write_corpus(directory: Path) -> Path:
    """Writes CORPUS as .md files (one document each) and .jsonl files (one line per document)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, title, text in CORPUS:
        path = directory / name
        if name.endswith(".md"):
            path.write_text(f"# {title}\n\n{text}\n", encoding="utf-8")
        else:
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n")
    return directory


@pytest.fixture(scope="session")
def corpus_index(tmp_path_factory) -> Path:
    """A BM25 index of CORPUS, built once per session."""
    root = tmp_path_factory.mktemp("search")
    search_index.build_index(search_index.read_documents([write_corpus(root / "docs")]), root / "index")
    return root / "index"


def png_bytes(size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    """A real PNG written by Pillow (an encoder independent of the code under test)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


Handler = Callable[[dict], tuple]  # (status, content type, body) or (status, content type, body, headers)


@pytest.fixture
def http_server(monkeypatch):
    """Starts loopback HTTP servers: `start(handler) -> (base_url, requests)`.

    `handler(request)` gets {"method", "path", "headers" (lower-case names), "body"} and returns
    (status, content type, body), or the same plus a dict of extra response headers (a redirect's
    Location); `requests` records every request. A handler may wait on `request["stop"]` (set at
    teardown) to simulate a server that hangs.
    """
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    servers, stop = [], threading.Event()

    def start(handler: Handler):
        requests = []

        class RequestHandler(BaseHTTPRequestHandler):
            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                request = {"method": self.command, "path": self.path, "headers": headers, "body": body}
                requests.append(request)
                status, content_type, payload, *extra = handler({**request, "stop": stop})
                try:
                    self.send_response(status)
                    for name, value in (extra[0] if extra else {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout tests)
                    pass

            do_GET = do_POST = _handle

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}", requests

    yield start
    stop.set()
    for server in servers:
        server.shutdown()
        server.server_close()


def child_pids() -> set[int]:
    """PIDs whose parent is this process (zombies included), read from /proc."""
    me, pids = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            pids.add(int(entry))
    return pids
