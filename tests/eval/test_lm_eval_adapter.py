"""The lm-evaluation-harness adapter: designed logits give known log-likelihoods and accuracy."""

import json
import math

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from moss_jax.eval.lm_eval_adapter import MossJaxLM  # noqa: E402

from .conftest import unigram_model  # noqa: E402

LOGZ = math.log(256 + math.exp(3.0))  # unigram_model: 257 ids, one with logit 3, the rest 0


def logp(ch: str, preferred: str = "B") -> float:
    return (3.0 if ch == preferred else 0.0) - LOGZ


def test_requests_match_the_closed_form():
    seen = []

    def generate_fn(ids, max_new_tokens, stop_strings, **kw):
        seen.append((max_new_tokens, list(stop_strings), kw))
        return ["yes B\nQuestion: more"]

    lm = MossJaxLM(model=unigram_model("B", generate_fn=generate_fn))
    reqs = [
        Instance("loglikelihood", {}, ("Answer:", " B"), 0),
        Instance("loglikelihood", {}, ("Answer: ", "A"), 1),  # the trailing space moves to the continuation
    ]
    (ll_b, greedy_b), (ll_a, greedy_a) = lm.loglikelihood(reqs)
    assert ll_b == pytest.approx(logp(" ") + logp("B")) and not greedy_b  # greedy picks "B", not " "
    assert ll_a == pytest.approx(logp(" ") + logp("A"))
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("BBA",), 0)])
    assert rolling[0] == pytest.approx(2 * logp("B") + logp("A"))
    gen = lm.generate_until([Instance("generate_until", {}, ("Q?", {"until": ["\n"], "max_gen_toks": 7}), 0)])
    assert gen == ["yes B"] and seen == [(7, ["\n"], {})]


@pytest.mark.slow
def test_simple_evaluate_on_a_local_task(tmp_path):
    """lm-eval's own multiple-choice task over local JSON: the model that prefers B scores the B rate."""
    answers = [1, 1, 0, 3, 1]  # indexes into A..D: 3 of 5 are B
    rows = [{"question": f"Question {i}?", "label": a} for i, a in enumerate(answers)]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "toy.yaml").write_text(
        "task: moss_toy_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  cache_dir: {tmp_path / 'cache'}\n  data_files:\n    test: {tmp_path / 'toy.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}\\nAnswer:"\n'
        'doc_to_choice: [" A", " B", " C", " D"]\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=MossJaxLM(model=unigram_model("B")),
        tasks=["moss_toy_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=False,
        bootstrap_iters=0,
    )
    assert np.isclose(results["results"]["moss_toy_mc"]["acc,none"], 0.6)
