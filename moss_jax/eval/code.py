"""HumanEval-format code generation: n samples per problem, executed in the sandbox, pass@k.

Problems are JSON lines with `task_id`, `prompt`, `canonical_solution`, `test`, `entry_point`
(the HumanEval release's `HumanEval.jsonl`). A sample passes when
`prompt + completion + test + check(entry_point)` runs to its end in the sandbox.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moss_jax.eval.lm import EvalError, EvalModel
from moss_jax.eval.sandbox import SandboxLimits, SandboxResult, run_programs

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
# The Codex paper's stop sequences: the function body ends where top-level code starts.
DEFAULT_LIMITS = SandboxLimits()
STOP_STRINGS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert")


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def load_problems(path: str | Path) -> list[Problem]:
    """HumanEval JSON lines; a malformed line is an error naming file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"HumanEval file {path} does not exist (expected JSON lines: {', '.join(FIELDS)})")
    problems = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{n}: not JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise EvalError(f"{path}:{n}: expected a JSON object")
            for field in FIELDS:
                if not isinstance(record.get(field), str):
                    raise EvalError(f"{path}:{n}: field '{field}' missing or not a string")
            problems.append(Problem(**{k: record[k] for k in FIELDS}))
    if not problems:
        raise EvalError(f"{path}: no problems")
    return problems


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def program(problem: Problem, completion: str) -> str:
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def check_completions(
    problems: Sequence[Problem],
    completions: Sequence[Sequence[str]],
    ks: Sequence[int] = (1,),
    limits: SandboxLimits = DEFAULT_LIMITS,
    workers: int = 2,
) -> dict:
    """Executes completions[i][j] (sample j of problem i) and reports pass@k per k."""
    flat = [(i, program(p, c)) for i, (p, cs) in enumerate(zip(problems, completions, strict=True)) for c in cs]
    results: list[SandboxResult] = run_programs([prog for _, prog in flat], limits, workers)
    per_problem: dict[str, dict] = {}
    for (i, _), r in zip(flat, results, strict=True):
        entry = per_problem.setdefault(problems[i].task_id, {"n": 0, "passed": 0, "statuses": []})
        entry["n"] += 1
        entry["passed"] += int(r.passed)
        entry["statuses"].append(r.status)
    report = {"problems": per_problem, "pass@k": {}}
    for k in ks:
        usable = [v for v in per_problem.values() if v["n"] >= k]
        if len(usable) != len(per_problem):
            raise EvalError(f"pass@{k} needs at least {k} samples per problem")
        report["pass@k"][f"pass@{k}"] = float(np.mean([pass_at_k(v["n"], v["passed"], k) for v in usable]))
    report["isolation"] = results[0].layers if results else {}
    return report


def evaluate(
    model: EvalModel,
    problems: Sequence[Problem],
    *,
    n_samples: int = 1,
    ks: Sequence[int] = (1,),
    max_new_tokens: int = 256,
    temperature: float = 0.2,
    top_p: float = 0.95,
    seed: int = 0,
    limits: SandboxLimits = DEFAULT_LIMITS,
    workers: int = 2,
) -> dict:
    """Samples `n_samples` completions per problem (greedy when n_samples == 1) and scores them."""
    if any(k > n_samples for k in ks):
        raise EvalError(f"pass@k with k={max(ks)} needs n_samples >= {max(ks)}, got {n_samples}")
    sampling = {} if n_samples == 1 else {"temperature": temperature, "top_p": top_p}
    completions = []
    for p in problems:
        prompts = [p.prompt] * n_samples
        completions.append(model.generate(prompts, max_new_tokens, STOP_STRINGS, seed=seed, **sampling))
    report = check_completions(problems, completions, ks, limits, workers)
    report.update(n_samples=n_samples, temperature=temperature if n_samples > 1 else 0.0)
    return report
