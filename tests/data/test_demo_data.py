"""The embedded alignment demo data: correct by construction, deterministic, in the chat's format."""

import json
import re

import pytest

from data_pipelines import conversation as conv
from data_pipelines import demo_data
from data_pipelines.jsonl import iter_jsonl
from data_pipelines.vocab import load_vocabulary
from moss_jax.inference.prompt import Turn, meta_instruction, render_turn
from moss_jax.tools import ToolRegistry, ToolsConfig
from moss_jax.tools.search_index import build_index, read_documents

SIZES = demo_data.DemoDataSizes(
    sft_train=30, sft_heldout=6, pairs_train=30, pairs_heldout=10, tool_questions=9, equations=8, topics=40
)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("demo_index")
    for lang in ("en", "zh"):
        (d / f"{lang}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[lang]))
    build_index(read_documents([d / "en.jsonl", d / "zh.jsonl"], max_chars=300), d / "index")
    return ToolRegistry(
        ToolsConfig(enable_search=True, search_index_dir=str(d / "index"), search_top_k=1, snippet_chars=100)
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory, registry, corpus):
    out = tmp_path_factory.mktemp("demo")
    meta = meta_instruction(registry.capability_lines(), inner_thoughts=True)
    counts = demo_data.build_demo_data(out, registry, meta, corpus, SIZES, seed=3)
    return out, counts, meta, corpus


def _records(path):
    return [r for _, _, r in iter_jsonl([path])]


def test_counts_and_files(demo):
    out, counts, _, _ = demo
    assert counts["sft_train"] == 30 and counts["pairs_heldout"] == 10 and counts["tool_questions"] == 9
    for name in ("sft_train", "sft_heldout", "pairs_train", "pairs_heldout", "tool_questions"):
        assert len(_records(out / f"{name}.jsonl")) == counts[name]


def test_tool_answers_come_from_the_real_tools(demo, registry):
    out, _, _, _ = demo
    checked = 0
    for rec in _records(out / "sft_train.jsonl"):
        for turn in conv.record_turns(rec):
            command = turn["Commands"][len("<|Commands|>: ") : -len("<eoc>\n")]
            if command == "None":
                assert turn["Tool Responses"] == "<|Results|>: None<eor>\n"
                continue
            body = turn["Tool Responses"][len("<|Results|>:\n") : -len("\n<eor>\n")]
            if command.startswith(("Calculate", "Search")):  # solving is a subprocess: checked below
                assert body == registry.execute(command).text
                checked += 1
            reply = turn["MOSS"]
            if command.startswith("Calculate"):
                value = re.search(r"=> '([^']*)'", body).group(1)
                assert value.removesuffix(".0") in reply
            elif command.startswith("Solve"):
                root = re.search(r"x = (-?\d+)(?:\.0+)?$", body, re.M).group(1)
                assert f"x = {root}" in reply
                eq = command[len('Solve("') : -2]
                lhs, rhs = eq.split("=")
                assert eval(lhs.replace("x", f"({root})")) == int(rhs)  # test-only check of our own data
            else:
                assert reply.endswith("<sup><|1|></sup><eom>\n")
    assert checked >= 10


def test_fields_render_exactly_as_the_chat_prompt(demo):
    out, _, meta, _ = demo
    for rec in _records(out / "sft_train.jsonl"):
        assert rec["meta_instruction"] == meta
        for turn in conv.record_turns(rec):
            strip = lambda f, pre, post: turn[f][len(pre) : len(turn[f]) - len(post)]
            t = Turn(
                human=strip("Human", "<|Human|>: ", "<eoh>\n"),
                thoughts=strip("Inner Thoughts", "<|Inner Thoughts|>: ", "<eot>\n"),
                commands=strip("Commands", "<|Commands|>: ", "<eoc>\n"),
                results="None"
                if turn["Tool Responses"].startswith("<|Results|>: None")
                else strip("Tool Responses", "<|Results|>:\n", "\n<eor>\n"),
                moss=strip("MOSS", "<|MOSS|>: ", "<eom>\n"),
            )
            assert render_turn(t, tools=True) == "".join(turn[f] for f in conv.TURN_FIELDS)


def test_training_and_chat_tokenise_the_same(demo, vocab_path):
    """Training encodes segment by segment; the chat encodes the whole prompt: same ids."""
    out, _, _, _ = demo
    vocab = load_vocabulary(vocab_path)
    for rec in _records(out / "sft_train.jsonl")[:10]:
        ids, _ = conv.encode_conversation(rec, vocab, 4096, conv.MaskOptions())
        text = rec["meta_instruction"] + "".join(
            t[f] for t in conv.record_turns(rec) for f in conv.TURN_FIELDS if f in t
        )
        assert list(vocab.encode(text)) == list(ids)


def test_pairs_differ_only_in_a_worse_final_reply(demo):
    out, _, _, _ = demo
    kinds = set()
    for pair in _records(out / "pairs_train.jsonl"):
        assert pair["chosen"] != pair["rejected"]
        assert pair["rejection_kind"] in demo_data.REJECTION_KINDS
        kinds.add(pair["rejection_kind"])
        last = conv.record_turns(pair)[-1]
        assert "MOSS" not in last and last["Commands"] != "<|Commands|>: None<eoc>\n"
        if pair["rejection_kind"] == "wrong_number":
            nums = lambda s: re.findall(r"-?\d+", s.split(":", 1)[1])
            assert nums(pair["chosen"]) != nums(pair["rejected"])
        chosen, rejected = demo_data.pair_conversations(pair)
        assert chosen["chat"][f"turn_{pair['num_turns']}"]["MOSS"] == pair["chosen"]
        assert rejected["chat"][f"turn_{pair['num_turns']}"]["MOSS"] == pair["rejected"]
    assert len(kinds) >= 2


def test_heldout_questions_use_unseen_topics_and_equations(demo):
    out, _, meta, _ = demo
    train_commands = {t["Commands"] for r in _records(out / "sft_train.jsonl") for t in conv.record_turns(r)} | {
        t["Commands"] for r in _records(out / "pairs_train.jsonl") for t in conv.record_turns(r)
    }
    for q in _records(out / "tool_questions.jsonl"):
        assert q["meta_instruction"] == meta  # evaluated with the meta instruction it trained on
        if q["kind"] in ("search", "solve"):
            assert f"<|Commands|>: {q['command']}<eoc>\n" not in train_commands
        assert q["command"].split("(")[0] in ("Calculate", "Solve", "Search")


def test_deterministic_for_a_seed(tmp_path, registry, demo):
    out, _, meta, corpus = demo
    again = tmp_path / "again"
    demo_data.build_demo_data(again, registry, meta, corpus, SIZES, seed=3)
    for name in ("sft_train", "pairs_heldout", "tool_questions"):
        assert (again / f"{name}.jsonl").read_text() == (out / f"{name}.jsonl").read_text()


def test_rejection_weights_set_the_mix_of_rejected_replies():
    def run_tool(command):  # the calculator's result format; the value itself is not checked here
        return f"{command} => '7'"

    def mix(weights):
        gen = demo_data.DemoGenerator(run_tool, "meta", (["alpha"], ["甲乙"]), ["2*x+1=5"], seed=0,
                                      rejection_weights=weights)  # fmt: skip
        return [gen.rejected_reply(gen.turn(kind="calculate"))[0] for _ in range(300)]

    equal, weighted = mix(None), mix({"wrong_number": 8.0})
    assert 70 < equal.count("wrong_number") < 130  # 1/3 of 300
    assert 210 < weighted.count("wrong_number") < 270  # 8/10 of 300
    with pytest.raises(ValueError, match="unknown kinds"):
        mix({"wrong_numbers": 1.0})
