"""Embedded alignment demo data, correct by construction: every tool answer comes from the real tool.

Conversations (moss-003-sft-data layout, plugin format with inner thoughts) in English and
Chinese, mixing four kinds of turn:

- `calculate`: an arithmetic question; the command is `Calculate("<the expression>")`, the
  result is what `moss_jax.tools` returns for it, and the reply states that value;
- `solve`: a linear equation; `Solve("<the equation>")`, the reply states the solver's root;
- `search`: a look-up; `Search("<topic>")` over a BM25 index of the embedded corpus, the reply
  quotes the first snippet and cites it as `<sup><|1|></sup>`;
- `chat`: greetings, identity and thanks, with `None` commands.

Preference pairs share a context that ends after a tool turn's results and differ in the final
reply: the correct one (chosen) against a plausible wrong one (rejected) of one of three kinds:
`wrong_number` (a value that differs from the tool's), `skipped_tool` (a reply that ignores the
tool result) or `wrong_format` (no citation for a search answer; the wrong language otherwise).

Everything is deterministic for a seed. The meta instruction is the one the chat prompt builder
writes for the same tool registry (`moss_jax.inference.prompt.meta_instruction`), so a model
trained on these files sees at inference exactly the prompt format it was trained on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from data_pipelines import specials as sp
from data_pipelines.jsonl import write_text_atomic
from moss_jax.tools.commands import parse_commands

KINDS = ("calculate", "solve", "search", "chat")
REJECTION_KINDS = ("wrong_number", "skipped_tool", "wrong_format")

# Search topics are words of the embedded corpus (English: Python's documentation; Chinese: the
# People's Daily corpus), hundreds of them, so a model must copy the topic from the question rather
# than memorise a short list. Held-out questions use topics never seen in training.
STOPWORDS_EN = frozenset("about above after again against because before being below between could doing during "
                         "further having other should their there these those through under until where which "
                         "while would yours itself".split())  # fmt: skip


def corpus_topics(english: Sequence[str], chinese: Sequence[str], n: int, seed: int) -> tuple[list[str], list[str]]:
    """`n` English and `n` Chinese topic words from the corpus (neither rare nor very common)."""
    import collections

    import jieba

    jieba.setLogLevel(60)
    df_en, df_zh = collections.Counter(), collections.Counter()
    for doc in english:
        df_en.update({w.lower() for w in re.findall(r"\b[a-zA-Z]{5,12}\b", doc)})
    for doc in chinese[:6000]:
        df_zh.update({w for w in jieba.cut(doc) if re.fullmatch(r"[\u4e00-\u9fff]{2,4}", w)})
    rng = random.Random(seed)

    def pick(df, lo, hi):
        pool = sorted(w for w, c in df.items() if lo <= c <= hi)
        return rng.sample(pool, k=min(n, len(pool)))

    en = [w for w in pick(df_en, 5, 60) if w not in STOPWORDS_EN]
    return en, pick(df_zh, 8, 200)


CALC_Q_EN = ("What is {e}?", "Please calculate {e}.", "Can you compute {e} for me?", "How much is {e}?")
CALC_Q_ZH = ("{e} 等于多少？", "请帮我计算 {e}。", "算一下 {e}。")
SOLVE_Q_EN = ("Solve the equation {e}.", "Find x if {e}.", "What is x in {e}?")
SOLVE_Q_ZH = ("解方程 {e}。", "求解方程 {e} 中的 x。")
SEARCH_Q_EN = ("Search for information about {e}.", "What can you find about {e}?", "Tell me about {e}.")
SEARCH_Q_ZH = ("帮我搜索一下{e}。", "查一查关于{e}的资料。")
# Thoughts restate what the tool gets (as MOSS's plugin data often does).
THOUGHTS = {
    ("calculate", "en"): "The human wants the value of {e}, so I should use the calculator.",
    ("calculate", "zh"): "用户需要计算 {e}，我应该使用计算器。",
    ("solve", "en"): "The human wants x in {e}, so I should use the equation solver.",
    ("solve", "zh"): "用户要解方程 {e}，我应该使用方程求解器。",
    ("search", "en"): "The human asks about {e}, so I should search for it.",
    ("search", "zh"): "用户想了解{e}，我应该搜索一下。",
    ("chat", "en"): "No tool is needed for this.",
    ("chat", "zh"): "这个问题不需要使用工具。",
}
CHAT_EN = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi, who are you?", "I am MOSS, an AI assistant. I can search, calculate and solve equations."),
    ("Thank you!", "You are welcome!"),
    ("Good morning.", "Good morning! What can I do for you?"),
    ("Can you help me?", "Of course. Please tell me what you need."),
    ("Goodbye.", "Goodbye! Have a nice day."),
)
CHAT_ZH = (
    ("你好！", "你好！有什么可以帮你的吗？"),
    ("你是谁？", "我是 MOSS，一个人工智能助手。我可以搜索、计算和解方程。"),
    ("谢谢你！", "不客气！"),
    ("早上好。", "早上好！有什么需要帮忙的吗？"),
    ("你能帮我吗？", "当然可以，请告诉我你需要什么。"),
    ("再见。", "再见！祝你愉快。"),
)
SKIPPED = {
    ("calculate", "en"): "Sorry, I am not able to calculate that.",
    ("calculate", "zh"): "抱歉，我无法计算这个算式。",
    ("solve", "en"): "Sorry, I cannot solve this equation.",
    ("solve", "zh"): "抱歉，我无法求解这个方程。",
    ("search", "en"): "Sorry, I could not find anything about it.",
    ("search", "zh"): "抱歉，我没有找到相关信息。",
}
CITE = "<sup><|1|></sup>"
# Training pairs hold four times as many wrong numbers as each other kind: telling a wrong number
# from the tool's needs a digit-by-digit comparison, the hardest of the three for a small
# preference model (docs/alignment.md: weight 2 gave 0.61 on held-out wrong numbers, 4 gave 0.65).
# Held-out pairs keep equal weights, so the measured accuracy is over the natural mix.
TRAIN_REJECTION_WEIGHTS = {"wrong_number": 4.0}


@dataclasses.dataclass(frozen=True)
class DemoTurn:
    """One generated turn: the fields of the SFT record plus what the evaluation needs."""

    kind: str
    lang: str
    human: str
    thoughts: str
    commands: str  # "None" or the canonical command text
    results: str  # the <|Results|> body ("None" when no tool ran)
    moss: str
    value: str | None = None  # the answer's key value (number or quoted snippet)

    def fields(self, with_moss: bool = True) -> dict[str, str]:
        """The turn as moss-003-sft-data fields (markers and end tokens included)."""
        out = {
            "Human": f"{sp.ROLE_HUMAN}: {self.human}{sp.END_OF_HUMAN}\n",
            "Inner Thoughts": f"{sp.ROLE_THOUGHTS}: {self.thoughts}{sp.END_OF_THOUGHTS}\n",
            "Commands": f"{sp.ROLE_COMMANDS}: {self.commands}{sp.END_OF_COMMANDS}\n",
            "Tool Responses": (
                f"{sp.ROLE_RESULTS}: None{sp.END_OF_RESULTS}\n"
                if self.results == "None"
                else f"{sp.ROLE_RESULTS}:\n{self.results}\n{sp.END_OF_RESULTS}\n"
            ),
        }
        if with_moss:
            out["MOSS"] = moss_field(self.moss)
        return out


def moss_field(reply: str) -> str:
    return f"{sp.ROLE_MOSS}: {reply}{sp.END_OF_MOSS}\n"


class ToolRunner:
    """Runs commands through the real tool registry, caching results (solving is a subprocess)."""

    def __init__(self, registry: Any):
        self.registry = registry
        self._cache: dict[str, str] = {}

    def prefetch(self, commands: Sequence[str], workers: int = 2, retries: int = 2) -> list[str]:
        """Runs the commands in parallel; returns those that still gave no result after retries
        (a solver worker can miss its deadline on a loaded machine). Failures are not cached."""
        todo = sorted(set(commands) - set(self._cache))
        # Equations go to one solver worker together (a worker start-up each would dominate).
        solve_args = [c.argument for cmd in todo for c in parse_commands(cmd) if c.name == "Solve"]
        if solve_args:
            self.registry.presolve(solve_args)
        for _ in range(retries + 1):
            if not todo:
                break
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(lambda c: self.registry.execute(c).text, todo))
            failed = []
            for cmd, res in zip(todo, results, strict=True):
                if "No result." in res:
                    failed.append(cmd)
                else:
                    self._cache[cmd] = res
            todo, workers = failed, 1
        return todo

    def __call__(self, command: str) -> str:
        if command not in self._cache:
            self._cache[command] = self.registry.execute(command).text
        return self._cache[command]


def _calc_expression(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(1, 99)
    form = rng.randrange(4)
    if form == 0:
        return f"{a}*{b}+{c}"
    if form == 1:
        return f"{a}+{b}*{c}"
    if form == 2:
        return f"({a}+{b})*{rng.randint(2, 9)}"
    return f"{a * b}/{b}-{c}" if rng.random() < 0.5 else f"{a}*{b}-{c}"


def _solve_equation(rng: random.Random) -> str:
    a, x, b = rng.randint(2, 12), rng.randint(-20, 30), rng.randint(1, 50)
    return f"{a}*x+{b}={a * x + b}"


def _result_value(kind: str, results: str) -> str:
    """The value a correct reply states, parsed from the tool's own result text."""
    if kind == "calculate":
        m = re.search(r"=> '([^']*)'", results)
        if not m or m.group(1) == "No result.":
            raise ValueError(f"calculator gave no value: {results!r}")
        v = m.group(1)
        return v[:-2] if v.endswith(".0") else v
    if kind == "solve":
        m = re.search(r"x = (-?\d+)(?:\.0+)?$", results, re.M)
        if not m:
            raise ValueError(f"solver gave no integer root: {results!r}")
        return m.group(1)
    raise ValueError(kind)


def _first_sentence(snippet_line: str, limit: int = 80) -> str:
    text = re.sub(r"^<\|1\|>: ", "", snippet_line).strip("'\"")
    text = re.split(r"(?<=[。！？])|(?<=[.!?])\s", text)[0]
    return text[:limit].strip()


def _wrong_number(value: str, rng: random.Random) -> str:
    v = int(float(value)) if re.fullmatch(r"-?\d+(\.0+)?", value) else None
    if v is None:
        return value + "1"
    delta = rng.choice([-10, -2, -1, 1, 2, 10, 100])
    return str(v + delta)


def _reply(kind: str, lang: str, value: str) -> str:
    if kind == "calculate":
        return f"The result is {value}." if lang == "en" else f"计算结果是 {value}。"
    if kind == "solve":
        return f"The solution is x = {value}." if lang == "en" else f"方程的解是 x = {value}。"
    if kind == "search":
        return f"According to the search results, {value}{CITE}" if lang == "en" else f"根据搜索结果，{value}{CITE}"
    raise ValueError(kind)


class DemoGenerator:
    """Draws turns, conversations and preference pairs (deterministic per seed).

    Args:
      run_tool: command text -> `<|Results|>` body (a `ToolRunner` over `moss_jax.tools`).
      meta_instruction: the meta instruction every record carries.
      search_topics: (english, chinese) topics that the search backend answers.
      equations: the pool of equations to ask about (solving is a subprocess per equation, so the
        pool is drawn and solved up front, in parallel).
      held_out: draw from the held-out quarter of the topics and equations.
      rejection_weights: relative frequency of each rejection kind in pairs (default: equal).
    """

    def __init__(
        self,
        run_tool: Callable[[str], str],
        meta_instruction: str,
        search_topics: tuple[Sequence[str], Sequence[str]],
        equations: Sequence[str],
        seed: int,
        held_out: bool = False,
        lang_zh: float = 0.4,
        rejection_weights: dict[str, float] | None = None,
    ):
        self.run_tool, self.meta, self.rng, self.lang_zh = run_tool, meta_instruction, random.Random(seed), lang_zh
        unknown = set(rejection_weights or {}) - set(REJECTION_KINDS)
        if unknown:
            raise ValueError(f"rejection_weights: unknown kinds {sorted(unknown)}; known: {REJECTION_KINDS}")
        self.rejection_weights = dict(rejection_weights or {})
        # Every 4th topic is held out: held-out questions ask about topics never seen in training.
        self.topics = {
            lang: [t for i, t in enumerate(topics) if (i % 4 == 3) == held_out]
            for lang, topics in zip(("en", "zh"), search_topics, strict=True)
        }
        self.equations = [e for i, e in enumerate(equations) if (i % 4 == 3) == held_out]

    def question(self, kind: str, lang: str) -> tuple[str, str, str]:
        """(human text, inner thoughts, command text) for a tool kind."""
        rng = self.rng
        if kind == "calculate":
            e, templates, command = _calc_expression(rng), (CALC_Q_EN, CALC_Q_ZH), "Calculate"
        elif kind == "solve":
            e, templates, command = rng.choice(self.equations), (SOLVE_Q_EN, SOLVE_Q_ZH), "Solve"
        elif kind == "search":
            e, templates, command = rng.choice(self.topics[lang]), (SEARCH_Q_EN, SEARCH_Q_ZH), "Search"
        else:
            raise ValueError(f"not a tool kind: {kind!r}")
        human = rng.choice(templates[0] if lang == "en" else templates[1]).format(e=e)
        return human, THOUGHTS[(kind, lang)].format(e=e), f'{command}("{e}")'

    def turn(self, kind: str | None = None, lang: str | None = None) -> DemoTurn:
        rng = self.rng
        kind = kind or rng.choices(KINDS, weights=(4, 2, 3, 1))[0]
        lang = lang or ("zh" if rng.random() < self.lang_zh else "en")
        if kind == "chat":
            human, reply = rng.choice(CHAT_EN if lang == "en" else CHAT_ZH)
            return DemoTurn(kind, lang, human, THOUGHTS[(kind, lang)], "None", "None", reply)
        human, thoughts, command = self.question(kind, lang)
        results = self.run_tool(command)
        if kind == "search":
            first = results.split("\n")[1] if "\n" in results else ""
            if not first.startswith("<|1|>"):
                raise ValueError(f"search for {command} returned nothing; choose topics the index answers")
            value = _first_sentence(first)
        else:
            value = _result_value(kind, results)
        return DemoTurn(kind, lang, human, thoughts, command, results, _reply(kind, lang, value), value)

    def conversation(self, cid: str, max_turns: int = 2) -> dict:
        turns = [self.turn() for _ in range(self.rng.randint(1, max_turns))]
        return self.record(cid, turns)

    def record(self, cid: str, turns: Sequence[DemoTurn]) -> dict:
        chat = {f"turn_{i}": t.fields() for i, t in enumerate(turns, 1)}
        return {
            "conversation_id": cid,
            "meta_instruction": self.meta,
            "num_turns": len(turns),
            "chat": chat,
            "category": "demo_" + "+".join(t.kind for t in turns),
        }

    def rejected_reply(self, turn: DemoTurn) -> tuple[str, str]:
        """(rejection kind, a plausible wrong reply) for a tool turn."""
        rng = self.rng
        options = ["skipped_tool", "wrong_format"] + (["wrong_number"] if turn.kind != "search" else [])
        kind = rng.choices(options, weights=[self.rejection_weights.get(k, 1.0) for k in options])[0]
        if kind == "skipped_tool":
            return kind, SKIPPED[(turn.kind, turn.lang)]
        if kind == "wrong_number":
            return kind, _reply(turn.kind, turn.lang, _wrong_number(turn.value, rng))
        if turn.kind == "search":  # wrong format: the quote without its citation
            return kind, turn.moss[: -len(CITE)]
        other = "zh" if turn.lang == "en" else "en"  # wrong format: the other language
        return kind, _reply(turn.kind, other, turn.value)

    def pair(self, cid: str, history_rate: float = 0.0) -> dict:
        """A preference pair: an optional earlier turn (with probability `history_rate`), then a
        tool turn whose reply differs."""
        history = [self.turn()] if self.rng.random() < history_rate else []
        last = self.turn(kind=self.rng.choice(("calculate", "calculate", "solve", "search")))
        rejection, rejected = self.rejected_reply(last)
        record = self.record(cid, history + [last])
        record["chat"][f"turn_{len(history) + 1}"] = last.fields(with_moss=False)
        record.update(
            chosen=moss_field(last.moss),
            rejected=moss_field(rejected),
            rejection_kind=rejection,
            category=f"demo_pair_{last.kind}",
        )
        return record


def pair_conversations(pair: dict) -> list[dict]:
    """The two full conversations of a pair (chosen and rejected), for preference-aware training."""
    out = []
    for side in ("chosen", "rejected"):
        rec = {k: v for k, v in pair.items() if k not in ("chosen", "rejected", "rejection_kind")}
        chat = {k: dict(v) for k, v in pair["chat"].items()}
        chat[f"turn_{len(chat)}"]["MOSS"] = pair[side]
        rec.update(conversation_id=f"{pair['conversation_id']}-{side}", chat=chat, quality_source=side)
        out.append(rec)
    return out


def available_topics(search: Callable[[str], str], topics: Sequence[str]) -> list[str]:
    """The topics for which the search backend returns at least one snippet."""
    return [t for t in topics if "<|1|>" in search(f'Search("{t}")')]


def write_jsonl(path: str | os.PathLike, records: Sequence[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@dataclasses.dataclass(frozen=True)
class DemoDataSizes:
    sft_train: int = 1500
    sft_heldout: int = 100
    pairs_train: int = 1200
    pairs_heldout: int = 200
    tool_questions: int = 100
    equations: int = 400
    topics: int = 400


def tool_questions(gen: DemoGenerator, n: int) -> list[dict]:
    """Held-out single-turn tool questions with the exact command a correct model emits, each
    with the meta instruction the demo trained on (moss_jax.eval.tool_use puts it in the prompt;
    without it the prompt would carry MOSS's long default one, which the demo model never saw)."""
    out = []
    for i in range(n):
        kind = ("calculate", "solve", "search")[i % 3]
        lang = "zh" if gen.rng.random() < gen.lang_zh else "en"
        human, _, command = gen.question(kind, lang)
        out.append(
            {
                "id": f"q{i}",
                "kind": kind,
                "lang": lang,
                "human": human,
                "command": command,
                "meta_instruction": gen.meta,
            }
        )
    return out


def build_demo_data(
    out_dir: str | os.PathLike,
    registry: Any,
    meta_instruction: str,
    corpus: dict[str, Sequence[str]],
    sizes: DemoDataSizes = DemoDataSizes(),
    seed: int = 0,
) -> dict[str, int]:
    """Writes sft_{train,heldout}.jsonl, pairs_{train,heldout}.jsonl and tool_questions.jsonl.

    `corpus` (data_pipelines.corpus.read_corpus) gives the search topics. Returns counts per
    file. Files are written atomically; existing ones are replaced.
    """
    runner = ToolRunner(registry)
    en, zh = corpus_topics(corpus["en"], corpus["zh"], sizes.topics, seed)
    topics = (available_topics(runner, en), available_topics(runner, zh))
    if len(topics[0]) < 8 or len(topics[1]) < 8:
        raise ValueError(f"the search backend answers too few demo topics: {topics}")
    # Solving runs one subprocess per equation: draw the equations first, solve them in parallel.
    draft = random.Random(seed + 99)
    equations = sorted({_solve_equation(draft) for _ in range(sizes.equations)})
    failed = runner.prefetch([f'Solve("{e}")' for e in equations])
    if failed:
        print(f"[demo data] {len(failed)} of {len(equations)} equations gave no solver result; left out: {failed}")
        equations = [e for e in equations if f'Solve("{e}")' not in failed]
    counts_failed = len(failed)
    out_dir = Path(out_dir)
    counts = {}
    train = DemoGenerator(
        runner, meta_instruction, topics, equations, seed=seed, rejection_weights=TRAIN_REJECTION_WEIGHTS
    )
    held = DemoGenerator(runner, meta_instruction, topics, equations, seed=seed + 1, held_out=True)
    for name, gen, n, make in (
        ("sft_train", train, sizes.sft_train, lambda g, i: g.conversation(f"sft-{i}")),
        ("sft_heldout", held, sizes.sft_heldout, lambda g, i: g.conversation(f"sft-heldout-{i}")),
        ("pairs_train", train, sizes.pairs_train, lambda g, i: g.pair(f"pair-{i}")),
        ("pairs_heldout", held, sizes.pairs_heldout, lambda g, i: g.pair(f"pair-heldout-{i}")),
    ):
        records = [make(gen, i) for i in range(n)]
        write_jsonl(out_dir / f"{name}.jsonl", records)
        counts[name] = len(records)
    questions = tool_questions(held, sizes.tool_questions)
    write_jsonl(out_dir / "tool_questions.jsonl", questions)
    counts["tool_questions"] = len(questions)
    counts["equations_left_out"] = counts_failed
    counts["search_topics"] = len(topics[0]) + len(topics[1])
    return counts
