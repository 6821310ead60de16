"""Bilingual tokenizer for the BM25 index: jieba for Chinese runs, word splitting for the rest.

Documents and queries go through the same function, so whatever it does (NFKC, lowercase,
stop words, plural folding) is symmetric. jieba's search mode (`cut_for_search`) also emits the
shorter words inside long ones (中华人民共和国 -> 中华, 人民, 共和国, ...), which helps recall when
a query and a document segment a phrase differently.
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata

TOKENIZER_VERSION = "jieba-search+en-plural/1"  # stored in the index manifest; bump on any change

_CJK_OR_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+|[0-9a-z]+")
_EN_STOPWORDS = frozenset(
    """a an and are as at be been but by can could did do does for from had has have how i if in into is it
    its me my no not of on or our so than that the their them then there these they this to was we were
    what when where which who whom why will with would you your""".split()
)
_ZH_STOPWORDS = frozenset(
    """的 了 是 在 和 与 及 或 吗 呢 吧 啊 呀 么 什么 怎么 怎样 如何 哪 哪里 哪些 哪个 谁 多少 几
    有 没有 这 那 这个 那个 个 也 都 就 还 我 你 他 她 它 我们 你们 他们 请 请问 一下 是否 为什么
    之 其 被 把 给 对 从 到 上 中 下""".split()
)

_jieba_lock = threading.Lock()
_jieba_tokenizer = None


def _jieba():
    global _jieba_tokenizer
    with _jieba_lock:
        if _jieba_tokenizer is None:
            import jieba

            # jieba logs dictionary loading to stderr at DEBUG on every new process.
            jieba.setLogLevel(logging.WARNING)
            _jieba_tokenizer = jieba.Tokenizer()
            _jieba_tokenizer.initialize()
        return _jieba_tokenizer


def _fold_plural(word: str) -> str:
    # Deliberately tiny (no stemmer dependency): cities -> city, cats -> cat; keeps class, bus, is.
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    """Index/query tokens of a text, in order; empty for text with no words."""
    text = unicodedata.normalize("NFKC", text).lower()
    tokens = []
    for match in _CJK_OR_WORD.finditer(text):
        chunk = match.group()
        if chunk[0].isascii():
            if chunk not in _EN_STOPWORDS:
                tokens.append(_fold_plural(chunk))
        else:
            tokens.extend(w for w in _jieba().cut_for_search(chunk) if w.strip() and w not in _ZH_STOPWORDS)
    return tokens
