"""Format compliance: end tokens and role names in generated replies."""

import json

import pytest

from moss_jax.eval import format_checks as fc
from moss_jax.eval.lm import EvalError, EvalModel

from .conftest import START, SpecialByteTokenizer, two_step_params, unigram_model


@pytest.mark.parametrize(
    "reply, problems",
    [
        (" Hello there.<eom>", []),
        ("<|quality_2|> Hi.<eom>", []),
        (" Hello there.", ["does not end with <eom>"]),
        (" Sure.<eom>\n<|Human|>: and you?", ["does not end with <eom>", "writes another role's turn (<|Human|>)"]),
        (" Hi<|Assistant|>: hello<eom>", ["invented role name <|Assistant|>"]),
        (" a<eoh> b<eom>", ["stray <eoh>"]),
        (" a<eom> b<eom>", ["<eom> 2 times"]),
    ],
)
def test_chat_replies(reply, problems):
    assert fc.check_reply(reply) == problems


@pytest.mark.parametrize(
    "reply, problems",
    [
        (' add them<eot>\n<|Commands|>: Calculate("1+2")<eoc>', []),
        (" None<eot>\n<|Commands|>: None<eoc>", []),
        (" x<eot>\n<|Commands|>: None<eoc>\n<|Results|>: None<eor>\n<|MOSS|>: hi<eom>", []),
        (' add<eot>\n<|Commands|>: Calculate("1")', ["does not end with <eoc>"]),
        (' add them\n<|Commands|>: Calculate("1")<eoc>', ["no '<eot>\\n<|Commands|>:' before the commands"]),
        (
            " x<eot>\n<|Tool|>: y<eoc>",
            ["no '<eot>\\n<|Commands|>:' before the commands", "invented role name <|Tool|>"],
        ),
        (" thinking", ["does not end with <eoc>"]),
    ],
)
def test_plugin_replies(reply, problems):
    assert fc.check_reply(reply, plugin=True) == problems


def test_evaluate_counts_compliance(tmp_path):
    path = tmp_path / "heldout.jsonl"
    record = {"chat": {"turn_1": {"Human": "<|Human|>: hi<eoh>\n"}, "turn_2": {"Human": "<|Human|>: 1+1?<eoh>\n"}}}
    path.write_text(json.dumps(record) + "\n" + json.dumps({"human": "你好"}) + "\n")
    messages = fc.read_messages(path)
    assert messages == ["hi", "1+1?", "你好"]
    seen = []

    def generate_fn(ids, max_new_tokens, stop_strings, **kw):
        seen.extend(bytes(i).decode() for i in ids)
        return [" Hello!<eom>", " 2<eom>\n<|Human|>: thanks", " 你好<|Assistant|>:<eom>"]

    report = fc.evaluate(unigram_model("x", generate_fn=generate_fn), messages)
    assert report["compliance"] == pytest.approx(1 / 3)
    assert report["problems"] == {
        "does not end with <eom>": 1,
        "writes another role's turn": 1,
        "invented role name": 1,
    }
    assert all(p.endswith("<|Human|>: " + m + "<eoh>\n<|MOSS|>:") for p, m in zip(seen, messages, strict=True))
    path.write_text('{"chat": {"turn_1": {"MOSS": "x"}}}\n')
    with pytest.raises(EvalError, match=r"heldout.jsonl:1: chat.turn_1.Human"):
        fc.read_messages(path)


def test_a_reply_that_stops_on_eom_complies_through_real_generation(byte_debug_model):
    """A real MossLM whose weights make it answer 'A<eom>' complies; one that alternates 'AB'
    until the token budget cuts it does not end with <eom>. Generation stops at the <eom> id,
    whose text the stream never holds: the reply must still be judged as ending with it."""
    config, params = byte_debug_model
    tokenizer = SpecialByteTokenizer()
    eom = tokenizer.SPECIAL_IDS["<eom>"]
    assert tokenizer.decode(tokenizer.encode(" A<eom>")) == " A<eom>" and len(tokenizer.encode("<eom>")) == 1
    messages = ["hello", "1+1?"]

    def run(first, then):
        designed = two_step_params(config, params, tokenizer.encode(first)[0], tokenizer.encode(then)[0])
        model = EvalModel.from_params(config, designed, tokenizer, start_id=START, batch_size=2)
        return fc.evaluate(model, messages, max_new_tokens=6, end_ids=[eom])

    report = run("A", "<eom>")
    assert report["compliance"] == 1.0 and report["problems"] == {}, report
    report = run("A", "B")
    assert report["compliance"] == 0.0 and report["problems"] == {"does not end with <eom>": 2}
    assert [e["reply"] for e in report["examples"]] == ["ABABAB"] * 2
