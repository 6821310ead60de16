"""Decode throughput: moss_jax `generate` vs transformers `generate` on the same weights.

    python bench/decode.py [--config 125m] [--batches 1 8] [--prompt_len 32] [--new_tokens 64]
                           [--repeats 3] [--threads N]

A random CodeGenForCausalLM of the preset's size is built in PyTorch, converted with
`moss_jax.convert.params_from_hf`, and both sides decode greedily (no stop token, so both
produce exactly `new_tokens` per row) from the same random prompts, with the same number of
CPU threads, in the same process. After one warm-up call each (compilation for us), the two
are timed alternately (A, B, A, B, ...) and the median of each is reported. Greedy outputs are
compared token for token ("tokens_match"). Prints one JSON line per batch size:

    {"bench": "decode", "config": "125m", "batch": 1, "ours_tokens_per_s": ..., "peer_tokens_per_s": ..., "ratio": ...}

tokens/s counts generated tokens (batch x new_tokens) over the whole generate call (the short
prompt's prefill included on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="125m")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chunk_size", type=int, default=64, help="our decode steps per device call")
    args = parser.parse_args(argv)

    # Both runtimes get the same thread count; XLA reads its flags at import.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}"
    )
    import numpy as np
    import torch
    import transformers

    from moss_jax.config import get_config
    from moss_jax.convert import params_from_hf
    from moss_jax.inference import generate

    torch.set_num_threads(args.threads)
    config = get_config(args.config, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    hf_config = transformers.CodeGenConfig(**{**config.to_hf(), "torch_dtype": "float32"})
    model = transformers.CodeGenForCausalLM(hf_config).eval()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = params_from_hf(state, config)
    del state

    for batch in args.batches:
        ids = np.random.RandomState(batch).randint(0, config.vocab_size, (batch, args.prompt_len))
        ids_t = torch.tensor(ids)

        def ours():
            return generate(params, config, ids, args.new_tokens, chunk_size=args.chunk_size)[:, args.prompt_len :]

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

        match = bool((ours() == peer()).all())  # warm-up (and compilation) of both
        times = {"ours": [], "peer": []}
        for _ in range(args.repeats):
            for name, fn in (("ours", ours), ("peer", peer)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        tokens = batch * args.new_tokens
        ours_tps = tokens / statistics.median(times["ours"])
        peer_tps = tokens / statistics.median(times["peer"])
        print(
            json.dumps(
                {
                    "bench": "decode",
                    "config": args.config,
                    "batch": batch,
                    "ours_tokens_per_s": round(ours_tps, 1),
                    "peer_tokens_per_s": round(peer_tps, 1),
                    "ratio": round(ours_tps / peer_tps, 2),
                    "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens,
                    "threads": args.threads,
                    "tokens_match": match,
                    "peer": f"transformers {transformers.__version__} / torch {torch.__version__}",
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
