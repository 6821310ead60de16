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
