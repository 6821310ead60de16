"""Command-line flags shared by `python -m moss_jax.chat` and `python -m moss_jax.serve`."""

from __future__ import annotations

import argparse
from typing import Any

from moss_jax.config import MossConfig
from moss_jax.inference.sampling import MOSS_DEFAULTS, SamplingParams
from moss_jax.inference.tags import PreferenceTags, TagError, check_tag_token, load_preference_tags, resolve_tag
from moss_jax.inference.tokenizer import Tokenizer, load_tokenizer


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="moss_jax checkpoint dir (save_params) or a HF dir")
    parser.add_argument(
        "--tokenizer", required=True, help="SentencePiece .model file, or a dir with the released BPE files"
    )
    parser.add_argument("--tensor_parallel", type=int, default=1, help="devices to shard the model over (heads/mlp)")
    parser.add_argument(
        "--weights",
        choices=("float32", "bfloat16", "int8", "int8_dynamic"),
        default="float32",
        help="matmul weights for decoding: int8 = weight-only per-channel int8, int8_dynamic = int8 weights and "
        "per-row int8 activations (moss_jax/quant.py; one device)",
    )
    parser.add_argument(
        "--tag",
        default="auto",
        help="preference tag after <|MOSS|>: best, none, or an index (0 = worst); "
        "auto = best when the checkpoint has preference_tags.json, else none",
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    d = MOSS_DEFAULTS
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=d.top_k, help="0 = off")
    parser.add_argument("--top_p", type=float, default=d.top_p)
    parser.add_argument("--repetition_penalty", type=float, default=d.repetition_penalty)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_new_tokens", type=int, default=512)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def tag_from_args(args: argparse.Namespace, tokenizer: Tokenizer) -> tuple[PreferenceTags | None, str | None]:
    """(the checkpoint's preference tags or None, the tag token `--tag` picks or None); exits on a bad choice."""
    try:
        tags = load_preference_tags(args.checkpoint)
        tag = resolve_tag(args.tag, tags)
        check_tag_token(tag, tokenizer)
    except TagError as e:
        raise SystemExit(f"--tag {args.tag}: {e}") from None
    return tags, tag


def load_from_args(args: argparse.Namespace) -> tuple[MossConfig, Any, Tokenizer, Any]:
    """(config, params, tokenizer, mesh or None); checks the tokenizer fits the model."""
    from moss_jax.inference.local import load_model

    weights = getattr(args, "weights", "float32")
    if args.tensor_parallel < 1:
        raise SystemExit(f"--tensor_parallel must be >= 1, got {args.tensor_parallel}")
    mesh = None
    if args.tensor_parallel > 1:
        import jax

        from moss_jax.sharding import make_mesh

        if weights != "float32":
            raise SystemExit(
                f"--weights {weights} runs on one device only (no tensor parallelism yet): "
                f"drop --tensor_parallel {args.tensor_parallel} or use --weights float32"
            )
        devices = jax.devices()
        if args.tensor_parallel > len(devices):
            raise SystemExit(
                f"--tensor_parallel {args.tensor_parallel}: this host has only {len(devices)} "
                f"{devices[0].platform} device(s)"
            )
        mesh = make_mesh(data=1, fsdp=1, tensor=args.tensor_parallel, devices=devices[: args.tensor_parallel])
    config, params = load_model(args.checkpoint, mesh, weights=weights)
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise SystemExit(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only {config.vocab_size}: wrong pair?"
        )
    return config, params, tokenizer, mesh
