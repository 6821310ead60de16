import json

import pytest
import tensorflow_datasets as tfds

from data_pipelines.tfds_builders import LocalTextCorpus, MossSftConversations
from tests.data.test_conversation import RECORD


def _prepare(builder_cls, tmp_path, manual, config="strict"):
    builder = builder_cls(data_dir=str(tmp_path / f"tfds_{config}"), config=config)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return builder


def test_sft_builder_reads_conversations(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    lines = [json.dumps(RECORD | {"conversation_id": i}, ensure_ascii=False) for i in range(3)]
    (manual / "part1.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    builder = _prepare(MossSftConversations, tmp_path, manual)
    examples = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert len(examples) == 3
    ex = examples[0]
    assert json.loads(ex["chat_json"].decode()) == RECORD["chat"]
    assert ex["num_turns"] == 2 and ex["meta_instruction"].decode() == RECORD["meta_instruction"]


def test_malformed_line_error_names_file_and_line_or_is_counted(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    good = json.dumps(RECORD, ensure_ascii=False)
    (manual / "data.jsonl").write_text(f"{good}\n{{broken\n{good}\n" + json.dumps({"chat": {}}) + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl:2: malformed JSON"):
        _prepare(MossSftConversations, tmp_path, manual)
    builder = _prepare(MossSftConversations, tmp_path, manual, config="skip_malformed")
    assert len(list(builder.as_dataset(split="train"))) == 2
    assert builder.info.metadata["malformed_lines"] == 2
    reloaded = MossSftConversations(data_dir=str(tmp_path / "tfds_skip_malformed"), config="skip_malformed")
    assert reloaded.info.metadata["malformed_lines"] == 2


def test_text_corpus_builder(tmp_path):
    manual = tmp_path / "manual"
    (manual / "sub").mkdir(parents=True)
    (manual / "a.txt").write_text("English prose.\n", encoding="utf-8")
    (manual / "sub" / "b.py").write_text("def f():\n\treturn 1\n", encoding="utf-8")
    (manual / "c.jsonl").write_text(json.dumps({"text": "中文文本"}, ensure_ascii=False) + "\n", encoding="utf-8")
    builder = _prepare(LocalTextCorpus, tmp_path, manual)
    texts = sorted(ex["text"].decode() for ex in tfds.as_numpy(builder.as_dataset(split="train")))
    assert texts == sorted(["English prose.\n", "def f():\n\treturn 1\n", "中文文本"])
    (manual / "d.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:1: not a JSON object with a string 'text'"):
        _prepare(LocalTextCorpus, tmp_path / "again", manual)


@pytest.mark.parametrize(
    "num_turns, message",
    [
        (None, r"'num_turns' is null, expected an integer"),
        ("2", r"'num_turns' is a string \('2'\), expected an integer"),
        (3, r"num_turns=3 but 'chat' has 2 turns"),
    ],
)
def test_bad_num_turns_is_named_or_counted(tmp_path, num_turns, message):
    manual = tmp_path / "manual"
    manual.mkdir()
    good = json.dumps(RECORD, ensure_ascii=False)
    bad = json.dumps(RECORD | {"conversation_id": 8, "num_turns": num_turns}, ensure_ascii=False)
    (manual / "data.jsonl").write_text(f"{good}\n{bad}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.jsonl:2: conversation 8: " + message):
        _prepare(MossSftConversations, tmp_path, manual)
    builder = _prepare(MossSftConversations, tmp_path, manual, config="skip_malformed")
    assert len(list(builder.as_dataset(split="train"))) == 1
    assert builder.info.metadata["malformed_lines"] == 1


def test_turn_that_is_not_an_object_or_bad_utf8_is_named(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    bad_turn = json.dumps({"conversation_id": 9, "chat": {"turn_1": None}})
    good = json.dumps(RECORD, ensure_ascii=False)
    (manual / "data.jsonl").write_bytes(f"{bad_turn}\n".encode() + b'{"chat": "\xff"}\n' + f"{good}\n".encode())
    with pytest.raises(ValueError, match=r"data\.jsonl:1: conversation 9 turn_1: is null, expected an object"):
        _prepare(MossSftConversations, tmp_path, manual)
    builder = _prepare(MossSftConversations, tmp_path, manual, config="skip_malformed")
    assert builder.info.metadata["malformed_lines"] == 2
    assert len(list(builder.as_dataset(split="train"))) == 1


def test_files_of_the_same_name_in_different_subdirectories_are_all_read(tmp_path):
    manual = tmp_path / "manual"
    no_id = {k: v for k, v in RECORD.items() if k != "conversation_id"}
    for sub in ("a", "b"):
        (manual / sub).mkdir(parents=True)
        (manual / sub / "data.jsonl").write_text(json.dumps(no_id, ensure_ascii=False) + "\n", encoding="utf-8")
    builder = _prepare(MossSftConversations, tmp_path, manual)
    ids = sorted(ex["conversation_id"].decode() for ex in tfds.as_numpy(builder.as_dataset(split="train")))
    assert ids == ["a/data.jsonl:1", "b/data.jsonl:1"]
