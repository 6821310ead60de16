"""Train step throughput: our jitted step vs transformers CodeGen in PyTorch, same weights and batch.

    python bench/train_step.py [--configs tiny 125m] [--seq_len 512] [--batch 2] [--repeats 3]
                               [--threads N] [--device cpu|gpu] [--dtype float32|bfloat16]

One optimizer step = forward, backward, global-norm clipping (1.0) and AdamW (weight decay 0.1
on kernels and embeddings, none on biases and norms) on both sides. The PyTorch peer is
`transformers.CodeGenForCausalLM` built from the same config with random weights; ours starts
from those weights (converted), so the first-step losses are compared ("loss_diff"). The peer
uses eager PyTorch with its fused CPU AdamW (the fastest stock optimizer) and the same thread
count. After warm-up (compilation for us) the two alternate; each timing runs `steps` steps
(chosen so one timing takes about a second). Prints one JSON line per config:

    {"bench": "train_step", "config": "125m", "ours_tokens_per_s": ..., "peer_tokens_per_s": ..., "ratio": ...}

`--device gpu --dtype bfloat16` runs the same comparison on a CUDA GPU (ours on the JAX GPU
backend with bf16 compute and fp32 master weights, the peer with bf16 autocast).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def our_step(
    config,
    params,
    batch_size: int,
    seq_len: int,
    *,
    remat: str,
    scan: bool,
    attention_impl: str,
    head_chunk_tokens=1024,
    micro_batches: int = 1,
):
    """(initial TrainState, jitted step donating the state) for `params` (stacked layers).

    `head_chunk_tokens`: the LM objective's fused head + cross-entropy chunk (None or 0: full logits).
    `micro_batches`: gradient accumulation over that many slices of the batch (one optimizer update).
    """
    import jax
    import jax.numpy as jnp

    from moss_jax.convert import unstack_layers
    from moss_jax.train.objectives import lm_objective
    from moss_jax.train.optimizer import OptimizerConfig, make_optimizer
    from moss_jax.train.state import TrainState
    from moss_jax.train.step import make_train_step

    config = config.replace(remat_policy=remat, scan_layers=scan, attention_impl=attention_impl)
    if not scan:
        params = unstack_layers(params, config.n_layers)
    tx, schedule = make_optimizer(OptimizerConfig(total_steps=1000, warmup_steps=0, schedule="constant"))
    params = jax.device_put(params)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(1)
    )
    objective = lm_objective(head_chunk_tokens=head_chunk_tokens or None)
    step = jax.jit(
        make_train_step(config, tx, schedule, objective=objective, micro_batches=micro_batches), donate_argnums=0
    )
    return state, step


def make_batch(config, batch_size: int, seq_len: int, seed: int = 0):
    """Random (inputs, next-token targets), both int32 [B, L]."""
    import numpy as np

    ids = np.random.RandomState(seed).randint(0, config.vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def our_batch(inputs, targets) -> dict:
    """The train step's features for unpacked rows (one segment per row, every token weighted)."""
    import numpy as np

    return {
        "decoder_input_tokens": inputs,
        "decoder_target_tokens": targets,
        "decoder_segment_ids": np.ones_like(inputs),
        "decoder_positions": np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape).copy(),
        "decoder_loss_weights": np.ones(inputs.shape, np.float32),
    }


def bench_config(name: str, args) -> dict:
    import jax
    import torch

    from moss_jax.config import get_config

    config = get_config(name, dtype=args.dtype)
    model, params = common.hf_codegen(config)
    inputs, targets = make_batch(config, args.batch, args.seq_len)
    n_tok = args.batch * args.seq_len

    # Ours ----------------------------------------------------------------------------
    state, step = our_step(
        config,
        params,
        args.batch,
        args.seq_len,
        remat=args.remat,
        scan=args.scan,
        attention_impl=args.attention_impl,
        head_chunk_tokens=args.head_chunk_tokens,
    )
    del params
    batch = jax.device_put(our_batch(inputs, targets))
    ours_box = {"state": state}

    def ours(n: int):
        st = ours_box["state"]
        for _ in range(n):
            st, metrics = step(st, batch)  # no host sync inside the loop
        ours_box["state"] = st
        return float(metrics["loss"])

    # Peer ------------------------------------------------------------------------------
    device = "cuda" if args.device == "gpu" else "cpu"
    model = model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=True,
    )
    inputs_t = torch.tensor(inputs, dtype=torch.long, device=device)
    targets_t = torch.tensor(targets, dtype=torch.long, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def peer(n: int):
        for _ in range(n):
            with autocast:
                logits = model(input_ids=inputs_t).logits
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_t.view(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    # The first step of each starts from the same weights and batch: same loss.
    loss_ours, loss_peer = ours(1), peer(1)
    loss_diff = abs(loss_ours - loss_peer)
    start = time.perf_counter()
    ours(1)
    one = time.perf_counter() - start
    steps = max(1, round(args.target_s / one))
    times = common.alternate({"ours": lambda: ours(steps), "peer": lambda: peer(steps)}, args.repeats)
    ours_tps = n_tok * steps / common.median(times["ours"])
    peer_tps = n_tok * steps / common.median(times["peer"])
    return {
        "bench": "train_step",
        "config": name,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "ours_tokens_per_s": round(ours_tps, 1),
        "peer_tokens_per_s": round(peer_tps, 1),
        "ratio": round(ours_tps / peer_tps, 2),
        "ratios": [round(p / o, 2) for o, p in zip(times["ours"], times["peer"], strict=True)],
        "steps_per_timing": steps,
        "repeats": args.repeats,
        "first_step_loss": round(loss_ours, 5),
        "loss_diff_first_step": float(f"{loss_diff:.2e}"),
        "dtype": args.dtype,
        "device": jax.devices()[0].device_kind,
        "threads": args.threads,
        "cpu_affinity": common.cpu_affinity(),
        "ours_setup": f"scan={args.scan} remat={args.remat} attention={args.attention_impl} "
        f"head_chunk_tokens={args.head_chunk_tokens}",
        "peer": common.peer_name() + " eager, fused AdamW",
    }


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "125m"])
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target_s", type=float, default=1.0, help="approximate seconds per timing")
    parser.add_argument("--threads", type=int, default=common.default_threads())
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--scan", type=int, default=1, help="1: scan over layers, 0: unrolled")
    parser.add_argument("--attention_impl", default="xla")
    parser.add_argument(
        "--head_chunk_tokens", type=int, default=1024, help="fused LM head + loss chunk; 0: full logits (plain)"
    )
    args = parser.parse_args(argv)
    args.scan = bool(args.scan)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads, args.device)
    common.torch_threads(args.threads)
    for name in args.configs:
        print(json.dumps(bench_config(name, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
