"""Smoke demo of the MOSS model on this machine (CPU by default).

    python -m moss_jax.demo [--preset tiny | --gin_file experiments/models/tiny.gin] [--batch 4]
                            [--seq_len 128] [--new_tokens 32]

What it does, all for real on the chosen preset:
  1. sizes every preset with `jax.eval_shape` (moss-moon-003: ~16.7B, nothing allocated);
  2. initialises the model, checks every parameter carries logical axis names;
  3. times a jitted forward pass (tokens/s after compilation);
  4. greedy-decodes with the KV cache and checks each step's logits against a full
     forward pass over the same tokens;
  5. if several devices are present, runs the forward on a (data, fsdp, tensor) mesh
     and checks it equals the single-device result.
It ends with one JSON line of the measured figures. The end-to-end run (pre-training, SFT,
preference-aware training and DPO on embedded data, with a report) is
`python -m moss_jax.stages.demo` (`bash scripts/demo.sh`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from moss_jax.config import PRESETS, get_config
from moss_jax.model import KVCache, MossLM, abstract_params, count_params, init_params, param_shardings
from moss_jax.sharding import make_mesh, mesh_rules


def _timed(fn, *args, repeats: int = 3):
    out = jax.block_until_ready(fn(*args))  # compile + warm up
    start = time.perf_counter()
    for _ in range(repeats):
        out = jax.block_until_ready(fn(*args))
    return out, (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--gin_file", action="append", default=[], help="model gin (overrides --preset)")
    parser.add_argument("--gin_param", action="append", default=[], help="gin binding, repeatable")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.gin_file or args.gin_param:
        from moss_jax import configurables

        configurables.parse(args.gin_file, args.gin_param)
        config = configurables.model_config()
        args.preset = "gin:" + ",".join(args.gin_file)
    else:
        config = get_config(args.preset)
    if args.seq_len + args.new_tokens > config.max_len:
        parser.error(f"--seq_len + --new_tokens = {args.seq_len + args.new_tokens} exceeds max_len {config.max_len}")
    report: dict = {"preset": args.preset, "backend": jax.default_backend(), "devices": jax.device_count()}

    print("== presets (jax.eval_shape, no memory allocated) ==")
    for name, cfg in PRESETS.items():
        n = count_params(abstract_params(cfg))
        print(
            f"  {name:14s} layers={cfg.n_layers:3d} d_model={cfg.d_model:5d} heads={cfg.n_heads:3d} "
            f"params={n / 1e6:10.1f}M"
        )
    report["moss_moon_003_params"] = count_params(abstract_params(PRESETS["moss-moon-003"]))

    print(f"== {args.preset}: init ==")
    params = init_params(config, jax.random.key(args.seed))
    report["params"] = count_params(params)
    print(f"  {report['params'] / 1e6:.2f}M parameters, axis names checked")

    model = MossLM(config)
    ids = jax.random.randint(jax.random.key(args.seed + 1), (args.batch, args.seq_len), 0, config.vocab_size)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    logits, seconds = _timed(forward, params, ids)
    report["forward_tokens_per_s"] = round(args.batch * args.seq_len / seconds, 1)
    print(f"  forward {tuple(logits.shape)}: {report['forward_tokens_per_s']:.0f} tokens/s")

    print(f"== greedy decode with KV cache: {args.new_tokens} tokens ==")
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    cache = KVCache.init(config, args.batch, max_len=args.seq_len + args.new_tokens)
    step_logits, cache = step(params, ids, cache)
    tokens = [ids]
    decoded_logits = []
    start = None
    for i in tqdm(range(args.new_tokens), desc="decoding", unit="tok", file=sys.stdout):
        next_ids = jnp.argmax(step_logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
        tokens.append(next_ids)
        step_logits, cache = step(params, next_ids, cache)
        decoded_logits.append(step_logits[:, -1])
        if i == 0:  # the first one-token step compiles; time the rest
            jax.block_until_ready(step_logits)
            start = time.perf_counter()
    jax.block_until_ready(step_logits)
    steps = max(args.new_tokens - 1, 1)
    report["decode_tokens_per_s"] = round(args.batch * steps / (time.perf_counter() - start), 1)
    full = forward(params, jnp.concatenate(tokens, axis=1))[:, args.seq_len :]
    err = float(jnp.max(jnp.abs(jnp.stack(decoded_logits, axis=1) - full)))
    report["kv_cache_max_abs_diff"] = err
    print(f"  {report['decode_tokens_per_s']:.0f} tokens/s; max |cached - full forward| = {err:.2e}")
    if not err <= 1e-4:
        print("error: KV-cache logits differ from the full forward", file=sys.stderr)
        return 1

    if jax.device_count() >= 8 and args.batch % 4 == 0:
        print("== sharded forward on a (data=2, fsdp=2, tensor=2) mesh ==")
        mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
        with mesh_rules(mesh):
            sharded_fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
            sharded_params = jax.device_put(params, param_shardings(config, mesh))
            out = sharded_fwd(sharded_params, ids)
        err = float(jnp.max(jnp.abs(out - logits)))
        report["sharded_max_abs_diff"] = err
        print(f"  max |sharded - single device| = {err:.2e}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
