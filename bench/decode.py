"""Decode throughput: moss_jax `generate` vs transformers `generate` on the same weights.

    python bench/decode.py [--config 125m] [--batches 1 8] [--prompt_len 32] [--new_tokens 64]
                           [--repeats 3] [--threads N] [--weights float32 int8 int8_dynamic]

A random CodeGenForCausalLM of the preset's size is built in PyTorch, converted with
`moss_jax.convert.params_from_hf`, and both sides decode greedily (no stop token, so both
produce exactly `new_tokens` per row) from the same random prompts, with the same number of
CPU threads, in the same process. After one warm-up call each (compilation for us), the two
are timed alternately (A, B, A, B, ...) and the median of each is reported. Greedy outputs are
compared token for token ("tokens_match"). Prints one JSON line per batch size:

    {"bench": "decode", "config": "125m", "batch": 1, "ours_tokens_per_s": ..., "peer_tokens_per_s": ..., "ratio": ...}

tokens/s counts generated tokens (batch x new_tokens) over the whole generate call (the short
prompt's prefill included on both sides).

`--weights` lists our weight storage modes (moss_jax.quant: float32, bfloat16, int8 weight-only,
int8_dynamic: int8 weights and per-row int8 activations);
each mode is its own line ("weights"), timed in the same alternation against the same fp32
peer. Only the float32 line is the like-for-like comparison; the others trade accuracy
("match_fraction": share of generated tokens equal to the fp32 peer's) for speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

WEIGHT_MODES = ("float32", "bfloat16", "int8", "int8_dynamic")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="125m")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=common.default_threads())
    parser.add_argument("--chunk_size", type=int, default=64, help="our decode steps per device call")
    parser.add_argument("--weights", nargs="+", default=["float32"], choices=WEIGHT_MODES)
    args = parser.parse_args(argv)

    # Both runtimes get the same thread count; XLA reads its flags at import.
    common.set_threads(args.threads)
    import numpy as np
    import torch

    from moss_jax.config import get_config
    from moss_jax.inference import generate
    from moss_jax.quant import quantize_params, weight_bytes

    common.torch_threads(args.threads)
    config = get_config(args.config, eos_token_id=None, bos_token_id=None)
    model, params = common.hf_codegen(config)
    variants = {mode: quantize_params(params, mode) for mode in args.weights}

    for batch in args.batches:
        ids = np.random.RandomState(batch).randint(0, config.vocab_size, (batch, args.prompt_len))
        ids_t = torch.tensor(ids)

        def ours(p):
            return generate(p, config, ids, args.new_tokens, chunk_size=args.chunk_size)[:, args.prompt_len :]

        def peer():
            with torch.inference_mode():
                out = model.generate(
                    ids_t,
                    attention_mask=torch.ones_like(ids_t),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            return out[:, args.prompt_len :].numpy()

        reference = peer()  # warm-up of the peer; our warm-up (compilation) below
        match = {mode: float((ours(p) == reference).mean()) for mode, p in variants.items()}
        fns = {mode: (lambda p=p: ours(p)) for mode, p in variants.items()}
        fns["peer"] = peer
        times = common.alternate(fns, args.repeats, warmup=0)
        tokens = batch * args.new_tokens
        peer_tps = tokens / common.median(times["peer"])
        for mode in variants:
            ours_tps = tokens / common.median(times[mode])
            print(
                json.dumps(
                    {
                        "bench": "decode",
                        "config": args.config,
                        "batch": batch,
                        "weights": mode,
                        "ours_tokens_per_s": round(ours_tps, 1),
                        "peer_tokens_per_s": round(peer_tps, 1),
                        "ratio": round(ours_tps / peer_tps, 2),
                        "ratios": [round(p / o, 2) for o, p in zip(times[mode], times["peer"], strict=True)],
                        "prompt_len": args.prompt_len,
                        "new_tokens": args.new_tokens,
                        "threads": args.threads,
                        "cpu_affinity": common.cpu_affinity(),
                        "tokens_match": match[mode] == 1.0,
                        "match_fraction": round(match[mode], 3),
                        "weight_mib": round(weight_bytes(variants[mode]) / 2**20, 1),
                        "peer": common.peer_name() + " float32",
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
