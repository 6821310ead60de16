"""ToolRegistry: the full `<|Results|>` body in MOSS's format, limits, and the zero-tool case."""

import logging

import pytest

from moss_jax.tools import ToolRegistry, ToolsConfig, results_turn, search
from moss_jax.tools.config import ToolConfigError
from moss_jax.tools.search_index import Passage

NO_TOOLS = ToolsConfig(enable_calculate=False, enable_solve=False)


@pytest.fixture
def registry(corpus_index):
    return ToolRegistry(ToolsConfig(enable_search=True, search_index_dir=str(corpus_index)))


def test_released_examples_exactly(registry):
    assert registry.run_commands('Calculate("(6000-4800)/6000*100")') == "Calculate(\"(6000-4800)/6000*100\") => '20.0'"
    assert registry.run_commands('Solve("2/5*x+3/5*x=130")') == 'Solve("2/5*x+3/5*x=130") =>\nx = 130.000000000000'
    assert registry.run_commands('Calculate("1/0")') == "Calculate(\"1/0\") => 'No result.'"


def test_calls_are_joined_by_newlines_with_markers_stripped(registry):
    body = registry.run_commands('<|Commands|>: Calculate("2+3"), Solve("x+y=10;x-y=2")<eoc>')
    assert body == 'Calculate("2+3") => \'5\'\nSolve("x+y=10;x-y=2") =>\nx = 6.00000000000000\ny = 4.00000000000000'


def test_chinese_question_commands(registry):
    # Commands as emitted for "长城有多长？一半是多少？" with full-width operators in the expression.
    body = registry.run_commands("Search(“长城有多长”)，Calculate(“８８５１.８÷２”)")
    lines = body.split("\n")
    assert lines[0] == 'Search("长城有多长") =>'
    assert lines[1].startswith("<|1|>: '长城: 长城是中国古代的军事防御工程")
    assert lines[-1] == "Calculate(\"８８５１.８÷２\") => '4425.9'"


def test_search_numbering_continues_across_searches(registry, corpus_index):
    config = ToolsConfig(enable_search=True, search_index_dir=str(corpus_index))
    first = search("France", config=config)
    second = search("北京", config=config)
    assert len(first) >= 2 and len(second) >= 2
    body = registry.run_commands('Search("France"), Search("北京")')
    expected = ['Search("France") =>']
    expected += [f"<|{i + 1}|>: {s!r}" for i, s in enumerate(first)]
    expected += ['Search("北京") =>']
    expected += [f"<|{len(first) + i + 1}|>: {s!r}" for i, s in enumerate(second)]
    assert body.split("\n") == expected


def test_snippets_are_quoted_on_one_line():
    class Backend:
        def search(self, query, k):
            return [Passage('it\'s "quoted"\nand split', "T"), Passage("plain")]

    config = ToolsConfig(enable_search=True, search_index_dir="unused")
    body = ToolRegistry(config, search_backend=Backend()).run_commands('Search("q")')
    assert body == "Search(\"q\") =>\n<|1|>: 'T: it\\'s \"quoted\" and split'\n<|2|>: 'plain'"


def test_search_without_match_is_no_result(registry):
    assert registry.run_commands('Search("qwertyuiop")') == "Search(\"qwertyuiop\") => 'No result.'"


def test_at_most_max_commands_run(registry, caplog):
    with caplog.at_level(logging.WARNING):
        body = registry.run_commands('Calculate("1"), Calculate("2"), Calculate("3")')
    assert body == "Calculate(\"1\") => '1'\nCalculate(\"2\") => '2'"
    assert "dropped 'Calculate(\"3\")'" in caplog.text
    one = ToolRegistry(ToolsConfig(max_commands=1))
    assert one.run_commands('Calculate("1"), Calculate("2")') == "Calculate(\"1\") => '1'"


def test_none_and_parse_errors(registry, caplog):
    assert registry.run_commands("None") == "None"
    assert registry.run_commands("<|Commands|>: None<eoc>") == "None"
    with caplog.at_level(logging.WARNING):
        turn = registry.execute('Search("unterminated')
    assert turn.text == "No result." and "closing quote" in turn.parse_error
    assert "unparsable commands" in caplog.text


def test_unknown_disabled_and_crashing_tools(caplog):
    class Broken:
        def search(self, query, k):
            raise RuntimeError("backend bug")

    registry = ToolRegistry(ToolsConfig(enable_search=True, search_index_dir="unused"), search_backend=Broken())
    with caplog.at_level(logging.WARNING):
        body = registry.run_commands('Search("q"), Weather("北京")')
        assert registry.run_commands('Text2Image("cat")') == "No result."
    assert body == "Search(\"q\") => 'No result.'\nWeather(\"北京\") => 'No result.'"
    assert "backend bug" in caplog.text and "unknown tool 'Weather'" in caplog.text
    assert "Text2Image is not enabled" in caplog.text


def test_tool_names_are_case_insensitive(registry):
    assert registry.run_commands('calculate("1+1")') == "Calculate(\"1+1\") => '2'"


def test_oversized_results_are_refused_not_cut(registry):
    assert registry.run_commands('Calculate("10**2000")') == "Calculate(\"10**2000\") => 'No result.'"
    small = ToolRegistry(ToolsConfig(max_result_chars=4))
    assert small.run_commands('Calculate("12345")') == "Calculate(\"12345\") => 'No result.'"
    assert small.run_commands('Calculate("1234")') == "Calculate(\"1234\") => '1234'"


def test_zero_tools_is_the_none_behaviour(caplog):
    registry = ToolRegistry(NO_TOOLS)
    assert registry.signatures() == []
    assert registry.capability_lines() == [
        "Web search: disabled.",
        "Calculator: disabled.",
        "Equation solver: disabled.",
        "Text-to-image: disabled.",
    ]
    assert registry.run_commands("None") == "None"
    with caplog.at_level(logging.WARNING):
        assert registry.run_commands('Calculate("1+1")') == "None"
    assert "no tools are enabled" in caplog.text


def test_signatures_and_capability_lines(registry):
    assert registry.signatures() == ["Search(query)", "Calculate(expression)", "Solve(equation)"]
    assert registry.capability_lines() == [
        "Web search: enabled. API: Search(query)",
        "Calculator: enabled. API: Calculate(expression)",
        "Equation solver: enabled. API: Solve(equation)",
        "Text-to-image: disabled.",
    ]


def test_results_turn():
    assert results_turn("None") == "<|Results|>: None<eor>\n"
    assert results_turn("Calculate(\"1\") => '1'") == "<|Results|>:\nCalculate(\"1\") => '1'\n<eor>\n"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_commands": 0}, "max_commands"),
        ({"snippet_chars": -1}, "snippet_chars"),
        ({"solve_timeout_s": 0}, "solve_timeout_s"),
        ({"search_top_k": True}, "search_top_k"),
        ({"txt2img_url": "ftp://host"}, "txt2img_url"),
        ({"image_dir": ""}, "image_dir"),
    ],
)
def test_config_is_validated(kwargs, field):
    with pytest.raises(ToolConfigError, match=field):
        ToolsConfig(**kwargs)
