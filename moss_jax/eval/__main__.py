"""python -m moss_jax.eval: see moss_jax/eval/cli.py."""

import sys

from moss_jax.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
