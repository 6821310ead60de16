"""MOSS prompt format: meta instruction, turn rendering, ending role, history truncation."""

import pytest

from moss_jax.inference.prompt import PromptTooLongError, Turn, build_prompt, meta_instruction, render_turn
from moss_jax.tools import ToolRegistry, ToolsConfig

META = meta_instruction(["Calculator: enabled. API: Calculate(expression)"], inner_thoughts=True)


def count(text):
    return len(text.split())


def test_meta_instruction_lines():
    no_tools = ToolRegistry(ToolsConfig(enable_calculate=False, enable_solve=False))
    meta = meta_instruction(no_tools.capability_lines(), inner_thoughts=False)
    assert "- Inner thoughts: disabled.\n" in meta
    assert "- Calculator: disabled.\n" in meta and "- Web search: disabled.\n" in meta
    assert "enabled" not in meta.split("Capabilities")[1]
    assert "- Inner thoughts: enabled.\n- Calculator: enabled. API: Calculate(expression)\n" in META
    assert meta.startswith("You are MOSS") and meta.endswith("\n")


def test_prompt_ends_with_the_role_to_write():
    turns = [Turn("hi", moss="Hello!"), Turn("what is 2+2?")]
    text, dropped = build_prompt(turns, meta=META, tools=False, count_tokens=count, max_tokens=10_000)
    assert dropped == 0
    assert text == META + "<|Human|>: hi<eoh>\n<|MOSS|>: Hello!<eom>\n<|Human|>: what is 2+2?<eoh>\n<|MOSS|>:"
    text, _ = build_prompt(turns, meta=META, tools=True, count_tokens=count, max_tokens=10_000)
    assert text.endswith("<|Human|>: what is 2+2?<eoh>\n<|Inner Thoughts|>:")


def test_tool_turns_render_and_old_results_collapse():
    done = Turn("x", thoughts="use calc", commands='Calculate("1+1")', results="Calculate(\"1+1\") => '2'", moss="2")
    pending = Turn("y", thoughts="again", commands='Calculate("2+2")', results="Calculate(\"2+2\") => '4'")
    text, _ = build_prompt([done, pending], meta=META, tools=True, count_tokens=count, max_tokens=10_000)
    assert (
        '<|Human|>: x<eoh>\n<|Inner Thoughts|>: use calc<eot>\n<|Commands|>: Calculate("1+1")<eoc>\n'
        "<|Results|>: None<eor>\n<|MOSS|>: 2<eom>\n" in text
    )
    assert text.endswith("<|Results|>:\nCalculate(\"2+2\") => '4'\n<eor>\n<|MOSS|>:")
    assert render_turn(Turn("z", thoughts="t", commands=None, results="None"), tools=True).endswith(
        "<|Commands|>: None<eoc>\n<|Results|>: None<eor>\n<|MOSS|>:"
    )


def test_history_is_cut_at_human_boundaries():
    turns = [Turn(f"question {i} " + "w " * 20, moss="answer " * 20) for i in range(5)] + [Turn("last")]
    full, _ = build_prompt(turns, meta=META, tools=False, count_tokens=count, max_tokens=10_000)
    limit = count(full) - 50
    text, dropped = build_prompt(turns, meta=META, tools=False, count_tokens=count, max_tokens=limit)
    assert dropped >= 1 and count(text) <= limit
    assert text.startswith(META + "<|Human|>: question " + str(dropped) + " ")  # whole turns only
    assert text.endswith("<|Human|>: last<eoh>\n<|MOSS|>:")
    with pytest.raises(PromptTooLongError):
        build_prompt(turns, meta=META, tools=False, count_tokens=count, max_tokens=count(META))
    with pytest.raises(ValueError):
        build_prompt([Turn("a", moss="b")], meta=META, tools=False, count_tokens=count, max_tokens=100)


def test_preference_tag_follows_the_pending_moss_marker_only():
    turns = [Turn("hi", moss="Hello!"), Turn("what is 2+2?")]
    text, _ = build_prompt(turns, meta=META, tools=False, count_tokens=count, max_tokens=10_000, tag="<|quality_2|>")
    assert text.endswith("<|Human|>: what is 2+2?<eoh>\n<|MOSS|>:<|quality_2|>")  # no space, as in training
    assert "<|MOSS|>: Hello!<eom>" in text and text.count("<|quality_2|>") == 1  # history stays untagged
    # Tools on: the thoughts pass gets no tag; the reply after the results does.
    text, _ = build_prompt(turns, meta=META, tools=True, count_tokens=count, max_tokens=10_000, tag="<|quality_2|>")
    assert text.endswith("<|Inner Thoughts|>:") and "<|quality_2|>" not in text
    pending = Turn("y", thoughts="t", commands='Calculate("2+2")', results="Calculate(\"2+2\") => '4'")
    text, _ = build_prompt([pending], meta=META, tools=True, count_tokens=count, max_tokens=10_000, tag="<|quality_0|>")
    assert text.endswith("<|Results|>:\nCalculate(\"2+2\") => '4'\n<eor>\n<|MOSS|>:<|quality_0|>")


def test_finished_turn_without_a_tool_pass_renders_none_in_the_plugin_format():
    # e.g. an earlier reply a server client sends back: only its text is known.
    text = render_turn(Turn("hi", moss="Hello!"), tools=True)
    assert text == (
        "<|Human|>: hi<eoh>\n<|Inner Thoughts|>: None<eot>\n<|Commands|>: None<eoc>\n"
        "<|Results|>: None<eor>\n<|MOSS|>: Hello!<eom>\n"
    )
