import numpy as np
import pytest

from data_pipelines.conversation import (
    ConversationError,
    ConversionStats,
    MaskOptions,
    encode_conversation,
    encode_pair,
    tag_for_turn,
)
from data_pipelines.vocab import load_vocabulary

META = "You are a helpful bilingual assistant built for research.\n"
TURN1 = {
    "Human": "<|Human|>: 北京今天的气温是多少？再算一下 (6000-4800)/6000*100<eoh>\n",
    "Inner Thoughts": "<|Inner Thoughts|>: 需要搜索天气，并计算百分比<eot>\n",
    "Commands": '<|Commands|>: Search("北京 今天 气温"), Calculate("(6000-4800)/6000*100")<eoc>\n',
    "Tool Responses": "<|Results|>:\nSearch(\"北京 今天 气温\") =>\n<|1|>: '北京今日晴，气温 3 到 12 度'\n"
    "Calculate(\"(6000-4800)/6000*100\") => '20.0'\n<eor>\n",
    "MOSS": "<|MOSS|>: 北京今天晴，3 到 12 度<sup><|1|></sup>；结果是 20.0%。<eom>\n",
}
TURN2 = {
    "Human": "<|Human|>: Thanks! Say it in English.<eoh>\n",
    "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
    "Commands": "<|Commands|>: None<eoc>\n",
    "Tool Responses": "<|Results|>:\nNone\n<eor>\n",
    "MOSS": "<|MOSS|>: Sunny in Beijing, 3 to 12 degrees; the result is 20.0%.<eom>\n",
}
RECORD = {
    "conversation_id": 7,
    "meta_instruction": META,
    "num_turns": 2,
    "chat": {"turn_1": TURN1, "turn_2": TURN2},
    "category": "tool",
}


def _expected_trained(turn, train_human):
    """Built by hand from the field strings, independently of the code under test."""
    thoughts = turn["Inner Thoughts"][len("<|Inner Thoughts|>:") :]
    moss = turn["MOSS"][len("<|MOSS|>:") :]
    results = "<|Results|>:" + "<eor>\n"
    if train_human:
        return turn["Human"] + turn["Inner Thoughts"] + turn["Commands"] + results + turn["MOSS"]
    return thoughts + turn["Commands"] + results + moss


@pytest.mark.parametrize("train_human", [False, True])
def test_trained_tokens_are_exactly_the_model_written_parts(vocab_path, train_human):
    vocab = load_vocabulary(vocab_path)
    ids, weights = encode_conversation(RECORD, vocab, max_len=4096, options=MaskOptions(train_human=train_human))
    assert len(ids) == len(weights)
    full = META + "".join(TURN1.values()) + "".join(TURN2.values())
    assert vocab.decode(ids) == full
    trained = [i for i, w in zip(ids, weights, strict=True) if w == 1.0]
    assert vocab.decode(trained) == _expected_trained(TURN1, train_human) + _expected_trained(TURN2, train_human)
    assert set(weights) <= {0.0, 1.0}
    # The meta instruction and the tool result contents are never trained.
    meta_len = len(vocab.encode(META))
    assert not any(weights[:meta_len])
    assert "北京今日晴" not in vocab.decode(trained)


def test_truncation_keeps_whole_turns_and_counts(vocab_path):
    vocab = load_vocabulary(vocab_path)
    full_ids, _ = encode_conversation(RECORD, vocab, max_len=4096)
    one_turn = RECORD | {"chat": {"turn_1": TURN1}, "num_turns": 1}
    one_ids, _ = encode_conversation(one_turn, vocab, max_len=4096)
    stats = ConversionStats()
    cut = encode_conversation(RECORD, vocab, max_len=len(full_ids) - 1, stats=stats)
    assert cut[0] == one_ids and stats.truncated == 1 and stats.turns_cut == 1
    assert encode_conversation(RECORD, vocab, max_len=len(one_ids) - 1, stats=stats) is None
    assert stats.dropped_too_long == 1 and stats.examples == 1
    assert "1 dropped" in stats.report()


def test_plain_sft_turns_without_tools(vocab_path):
    vocab = load_vocabulary(vocab_path)
    record = {"meta_instruction": META, "chat": {"turn_1": {"Human": TURN2["Human"], "MOSS": TURN2["MOSS"]}}}
    ids, weights = encode_conversation(record, vocab, max_len=1024)
    trained = vocab.decode([i for i, w in zip(ids, weights, strict=True) if w])
    assert trained == TURN2["MOSS"][len("<|MOSS|>:") :]
    assert np.isclose(sum(weights), len(vocab.encode(trained)), atol=2)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"chat": {}}, "missing or empty 'chat'"),
        ({"chat": {"turn_2": TURN1}}, "numbered"),
        ({"chat": {"turn_1": {"MOSS": TURN1["MOSS"]}}}, "missing field 'Human'"),
        ({"chat": {"turn_1": TURN1 | {"Humans": "x"}}}, "unknown field"),
        ({"chat": {"turn_1": TURN1 | {"MOSS": "<|MOSS|>: no end token"}}}, "end token"),
        ({"chat": {"turn_1": TURN1 | {"Human": "Human: hi<eoh>"}}}, "does not start with"),
        ({"chat": {"turn_1": TURN1}, "num_turns": 3}, "num_turns=3"),
    ],
)
def test_malformed_records_name_the_problem(vocab_path, bad, message):
    vocab = load_vocabulary(vocab_path)
    with pytest.raises(ConversationError, match=message):
        encode_conversation({"conversation_id": 42, "meta_instruction": META} | bad, vocab, max_len=512)


def _pair_record():
    """Two context turns and a final human turn; the rejected reply is much longer."""
    return {
        "conversation_id": "p1",
        "meta_instruction": "META\n",
        "chat": {
            "turn_1": {"Human": "<|Human|>: " + "hello world " * 5 + "<eoh>\n", "MOSS": "<|MOSS|>: ok<eom>\n"},
            "turn_2": {"Human": "<|Human|>: why?<eoh>\n", "MOSS": "<|MOSS|>: because<eom>\n"},
            "turn_3": {"Human": "<|Human|>: and then?<eoh>\n"},
        },
        "chosen": "<|MOSS|>: short<eom>\n",
        "rejected": "<|MOSS|>: " + "a much longer rejected reply " * 3 + "<eom>\n",
    }


def _context(ids, weights):
    """The ids before the first trained token (the context the reply is scored in)."""
    first = next(i for i, w in enumerate(weights) if w)
    return ids[:first]


def test_pair_sides_keep_the_same_context_near_max_len(vocab_path):
    vocab = load_vocabulary(vocab_path)
    record = _pair_record()
    full = encode_pair(record, vocab, 10_000)
    n_chosen, n_rejected = len(full["chosen"][0]), len(full["rejected"][0])
    assert n_chosen < n_rejected
    assert _context(*full["chosen"]) == _context(*full["rejected"])
    context_turns = [
        len(vocab.encode(record["chat"][f"turn_{i}"]["Human"])) + len(vocab.encode(record["chat"][f"turn_{i}"]["MOSS"]))
        for i in (1, 2)
    ]
    # Every max_len between "all fits" and "the last turn alone does not fit", in particular the
    # ones where the chosen side alone would have kept more context than the rejected side.
    kept_turns = set()
    for max_len in range(n_rejected, n_rejected - sum(context_turns) - 20, -1):
        stats = ConversionStats()
        out = encode_pair(record, vocab, max_len, stats=stats)
        if out is None:
            assert stats.dropped_too_long == 1 and stats.examples == 0
            continue
        (c_ids, c_w), (r_ids, r_w) = out["chosen"], out["rejected"]
        assert _context(c_ids, c_w) == _context(r_ids, r_w), max_len
        assert len(r_ids) <= max_len and len(c_ids) <= max_len
        assert vocab.decode([i for i, w in zip(c_ids, c_w, strict=True) if w]) == " short<eom>\n"
        human_turns = _context(c_ids, c_w).count(vocab.encode("<eoh>")[0])  # context turns + the last
        kept_turns.add(human_turns)
        assert stats.examples == 1 and stats.truncated == (human_turns < 3)
    assert kept_turns == {1, 2, 3}  # the range covered every amount of context
    stats = ConversionStats()
    assert encode_pair(record, vocab, 10, stats=stats) is None and stats.dropped_too_long == 1


@pytest.mark.parametrize(
    "chat, extra, message",
    [
        ({"turn_1": None}, {}, r"turn_1: is null, expected an object"),
        ({"turn_1": 3}, {}, r"turn_1: is a number \(3\), expected an object"),
        ({"turn_1": "<|Human|>: hi<eoh>\n"}, {}, r"turn_1: is a string .*expected an object"),
        ({"turn_1": ["<|Human|>: hi<eoh>\n"]}, {}, r"turn_1: is a list .*expected an object"),
        ([TURN1], {}, r"'chat' is a list .*expected an object turn_1"),
        ({"turn_1": TURN1}, {"num_turns": "1"}, r"'num_turns' is a string \('1'\), expected an integer"),
        ({"turn_1": TURN1}, {"num_turns": None}, r"'num_turns' is null, expected an integer"),
        ({"turn_1": TURN1}, {"num_turns": True}, r"'num_turns' is a boolean"),
        ({"turn_1": TURN1 | {"Human": None}}, {}, r"turn_1: field 'Human' is null, expected a string"),
        ({"turn_1": TURN1 | {"Commands": 5}}, {}, r"turn_1: field 'Commands' is a number \(5\)"),
        ({"turn_1": TURN1}, {"meta_instruction": ["x"]}, r"'meta_instruction' is a list"),
    ],
)
def test_wrong_json_types_are_conversation_errors_naming_the_field(vocab_path, chat, extra, message):
    vocab = load_vocabulary(vocab_path)
    record = {"conversation_id": 42, "meta_instruction": META, "chat": chat} | extra
    with pytest.raises(ConversationError, match=r"^conversation 42:? " + message):
        encode_conversation(record, vocab, max_len=512)
    pair = {"conversation_id": 42, "chat": chat, "chosen": TURN1["MOSS"], "rejected": TURN1["MOSS"]} | extra
    with pytest.raises(ConversationError):
        encode_pair(pair, vocab, max_len=512)


def test_tag_must_be_one_of_the_runs_tags():
    from data_pipelines.specials import QUALITY_TAGS

    assert tag_for_turn(2, "c", 1, dropout=0.0, seed=0, num_tags=3) == QUALITY_TAGS[2]
    with pytest.raises(ConversationError, match=r"conversation c turn 1: tag 3 is outside \[0, 3\)"):
        tag_for_turn(3, "c", 1, dropout=0.0, seed=0, num_tags=3)
    with pytest.raises(ConversationError, match="outside"):
        tag_for_turn(-1, "c", 1, dropout=0.0, seed=0, num_tags=3)
    with pytest.raises(ValueError, match="num_tags"):
        tag_for_turn(0, "c", 1, dropout=0.0, seed=0, num_tags=9)


@pytest.mark.parametrize("field", ["Human", "MOSS"])
def test_empty_required_field_is_an_error_naming_turn_and_field(vocab_path, field):
    vocab = load_vocabulary(vocab_path)
    record = {"conversation_id": 42, "meta_instruction": META, "chat": {"turn_1": TURN1, "turn_2": TURN2 | {field: ""}}}
    with pytest.raises(ConversationError, match=rf"^conversation 42 turn_2: field '{field}' is empty$"):
        encode_conversation(record, vocab, max_len=4096)
    last = {k: v for k, v in TURN2.items() if k != "MOSS"}
    pair = {"conversation_id": 42, "chat": {"turn_1": last}, "chosen": TURN2["MOSS"], "rejected": ""}
    with pytest.raises(ConversationError, match=r"turn_1 \(rejected\): field 'MOSS' is empty"):
        encode_pair(pair, vocab, max_len=4096)


def test_empty_optional_plugin_fields_are_allowed(vocab_path):
    vocab = load_vocabulary(vocab_path)
    turn = TURN2 | {"Inner Thoughts": "", "Commands": None, "Tool Responses": ""}
    ids, weights = encode_conversation({"chat": {"turn_1": turn}}, vocab, max_len=4096)
    assert vocab.decode(ids) == turn["Human"] + turn["MOSS"] and any(weights)


class _NoEndTokens:
    """A vocabulary that encodes `<eom>` (and what follows it) to nothing: the MOSS reply's only
    trained tokens when its body is blank."""

    def encode(self, s):
        return [] if s.startswith("<eom>") else [ord(c) for c in s]


def test_conversation_with_no_trained_token_is_dropped_not_kept():
    stats = ConversionStats()
    blank = {"chat": {"turn_1": {"Human": "<|Human|>: hi<eoh>\n", "MOSS": "<|MOSS|>:<eom>\n"}}}
    assert encode_conversation(blank, _NoEndTokens(), max_len=4096, stats=stats) is None
    assert (stats.examples, stats.dropped_untrained) == (0, 1)
    assert "0 conversations kept" in stats.report() and "1 dropped (no token with a loss weight)" in stats.report()
    replied = {"chat": {"turn_1": {"Human": "<|Human|>: hi<eoh>\n", "MOSS": "<|MOSS|>: ok<eom>\n"}}}
    assert encode_conversation(replied, _NoEndTokens(), max_len=4096, stats=stats) is not None
    assert (stats.examples, stats.dropped_untrained) == (1, 1)
