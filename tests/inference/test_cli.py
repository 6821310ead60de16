"""`python -m moss_jax.chat` end to end on a saved checkpoint; checkpoint and HF loading."""

import io
import sys

import jax
import numpy as np
import pytest

from moss_jax import chat
from moss_jax.convert.checkpoint_io import save_hf_checkpoint, save_params
from moss_jax.inference.chat_session import ChatSession, Generation
from moss_jax.inference.local import load_model


def test_chat_cli_streams_and_handles_commands(tmp_path, chat_model, sp_model_path, monkeypatch, capsys):
    config, params = chat_model
    ckpt = save_params(tmp_path / "ckpt", params, config.replace(max_len=1024))
    script = "Hello there\n/tools on\nWhat is 2+2?\n/tools maybe\n/bogus\n/reset\nBye\n/quit\nnot read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    argv = ["--checkpoint", str(ckpt), "--tokenizer", str(sp_model_path), "--max_new_tokens", "6", "--show_tools"]
    assert chat.main(argv + ["--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("<|MOSS|>: ") == 3  # three messages answered, "not read" after /quit
    assert "[tools on]" in out and "usage: /tools on|off" in out and "unknown command '/bogus'" in out
    assert "[conversation reset]" in out and "[commands]" in out
    with pytest.raises(SystemExit):  # a reply cap that leaves no room for a prompt
        chat.main(["--checkpoint", str(ckpt), "--tokenizer", str(sp_model_path), "--max_new_tokens", "1024"])
    assert "--max_new_tokens must be in [1, 1024)" in capsys.readouterr().err


def test_load_model_reads_both_checkpoint_kinds(tmp_path, debug_model):
    config, params = debug_model
    ours_cfg, ours = load_model(save_params(tmp_path / "ours", params, config))
    hf_cfg, hf = load_model(save_hf_checkpoint(tmp_path / "hf", params, config, progress=False))
    assert ours_cfg == config and hf_cfg.d_model == config.d_model
    for a, b, c in zip(jax.tree.leaves(params), jax.tree.leaves(ours), jax.tree.leaves(hf), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=0, atol=0)


def test_load_model_onto_a_tensor_parallel_mesh(tmp_path, debug_model):
    from moss_jax.sharding import make_mesh

    config, params = debug_model
    mesh = make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
    for path in (save_params(tmp_path / "ours", params, config), save_hf_checkpoint(tmp_path / "hf", params, config)):
        _, loaded = load_model(path, mesh)
        assert loaded["layers"]["mlp"]["fc_in_kernel"].sharding.spec[-1] == "tensor"


class _Echo:
    """Stands in for the model: answers " hello"; a prompt containing BAD is a ValueError."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate_text(self, prompt_ids, *, max_new_tokens, stop_ids, stop_strings, sampling, on_text=None):
        if "BAD" in self.tokenizer.decode(prompt_ids):
            raise ValueError("the generator refused this input")
        if on_text is not None:
            on_text(" hello")
        return Generation(" hello", [], "stop")


def test_repl_survives_a_message_that_cannot_be_sent(tokenizer):
    session = ChatSession(_Echo(tokenizer), tokenizer, 1024)
    stdin = io.StringIO("hi\n" + "word " * 2000 + "\nBAD one\nstill here?\n")
    out = io.StringIO()
    chat.run_repl(session, stdin, out)
    text = out.getvalue()
    assert "[message not sent: the meta instruction plus the current message need" in text
    assert "shorten it, or /reset" in text and "[message not sent: the generator refused this input]" in text
    assert text.count("<|MOSS|>: hello") == 2  # the conversation went on after both failures
    assert [t.human for t in session.history] == ["hi", "still here?"]
