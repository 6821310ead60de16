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


def test_repl_survives_text_that_is_not_unicode(tokenizer):
    """Undecodable input bytes (read with errors="surrogateescape") and other lone surrogates are
    reported like any message that cannot be sent; the conversation goes on."""
    session = ChatSession(_Echo(tokenizer), tokenizer, 1024)
    out = io.StringIO()
    chat.run_repl(session, io.StringIO("hi\ncaf\udcff\nx\ud800\nstill here?\n"), out)
    text = out.getvalue()
    assert "[message not sent: byte 0xFF at character 3 is not UTF-8 text]" in text
    assert "[message not sent: the message is not valid Unicode: lone surrogate U+D800 at character 1]" in text
    assert text.count("<|MOSS|>: hello") == 2
    assert [t.human for t in session.history] == ["hi", "still here?"]


def test_chat_reads_stdin_so_that_bad_bytes_reach_the_repl(chat_model, tokenizer, monkeypatch):
    """A strict UTF-8 stdin would raise UnicodeDecodeError out of readline and end the chat."""
    config, params = chat_model
    monkeypatch.setattr(chat, "load_from_args", lambda args: (config, params, tokenizer, None))
    lines = []

    def fake_repl(session, stdin, stdout, **kw):
        lines.extend(iter(stdin.readline, ""))

    monkeypatch.setattr(chat, "run_repl", fake_repl)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hi\ncaf\xff\n/quit\n"), encoding="utf-8"))
    assert chat.main(["--checkpoint", "unused", "--tokenizer", "unused", "--max_new_tokens", "4"]) == 0
    assert lines == ["hi\n", "caf\udcff\n", "/quit\n"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["--tensor_parallel", str(len(jax.devices()) + 1)],
            f"--tensor_parallel {len(jax.devices()) + 1}: this host has only {len(jax.devices())} cpu device(s)",
        ),
        (["--tensor_parallel", "2", "--weights", "int8"], "--weights int8 runs on one device only"),
        (["--tensor_parallel", "0"], "--tensor_parallel must be >= 1, got 0"),
    ],
    ids=["more-than-the-devices", "int8", "zero"],
)
@pytest.mark.parametrize("cli", ["chat", "serve"])
def test_device_flags_the_model_cannot_use_are_usage_errors(tmp_path, monkeypatch, cli, extra, message):
    """Refused before anything is loaded (the checkpoint does not exist), as a message, not a traceback."""
    import logging

    from moss_jax import serve

    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)  # serve's: not in the test process

    main = chat.main if cli == "chat" else serve.main
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path / "none"), "--tokenizer", str(tmp_path / "none")] + extra)
    assert isinstance(e.value.code, str) and e.value.code.startswith(message), e.value.code
