"""ChatSession: the tool loop against the real tool registry, and a real model end to end."""

from moss_jax.inference.chat_session import ChatSession, Generation, parse_tool_pass
from moss_jax.inference.local import LocalGenerator
from moss_jax.inference.sampling import SamplingParams
from moss_jax.tools import ToolRegistry, ToolsConfig


class ScriptedGenerator:
    """Returns fixed texts in order and records what it was asked (stands in for the model)."""

    def __init__(self, texts):
        self.texts = list(texts)
        self.calls = []

    def generate_text(self, prompt_ids, *, max_new_tokens, stop_ids, stop_strings, sampling, on_text=None):
        self.calls.append(dict(prompt_ids=prompt_ids, stop_ids=list(stop_ids), max_new_tokens=max_new_tokens))
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


def test_parse_tool_pass():
    assert parse_tool_pass(' think<eot>\n<|Commands|>: Search("q")') == ("think", 'Search("q")', None)
    assert parse_tool_pass(" think<eot>\n") == ("think", "None", None)
    assert parse_tool_pass(" ok<eot>\n<|MOSS|>: direct answer<eom>") == ("ok", "None", "direct answer")


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
        gen = super().generate_text(
            prompt_ids,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            stop_strings=stop_strings,
            sampling=sampling,
            on_text=on_text,
        )
        self.calls[-1]["stop_strings"] = list(stop_strings)
        cut = min([gen.text.find(s) for s in stop_strings if s in gen.text], default=len(gen.text))
        return Generation(gen.text[:cut], [], "stop")


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
