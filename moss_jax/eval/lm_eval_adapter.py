"""An lm-evaluation-harness (EleutherAI `lm-eval`, optional extra `lm_eval`) model for moss_jax.

    python -m moss_jax.eval.lm_eval_adapter --checkpoint ckpt/tiny --tokenizer data/vocab/moss_sp.model \
        --tasks my_task --include_path tasks/ [--num_fewshot 5] [--limit 100] [--out results.json]

or, in Python, `lm_eval.simple_evaluate(model=MossJaxLM(checkpoint=..., tokenizer=...), tasks=[...])`.
Importing this module registers the model name `moss_jax`. The harness's own task configs fetch
their datasets from the Hugging Face hub; offline, point a task YAML at local files
(`dataset_path: json`, `dataset_kwargs: {data_files: ...}`) and pass `--include_path`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from moss_jax.eval.lm import EvalModel


@register_model("moss_jax")
class MossJaxLM(LM):
    """loglikelihood, loglikelihood_rolling and generate_until over an `EvalModel`.

    Args:
      checkpoint, tokenizer: as for `python -m moss_jax.eval` (ignored when `model` is given).
      model: an EvalModel to wrap directly (tests, notebooks).
      batch_size: rows per forward pass ("auto" is read as 8).
    """

    def __init__(self, checkpoint=None, tokenizer=None, model: EvalModel | None = None, batch_size=8, **_unused):
        super().__init__()
        if model is None:
            if not (checkpoint and tokenizer):
                raise ValueError("moss_jax needs model_args checkpoint=...,tokenizer=...")
            batch = 8 if str(batch_size).startswith("auto") else int(batch_size)
            model = EvalModel.from_checkpoint(checkpoint, tokenizer, batch_size=batch)
        self.model = model

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # As the harness's HF model does: trailing context spaces belong to the continuation, and
        # the continuation's ids are what encoding the whole text adds after the context's.
        stripped = context.rstrip(" ")
        continuation = context[len(stripped) :] + continuation
        context = stripped
        whole = self.model.encode(context + continuation)
        ctx = self.model.encode(context)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx) :]
        return ctx, self.model.encode(continuation)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._split(*req.args) for req in requests]
        return self.model.loglikelihood(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            ids = self.model.encode(req.args[0])
            out.append(float(self.model.text_logprobs(ids).sum()) if ids else 0.0)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            sampling = {}
            if kwargs.pop("do_sample", False) and float(kwargs.get("temperature", 0.0)) > 0:
                sampling["temperature"] = float(kwargs["temperature"])
                if "top_p" in kwargs:
                    sampling["top_p"] = float(kwargs["top_p"])
            out.append(self.model.generate([context], max_new, until, **sampling)[0])
        return out


def main(argv: list[str] | None = None) -> int:
    import lm_eval
    from lm_eval.tasks import TaskManager

    p = argparse.ArgumentParser(prog="python -m moss_jax.eval.lm_eval_adapter", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include_path", default=None, help="directory of extra task YAML files")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    model = MossJaxLM(checkpoint=args.checkpoint, tokenizer=args.tokenizer, batch_size=args.batch_size)
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=args.tasks.split(","),
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        task_manager=TaskManager(include_path=args.include_path),
        log_samples=False,
    )
    text = json.dumps(results["results"], indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
