"""SequenceStream: stop tokens, stop strings, held-back text, finish reasons."""

import pytest

from moss_jax.inference.streaming import REPLACEMENT_CHAR, SequenceStream

CHARS = {i: c for i, c in enumerate("abcdefghij<|>XY ")}


def decode(ids):
    return "".join(CHARS[i] for i in ids)


def ids(text):
    inv = {c: i for i, c in CHARS.items()}
    return [inv[c] for c in text]


def test_stop_token_kept_in_tokens_not_in_text():
    s = SequenceStream(10, stop_ids=[13], decode=decode)
    assert s.push_many(ids("ab") + [13] + ids("cd")) == ids("ab") + [13]
    assert s.finished and s.finish_reason == "stop"
    assert s.text == "ab" and s.text_delta() == "ab"


def test_budget_gives_length():
    s = SequenceStream(3, decode=decode)
    assert s.push_many(ids("abcdef")) == ids("abc")
    assert s.finish_reason == "length" and s.text == "abc"
    with pytest.raises(RuntimeError):
        s.push(0)


def test_stop_string_cuts_text_and_holds_back_prefixes():
    s = SequenceStream(50, stop_strings=["<|X"], decode=decode)
    deltas = []
    for t in ids("ab<"):
        s.push(t)
        deltas.append(s.text_delta())
    assert deltas == ["a", "b", ""]  # "<" could start the stop string: held back
    s.push(ids("|")[0])
    assert s.text_delta() == ""
    assert s.push(ids("X")[0]) is True
    assert s.finish_reason == "stop" and s.text == "ab" and s.text_delta() == ""
    assert s.tokens == ids("ab<|X")


def test_held_back_prefix_is_released_when_it_does_not_match():
    s = SequenceStream(50, stop_strings=["<|X"], decode=decode)
    s.push_many(ids("a<|"))
    assert s.text_delta() == "a"
    s.push(ids("Y")[0])
    assert s.text_delta() == "<|Y"


def test_incomplete_characters_are_held_back():
    pieces = {0: "a", 1: REPLACEMENT_CHAR, 2: "é"}

    def dec(toks):  # bytes of "é" arrive as two tokens; the first alone decodes to U+FFFD
        text = "".join(pieces[t] for t in toks)
        return text.replace(REPLACEMENT_CHAR + "é", "é")

    s = SequenceStream(10, decode=dec)
    s.push(0)
    s.push(1)
    assert s.text_delta() == "a"
    s.push(2)
    assert s.text_delta() == "é"


def test_stop_strings_need_a_decoder():
    with pytest.raises(ValueError):
        SequenceStream(5, stop_strings=["x"])
