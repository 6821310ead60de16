"""Every analysis notebook runs top to bottom on tiny artifacts this test makes; figures are saved."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")

from data_pipelines import corpus as corpus_lib  # noqa: E402
from data_pipelines.vocab import train_sentencepiece  # noqa: E402
from moss_jax.config import get_config  # noqa: E402
from moss_jax.convert.checkpoint_io import save_params  # noqa: E402
from moss_jax.eval import bits_per_byte as bpb  # noqa: E402
from moss_jax.eval.notebooks import NotebookError, execute_notebook  # noqa: E402
from moss_jax.inference.tokenizer import load_tokenizer  # noqa: E402
from moss_jax.model import init_params  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    docs = corpus_lib.gather(max_chars=60_000)
    sp = train_sentencepiece(docs["en"] + docs["code"], root / "sp", vocab_size=1024)
    config = get_config("debug", vocab_size=1024, max_len=128)
    ckpt = save_params(root / "ckpt", init_params(config, jax.random.key(0)), config)
    texts = root / "texts"
    texts.mkdir()
    (texts / "en.jsonl").write_text(json.dumps({"text": docs["en"][0][:400]}) + "\n")
    (texts / "zh.jsonl").write_text(json.dumps({"text": "今天天气很好，我们去公园散步，然后回家吃饭。"}) + "\n")
    (texts / "code.jsonl").write_text(json.dumps({"text": docs["code"][0][:400]}) + "\n")
    return {"root": root, "sp": sp, "ckpt": ckpt, "config": config, "texts": texts}


def outputs(executed: Path) -> list[dict]:
    nb = json.loads(executed.read_text())
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def last_json(executed: Path) -> dict:
    lines = [line for o in outputs(executed) if o.get("name") == "stdout" for line in "".join(o["text"]).splitlines()]
    return json.loads([line for line in lines if line.startswith("{")][-1])


def run(name, out_dir, **params):
    executed, figures = execute_notebook(NOTEBOOKS / name, out_dir, params, timeout=240)
    assert not [o for o in outputs(executed) if o.get("output_type") == "error"]
    assert figures and all(f.stat().st_size > 1000 and f.read_bytes()[:4] == b"\x89PNG" for f in figures)
    return executed, figures


def test_training_curves(tmp_path):
    for name, final in (("run_a", 3.0), ("run_b", 4.0)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        with open(run_dir / "metrics.jsonl", "w") as f:  # the trainer's format
            for step in range(1, 41):
                loss = final + 6.0 * math.exp(-step / 8)
                m = {
                    "loss": loss,
                    "z_loss": 0.0,
                    "grad_norm": 1.0 / step,
                    "param_norm": 10.0,
                    "learning_rate": 1e-3,
                    "loss_weight": 512.0,
                    "step": step,
                    "tokens_per_s": 3000.0 + step,
                }
                f.write(json.dumps(m) + "\n")
    executed, figures = run(
        "training_curves.ipynb", tmp_path / "out", run_dirs=[str(tmp_path / "run_a"), str(tmp_path / "run_b")]
    )
    summary = last_json(executed)
    assert summary["run_a"]["steps"] == 40 and summary["run_b"]["last_loss"] == pytest.approx(4.0 + 6 * math.exp(-5))
    assert len(figures) == 1


def test_loss_by_language(tmp_path, artifacts):
    executed, figures = run(
        "loss_by_language.ipynb",
        tmp_path / "out",
        checkpoint=str(artifacts["ckpt"]),
        tokenizer=str(artifacts["sp"]),
        text_dir=str(artifacts["texts"]),
        max_positions=64,
    )
    report = last_json(executed)  # the notebook's bits-per-byte report
    texts = bpb.read_texts(artifacts["texts"])
    for lang in ("en", "zh", "code"):
        assert report[lang]["bytes"] == len(texts[lang][0].encode("utf-8")) and report[lang]["documents"] == 1
        # A random model over 1024 entries: about log2(1024) = 10 bits per token.
        assert 8 < report[lang]["bits_per_byte"] * report[lang]["bytes_per_token"] < 12
    assert len(figures) == 2


def test_attention_maps(tmp_path, artifacts):
    text = "def add(a, b):\n    return a + b\n"
    executed, figures = run(
        "attention_maps.ipynb",
        tmp_path / "out",
        checkpoint=str(artifacts["ckpt"]),
        tokenizer=str(artifacts["sp"]),
        text=text,
        layer=1,
    )
    n = len(load_tokenizer(artifacts["sp"]).encode(text))
    # Freshly initialised weights (std 0.02) attend almost uniformly over the causal prefix, whose
    # mean distance is (n - 1) / 4; tests/eval/test_analysis.py checks the weights themselves.
    distances = last_json(executed)["mean_attention_distance"]
    assert len(distances) == artifacts["config"].n_heads
    np.testing.assert_allclose(distances, (n - 1) / 4, rtol=0.05)
    assert len(figures) == 1


@pytest.mark.parametrize(
    "by_tag, monotone",
    # Tied scores do not rise: the notebook and the demo report (monotone_by_tag) agree on strict.
    [([-0.5, 0.1, 0.7], True), ([0.1, 0.1, 0.7], False)],
)
def test_preference_scores(tmp_path, by_tag, monotone):
    rng = np.random.default_rng(0)
    with open(tmp_path / "scores.jsonl", "w") as f:
        for split in ("train", "heldout"):
            for tag in range(3):
                for score in rng.normal(tag, 0.3, size=20):
                    f.write(json.dumps({"score": float(score), "tag": tag, "split": split}) + "\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"pm_score_by_tag": by_tag}))
    executed, figures = run(
        "preference_scores.ipynb",
        tmp_path / "out",
        scores_path=str(tmp_path / "scores.jsonl"),
        report_metrics=str(tmp_path / "metrics.json"),
    )
    assert last_json(executed) == {"pm_score_by_tag": by_tag, "monotone": monotone}
    assert len(figures) == 2


def test_bad_parameters_and_failing_cells(tmp_path):
    with pytest.raises(NotebookError, match=r"unknown parameter\(s\) \['run_dir'\]"):
        execute_notebook(NOTEBOOKS / "training_curves.ipynb", tmp_path, {"run_dir": "x"})
    with pytest.raises(NotebookError, match=r"(?s)a cell failed.*EvalError: .*none/metrics.jsonl does not exist"):
        execute_notebook(NOTEBOOKS / "training_curves.ipynb", tmp_path, {"run_dirs": [str(tmp_path / "none")]})
