"""CLI: convert between HF CodeGen/MOSS checkpoints and moss_jax (orbax) checkpoints.

python -m moss_jax.convert hf2orbax --hf_dir fnlp/moss-moon-003-sft --out_dir ckpt/moss-sft
python -m moss_jax.convert orbax2hf --ckpt_dir ckpt/moss-sft --out_dir hf/moss-sft
"""

from __future__ import annotations

import argparse
import sys

from moss_jax.config import DTYPES, ConfigError
from moss_jax.convert.checkpoint_io import (
    export_params_from_run,
    load_hf_checkpoint,
    load_params,
    save_hf_checkpoint,
    save_params,
)
from moss_jax.convert.mapping import CheckpointError


def _size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moss_jax.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf2orbax", help="HF directory -> moss_jax orbax checkpoint")
    a.add_argument("--hf_dir", required=True)
    a.add_argument("--out_dir", required=True)
    a.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="cast parameters to this dtype; default: keep the file's (int8 is chat/serve's --weights int8)",
    )
    a.add_argument("--overwrite", action="store_true")
    b = sub.add_parser("orbax2hf", help="moss_jax orbax checkpoint -> HF directory (safetensors)")
    b.add_argument("--ckpt_dir", required=True)
    b.add_argument("--out_dir", required=True)
    b.add_argument("--max_shard_size", default="2GB", type=_size)
    b.add_argument("--model_type", default="codegen", choices=("codegen", "moss"))
    b.add_argument("--overwrite", action="store_true")
    c = sub.add_parser("export", help="a training run's checkpoint -> params checkpoint (for chat/serve/eval)")
    c.add_argument("--run_dir", required=True, help="the training workdir (holds checkpoints/)")
    c.add_argument("--out_dir", required=True)
    c.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    c.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "hf2orbax":
            config, params = load_hf_checkpoint(args.hf_dir, dtype=args.dtype)
            save_params(args.out_dir, params, config, overwrite=args.overwrite)
            print(f"wrote {args.out_dir} ({config.num_params / 1e6:.1f}M parameters)")
        elif args.command == "export":
            step, out = export_params_from_run(args.run_dir, args.out_dir, step=args.step, overwrite=args.overwrite)
            print(f"wrote {out} (parameters of step {step})")
        else:
            config, params = load_params(args.ckpt_dir)
            save_hf_checkpoint(
                args.out_dir,
                params,
                config,
                max_shard_bytes=args.max_shard_size,
                model_type=args.model_type,
                overwrite=args.overwrite,
            )
            print(f"wrote {args.out_dir}")
    except (CheckpointError, ConfigError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
