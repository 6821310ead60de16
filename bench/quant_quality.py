"""Perplexity cost of weight-only quantisation, on held-out text, for a trained model.

    python bench/quant_quality.py --run_dir runs/pretrain_tiny_cpu          # a training run (latest step)
    python bench/quant_quality.py --checkpoint ckpt/tiny                    # a params checkpoint or HF dir
        [--vocab data/vocab/moss_sp.model] [--corpus data/embedded] [--seq_len 128] [--weights float32 bfloat16 int8]

Held-out text: the validation split of the embedded corpus (every `VALIDATION_EVERY`-th
document of each language file, never trained on; data_pipelines/tasks.py), tokenised with the
run's vocabulary, each document cut into non-overlapping windows of `seq_len` tokens. Every
weights mode scores the same windows; perplexity = exp(mean next-token NLL). Prints one JSON
line per mode with the perplexity per language and overall, and the delta to fp32.

Greedy agreement: `--greedy_prompts` held-out windows (their first `--greedy_prompt_len` tokens,
taken round-robin over the languages) are decoded greedily for `--greedy_tokens` tokens in every
mode; "greedy_match_fraction" is the share of generated tokens equal to fp32's, and
"greedy_prefix_fraction" the share before a row's first difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

WEIGHT_MODES = ("float32", "bfloat16", "int8", "int8_dynamic")


def held_out_windows(corpus_dir: str, vocab, seq_len: int, max_docs: int) -> dict[str, list[list[int]]]:
    """Per language, token windows (<= seq_len + 1 tokens, >= 2) of the validation documents."""
    from data_pipelines import corpus as corpus_lib
    from data_pipelines.tasks import VALIDATION_EVERY

    docs = corpus_lib.read_corpus(corpus_dir)
    out = {}
    for lang, texts in docs.items():
        held = [t for i, t in enumerate(texts) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1][:max_docs]
        windows = []
        for text in held:
            ids = list(vocab.encode(text))
            for start in range(0, max(len(ids) - 1, 0), seq_len):
                piece = ids[start : start + seq_len + 1]
                if len(piece) >= 2:
                    windows.append(piece)
        out[lang] = windows
    return out


def nll_sums(params, config, windows: list[list[int]], seq_len: int, batch: int = 16) -> tuple[float, int]:
    """(sum of next-token NLL, token count) over the windows, right-padded to seq_len."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moss_jax.model import MossLM

    model = MossLM(config)

    @jax.jit
    def score(p, ids, targets, weights):
        logits = model.apply({"params": p}, ids)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * weights)

    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        ids = np.zeros((batch, seq_len), np.int32)
        targets = np.zeros((batch, seq_len), np.int32)
        weights = np.zeros((batch, seq_len), np.float32)
        for r, w in enumerate(chunk):
            n = len(w) - 1
            ids[r, :n], targets[r, :n], weights[r, :n] = w[:-1], w[1:], 1.0
        total += float(score(params, ids, targets, weights))
        count += int(weights.sum())
    return total, count


def greedy_prompts(windows: dict[str, list[list[int]]], n: int, length: int) -> list[list[int]]:
    """Up to `n` prompts of `length` tokens, round-robin over the languages' windows."""
    pools = [[w[:length] for w in ws if len(w) >= length] for ws in windows.values()]
    out = []
    for i in range(max((len(p) for p in pools), default=0)):
        out.extend(p[i] for p in pools if i < len(p))
    return out[:n]


def greedy_agreement(tokens, reference) -> tuple[float, float]:
    """(share of equal tokens, share of tokens before each row's first difference)."""
    import numpy as np

    same = np.asarray(tokens) == np.asarray(reference)
    prefix = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return float(same.mean()), float(prefix.mean() / same.shape[1])


def load(args):
    from moss_jax.convert.checkpoint_io import export_params_from_run, load_params
    from moss_jax.inference.local import load_model

    if args.run_dir:
        with tempfile.TemporaryDirectory() as tmp:
            step, path = export_params_from_run(args.run_dir, os.path.join(tmp, "params"))
            config, params = load_params(path)
        return config, params, f"{args.run_dir} step {step}"
    config, params = load_model(args.checkpoint)
    return config, params, args.checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run_dir")
    source.add_argument("--checkpoint")
    parser.add_argument("--vocab", default="data/vocab/moss_sp.model")
    parser.add_argument("--corpus", default="data/embedded")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--max_docs", type=int, default=200, help="held-out documents per language")
    parser.add_argument("--weights", nargs="+", default=list(WEIGHT_MODES), choices=WEIGHT_MODES)
    parser.add_argument("--greedy_prompts", type=int, default=32)
    parser.add_argument("--greedy_prompt_len", type=int, default=16)
    parser.add_argument("--greedy_tokens", type=int, default=32)
    args = parser.parse_args(argv)
    common.set_threads(common.default_threads())

    import numpy as np

    from data_pipelines.vocab import load_vocabulary
    from moss_jax.inference import generate
    from moss_jax.quant import quantize_params, weight_bytes

    config, params, source_name = load(args)
    windows = held_out_windows(args.corpus, load_vocabulary(args.vocab), args.seq_len, args.max_docs)
    prompts = np.asarray(greedy_prompts(windows, args.greedy_prompts, args.greedy_prompt_len), np.int32)
    base, base_tokens = None, None
    for mode in ["float32"] + [m for m in args.weights if m != "float32"]:
        p = quantize_params(params, mode)
        per_lang, total, count = {}, 0.0, 0
        for lang, ws in windows.items():
            s, n = nll_sums(p, config, ws, args.seq_len)
            per_lang[lang] = round(math.exp(s / max(n, 1)), 4)
            total, count = total + s, count + n
        ppl = math.exp(total / max(count, 1))
        base = ppl if base is None else base
        tokens = generate(p, config, prompts, args.greedy_tokens)[:, prompts.shape[1] :] if len(prompts) else None
        base_tokens = tokens if base_tokens is None else base_tokens
        match, prefix = greedy_agreement(tokens, base_tokens) if tokens is not None else (None, None)
        if mode in args.weights:
            row = {
                "bench": "quant_quality",
                "model": source_name,
                "weights": mode,
                "ppl": round(ppl, 4),
                "ppl_delta": round(ppl - base, 4),
                "ppl_delta_pct": round(100 * (ppl / base - 1), 3),
                "ppl_by_language": per_lang,
                "tokens": count,
                "seq_len": args.seq_len,
                "weight_mib": round(weight_bytes(p) / 2**20, 2),
                "greedy_match_fraction": None if match is None else round(match, 3),
                "greedy_prefix_fraction": None if prefix is None else round(prefix, 3),
                "greedy_rows": len(prompts),
                "greedy_tokens": args.greedy_tokens,
            }
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
