import pytest

from data_pipelines.jsonl import DataFormatError, iter_jsonl


def test_invalid_utf8_line_is_named_or_skipped_and_counted(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff\xfe byte"}\n\n{"text": "\xe4\xbd\xa0\xe5\xa5\xbd"}\n')
    with pytest.raises(DataFormatError, match=r"mixed\.jsonl:2: not valid UTF-8 \(invalid start byte"):
        list(iter_jsonl([path]))
    counter = {}
    got = list(iter_jsonl([path], skip_malformed=True, counter=counter))
    # Line numbers are physical lines: the blank line 3 and the skipped line 2 shift nothing.
    assert got == [(str(path), 1, {"text": "ok"}), (str(path), 4, {"text": "你好"})]
    assert counter == {"malformed": 1}


def test_bom_crlf_and_malformed_json_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n[1, 2]\r\n{"a": \n{"a": 2}')
    counter = {}
    got = [(lineno, obj) for _, lineno, obj in iter_jsonl([path], skip_malformed=True, counter=counter)]
    assert got == [(1, {"a": 1}), (4, {"a": 2})] and counter == {"malformed": 2}
    with pytest.raises(DataFormatError, match=r"a\.jsonl:2: malformed JSON line \(not a JSON object\)"):
        list(iter_jsonl([path]))
