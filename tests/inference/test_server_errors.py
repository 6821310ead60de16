"""Requests the server refuses before generating: every one gets a JSON error with a clear message.

The engine is never started: none of these requests may reach it.
"""

import logging
import re

import pytest
from starlette.testclient import TestClient

from moss_jax.inference.decoder import Decoder
from moss_jax.inference.engine import BatchEngine, Request
from moss_jax.inference.server_app import create_app

URL = "/v1/chat/completions"


def _engine(chat_model, tokenizer, cache_len):
    config, params = chat_model
    decoder = Decoder(config.replace(max_len=1024), batch_size=2, cache_len=cache_len, chunk_size=4)
    return BatchEngine(decoder, params, tokenizer.decode)  # not started


@pytest.fixture(scope="module")
def client(chat_model, tokenizer):
    app = create_app(_engine(chat_model, tokenizer, 2048), tokenizer, 1024, "moss-test", default_max_tokens=16)
    return TestClient(app, raise_server_exceptions=False)


def _json_error(r, status):
    assert r.status_code == status and r.headers["content-type"] == "application/json", (r.status_code, r.text)
    return r.json()["error"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
        b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2, "stream": true}',
        b'{"messages": [{"role": "system", "content": "\\ud800"}, {"role": "user", "content": "hi"}]}',
        b'{"messages": [{"role": "user", "content": "\\ud800"}], "moss_tools": {"calculate": true}}',
    ],
    ids=["plain", "stream", "system", "moss_tools"],
)
def test_a_lone_surrogate_is_a_400_naming_where_it_is(client, raw):
    error = _json_error(client.post(URL, content=raw), 400)
    assert error["message"] == "messages[0].content is not valid Unicode: lone surrogate U+D800 at character 0"
    assert error["param"] == "messages"


def test_unsupported_message_fields_are_a_400(client):
    # max_tokens leaves no room for a prompt: were the field dropped, a 400 would still come, but another one.
    body = {"messages": [{"role": "user", "content": "a", "foo": 1}], "max_tokens": 1023}
    error = _json_error(client.post(URL, json=body), 400)
    assert error["message"].startswith("messages[0]: unsupported field(s) ['foo']")


def test_prompt_too_long_says_what_the_limit_is_made_of(client):
    """The plain path words it as the terminal chat does; the tool path adds the tool pass's room."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1023}
    error = _json_error(client.post(URL, json=body), 400)
    assert re.fullmatch(
        r"the meta instruction plus the current message need \d+ tokens; the limit is 1 "
        r"\(the 1024-token context minus 1023 reply tokens\)",
        error["message"],
    ), error["message"]
    error = _json_error(client.post(URL, json={**body, "moss_tools": {"calculate": True}}), 400)
    assert "(with tools on: the 1024-token context minus 1023 reply tokens minus" in error["message"]


def test_an_unexpected_failure_is_a_json_500(chat_model, tokenizer):
    class Broken:
        """The test tokenizer, except that building a prompt fails in a way no handler expects."""

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode_parts(self, parts):
            raise RuntimeError("the tokenizer broke")

    app = create_app(_engine(chat_model, tokenizer, 2048), Broken(), 1024, "moss-test")
    r = TestClient(app, raise_server_exceptions=False).post(URL, json={"messages": [{"role": "user", "content": "a"}]})
    error = _json_error(r, 500)
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]


def test_cache_fit_error_and_start_up_warning_count_the_padded_prompt(chat_model, tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="moss_jax.inference.server_app"):
        app = create_app(_engine(chat_model, tokenizer, 600), tokenizer, 1024, "moss-test", default_max_tokens=512)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "the 600-slot cache is smaller than a 512-token prompt (padded to 512) plus the default 512" in warning
    assert "requests without max_tokens and with long prompts will be refused" in warning
    client = TestClient(app, raise_server_exceptions=False)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    error = _json_error(client.post(URL, json=body), 400)
    # The ~380-token meta instruction of the test vocabulary takes a 512-slot bucket.
    assert re.fullmatch(
        r"\d+ prompt tokens \(padded to 512\) \+ 100 new tokens need 612 of the 600 cache slots", error["message"]
    ), error["message"]


def test_engine_check_names_the_padded_size(chat_model, tokenizer):
    engine = _engine(chat_model, tokenizer, 600)
    with pytest.raises(ValueError) as e:
        engine.check(Request(list(range(292)), 100))
    assert str(e.value) == "292 prompt tokens (padded to 512) + 100 new tokens need 612 of the 600 cache slots"
    with pytest.raises(ValueError, match="^512 prompt tokens \\+ 100 new tokens need 612 of the 600 cache slots$"):
        engine.check(Request(list(range(512)), 100))  # a prompt that fills its bucket is not "padded"
    with pytest.raises(ValueError, match="^601 prompt tokens do not fit the 600-slot cache$"):
        engine.check(Request(list(range(601)), 1))
    engine.check(Request(list(range(292)), 88))  # 512 + 88 = 600 fits


def test_no_warning_when_the_default_cache_fits(chat_model, tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="moss_jax.inference.server_app"):
        create_app(_engine(chat_model, tokenizer, 2048), tokenizer, 1024, "moss-test", default_max_tokens=512)
    assert not [r for r in caplog.records if "slot cache" in r.getMessage()]
