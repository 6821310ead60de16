"""HumanEval: pass@k against the exact combinatorial formula; samples executed in the sandbox."""

import json
import math

import pytest

from moss_jax.eval import code
from moss_jax.eval.lm import EvalError
from moss_jax.eval.sandbox import SandboxLimits

from .conftest import unigram_model

PROBLEMS = [
    {
        "task_id": "Toy/0",
        "prompt": 'def add(a, b):\n    """Sum of a and b."""\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    },
    {
        "task_id": "Toy/1",
        "prompt": 'def is_even(n):\n    """True when n is even."""\n',
        "canonical_solution": "    return n % 2 == 0\n",
        "test": "def check(candidate):\n    assert candidate(4)\n    assert not candidate(7)\n",
        "entry_point": "is_even",
    },
]
LIMITS = SandboxLimits(timeout_s=3, cpu_seconds=2)


@pytest.fixture
def problems_file(tmp_path):
    path = tmp_path / "HumanEval.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20])
def test_pass_at_k_is_the_combinatorial_formula(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            exact = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert code.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    assert code.pass_at_k(n, 0, 1) == 0.0 and code.pass_at_k(n, n, 1) == 1.0
    with pytest.raises(ValueError):
        code.pass_at_k(n, n + 1, 1)


def test_samples_are_executed_and_counted(problems_file):
    problems = code.load_problems(problems_file)
    completions = [
        # add: right, wrong, loops forever, writes outside its directory, opens a socket
        [
            "    return a + b\n",
            "    return a - b\n",
            "    while True:\n        pass\n",
            "    open('/tmp/moss_eval_escape', 'w').write('x')\n    return a + b\n",
            "    import socket\n    socket.create_connection(('127.0.0.1', 80))\n    return a + b\n",
        ],
        # is_even: right 3 times, wrong twice
        ["    return n % 2 == 0\n"] * 3 + ["    return True\n", "    return n % 2\n"],
    ]
    report = code.check_completions(problems, completions, ks=(1, 2, 5), limits=LIMITS)
    add, even = report["problems"]["Toy/0"], report["problems"]["Toy/1"]
    statuses = add["statuses"]
    # The endless loop is stopped by whichever limit comes first: the CPU limit on a quiet
    # machine ("killed"), the wall clock on a loaded one ("timeout").
    assert statuses[2] in ("timeout", "killed")
    assert statuses[:2] + statuses[3:] == ["passed", "failed", "failed", "failed"]
    assert (add["passed"], even["passed"]) == (1, 3)
    for k in (1, 2, 5):
        want = (code.pass_at_k(5, 1, k) + code.pass_at_k(5, 3, k)) / 2
        assert report["pass@k"][f"pass@{k}"] == pytest.approx(want)
    assert report["pass@k"]["pass@1"] == pytest.approx(0.4)


def test_canonical_solutions_pass_through_a_designed_generator(problems_file):
    problems = code.load_problems(problems_file)
    by_prompt = {p.prompt: p.canonical_solution for p in problems}

    def generate_fn(ids, max_new_tokens, stop_strings, **sampling):
        # The canonical body, then top-level junk that the stop strings must cut.
        return [by_prompt[bytes(i).decode()] + "\nprint('junk')\nraise SystemExit(1)\n" for i in ids]

    model = unigram_model("x", generate_fn=generate_fn)
    report = code.evaluate(model, problems, n_samples=1, ks=(1,), limits=LIMITS)
    assert report["pass@k"]["pass@1"] == 1.0
    with pytest.raises(EvalError, match="n_samples >= 2"):
        code.evaluate(model, problems, n_samples=1, ks=(2,))


def test_malformed_problem_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PROBLEMS[0]) + "\n" + json.dumps({**PROBLEMS[1], "entry_point": None}) + "\n")
    with pytest.raises(EvalError, match=r"bad.jsonl:2: field 'entry_point'"):
        code.load_problems(bad)
    bad.write_text("{not json\n")
    with pytest.raises(EvalError, match=r"bad.jsonl:1: not JSON"):
        code.load_problems(bad)
    with pytest.raises(EvalError, match="does not exist"):
        code.load_problems(tmp_path / "missing.jsonl")
