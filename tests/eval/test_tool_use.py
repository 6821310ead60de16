"""Tool-command exact match against a designed generator (an oracle)."""

import pytest

from moss_jax.eval.tool_use import canonical, command_prompt, exact_match, extract_commands, read_questions

QUESTIONS = [
    {"human": "What is 2*3?", "command": 'Calculate("2*3")', "kind": "calculate"},
    {"human": "Solve 2*x=4.", "command": 'Solve("2*x=4")', "kind": "solve"},
    {"human": "Tell me about heaps.", "command": 'Search("heaps")', "kind": "search"},
    {"human": "What is 5+5?", "command": 'Calculate("5+5")', "kind": "calculate"},
]


def fake_generate(answers):
    def generate(prompts, max_new_tokens, stop_strings):
        assert stop_strings == ["<eoc>"] and all(p.endswith("<|Inner Thoughts|>:") for p in prompts)
        return [f" I should use a tool.<eot>\n<|Commands|>: {answers[i]}" for i in range(len(prompts))]

    return generate


def test_known_accuracy_from_designed_outputs():
    answers = ['Calculate("2*3")', 'Solve("2*x=5")', "Search('heaps')", "None"]
    r = exact_match(fake_generate(answers), QUESTIONS)
    assert r["exact_match"] == pytest.approx(0.5)  # a changed argument and a skipped tool are misses
    assert r["by_kind"] == {"calculate": 0.5, "search": 1.0, "solve": 0.0}
    assert [e["match"] for e in r["examples"]] == [True, False, True, False]


def test_unparsable_or_missing_commands_are_misses():
    assert extract_commands(" thoughts<eot>\n") is None
    assert canonical('Calculate("2*3"') is None
    assert canonical("None") == ()
    r = exact_match(lambda p, n, s: ["no commands at all"] * len(p), QUESTIONS[:2])
    assert r["exact_match"] == 0.0


def test_prompt_is_the_plugin_prompt():
    p = command_prompt("hi", "META\n")
    assert p == "META\n<|Human|>: hi<eoh>\n<|Inner Thoughts|>:"


def test_question_file_errors_name_the_line(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"human": "a", "command": "None"}\n{"human": "b"}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2.*command"):
        read_questions(f)


def test_an_expected_command_that_does_not_parse_is_refused(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"human": "a", "command": "None"}\n{"human": "b", "command": "Calculate(1+2"}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: expected command 'Calculate\(1\+2' does not parse"):
        read_questions(f)
    f.write_text('{"human": "a", "command": "None"}\n{"human": "b", "command": "Calculate(\\"1+2\\")"}\n')
    assert [q["command"] for q in read_questions(f)] == ["None", 'Calculate("1+2")']
