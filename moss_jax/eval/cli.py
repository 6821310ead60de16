"""`python -m moss_jax.eval --checkpoint CKPT --tokenizer TOK --suite mmlu,ceval,... --out report.json`.

Writes a JSON report (suites, settings, timings) and prints a short table. Exit status 2 for
bad input (a dataset folder in the wrong layout, a checkpoint that does not match its config
or the tokenizer, arguments that cannot work together), with the message naming the file, line,
field or argument; all of it is found before the first suite runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moss_jax.eval.lm import EvalError, EvalModel

SUITES = ("mmlu", "ceval", "humaneval", "bpb", "format", "tools", "copying")
FORMAT_MAX_NEW_TOKENS = 128  # the format suite generates min(--max_new_tokens, this)
CHOICE_MAX_NEW_TOKENS = 16  # --method generate for MMLU / C-Eval
TOOLS_MAX_NEW_TOKENS = 64  # the tools suite


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moss_jax.eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="moss_jax params checkpoint or HF CodeGen/MOSS directory")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model or a directory with the MOSS BPE files")
    p.add_argument("--suite", required=True, help=f"comma-separated, from {','.join(SUITES)}")
    p.add_argument("--out", default=None, help="JSON report path (default: print only)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--tensor_parallel", type=int, default=1, help="devices to shard the model over (heads/mlp)")
    p.add_argument("--limit", type=int, default=None, help="at most this many items per subject/problem set/file")
    # multiple choice
    p.add_argument("--mmlu_dir", help="hendrycks MMLU: [data/]{dev,val,test}/<subject>_<split>.csv")
    p.add_argument("--ceval_dir", help="C-Eval: {dev,val,test}/<subject>_<split>.csv with header")
    p.add_argument("--split", default=None, help="default: test for MMLU, val for C-Eval (test answers are hidden)")
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--method", default="loglikelihood", choices=("loglikelihood", "generate"))
    p.add_argument("--chat", action="store_true", help="wrap questions in a MOSS chat turn")
    p.add_argument("--subjects", default=None, help="comma-separated subset")
    p.add_argument(
        "--ceval_submission",
        default=None,
        help="write C-Eval predictions ({subject: {id: letter}}) for the C-Eval server here; split default test",
    )
    # code
    p.add_argument("--humaneval", help="HumanEval JSON lines")
    p.add_argument("--n_samples", type=int, default=1)
    p.add_argument("--k", default="1", help="comma-separated k for pass@k")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--timeout_s", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--require_kernel_isolation", action="store_true", help="refuse to run code without Landlock+seccomp"
    )
    # bits per byte
    p.add_argument("--text_dir", help="<lang>.jsonl / <lang>.txt held-out text")
    p.add_argument("--corpus_dir", help="embedded corpus dir: score its held-out (validation) documents")
    p.add_argument("--max_chars", type=int, default=20_000, help="per document, with --corpus_dir")
    # conversations
    p.add_argument("--conversations", help="held-out conversations (moss-003-sft JSON lines or {'human': ...})")
    p.add_argument("--plugin", action="store_true", help="format checks with tools on")
    p.add_argument("--tool_questions", help="held-out tool questions for the 'tools' suite")
    return p


def run(args: argparse.Namespace) -> dict:
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = sorted(set(suites) - set(SUITES))
    if unknown or not suites:
        raise EvalError(f"unknown suite(s) {unknown or suites}; known: {', '.join(SUITES)}")
    needs = {"mmlu": "mmlu_dir", "ceval": "ceval_dir", "humaneval": "humaneval", "format": "conversations"}
    for suite, flag in needs.items():
        if suite in suites and not getattr(args, flag):
            raise EvalError(f"suite '{suite}' needs --{flag}")
    for suite in ("bpb", "copying"):
        if suite in suites and not (args.text_dir or args.corpus_dir):
            raise EvalError(f"suite '{suite}' needs --text_dir or --corpus_dir")
    if "tools" in suites and not args.tool_questions:
        raise EvalError("suite 'tools' needs --tool_questions")
    if "humaneval" in suites:
        _pass_at_ks(args)  # a bad --k / --n_samples fails before the model loads
    if {"humaneval", "format"} & set(suites) and args.max_new_tokens < 1:
        raise EvalError(f"--max_new_tokens {args.max_new_tokens}: generation needs at least 1 new token")

    inputs = {suite: _load_inputs(suite, args) for suite in suites}  # bad data fails before the model loads
    model = EvalModel.from_checkpoint(
        args.checkpoint, args.tokenizer, tensor_parallel=args.tensor_parallel, batch_size=args.batch_size
    )
    for suite in suites:  # before any suite runs, so no finished suite's figures are lost
        if suite == "format":
            _format_end_ids(model, args)
        budget = _generation_budget(suite, args)
        if budget is not None and not 0 < budget < model.max_len:
            raise EvalError(
                f"suite '{suite}' generates up to {budget} new tokens, which leaves no room for a prompt "
                f"in the checkpoint's max_len {model.max_len}"
                + (" (lower --max_new_tokens)" if suite in ("humaneval", "format") else "")
            )
    report: dict = {"checkpoint": str(args.checkpoint), "tokenizer": str(args.tokenizer), "suites": {}, "seconds": {}}
    report["settings"] = _settings(args)
    report["prompts_cut"] = {}  # per suite: generation prompts cut from the left to fit (EvalModel.generate)
    for suite in suites:
        start, cut = time.perf_counter(), model.prompts_cut
        report["suites"][suite] = _run_suite(suite, model, inputs[suite], args)
        report["seconds"][suite] = round(time.perf_counter() - start, 2)
        report["prompts_cut"][suite] = model.prompts_cut - cut
    return report


def _settings(args: argparse.Namespace) -> dict:
    """The parsed arguments, JSON-safe, so a report says how its figures were made."""
    return {
        key: value if value is None or isinstance(value, (str, int, float, bool)) else str(value)
        for key, value in sorted(vars(args).items())
    }


def _pass_at_ks(args: argparse.Namespace) -> list[int]:
    """The k of --k; EvalError unless each is a whole number in 1..--n_samples."""
    if args.n_samples < 1:
        raise EvalError(f"--n_samples {args.n_samples}: needs at least 1 sample per problem")
    try:
        ks = [int(k) for k in args.k.split(",")]
    except ValueError:
        raise EvalError(f"--k {args.k!r}: expected comma-separated whole numbers such as 1,10") from None
    bad = [k for k in ks if not 1 <= k <= args.n_samples]
    if bad:
        raise EvalError(f"--k {args.k}: pass@k needs 1 <= k <= --n_samples ({args.n_samples}); got k={bad[0]}")
    return ks


def _generation_budget(suite: str, args: argparse.Namespace) -> int | None:
    """The max_new_tokens a suite generates with (None: it only scores)."""
    if suite == "humaneval":
        return args.max_new_tokens
    if suite == "format":
        return min(args.max_new_tokens, FORMAT_MAX_NEW_TOKENS)
    if suite == "tools":
        return TOOLS_MAX_NEW_TOKENS
    if suite in ("mmlu", "ceval") and args.method == "generate":
        return CHOICE_MAX_NEW_TOKENS
    return None


def _load_inputs(suite: str, args: argparse.Namespace):
    if suite in ("mmlu", "ceval"):
        from moss_jax.eval import multiple_choice as mc

        root = args.mmlu_dir if suite == "mmlu" else args.ceval_dir
        subjects = args.subjects.split(",") if args.subjects else None
        if suite == "ceval" and args.ceval_submission:
            return mc.load_dataset(suite, root, args.split or "test", args.shots, subjects, require_answers=False)
        return mc.load_dataset(suite, root, args.split, args.shots, subjects)
    if suite == "humaneval":
        from moss_jax.eval import code

        return code.load_problems(args.humaneval)[: args.limit]
    if suite in ("bpb", "copying"):
        from moss_jax.eval import bits_per_byte as bpb

        if args.text_dir:
            return bpb.read_texts(args.text_dir, max_docs=args.limit)
        return bpb.heldout_corpus(args.corpus_dir, max_docs=args.limit, max_chars=args.max_chars)
    if suite == "format":
        from moss_jax.eval import format_checks

        return format_checks.read_messages(args.conversations, args.limit)
    tool_use = _tool_use()
    try:
        tool_use.read_questions(args.tool_questions, args.limit)
    except (OSError, ValueError) as e:
        raise EvalError(f"--tool_questions: {e}") from e
    return args.tool_questions


def _run_suite(suite: str, model: EvalModel, inputs, args: argparse.Namespace) -> dict:
    if suite in ("mmlu", "ceval"):
        from moss_jax.eval import multiple_choice as mc

        kwargs = dict(method=args.method, chat=args.chat, limit=args.limit, max_new_tokens=CHOICE_MAX_NEW_TOKENS)
        if suite == "ceval" and args.ceval_submission:
            preds = mc.predict(model, inputs, **kwargs)
            Path(args.ceval_submission).parent.mkdir(parents=True, exist_ok=True)
            Path(args.ceval_submission).write_text(json.dumps(preds, ensure_ascii=False, indent=1) + "\n")
            return {
                "submission": str(args.ceval_submission),
                "method": args.method,
                "shots": args.shots,
                "questions": sum(len(v) for v in preds.values()),
                "unanswered": sum(1 for v in preds.values() for letter in v.values() if not letter),
            }
        return mc.evaluate(model, inputs, **kwargs)
    if suite == "humaneval":
        from moss_jax.eval import code
        from moss_jax.eval.sandbox import SandboxLimits

        limits = SandboxLimits(
            timeout_s=args.timeout_s,
            cpu_seconds=max(1, int(args.timeout_s)),
            require_kernel_isolation=args.require_kernel_isolation,
        )
        ks = _pass_at_ks(args)
        return code.evaluate(
            model,
            inputs,
            n_samples=args.n_samples,
            ks=ks,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            limits=limits,
            workers=args.workers,
        )
    if suite == "bpb":
        from moss_jax.eval import bits_per_byte as bpb

        return bpb.evaluate(model, inputs)
    if suite == "copying":
        from moss_jax.eval import copying

        return copying.evaluate(model, inputs, n_spans=args.limit or 64)
    if suite == "format":
        from moss_jax.eval import format_checks

        return format_checks.evaluate(
            model,
            inputs,
            plugin=args.plugin,
            end_ids=_format_end_ids(model, args),
            max_new_tokens=_generation_budget("format", args),
        )
    return _tools_suite(model, args)


def _format_end_ids(model: EvalModel, args: argparse.Namespace) -> list[int]:
    """The ids the format suite stops at: `<eom>`, and `<eoc>` with --plugin."""
    return [_token_id(model, "<eom>")] + ([_token_id(model, "<eoc>")] if args.plugin else [])


def _token_id(model: EvalModel, piece: str) -> int:
    ids = model.encode(piece)
    if len(ids) != 1:
        raise EvalError(
            f"{piece!r} is not one token in this tokenizer (got {ids}); format checks need MOSS's end tokens"
        )
    return ids[0]


def _tool_use():
    try:
        from moss_jax.eval import tool_use
    except ImportError as e:
        raise EvalError("suite 'tools' needs moss_jax/eval/tool_use.py (the alignment demo's tool accuracy)") from e
    return tool_use


def _tools_suite(model: EvalModel, args: argparse.Namespace) -> dict:
    """Tool-command exact match on held-out tool questions (moss_jax/eval/tool_use.py)."""
    return _tool_use().evaluate(model, args.tool_questions, limit=args.limit, max_new_tokens=TOOLS_MAX_NEW_TOKENS)


def table(report: dict) -> str:
    """A short text table of the headline figures."""
    rows = []
    for suite, r in report["suites"].items():
        if suite == "ceval" and "submission" in r:
            rows.append((suite, "predictions", str(r["questions"]), f"for the C-Eval server: {r['submission']}"))
        elif suite in ("mmlu", "ceval"):
            extra = f" (hard {r['hard_average']:.3f})" if "hard_average" in r else ""
            label = f"{r['method']}, {r['shots']}-shot, {len(r['subjects'])} subjects, mean over {r['accuracy_over']}"
            rows.append((suite, "accuracy", f"{r['accuracy']:.3f}{extra}", label))
        elif suite == "humaneval":
            for k, v in r["pass@k"].items():
                rows.append((suite, k, f"{v:.3f}", f"{len(r['problems'])} problems, n={r['n_samples']}"))
        elif suite == "bpb":
            for lang, v in r.items():
                rows.append((suite, f"{lang} bits/byte", f"{v['bits_per_byte']:.3f}", f"ppl {v['perplexity']:.1f}"))
        elif suite == "copying":
            for lang, v in r.items():
                rows.append(
                    (
                        suite,
                        f"{lang} second / first copy",
                        f"{v['second_copy_accuracy']:.3f} / {v['first_copy_accuracy']:.3f}",
                        f"{v['spans']} shuffled spans",
                    )
                )
        elif suite == "format":
            rows.append((suite, "compliance", f"{r['compliance']:.3f}", f"{r['mode']}, {r['replies']} replies"))
        else:
            for key, value in r.items():
                if isinstance(value, float):
                    rows.append((suite, key, f"{value:.3f}", ""))
    widths = [max(len(row[i]) for row in rows + [("suite", "metric", "value", "")]) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("suite", "metric", "value", ""), widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(table(report))
    return 0
