"""Preference tags at inference: preference_tags.json, tag choices, and the chat CLI's --tag and /tag."""

import io
import json
import sys

import pytest
import seqio

from data_pipelines import specials as sp
from moss_jax import chat
from moss_jax.convert.checkpoint_io import save_params
from moss_jax.inference.local import LocalGenerator
from moss_jax.inference.tags import (
    TAGS_FILE,
    PreferenceTags,
    TagError,
    check_tag_token,
    load_preference_tags,
    parse_tag_choice,
    resolve_tag,
)
from moss_jax.inference.tokenizer import Tokenizer

TAGS = PreferenceTags(sp.QUALITY_TAGS[:3], sp.QUALITY_TAGS[2], (0.2, 0.6))


def _write_tags(directory, **overrides):
    obj = {"num_tags": 3, "tokens": list(sp.QUALITY_TAGS[:3]), "best": "<|quality_2|>", "thresholds": [0.2, 0.6]}
    (directory / TAGS_FILE).write_text(json.dumps({**obj, **overrides}))


def test_load_preference_tags(tmp_path):
    assert load_preference_tags(tmp_path) is None
    _write_tags(tmp_path)
    assert load_preference_tags(tmp_path) == TAGS
    for bad in (
        {"tokens": ["<|quality_1|>", "<|quality_2|>"], "num_tags": 2},  # not the first K tags
        {"best": "<|quality_5|>"},
        {"num_tags": 4},
        {"thresholds": ["x"]},
    ):
        _write_tags(tmp_path, **bad)
        with pytest.raises(TagError, match=TAGS_FILE):
            load_preference_tags(tmp_path)
    (tmp_path / TAGS_FILE).write_text("{not json")
    with pytest.raises(TagError):
        load_preference_tags(tmp_path)


def test_resolve_tag_choices():
    assert resolve_tag("auto", TAGS) == resolve_tag("best", TAGS) == "<|quality_2|>"
    assert resolve_tag("auto", None) is None and resolve_tag("none", TAGS) is None
    assert resolve_tag(0, TAGS) == "<|quality_0|>" and resolve_tag("1", TAGS) == "<|quality_1|>"
    assert resolve_tag(7, None) == "<|quality_7|>"  # reserved in the vocabulary even without the file
    for choice, tags in (("best", None), (3, TAGS), (8, None), (-1, TAGS), ("great", TAGS), (True, TAGS), (1.0, TAGS)):
        with pytest.raises(TagError):
            resolve_tag(choice, tags)
    assert parse_tag_choice(" 2 ") == 2 and parse_tag_choice("none") == "none"


def test_check_tag_token(tokenizer):
    check_tag_token("<|quality_0|>", tokenizer)  # our SentencePiece reserves the tags
    check_tag_token(None, tokenizer)
    with pytest.raises(TagError, match="cannot write the tag"):
        check_tag_token("<|quality_0|>", Tokenizer(seqio.ByteVocabulary()))


class RecordingGenerator(LocalGenerator):
    prompts = []

    def generate_text(self, prompt_ids, **kw):
        RecordingGenerator.prompts.append(self.decode(prompt_ids))
        return super().generate_text(prompt_ids, **kw)


def test_chat_cli_tag_flag_and_command(tmp_path, chat_model, sp_model_path, monkeypatch, capsys):
    config, params = chat_model
    ckpt = save_params(tmp_path / "ckpt", params, config.replace(max_len=1024))
    argv = ["--checkpoint", str(ckpt), "--tokenizer", str(sp_model_path), "--max_new_tokens", "2", "--temperature", "0"]
    monkeypatch.setattr(chat, "LocalGenerator", RecordingGenerator)
    RecordingGenerator.prompts.clear()

    def run(script, *extra):
        monkeypatch.setattr(sys, "stdin", io.StringIO(script))
        assert chat.main(argv + list(extra)) == 0
        return capsys.readouterr().out

    run("Hello\n")  # no preference_tags.json: no tag by default
    assert RecordingGenerator.prompts[-1].endswith("<|Human|>: Hello<eoh>\n<|MOSS|>:")
    with pytest.raises(SystemExit, match="--tag best: .*preference_tags.json"):
        run("Hello\n", "--tag", "best")
    _write_tags(ckpt)
    out = run("Hello\n/tag 0\nAgain\n/tag 9\n/tag none\nThird\n")  # the file makes "best" the default
    first, second, third = RecordingGenerator.prompts[-3:]
    assert first.endswith("<|MOSS|>:<|quality_2|>") and second.endswith("<|MOSS|>:<|quality_0|>")
    assert third.endswith("<|Human|>: Third<eoh>\n<|MOSS|>:")
    assert "[tag <|quality_0|>]" in out and "[tag index must be in [0, 3), got 9]" in out and "[tag none]" in out
    run("Hello\n", "--tag", "1")
    assert RecordingGenerator.prompts[-1].endswith("<|MOSS|>:<|quality_1|>")
