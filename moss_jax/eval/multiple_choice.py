"""MMLU and C-Eval style multiple choice, by log-likelihood or by generation.

Datasets are read from their public file layouts in a local directory (nothing is downloaded):

- MMLU (hendrycks/test, `data.tar`): `[data/]{dev,val,test}/<subject>_<split>.csv`, no header,
  columns question, A, B, C, D, answer.
- C-Eval (ceval-exam): `{dev,val,test}/<subject>_<split>.csv` with the header
  `id,question,A,B,C,D,answer[,explanation]`; the public test files carry no answers, so `val`
  is what can be scored locally (the official test figures come from the C-Eval server). An
  optional `subject_mapping.json` ({subject: [English name, Chinese name, category]}, shipped
  with C-Eval) gives the Chinese subject names used in the prompt and per-category averages.

Prompts follow the benchmarks' own formats (MMLU: "The following are multiple choice questions
(with answers) about <subject>." ... "Answer: X"; C-Eval: "以下是中国关于<科目>考试的单项选择题，
请选出其中的正确答案。" ... "答案：X"), zero-shot or with the first k dev questions as shots.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moss_jax.eval.lm import EvalError, EvalModel

LETTERS = ("A", "B", "C", "D")
BENCHMARKS = ("mmlu", "ceval")
# C-Eval's "Hard" subset (the paper's C-Eval Hard).
CEVAL_HARD = (
    "advanced_mathematics",
    "discrete_mathematics",
    "probability_and_statistics",
    "college_chemistry",
    "college_physics",
    "high_school_mathematics",
    "high_school_chemistry",
    "high_school_physics",
)


@dataclasses.dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str | None  # "A".."D"; None where the file hides it (C-Eval test)
    source: str  # file:line
    qid: str = ""  # C-Eval's id column; MMLU: the row number


@dataclasses.dataclass(frozen=True)
class Dataset:
    benchmark: str
    root: Path
    questions: dict[str, list[Question]]  # subject -> questions of the evaluated split
    shots: dict[str, list[Question]]  # subject -> dev questions (few-shot examples)
    names: dict[str, str]  # subject -> name used in the prompt
    categories: dict[str, str]  # subject -> category (C-Eval mapping), may be empty


def _split_dir(benchmark: str, root: Path, split: str) -> Path:
    candidates = [root / split] + ([root / "data" / split] if benchmark == "mmlu" else [])
    for c in candidates:
        if c.is_dir():
            return c
    layout = (
        "data/{dev,val,test}/<subject>_<split>.csv (hendrycks/test)"
        if benchmark == "mmlu"
        else "{dev,val,test}/<subject>_<split>.csv with a header row (ceval-exam)"
    )
    raise EvalError(f"{root}: no '{split}' folder; the {benchmark} layout is {layout}")


def _read_split(benchmark: str, root: Path, split: str, require_answers: bool = True) -> dict[str, list[Question]]:
    folder = _split_dir(benchmark, root, split)
    suffix = f"_{split}.csv"
    files = sorted(p for p in folder.iterdir() if p.name.endswith(suffix))
    if not files:
        others = sorted(p.name for p in folder.iterdir())[:5]
        raise EvalError(f"{folder}: no <subject>{suffix} files (found {others or 'nothing'})")
    if benchmark == "mmlu":
        return {p.name[: -len(suffix)]: _read_mmlu_csv(p, p.name[: -len(suffix)]) for p in files}
    return {p.name[: -len(suffix)]: _read_ceval_csv(p, p.name[: -len(suffix)], require_answers) for p in files}


def _check_answer(answer: str, where: str) -> str:
    answer = answer.strip()
    if answer not in LETTERS:
        raise EvalError(f"{where}: answer {answer!r} is not one of {LETTERS}")
    return answer


def _read_mmlu_csv(path: Path, subject: str) -> list[Question]:
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        for row in rows:
            where = f"{path}:{rows.line_num}"
            if len(row) != 6:
                hint = " (a header row? that is the C-Eval layout)" if row[:2] == ["id", "question"] else ""
                raise EvalError(f"{where}: expected 6 columns question,A,B,C,D,answer, got {len(row)}{hint}")
            answer = _check_answer(row[5], where)
            out.append(Question(subject, row[0], tuple(row[1:5]), answer, where, str(len(out))))
    if not out:
        raise EvalError(f"{path}: no questions")
    return out


def _read_ceval_csv(path: Path, subject: str, require_answers: bool) -> list[Question]:
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None:
            raise EvalError(f"{path}: empty file")
        header = [h.strip().lstrip("\ufeff") for h in header]
        if header[:6] != ["id", "question", *LETTERS]:
            raise EvalError(
                f"{path}:1: expected the C-Eval header id,question,A,B,C,D,answer[,explanation], got {header[:7]}"
            )
        if "answer" not in header and require_answers:
            raise EvalError(
                f"{path}: no 'answer' column; C-Eval's test answers are hidden (scored only by the "
                f"C-Eval server): evaluate split 'val' locally, or write predictions for the server "
                f"(--ceval_submission)"
            )
        col = {name: i for i, name in enumerate(header)}
        for row in rows:
            where = f"{path}:{rows.line_num}"
            if len(row) != len(header):
                raise EvalError(f"{where}: {len(row)} columns, the header has {len(header)}")
            choices = tuple(row[col[c]] for c in LETTERS)
            answer = _check_answer(row[col["answer"]], where) if "answer" in col else None
            out.append(Question(subject, row[col["question"]], choices, answer, where, row[col["id"]].strip()))
    if not out:
        raise EvalError(f"{path}: no questions")
    return out


def load_dataset(
    benchmark: str,
    root: str | Path,
    split: str | None = None,
    shots: int = 0,
    subjects: Sequence[str] | None = None,
    require_answers: bool = True,
) -> Dataset:
    """Reads a benchmark's split (default: MMLU test, C-Eval val) and, for shots > 0, its dev split.

    `require_answers=False` accepts C-Eval files without answers (the test split), for `predict`.
    """
    if benchmark not in BENCHMARKS:
        raise EvalError(f"unknown benchmark {benchmark!r}; known: {BENCHMARKS}")
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"{benchmark} directory {root} does not exist")
    split = split or ("test" if benchmark == "mmlu" else "val")
    questions = _read_split(benchmark, root, split, require_answers)
    if subjects:
        missing = sorted(set(subjects) - set(questions))
        if missing:
            raise EvalError(f"{root}: no {split} file for subject(s) {missing}; found {sorted(questions)[:10]}")
        questions = {s: questions[s] for s in subjects}
    dev: dict[str, list[Question]] = {}
    if shots:
        dev = _read_split(benchmark, root, "dev")
        for s in questions:
            if len(dev.get(s, [])) < shots:
                raise EvalError(
                    f"{root}: {shots}-shot needs {shots} dev questions for {s}, found {len(dev.get(s, []))}"
                )
    names = {s: s.replace("_", " ") for s in questions}
    categories: dict[str, str] = {}
    mapping = root / "subject_mapping.json"
    if benchmark == "ceval" and mapping.is_file():
        try:
            table = json.loads(mapping.read_text(encoding="utf-8"))
            for s in questions:
                if s in table:
                    names[s], categories[s] = table[s][1], table[s][2]
        except (ValueError, IndexError, TypeError, KeyError) as e:
            raise EvalError(f"{mapping}: expected {{subject: [English, Chinese, category]}}: {e}") from e
    return Dataset(benchmark, root, questions, {s: dev.get(s, [])[:shots] for s in questions}, names, categories)


# Prompts ---------------------------------------------------------------------------------


def format_question(benchmark: str, q: Question, with_answer: bool) -> str:
    body = q.question.strip() + "\n" + "".join(f"{letter}. {c}\n" for letter, c in zip(LETTERS, q.choices, strict=True))
    if benchmark == "mmlu":
        return body + "Answer:" + (f" {q.answer}\n\n" if with_answer else "")
    return body + "答案：" + (f"{q.answer}\n\n" if with_answer else "")


def build_prompt(benchmark: str, subject_name: str, shots: Sequence[Question], q: Question) -> str:
    if benchmark == "mmlu":
        head = f"The following are multiple choice questions (with answers) about {subject_name}.\n\n"
    else:
        head = f"以下是中国关于{subject_name}考试的单项选择题，请选出其中的正确答案。\n\n"
    return head + "".join(format_question(benchmark, s, True) for s in shots) + format_question(benchmark, q, False)


def chat_wrap(prompt: str) -> str:
    """The question as one MOSS chat turn (for SFT models scored by generation)."""
    from moss_jax.inference.prompt import IDENTITY, Turn, render_turn

    return IDENTITY + render_turn(Turn(human=prompt), tools=False)


def continuation(benchmark: str, letter: str) -> str:
    return f" {letter}" if benchmark == "mmlu" else letter


_ANSWER_PATTERNS = (
    r"答案(?:是|为|选)?\s*[:：]?\s*[\(（]?([ABCD])",
    r"[Aa]nswer(?: is)?\s*[:：]?\s*\(?([ABCD])\b",
    r"^\s*\(?([ABCD])(?:[\.\)）:：、\s]|$)",
    r"(?:选项?|选择)\s*([ABCD])",
    r"([ABCD])\s*(?:是正确|正确|is correct)",
    r"(?<![A-Za-z])([ABCD])(?![A-Za-z])",
)


def extract_answer(text: str) -> str | None:
    """The letter a generated reply picks (C-Eval-style patterns, then the first lone letter)."""
    for pattern in _ANSWER_PATTERNS:
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return None


# Evaluation -------------------------------------------------------------------------------


def _picks(model: EvalModel, data: Dataset, subject: str, questions, method: str, chat: bool, max_new_tokens: int):
    """The letter the model picks for each question (None: a generated reply named no letter)."""
    prompts = [build_prompt(data.benchmark, data.names[subject], data.shots[subject], q) for q in questions]
    if chat:
        prompts = [chat_wrap(p) for p in prompts]
    letter_ids = [model.encode(continuation(data.benchmark, letter)) for letter in LETTERS]
    if method == "loglikelihood" and all(len(ids) == 1 for ids in letter_ids):
        # Every choice is one token: one forward pass per question reads all four.
        ll = model.next_token_logprobs([model.encode(p) for p in prompts], [ids[0] for ids in letter_ids])
        return [LETTERS[int(np.argmax(row))] for row in ll]
    if method == "loglikelihood":
        requests = [(model.encode(p), ids) for p in prompts for ids in letter_ids]
        ll = [score for score, _ in model.loglikelihood(requests)]
        return [LETTERS[max(range(4), key=lambda j, i=i: ll[4 * i + j])] for i in range(len(prompts))]
    if method == "generate":
        return [extract_answer(t) for t in model.generate(prompts, max_new_tokens, stop_strings=["\n\n"])]
    raise EvalError(f"unknown multiple-choice method {method!r}: 'loglikelihood' or 'generate'")


def evaluate(
    model: EvalModel,
    data: Dataset,
    *,
    method: str = "loglikelihood",
    chat: bool = False,
    max_new_tokens: int = 16,
    limit: int | None = None,
) -> dict:
    """Per-subject and average accuracy.

    Args:
      method: "loglikelihood" picks the letter whose continuation is most likely;
        "generate" decodes greedily and extracts the letter (how the C-Eval authors scored
        chat models such as moss-moon-003-sft); an answer it cannot find counts as wrong.
      chat: wrap each prompt in one MOSS chat turn.
      limit: at most this many questions per subject.
    """
    per_subject, unparsed = {}, 0
    for subject, questions in data.questions.items():
        questions = questions[:limit] if limit else questions
        hidden = [q.source for q in questions if q.answer is None]
        if hidden:
            raise EvalError(f"{hidden[0]}: no answer to score against (use predict() for a submission)")
        picks = _picks(model, data, subject, questions, method, chat, max_new_tokens)
        unparsed += sum(p is None for p in picks)
        correct = sum(p == q.answer for p, q in zip(picks, questions, strict=True))
        per_subject[subject] = {"accuracy": correct / len(questions), "correct": correct, "total": len(questions)}
    report = {
        "benchmark": data.benchmark,
        "method": method,
        "shots": max((len(s) for s in data.shots.values()), default=0),
        "chat": chat,
        "subjects": per_subject,
        "average": sum(v["accuracy"] for v in per_subject.values()) / len(per_subject),  # over subjects
        "micro_average": sum(v["correct"] for v in per_subject.values())
        / sum(v["total"] for v in per_subject.values()),  # over questions
    }
    # The headline: MMLU's reference script (hendrycks/test evaluate.py) averages over questions;
    # for C-Eval we report the mean over subjects, the per-subject table's natural summary.
    report["accuracy_over"] = "questions" if data.benchmark == "mmlu" else "subjects"
    report["accuracy"] = report["micro_average"] if data.benchmark == "mmlu" else report["average"]
    if method == "generate":
        report["unparsed"] = unparsed
    hard = [s for s in per_subject if s in CEVAL_HARD]
    if data.benchmark == "ceval" and hard:
        report["hard_average"] = sum(per_subject[s]["accuracy"] for s in hard) / len(hard)
    if data.categories:
        cats: dict[str, list[float]] = {}
        for s, v in per_subject.items():
            if s in data.categories:
                cats.setdefault(data.categories[s], []).append(v["accuracy"])
        report["categories"] = {c: sum(a) / len(a) for c, a in sorted(cats.items())}
    return report


def predict(
    model: EvalModel,
    data: Dataset,
    *,
    method: str = "loglikelihood",
    chat: bool = False,
    max_new_tokens: int = 16,
    limit: int | None = None,
) -> dict[str, dict[str, str]]:
    """{subject: {question id: letter}}: the C-Eval server's submission format (an unparsed
    generated reply gives "")."""
    out = {}
    for subject, questions in data.questions.items():
        questions = questions[:limit] if limit else questions
        picks = _picks(model, data, subject, questions, method, chat, max_new_tokens)
        out[subject] = {q.qid: p or "" for q, p in zip(questions, picks, strict=True)}
    return out
