"""OpenAI-compatible HTTP server for a MOSS model, batching concurrent requests.

python -m moss_jax.serve --checkpoint ckpt/ --tokenizer data/vocab/moss_sp.model --port 8000 [--batch_size 16]

curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "hi"}], "stream": true}'

The web chat page is at http://localhost:8000/ . Requests may switch on MOSS's tools
(`"moss_tools": {"calculate": true}`) and pick the preference tag (`"moss_tag": "best"`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from moss_jax.inference.cli_args import add_model_args, load_from_args, tag_from_args


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
    parser.add_argument("--max_pending", type=int, default=64, help="answer 503 while this many requests wait")
    parser.add_argument(
        "--max_tool_requests", type=int, default=16, help="answer 429 while this many moss_tools requests run"
    )
    parser.add_argument("--search_index_dir", help="local BM25 index: lets requests turn on Search")
    parser.add_argument("--txt2img_url", help="AUTOMATIC1111-compatible server: lets requests turn on Text2Image")
    parser.add_argument("--image_dir", default="moss_images", help="where Text2Image writes its PNGs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    import uvicorn

    from moss_jax.inference.decoder import Decoder
    from moss_jax.inference.engine import BatchEngine
    from moss_jax.inference.server_app import create_app
    from moss_jax.tools import ToolsConfig

    config, params, tokenizer, mesh = load_from_args(args)
    tags, _ = tag_from_args(args, tokenizer)
    tools_config = ToolsConfig(
        enable_search=args.search_index_dir is not None,
        search_index_dir=args.search_index_dir,
        enable_text2image=args.txt2img_url is not None,
        txt2img_url=args.txt2img_url,
        image_dir=args.image_dir,
    )
    # Twice the context: a left-padded prompt bucket plus its reply always fits (see decoder.py).
    cache_len = args.cache_len or 2 * config.max_len
    decoder = Decoder(config, batch_size=args.batch_size, cache_len=cache_len, mesh=mesh, chunk_size=args.chunk_size)
    engine = BatchEngine(decoder, params, tokenizer.decode).start()
    app = create_app(
        engine,
        tokenizer,
        config.max_len,
        args.model_name,
        default_max_tokens=args.max_new_tokens,
        tools_config=tools_config,
        preference_tags=tags,
        default_tag=args.tag,
        max_pending=args.max_pending,
        max_tool_requests=args.max_tool_requests,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
