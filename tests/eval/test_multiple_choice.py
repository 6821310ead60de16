"""Multiple choice: designed logits give known accuracies; the public layouts are read, wrong ones refused."""

import csv
import json

import flax
import jax
import numpy as np
import pytest

from moss_jax.eval import multiple_choice as mc
from moss_jax.eval.lm import EvalError, EvalModel

from .conftest import ByteTokenizer, unigram_model

# answers per subject: astronomy 3 of 5 are B; virology 1 of 4 is B
ANSWERS = {"astronomy": "BBBAC", "virology": "ABCD"}
DEV = "ABCDA"
# Shared across tests so each compiles once per length bucket.
PREFERS_B, PREFERS_D = unigram_model("B"), unigram_model("D")


def _rows(subject, answers):
    return [[f"{subject} question {i}?", "one", "two", "three", "four", a] for i, a in enumerate(answers)]


def write_mmlu(root, split="test"):
    for sp, answers in ((split, ANSWERS), ("dev", {s: DEV for s in ANSWERS})):
        (root / "data" / sp).mkdir(parents=True, exist_ok=True)
        for subject, ans in answers.items():
            with open(root / "data" / sp / f"{subject}_{sp}.csv", "w", newline="") as f:
                csv.writer(f).writerows(_rows(subject, ans))
    return root


def write_ceval(root):
    for sp, answers in (("val", ANSWERS), ("dev", {s: DEV for s in ANSWERS})):
        (root / sp).mkdir(parents=True, exist_ok=True)
        for subject, ans in answers.items():
            with open(root / sp / f"{subject}_{sp}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", "question", "A", "B", "C", "D", "answer"] + (["explanation"] if sp == "dev" else []))
                for i, row in enumerate(_rows(subject, ans)):
                    w.writerow([i, *row] + (["因为"] if sp == "dev" else []))
    (root / "subject_mapping.json").write_text(
        json.dumps({"astronomy": ["Astronomy", "天文学", "STEM"], "virology": ["Virology", "病毒学", "Other"]})
    )
    return root


@pytest.mark.parametrize("benchmark", ["mmlu", "ceval"])
@pytest.mark.parametrize("shots", [0, 2])
def test_designed_logits_give_the_known_accuracy(tmp_path, benchmark, shots):
    root = write_mmlu(tmp_path) if benchmark == "mmlu" else write_ceval(tmp_path)
    data = mc.load_dataset(benchmark, root, shots=shots)
    report = mc.evaluate(PREFERS_B, data)  # always prefers the letter B
    assert report["subjects"]["astronomy"] == {"accuracy": 0.6, "correct": 3, "total": 5}
    assert report["subjects"]["virology"] == {"accuracy": 0.25, "correct": 1, "total": 4}
    assert report["average"] == pytest.approx((0.6 + 0.25) / 2)
    assert report["micro_average"] == pytest.approx(4 / 9)
    # MMLU's published figures average over questions (hendrycks/test evaluate.py).
    assert report["accuracy"] == (report["micro_average"] if benchmark == "mmlu" else report["average"])
    assert report["accuracy_over"] == ("questions" if benchmark == "mmlu" else "subjects")
    assert report["shots"] == shots
    assert mc.evaluate(PREFERS_D, data)["micro_average"] == pytest.approx(1 / 9)
    if benchmark == "ceval":
        assert report["categories"] == {"Other": 0.25, "STEM": 0.6}


def test_prompts_follow_the_benchmark_formats(tmp_path):
    data = mc.load_dataset("ceval", write_ceval(tmp_path), shots=1)
    q = data.questions["astronomy"][0]
    prompt = mc.build_prompt("ceval", data.names["astronomy"], data.shots["astronomy"], q)
    assert prompt == (
        "以下是中国关于天文学考试的单项选择题，请选出其中的正确答案。\n\n"
        "astronomy question 0?\nA. one\nB. two\nC. three\nD. four\n答案：A\n\n"
        "astronomy question 0?\nA. one\nB. two\nC. three\nD. four\n答案："
    )
    mmlu = mc.build_prompt("mmlu", "high school physics", [], q)
    assert mmlu.startswith("The following are multiple choice questions (with answers) about high school physics.\n\n")
    assert mmlu.endswith("D. four\nAnswer:")


def test_by_generation_extracts_the_letter(tmp_path):
    data = mc.load_dataset("ceval", write_ceval(tmp_path))
    replies = iter(["答案：B", "B. two", "I think the answer is (B).", "选项B正确", "no idea"] + ["B"] * 4)
    model = unigram_model("x", generate_fn=lambda ids, n, stops, **kw: [next(replies) for _ in ids])
    report = mc.evaluate(model, data, method="generate")
    assert report["subjects"]["astronomy"]["correct"] == 3  # 4 B picks (3 right), "no idea" wrong
    assert report["unparsed"] == 1
    assert report["micro_average"] == pytest.approx(4 / 9)
    for text, letter in [("答案是 C。", "C"), ("(D)", "D"), ("Answer: A", "A"), ("ABCD", None), ("", None)]:
        assert mc.extract_answer(text) == letter, text


def test_a_real_moss_model_with_designed_weights(tmp_path, byte_debug_model):
    """All weights zero but the head bias: the logits are the bias at every position."""
    config, params = byte_debug_model
    params = jax.tree.map(np.zeros_like, params)
    params = flax.core.unfreeze(params)
    params["lm_head_bias"] = np.zeros(config.vocab_size, np.float32)
    params["lm_head_bias"][ord("C")] = 4.0
    model = EvalModel.from_params(config, params, ByteTokenizer(), start_id=256, batch_size=4)
    report = mc.evaluate(model, mc.load_dataset("mmlu", write_mmlu(tmp_path), shots=1))
    assert report["subjects"]["astronomy"]["correct"] == 1 and report["subjects"]["virology"]["correct"] == 1


def test_wrong_layouts_are_named(tmp_path):
    write_mmlu(tmp_path / "mmlu")
    write_ceval(tmp_path / "ceval")
    with pytest.raises(EvalError, match=r"no 'val' folder.*header row"):
        mc.load_dataset("ceval", tmp_path / "mmlu")  # MMLU folder given as C-Eval
    with pytest.raises(EvalError, match=r"astronomy_val.csv:1: expected 6 columns.*C-Eval layout"):
        mc.load_dataset("mmlu", tmp_path / "ceval", split="val")
    with pytest.raises(EvalError, match="does not exist"):
        mc.load_dataset("mmlu", tmp_path / "nowhere")
    bad = tmp_path / "mmlu" / "data" / "test" / "virology_test.csv"
    bad.write_text(bad.read_text().replace(",D\n", ",E\n", 1))
    with pytest.raises(EvalError, match=r"virology_test.csv:4: answer 'E'"):
        mc.load_dataset("mmlu", tmp_path / "mmlu")
    hidden = tmp_path / "ceval" / "test"
    hidden.mkdir()
    (hidden / "astronomy_test.csv").write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n")
    with pytest.raises(EvalError, match="test answers are hidden"):
        mc.load_dataset("ceval", tmp_path / "ceval", split="test")
    with pytest.raises(EvalError, match="5-shot needs 5 dev questions for astronomy, found 1"):
        (tmp_path / "ceval" / "dev" / "astronomy_dev.csv").write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n")
        mc.load_dataset("ceval", tmp_path / "ceval", shots=5)
    with pytest.raises(EvalError, match=r"subject\(s\) \['chemistry'\]"):
        mc.load_dataset("ceval", tmp_path / "ceval", subjects=["chemistry"])


def test_predictions_for_the_ceval_server(tmp_path):
    root = write_ceval(tmp_path)
    (root / "test").mkdir()
    (root / "test" / "virology_test.csv").write_text("id,question,A,B,C,D\n7,q1,a,b,c,d\n9,q2,a,b,c,d\n")
    data = mc.load_dataset("ceval", root, split="test", shots=1, require_answers=False)
    assert mc.predict(PREFERS_B, data) == {"virology": {"7": "B", "9": "B"}}
    with pytest.raises(EvalError, match=r"virology_test.csv:2: no answer to score against"):
        mc.evaluate(PREFERS_B, data)
