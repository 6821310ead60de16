"""Parsing `<|Commands|>` text: MOSS's call syntax, Chinese text, escapes, None and malformed input."""

import re
import time

import pytest

from moss_jax.tools import Command, CommandParseError, ToolError, parse_commands


@pytest.mark.parametrize(
    "text, expected",
    [
        ('Search("a"), Calculate("b")', [("Search", "a"), ("Calculate", "b")]),
        ('<|Commands|>: Search("a"), Calculate("1+2")<eoc>', [("Search", "a"), ("Calculate", "1+2")]),
        ('Solve("2/5*x+3/5*x=130")', [("Solve", "2/5*x+3/5*x=130")]),
        ('Text2Image("a red panda, watercolor")', [("Text2Image", "a red panda, watercolor")]),
        # Chinese questions: Chinese queries, full-width comma between calls, Chinese curly quotes.
        ('Search("北京今天天气怎么样？")', [("Search", "北京今天天气怎么样？")]),
        ("Search(“长城有多长”)，Calculate(“１２＋３”)", [("Search", "长城有多长"), ("Calculate", "１２＋３")]),
        ('Search("黑暗荣耀 演员"), Search("宋慧乔 年龄")', [("Search", "黑暗荣耀 演员"), ("Search", "宋慧乔 年龄")]),
        # Quotes and escapes.
        ("Search('single quotes')", [("Search", "single quotes")]),
        (r'Search("say \"hi\" and \\ bye")', [("Search", 'say "hi" and \\ bye')]),
        (r"Search('it\'s')", [("Search", "it's")]),
        (r'Search("line\nbreak")', [("Search", "line\nbreak")]),
        (r'Search("C:\dir \frac")', [("Search", r"C:\dir \frac")]),  # unknown escapes kept as written
        ('Search("the "best" pizza")', [("Search", 'the "best" pizza')]),  # unescaped inner quotes
        ('Search("f(x) = x)")', [("Search", "f(x) = x)")]),
        # Blanks and separators.
        ('  Search ( "a" ) ,\n Calculate( "b" )  ', [("Search", "a"), ("Calculate", "b")]),
        ('Search("a")\nCalculate("b")', [("Search", "a"), ("Calculate", "b")]),
        ('Search("a"),', [("Search", "a")]),
        ('Search("")', [("Search", "")]),
    ],
)
def test_parses_calls(text, expected):
    assert [(c.name, c.argument) for c in parse_commands(text)] == expected


@pytest.mark.parametrize("text", ["None", "None<eoc>", "<|Commands|>: None<eoc>", "  None.  ", "", "<|Commands|>:"])
def test_none_means_no_calls(text):
    assert parse_commands(text) == []


@pytest.mark.parametrize(
    "text, where",
    [
        ('Search("a"', "closing quote"),
        ('Search("a") junk', "'('"),
        ("Search(a)", "quoted argument"),
        ('Search "a"', "'('"),
        ('"a"', "tool name"),
        ('Search("a"),, Calculate("b")', "tool name"),
        ('123("a")', "tool name"),
        ('Séarch("a")', "'('"),  # names are ASCII: no look-alike letters
        ("Search()", "quoted argument"),
        ("Nonsense", "'('"),
    ],
)
def test_malformed_is_a_clear_parse_error(text, where):
    with pytest.raises(CommandParseError, match=re.escape(where)):
        parse_commands(text)


def test_parse_error_is_a_tool_error():
    assert issubclass(CommandParseError, ToolError)


@pytest.mark.parametrize("text", ['Search("a\x00b")', "x" * 1_000_000, 'Search("' + "a" * 10_000 + '")'])
def test_nul_and_oversized_text_rejected_fast(text):
    start = time.perf_counter()
    with pytest.raises(CommandParseError):
        parse_commands(text)
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize(
    "argument",
    [
        "plain",
        'with "double" quotes',
        "with 'single' quotes",
        "back\\slash",
        "new\nline\ttab\rcr",
        "中文，全角（）",
        "",
    ],
)
def test_render_round_trips(argument):
    rendered = Command("Search", argument).render()
    assert "\n" not in rendered
    assert parse_commands(rendered) == [Command("Search", argument)]


def test_render_is_moss_style():
    assert Command("Calculate", "(6000-4800)/6000*100").render() == 'Calculate("(6000-4800)/6000*100")'
