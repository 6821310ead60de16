"""Request validation of the chat-completions wire format (no model, no server)."""

import json

import pytest

from moss_jax.inference.openai_api import RequestError, parse_request


def _user(content, **extra):
    return {"role": "user", "content": content, **extra}


@pytest.mark.parametrize(
    "body,where,param",
    [
        (
            {"messages": [_user("\ud800")]},
            "messages[0].content is not valid Unicode: lone surrogate U+D800 at character 0",
            "messages",
        ),
        (
            {"messages": [_user("ok"), {"role": "assistant", "content": "fine"}, _user("hi \udc80")]},
            "messages[2].content is not valid Unicode: lone surrogate U+DC80 at character 3",
            "messages",
        ),
        (
            {"messages": [{"role": "system", "content": "x\ud83d"}, _user("hi")]},
            "messages[0].content is not valid Unicode: lone surrogate U+D83D at character 1",
            "messages",
        ),
        (
            {"messages": [_user([{"type": "text", "text": "a"}, {"type": "text", "text": "b\udfff"}])]},
            "messages[0].content[1].text is not valid Unicode",
            "messages",
        ),
        ({"messages": [_user("hi")], "stop": ["ok", "\ud800"]}, "stop[1] is not valid Unicode", "stop"),
        ({"messages": [_user("hi")], "model": "m\udc00"}, "model is not valid Unicode", "model"),
        ({"messages": [_user("hi")], "\ud800": 1}, "a field name in the request body is not valid Unicode", None),
        (
            {"messages": [{"role": "user", "content": "hi", "\udc00": 1}]},
            "a field name in messages[0] is not valid Unicode",
            "messages",
        ),
        (
            {"messages": [_user("hi \ud800")], "moss_tools": {"calculate": True}},
            "messages[0].content is not valid Unicode",
            "messages",
        ),
    ],
    ids=["user", "third-message", "system", "text-part", "stop", "model", "top-level-key", "message-key", "tools"],
)
def test_text_that_is_not_valid_unicode_is_refused_with_its_place(body, where, param):
    with pytest.raises(RequestError) as e:
        parse_request(body)
    assert where in str(e.value) and e.value.param == param
    str(e.value).encode("utf-8")  # the message itself can be sent back


def test_a_valid_surrogate_pair_is_text():
    """JSON escapes a character outside the BMP as a surrogate pair, which decodes to one character."""
    req = parse_request(json.loads('{"messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}]}'))
    assert req.turns[0].human == "hi \U0001f600"


@pytest.mark.parametrize(
    "messages,fields",
    [
        ([_user("a", foo=1)], "['foo'] (a message with role 'user' has only ['content', 'role'])"),
        ([_user("a", name="bob")], "['name'] (a message with role 'user'"),
        ([_user("a", moss_tool_pass={"thoughts": "x"})], "['moss_tool_pass'] (a message with role 'user'"),
        (
            [{"role": "system", "content": "s", "moss_tool_pass": {}}, _user("a")],
            "['moss_tool_pass'] (a message with role 'system'",
        ),
        (
            [
                _user("a"),
                {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function"}]},
                _user("b"),
            ],
            "messages[1]: unsupported field(s) ['tool_calls'] (a message with role 'assistant' has only "
            "['content', 'moss_tool_pass', 'role'])",
        ),
    ],
    ids=["unknown", "name", "tool-pass-on-user", "tool-pass-on-system", "tool-calls"],
)
def test_unsupported_message_fields_are_refused(messages, fields):
    with pytest.raises(RequestError, match="unsupported field") as e:
        parse_request({"messages": messages})
    assert fields in str(e.value)
    assert e.value.param == "messages"


def test_an_assistant_message_may_carry_its_tool_pass():
    tool_pass = {"thoughts": "calc", "commands": 'Calculate("2+2")'}
    req = parse_request(
        {"messages": [_user("2+2?"), {"role": "assistant", "content": "4", "moss_tool_pass": tool_pass}, _user("ok")]}
    )
    assert (req.turns[0].thoughts, req.turns[0].commands, req.turns[0].moss) == ("calc", 'Calculate("2+2")', "4")
