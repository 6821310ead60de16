"""EvalModel.generate: prompts too long for the context are cut from the left, counted and logged."""

import logging

import pytest

from moss_jax.eval.lm import EvalError, EvalModel, _moss_generate

from .conftest import START, ByteTokenizer


def test_a_prompt_cut_to_fit_is_counted_and_logged(byte_debug_model, caplog):
    config, params = byte_debug_model  # max_len 64
    model = EvalModel.from_params(config, params, ByteTokenizer(), start_id=START, batch_size=2, name="tiny")
    long_prompt = "".join(f"<H{i}> question {i}?\n<M{i}> answer {i}\n" for i in range(4)) + "<H4> last?\n<M>:"
    assert len(long_prompt) > config.max_len
    with caplog.at_level(logging.WARNING, logger="moss_jax.eval.lm"):
        texts = model.generate(["short", long_prompt], 8)
    assert model.prompts_cut == 1
    assert "tiny: 1 of 2 prompt(s) cut from the left to 56 tokens" in caplog.text
    # The cut keeps the last max_len - max_new_tokens tokens: the same text as that prompt given whole.
    assert texts[1] == model.generate([long_prompt[-(config.max_len - 8) :]], 8)[0]
    assert model.prompts_cut == 1
    model.generate(["short"], 8)
    assert model.prompts_cut == 1


def test_the_generate_function_itself_never_cuts(byte_debug_model):
    config, params = byte_debug_model
    with pytest.raises(EvalError, match="prompt 0 has 60 tokens; with max_new_tokens=8 at most 56 fit max_len 64"):
        _moss_generate(config, params, ByteTokenizer(), [list(range(60))], 8, ())
