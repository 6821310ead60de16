"""ChatSession: the tool loop against the real tool registry, and a real model end to end."""

import pytest

from moss_jax.inference.chat_session import ChatSession, Generation, parse_tool_pass
from moss_jax.inference.local import LocalGenerator
from moss_jax.inference.prompt import PromptTooLongError, Turn
from moss_jax.inference.sampling import SamplingParams
from moss_jax.tools import ToolRegistry, ToolsConfig
from moss_jax.tools.registry import TurnResult


class ScriptedGenerator:
    """Returns fixed texts in order and records what it was asked (stands in for the model)."""

    def __init__(self, texts):
        self.texts = list(texts)
        self.calls = []

    def generate_text(self, prompt_ids, *, max_new_tokens, stop_ids, stop_strings, sampling, on_text=None):
        self.calls.append(
            dict(prompt_ids=prompt_ids, stop_ids=list(stop_ids), max_new_tokens=max_new_tokens, seed=sampling.seed)
        )
        text = self.texts.pop(0)
        if on_text is not None:
            for i in range(0, len(text), 3):
                on_text(text[i : i + 3])
        return Generation(text, [], "stop")


def test_tool_loop_runs_commands_and_feeds_results(tokenizer):
    gen = ScriptedGenerator(
        [' I should compute it.<eot>\n<|Commands|>: Calculate("(6000-4800)/6000*100")', " It is 20%."]
    )
    session = ChatSession(gen, tokenizer, 2048, tools=ToolRegistry(), tools_on=True)
    streamed = []
    reply = session.send("How much did it drop?", on_text=streamed.append)
    assert reply.text == "It is 20%." and "".join(streamed) == "It is 20%."
    first = tokenizer.decode(gen.calls[0]["prompt_ids"])
    second = tokenizer.decode(gen.calls[1]["prompt_ids"])
    assert first.endswith("<|Human|>: How much did it drop?<eoh>\n<|Inner Thoughts|>:")
    assert "- Inner thoughts: enabled." in first and "- Calculator: enabled. API: Calculate(expression)" in first
    assert gen.calls[0]["stop_ids"] == [tokenizer.eoc_id, tokenizer.eom_id]
    assert gen.calls[1]["stop_ids"] == [tokenizer.eom_id]
    assert second.endswith(
        '<|Commands|>: Calculate("(6000-4800)/6000*100")<eoc>\n'
        "<|Results|>:\nCalculate(\"(6000-4800)/6000*100\") => '20.0'\n<eor>\n<|MOSS|>:"
    )
    assert reply.turn.results == "Calculate(\"(6000-4800)/6000*100\") => '20.0'"
    # Next turn: the earlier results are collapsed to None to save context.
    gen.texts += [" No tool needed.<eot>\n<|Commands|>: None", " Hi."]
    session.send("thanks")
    third = tokenizer.decode(gen.calls[2]["prompt_ids"])
    assert "<|Results|>: None<eor>\n<|MOSS|>: It is 20%.<eom>\n<|Human|>: thanks<eoh>" in third
    fourth = tokenizer.decode(gen.calls[3]["prompt_ids"])
    assert fourth.endswith("<|Commands|>: None<eoc>\n<|Results|>: None<eor>\n<|MOSS|>:")


def test_zero_tool_registry_and_tools_off(tokenizer):
    registry = ToolRegistry(ToolsConfig(enable_calculate=False, enable_solve=False))
    gen = ScriptedGenerator([' hmm<eot>\n<|Commands|>: Calculate("1+1")', " Two.", " Plain."])
    session = ChatSession(gen, tokenizer, 2048, tools=registry, tools_on=True)
    assert session.send("1+1?").turn.results == "None"  # no tool enabled: nothing runs
    session.set_tools(False)
    session.send("again")
    prompt = tokenizer.decode(gen.calls[2]["prompt_ids"])
    assert prompt.endswith("<|Human|>: again<eoh>\n<|MOSS|>:") and "- Inner thoughts: disabled." in prompt
    session.reset()
    assert session.history == []


def test_every_pass_and_turn_samples_from_its_own_seed(tokenizer):
    """One seed for the tool pass, the reply pass and every turn would repeat the same random
    draws in each; the seeds derive from the user's, so the same seed replays the conversation."""
    script = [" a<eot>\n<|Commands|>: None", " One.", " b<eot>\n<|Commands|>: None", " Two.", " Three."]

    def seeds(seed):
        gen = ScriptedGenerator(script)
        sampling = SamplingParams(temperature=0.7, top_p=0.8, seed=seed)
        session = ChatSession(gen, tokenizer, 2048, tools=ToolRegistry(), tools_on=True, sampling=sampling)
        session.send("hi")
        session.send("again")
        session.set_tools(False)
        session.send("bye")
        return [c["seed"] for c in gen.calls]

    # turn 0: tool pass, reply; turn 1: tool pass, reply; turn 2 (tools off): reply.
    assert seeds(7) == [8, 7, 10, 9, 11] == seeds(7)
    assert seeds(0) == [1, 0, 3, 2, 4]
    gen = ScriptedGenerator([" Hi."])
    ChatSession(gen, tokenizer, 2048, sampling=SamplingParams(temperature=0.7, seed=5)).send("hi")
    assert gen.calls[0]["seed"] == 5  # a first reply without tools: the seed itself, as generate's row 0


def test_parse_tool_pass():
    assert parse_tool_pass(' think<eot>\n<|Commands|>: Search("q")') == ("think", 'Search("q")')
    assert parse_tool_pass(" think<eot>\n") == ("think", "None")
    assert parse_tool_pass(" ok<eot>\n<|MOSS|>: direct answer<eom>") == ("ok", "None")  # the reply pass answers
    # The model left out <eot>: the thoughts end where the commands start.
    assert parse_tool_pass(' think\n<|Commands|>: Calculate("1+1")<eoc>') == ("think", 'Calculate("1+1")')
    assert parse_tool_pass(' <|Commands|>: Calculate("2")') == ("None", 'Calculate("2")')
    assert parse_tool_pass(" just thinking") == ("just thinking", "None")


def test_commands_without_eot_still_run_and_render_once(tokenizer):
    gen = ScriptedGenerator([' I must add.\n<|Commands|>: Calculate("330*2")', " 660."])
    reply = ChatSession(gen, tokenizer, 2048, tools=ToolRegistry(), tools_on=True).send("330 doubled?")
    assert reply.turn.thoughts == "I must add." and reply.turn.commands == 'Calculate("330*2")'
    assert reply.tool_result.calls[0].ok and reply.turn.results == "Calculate(\"330*2\") => '660'"
    second = tokenizer.decode(gen.calls[1]["prompt_ids"])
    assert second.count("<|Commands|>") == 1
    assert second.endswith(
        '<|Inner Thoughts|>: I must add.<eot>\n<|Commands|>: Calculate("330*2")<eoc>\n'
        "<|Results|>:\nCalculate(\"330*2\") => '660'\n<eor>\n<|MOSS|>:"
    )


def test_real_model_streams_its_reply(chat_model, tokenizer):
    config, params = chat_model
    generator = LocalGenerator(params, config, tokenizer.decode)
    session = ChatSession(generator, tokenizer, config.max_len, sampling=SamplingParams(), max_new_tokens=12)
    deltas = []
    reply = session.send("Write a haiku about JAX.", on_text=deltas.append)
    assert "".join(deltas).strip() == reply.text
    assert reply.finish_reason in ("stop", "length") and len(session.history) == 1
    again = ChatSession(generator, tokenizer, config.max_len, sampling=SamplingParams(), max_new_tokens=12)
    assert again.send("Write a haiku about JAX.").text == reply.text  # greedy: reproducible


class StopAwareScript(ScriptedGenerator):
    """A ScriptedGenerator that also records the stop strings and cuts its text at the first one."""

    def generate_text(self, prompt_ids, *, max_new_tokens, stop_ids, stop_strings, sampling, on_text=None):
        text = self.texts[0]
        self.texts[0] = text[: min([text.find(s) for s in stop_strings if s in text], default=len(text))]
        gen = super().generate_text(
            prompt_ids,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            stop_strings=stop_strings,
            sampling=sampling,
            on_text=on_text,
        )
        self.calls[-1]["stop_strings"] = list(stop_strings)
        return gen


def test_tool_loop_with_a_preference_tag_and_tool_pass_callbacks(tokenizer):
    gen = StopAwareScript([' Compute.<eot>\n<|Commands|>: Calculate("6*7")', " 42."])
    session = ChatSession(gen, tokenizer, 2048, tools=ToolRegistry(), tools_on=True, tag="<|quality_2|>")
    thoughts, passes = [], []
    reply = session.send("6 times 7?", on_thoughts=thoughts.append, on_tools=lambda t, r: passes.append((t, r)))
    assert "".join(thoughts) == ' Compute.<eot>\n<|Commands|>: Calculate("6*7")'
    ((turn, result),) = passes
    assert turn.commands == 'Calculate("6*7")' and result.calls[0].ok and reply.tool_result is result
    first, second = (tokenizer.decode(c["prompt_ids"]) for c in gen.calls)
    assert first.endswith("<|Inner Thoughts|>:") and "<|quality_2|>" not in first
    assert gen.calls[0]["stop_strings"] == ["<|Human|>", "<|MOSS|>:"]  # so the reply starts after the tag
    assert second.endswith("\n<eor>\n<|MOSS|>:<|quality_2|>") and reply.text == "42."
    # The model skips its commands and starts answering: cut at `<|MOSS|>:`, the reply comes after the tag.
    gen.texts += [" Easy.<eot>\n<|MOSS|>: untagged answer<eom>", " Tagged answer."]
    reply = session.send("hi")
    assert reply.text == "Tagged answer." and reply.turn.commands == "None"
    assert tokenizer.decode(gen.calls[-1]["prompt_ids"]).endswith(
        "<|Human|>: hi<eoh>\n<|Inner Thoughts|>: Easy.<eot>\n<|Commands|>: None<eoc>\n<|Results|>: None<eor>\n"
        "<|MOSS|>:<|quality_2|>"
    )


def test_plain_chat_with_a_tag_and_extra_stop_strings(tokenizer):
    gen = StopAwareScript([" Hello there. END more"])
    session = ChatSession(gen, tokenizer, 2048, tag="<|quality_0|>", stop_strings=["END"], identity="You are Bob.\n")
    assert session.send("hi").text == "Hello there."
    prompt = tokenizer.decode(gen.calls[0]["prompt_ids"])
    assert prompt.startswith("You are Bob.\n") and prompt.endswith("<|Human|>: hi<eoh>\n<|MOSS|>:<|quality_0|>")
    assert gen.calls[0]["stop_strings"] == ["<|Human|>", "END"]


def test_a_reply_started_in_the_first_pass_is_written_by_the_reply_pass_with_its_stop_strings(tokenizer):
    # The model skips its commands and answers at once; the caller's stop string must still end the reply.
    gen = StopAwareScript([" None<eot>\n<|MOSS|>: foo STOP secret", " foo STOP secret"])
    session = ChatSession(gen, tokenizer, 2048, tools=ToolRegistry(), tools_on=True, stop_strings=("STOP",))
    streamed = []
    reply = session.send("hi", on_text=streamed.append)
    assert reply.text == "foo" and "".join(streamed).strip() == "foo" and "secret" not in reply.turn.moss
    assert gen.calls[0]["stop_strings"] == ["<|Human|>", "<|MOSS|>:"]
    assert gen.calls[1]["stop_strings"] == ["<|Human|>", "STOP"]
    assert reply.turn.commands == "None" and reply.turn.results == "None"
    # A generator that ignores stop strings: the first pass's answer is still not the reply.
    gen = ScriptedGenerator([" None<eot>\n<|MOSS|>: leaked STOP secret<eom>", " Fine."])
    reply = ChatSession(gen, tokenizer, 2048, tools=ToolRegistry(), tools_on=True, stop_strings=("STOP",)).send("hi")
    assert reply.text == "Fine." and len(gen.calls) == 2


def test_max_new_tokens_is_honoured_and_checked(tokenizer):
    gen = ScriptedGenerator([" Long answer."])
    ChatSession(gen, tokenizer, 2048, max_new_tokens=1500).send("hi")
    assert gen.calls[0]["max_new_tokens"] == 1500  # not silently halved
    assert len(gen.calls[0]["prompt_ids"]) <= 2048 - 1500
    for bad in (0, 2048):
        with pytest.raises(ValueError, match="max_new_tokens"):
            ChatSession(gen, tokenizer, 2048, max_new_tokens=bad)


class BigResults:
    """Tools whose one call returns `chars` characters of results (a search with long snippets)."""

    def __init__(self, chars):
        self.chars = chars
        self.executed = 0

    def capability_lines(self):
        return ToolRegistry().capability_lines()

    def execute(self, commands_text):
        self.executed += 1
        body = 'Search("q") =>\n<|1|>: \'' + ("lorem ipsum " * self.chars)[: self.chars] + "'"
        return TurnResult(body)


class BudgetCheckingScript(ScriptedGenerator):
    """Checks every generation fits the context; the first pass writes `first(cap)`."""

    def __init__(self, max_len, first):
        super().__init__([])
        self.max_len, self.first = max_len, first

    def generate_text(self, prompt_ids, *, max_new_tokens, **kw):
        assert len(prompt_ids) + max_new_tokens <= self.max_len
        self.texts.append(self.first(max_new_tokens) if not self.calls else " Done.")
        return super().generate_text(prompt_ids, max_new_tokens=max_new_tokens, **kw)


def _longest_accepted(session):
    n = 0
    while True:
        try:
            session.first_pass("a " * (n + 1))
        except PromptTooLongError:
            return n
        n += 1


FIRST_PASSES = {
    "calculate": lambda cap: ' I need arithmetic.<eot>\n<|Commands|>: Calculate("330*2")',
    "search": lambda cap: ' Look it up.<eot>\n<|Commands|>: Search("q")',
    "rambling to its cap": lambda cap: " thinking" * cap,
    "unreadable bytes": lambda cap: " " + "\ufffd" * cap + '<eot>\n<|Commands|>: Search("q")',
}


@pytest.mark.parametrize("first", FIRST_PASSES.values(), ids=FIRST_PASSES.keys())
@pytest.mark.parametrize("max_new_tokens", [8, 300])
def test_a_near_budget_tool_turn_fits_or_is_refused_before_anything_runs(tokenizer, first, max_new_tokens):
    max_len = 1024
    tools = BigResults(6000)
    gen = BudgetCheckingScript(max_len, first)
    session = ChatSession(gen, tokenizer, max_len, tools=tools, tools_on=True, max_new_tokens=max_new_tokens)
    n = _longest_accepted(session)
    assert n > 0
    with pytest.raises(PromptTooLongError, match="with tools on"):
        session.send("a " * (n + 1))
    assert gen.calls == [] and tools.executed == 0 and session.history == []  # refused before anything ran
    reply = session.send("a " * n)
    assert reply.text == "Done." and len(gen.calls) == 2
    assert gen.calls[1]["max_new_tokens"] == max_new_tokens  # the reply keeps its whole budget
    if tools.executed:
        assert reply.turn.results.endswith("[truncated]")  # cut where the model and the client see it
        assert reply.turn.results.startswith('Search("q") =>\n<|1|>: \'lorem') or reply.turn.results == "[truncated]"


def test_history_makes_way_for_the_tool_pass(tokenizer):
    tools = BigResults(200)
    gen = BudgetCheckingScript(1024, FIRST_PASSES["search"])
    session = ChatSession(gen, tokenizer, 1024, tools=tools, tools_on=True, max_new_tokens=64, results_tokens=64)
    session.history = [Turn(f"question {i} " + "w " * 40, moss="answer " * 40) for i in range(6)]
    reply = session.send("and now?")
    assert reply.dropped_turns > 0 and not reply.turn.results.endswith("[truncated]")
