"""Evaluation: multiple choice (MMLU/C-Eval), HumanEval pass@k in a sandbox, bits per byte by
language, conversation format checks, and an lm-evaluation-harness adapter.

    python -m moss_jax.eval --checkpoint ckpt/tiny --tokenizer data/vocab/moss_sp.model \
        --suite ceval,bpb --ceval_dir ceval-exam --corpus_dir data/embedded --out report.json

`EvalModel` (lm.py) is what every harness calls; docs/eval.md describes each suite.
"""

from moss_jax.eval.lm import EvalError, EvalModel, TokenScores

__all__ = ["EvalError", "EvalModel", "TokenScores"]
