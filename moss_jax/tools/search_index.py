"""Offline BM25 search index over local documents (bm25s), and its command line.

    python -m moss_jax.tools.search_index build --input FILES_OR_DIRS... --out INDEX_DIR [--passage_chars 600]
    python -m moss_jax.tools.search_index query --index INDEX_DIR [-k 3] "query text"

Inputs: `.txt`/`.md` files (split into passages at blank lines; a first line `# Title` becomes the
title) and `.jsonl` files (one object per line: "text" required, "title" and "url" optional);
directories are searched recursively in sorted order, so a build is reproducible. The index
directory holds bm25s's arrays (saved and loaded without pickle), `passages.jsonl` and
`manifest.json` (format and tokenizer version, checked on load).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from moss_jax.tools.errors import ToolError
from moss_jax.tools.text_tokenize import TOKENIZER_VERSION, tokenize

INDEX_FORMAT = "moss_jax.search_index/1"
MANIFEST = "manifest.json"
PASSAGES = "passages.jsonl"
TEXT_SUFFIXES = (".txt", ".md")
# Chinese sentence ends split anywhere; ASCII ones only before a blank, so 21196.18 stays whole.
_SENTENCE_END = re.compile(r"(?<=[。！？；])\s*|(?<=[.!?;])\s+")
_CJK_END = "。！？；"


@dataclasses.dataclass(frozen=True)
class Passage:
    """A searchable unit: a chunk of one document."""

    text: str
    title: str = ""
    source: str = ""


def _collapse(text: str) -> str:
    return " ".join(text.split())


def split_passages(text: str, max_chars: int) -> list[str]:
    """Packs paragraphs (then sentences, then hard cuts) into chunks of at most max_chars."""
    pieces = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = _collapse(paragraph)
        if len(paragraph) <= max_chars:
            pieces.append(paragraph)
            continue
        for sentence in _SENTENCE_END.split(paragraph):
            pieces.extend(sentence[i : i + max_chars] for i in range(0, len(sentence), max_chars))
    chunks: list[str] = []
    for piece in filter(None, pieces):
        sep = "" if chunks and chunks[-1][-1] in _CJK_END else " "  # Chinese needs no blank between sentences
        if chunks and len(chunks[-1]) + len(sep) + len(piece) <= max_chars:
            chunks[-1] += sep + piece
        else:
            chunks.append(piece)
    return chunks


def _read_text_file(path: Path, max_chars: int) -> Iterator[Passage]:
    text = path.read_text(encoding="utf-8")
    title = ""
    first, _, rest = text.lstrip().partition("\n")
    if first.startswith("# "):
        title, text = first[2:].strip(), rest
    for chunk in split_passages(text, max_chars):
        yield Passage(chunk, title, str(path))


def _read_jsonl_file(path: Path, max_chars: int) -> Iterator[Passage]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: not JSON: {e}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{line_no}: expected an object with a "text" string')
            title = _collapse(str(record.get("title") or ""))
            source = str(record.get("url") or f"{path}:{line_no}")
            for chunk in split_passages(record["text"], max_chars):
                yield Passage(chunk, title, source)


def read_documents(inputs: Iterable[str | Path], max_chars: int = 600) -> Iterator[Passage]:
    """Passages from files and directories (recursively, sorted); other file types are skipped."""
    for item in inputs:
        item = Path(item)
        if not item.exists():
            raise FileNotFoundError(f"input not found: {item}")
        files = sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item]
        for path in files:
            if path.suffix == ".jsonl":
                yield from _read_jsonl_file(path, max_chars)
            elif path.suffix in TEXT_SUFFIXES:
                yield from _read_text_file(path, max_chars)
            elif not item.is_dir():
                raise ValueError(f"unsupported input type {path.suffix!r} ({path}); use .txt, .md or .jsonl")


def build_index(passages: Iterable[Passage], out_dir: str | Path) -> int:
    """Tokenizes and indexes passages into out_dir; returns the number indexed."""
    import bm25s

    kept, corpus_tokens = [], []
    for passage in passages:
        tokens = tokenize(f"{passage.title} {passage.text}")
        if tokens:  # a passage with no words can never match and confuses bm25s's input check
            kept.append(passage)
            corpus_tokens.append(tokens)
    if not kept:
        raise ValueError("no indexable text in the inputs")
    retriever = bm25s.BM25()
    retriever.index(corpus_tokens, show_progress=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    retriever.save(out, show_progress=False)
    with (out / PASSAGES).open("w", encoding="utf-8") as f:
        for passage in kept:
            f.write(json.dumps(dataclasses.asdict(passage), ensure_ascii=False) + "\n")
    manifest = {"format": INDEX_FORMAT, "tokenizer": TOKENIZER_VERSION, "passages": len(kept)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return len(kept)


class SearchIndex:
    """A loaded index; `search` returns the best passages for a query."""

    def __init__(self, retriever, passages: list[Passage]):
        self._retriever = retriever
        self._passages = passages

    @classmethod
    def load(cls, index_dir: str | Path) -> SearchIndex:
        import bm25s

        index_dir = Path(index_dir)
        try:
            manifest = json.loads((index_dir / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ToolError(f"no search index at {index_dir} ({e})") from None
        if manifest.get("format") != INDEX_FORMAT or manifest.get("tokenizer") != TOKENIZER_VERSION:
            raise ToolError(f"search index at {index_dir} was built by another version; rebuild it")
        with (index_dir / PASSAGES).open(encoding="utf-8") as f:
            passages = [Passage(**json.loads(line)) for line in f]
        retriever = bm25s.BM25.load(index_dir, mmap=False, allow_pickle=False, show_progress=False)
        if len(passages) != manifest["passages"] or retriever.scores["num_docs"] != len(passages):
            raise ToolError(f"search index at {index_dir} is inconsistent; rebuild it")
        return cls(retriever, passages)

    def __len__(self) -> int:
        return len(self._passages)

    def search(self, query: str, k: int) -> list[Passage]:
        """Up to k passages with a positive BM25 score, best first."""
        tokens = tokenize(query)
        if not tokens:
            return []
        ids, scores = self._retriever.retrieve([tokens], k=min(k, len(self._passages)), show_progress=False)
        return [self._passages[int(i)] for i, score in zip(ids[0], scores[0], strict=True) if score > 0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build an index from .txt/.md/.jsonl files or directories")
    build.add_argument("--input", nargs="+", required=True, help="files or directories")
    build.add_argument("--out", required=True, help="index directory to write")
    build.add_argument("--passage_chars", type=int, default=600, help="maximum passage length")
    query = sub.add_parser("query", help="print the best passages for a query")
    query.add_argument("--index", required=True)
    query.add_argument("-k", type=int, default=3)
    query.add_argument("text")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            count = build_index(read_documents(args.input, args.passage_chars), args.out)
            print(f"indexed {count} passages into {args.out}")
        else:
            for rank, passage in enumerate(SearchIndex.load(args.index).search(args.text, args.k), 1):
                print(f"{rank}. [{passage.source}] {passage.title + ': ' if passage.title else ''}{passage.text}")
    except (OSError, ValueError) as e:  # ToolError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
