"""Tokens/s of the packed SeqIO pre-training pipeline vs the tiny model's train step, same run.

    python bench/data_throughput.py [--seq_len 128] [--batch 8] [--batches 50]

Builds the embedded corpus and a SentencePiece vocabulary in a temporary directory, then
measures (after warm-up) how many tokens per second each side produces/consumes on this CPU.
Prints one JSON line; "ratio" = pipeline / train step (> 1 means training never waits on data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--corpus_chars", type=int, default=1_000_000)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from data_pipelines import corpus as corpus_lib
    from data_pipelines.seqio_input import SeqioPipeline
    from data_pipelines.tasks import register_pretrain_tasks
    from data_pipelines.vocab import train_sentencepiece
    from moss_jax.config import PRESETS
    from moss_jax.model import init_params
    from moss_jax.train.optimizer import OptimizerConfig, make_optimizer
    from moss_jax.train.state import TrainState
    from moss_jax.train.step import make_train_step

    with tempfile.TemporaryDirectory() as tmp:
        corpus = corpus_lib.gather(args.corpus_chars)
        corpus_lib.write_corpus(tmp, corpus)
        vocab = train_sentencepiece([d for lang in corpus_lib.LANGUAGES for d in corpus[lang]], f"{tmp}/sp", 8192)
        register_pretrain_tasks(tmp, vocab)
        pipe = SeqioPipeline("moss_pretrain", seq_len=args.seq_len, batch_size=args.batch, seed=0)
        for _ in range(5):
            next(pipe)
        start = time.perf_counter()
        batches = [next(pipe) for _ in range(args.batches)]
        data_s = time.perf_counter() - start
        fill = float(np.mean([(b["decoder_segment_ids"] > 0).mean() for b in batches]))

    config = PRESETS["tiny"]
    tx, schedule = make_optimizer(OptimizerConfig(total_steps=1000, warmup_steps=10))
    params = init_params(config, jax.random.PRNGKey(0))
    state = TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(1)
    )
    step = jax.jit(make_train_step(config, tx, schedule), donate_argnums=0)
    device_batches = [jax.device_put(b) for b in batches[:10]]
    for b in device_batches[:2]:
        state, m = step(state, b)
    jax.block_until_ready(m)
    start = time.perf_counter()
    n = 0
    while n < 20:
        state, m = step(state, device_batches[n % len(device_batches)])
        n += 1
    jax.block_until_ready(m)
    train_s = time.perf_counter() - start

    tokens = args.batch * args.seq_len
    data_tps = tokens * args.batches / data_s
    train_tps = tokens * n / train_s
    print(
        json.dumps(
            {
                "bench": "data_throughput",
                "config": "tiny",
                "seq_len": args.seq_len,
                "batch": args.batch,
                "pipeline_tokens_per_s": round(data_tps, 1),
                "train_step_tokens_per_s": round(train_tps, 1),
                "ratio": round(data_tps / train_tps, 2),
                "packing_fill": round(fill, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
