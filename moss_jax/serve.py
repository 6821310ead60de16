"""OpenAI-compatible HTTP server for a MOSS model, batching concurrent requests.

python -m moss_jax.serve --checkpoint ckpt/ --tokenizer vocab/moss_sp.model --port 8000 [--batch_size 16]

curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "hi"}], "stream": true}'
"""

from __future__ import annotations

import argparse
import logging
import sys

from moss_jax.inference.cli_args import add_model_args, load_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model_name", default="moss", help="the id /v1/models reports")
    parser.add_argument("--batch_size", type=int, default=16, help="requests decoded together")
    parser.add_argument("--cache_len", type=int, default=None, help="KV-cache slots (default 2 x max_len)")
    parser.add_argument("--chunk_size", type=int, default=8, help="decode steps between streamed chunks")
    parser.add_argument("--max_new_tokens", type=int, default=512, help="default max_tokens of a request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    import uvicorn

    from moss_jax.inference.decoder import Decoder
    from moss_jax.inference.engine import BatchEngine
    from moss_jax.inference.server_app import create_app

    config, params, tokenizer, mesh = load_from_args(args)
    # Twice the context: a left-padded prompt bucket plus its reply always fits (see decoder.py).
    cache_len = args.cache_len or 2 * config.max_len
    decoder = Decoder(config, batch_size=args.batch_size, cache_len=cache_len, mesh=mesh, chunk_size=args.chunk_size)
    engine = BatchEngine(decoder, params, tokenizer.decode).start()
    app = create_app(engine, tokenizer, config.max_len, args.model_name, default_max_tokens=args.max_new_tokens)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
