"""Terminal chat with a MOSS model, streaming the reply as it is generated.

    python -m moss_jax.chat --checkpoint ckpt/ --tokenizer data/vocab/moss_sp.model [--tools] [--temperature 0.7]

Commands: /reset (forget the conversation), /tools on|off (the plugin loop: inner thoughts,
commands, results), /tag best|none|N (the preference tag after <|MOSS|>:), /quit (or end of input).
"""

from __future__ import annotations

import argparse
import io
import sys
from typing import TextIO

from moss_jax.inference.chat_session import ChatSession
from moss_jax.inference.cli_args import (
    add_model_args,
    add_sampling_args,
    load_from_args,
    sampling_from_args,
    tag_from_args,
)
from moss_jax.inference.local import LocalGenerator
from moss_jax.inference.prompt import PromptTooLongError
from moss_jax.inference.tags import PreferenceTags, TagError, check_tag_token, resolve_tag
from moss_jax.inference.tokenizer import check_unicode

HELP = "commands: /reset, /tools on|off, /tag best|none|N, /quit"


def check_message(message: str) -> None:
    """ValueError for a message no tokenizer can encode: input bytes that were not UTF-8 (read
    with errors="surrogateescape", they arrive as U+DC80..U+DCFF) or another lone surrogate."""
    for i, char in enumerate(message):
        if "\udc80" <= char <= "\udcff":
            raise ValueError(f"byte 0x{ord(char) - 0xDC00:02X} at character {i} is not UTF-8 text")
    check_unicode(message, "the message")


def run_repl(
    session: ChatSession,
    stdin: TextIO,
    stdout: TextIO,
    show_tools: bool = False,
    preference_tags: PreferenceTags | None = None,
) -> None:
    """Reads messages and commands from `stdin` until /quit or end of input.

    A message that cannot be sent (too long for the context, even alone; not valid text) is
    reported and the conversation goes on; nothing is added to the history.
    """
    print(f"MOSS chat. {HELP}", file=stdout, flush=True)
    while True:
        print("\n<|Human|>: ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        message = line.rstrip("\n")
        command = message.strip()
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            session.reset()
            print("[conversation reset]", file=stdout, flush=True)
            continue
        if command.startswith("/tools"):
            arg = command[len("/tools") :].strip()
            if arg not in ("on", "off"):
                print("usage: /tools on|off", file=stdout, flush=True)
                continue
            try:
                session.set_tools(arg == "on")
                print(f"[tools {arg}]", file=stdout, flush=True)
            except ValueError as e:
                print(f"[{e}]", file=stdout, flush=True)
            continue
        if command.startswith("/tag"):
            try:
                tag = resolve_tag(command[len("/tag") :].strip(), preference_tags)
                check_tag_token(tag, session.tokenizer)
                session.tag = tag
                print(f"[tag {tag or 'none'}]", file=stdout, flush=True)
            except TagError as e:
                print(f"[{e}]", file=stdout, flush=True)
            continue
        if command.startswith("/"):
            print(f"unknown command {command!r}; {HELP}", file=stdout, flush=True)
            continue
        if not command:
            continue
        print("<|MOSS|>: ", end="", file=stdout, flush=True)
        try:
            check_message(message)
            reply = session.send(message, on_text=lambda delta: print(delta, end="", file=stdout, flush=True))
        except PromptTooLongError as e:  # raised before anything is generated; the history is kept
            print(f"[message not sent: {e}; shorten it, or /reset to drop the history]", file=stdout, flush=True)
            continue
        except ValueError as e:
            print(f"[message not sent: {e}]", file=stdout, flush=True)
            continue
        print(file=stdout, flush=True)
        if show_tools and reply.turn.commands is not None:
            print(f"[thoughts] {reply.turn.thoughts}\n[commands] {reply.turn.commands}", file=stdout)
            print(f"[results] {reply.turn.results}", file=stdout, flush=True)
        if reply.finish_reason == "length":
            print("[reply cut at --max_new_tokens]", file=stdout, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--tools", action="store_true", help="start with tools on")
    parser.add_argument("--show_tools", action="store_true", help="print inner thoughts, commands and results")
    parser.add_argument("--search_index_dir", help="local BM25 index for the Search tool")
    args = parser.parse_args(argv)

    from moss_jax.tools import ToolRegistry, ToolsConfig

    config, params, tokenizer, mesh = load_from_args(args)
    if not 1 <= args.max_new_tokens < config.max_len:
        parser.error(f"--max_new_tokens must be in [1, {config.max_len}) (below the model's context length)")
    tags, tag = tag_from_args(args, tokenizer)
    tools_cfg = ToolsConfig(enable_search=args.search_index_dir is not None, search_index_dir=args.search_index_dir)
    session = ChatSession(
        LocalGenerator(params, config, tokenizer.decode, mesh=mesh),
        tokenizer,
        config.max_len,
        tools=ToolRegistry(tools_cfg),
        tools_on=args.tools,
        sampling=sampling_from_args(args),
        max_new_tokens=args.max_new_tokens,
        tag=tag,
    )
    stdin = sys.stdin
    if isinstance(stdin, io.TextIOWrapper):
        # Bytes that are not UTF-8 become lone surrogates that check_message reports, instead of a
        # UnicodeDecodeError out of readline that would end the chat.
        stdin.reconfigure(errors="surrogateescape")
    run_repl(session, stdin, sys.stdout, show_tools=args.show_tools, preference_tags=tags)
    return 0


if __name__ == "__main__":
    sys.exit(main())
