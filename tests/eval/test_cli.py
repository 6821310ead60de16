"""python -m moss_jax.eval: a JSON report and a table; clear errors for bad input."""

import csv
import json

import jax
import pytest

from data_pipelines import corpus as corpus_lib
from data_pipelines.vocab import train_sentencepiece
from moss_jax.config import get_config
from moss_jax.convert.checkpoint_io import CONFIG_NAME, save_params
from moss_jax.eval import bits_per_byte as bpb
from moss_jax.eval.cli import main
from moss_jax.eval.lm import EvalError, EvalModel
from moss_jax.model import init_params


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    docs = corpus_lib.gather(max_chars=60_000)
    return train_sentencepiece(docs["en"] + docs["code"], tmp_path_factory.mktemp("vocab") / "sp", vocab_size=1024)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sp_model):
    config = get_config("debug", vocab_size=1024, max_len=256)
    return save_params(tmp_path_factory.mktemp("ckpt") / "debug", init_params(config, jax.random.key(0)), config)


@pytest.fixture
def mmlu_dir(tmp_path):
    (tmp_path / "mmlu" / "data" / "test").mkdir(parents=True)
    with open(tmp_path / "mmlu" / "data" / "test" / "anatomy_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([[f"Question {i}?", "a", "b", "c", "d", "ABCD"[i % 4]] for i in range(3)])
    return tmp_path / "mmlu"


def test_bad_input_is_named_before_the_model_loads(tmp_path, mmlu_dir, capsys):
    (tmp_path / "ceval" / "val").mkdir(parents=True)
    (tmp_path / "ceval" / "val" / "law_val.csv").write_text("q,a,b,c,d,A\n")
    rc = main(["--checkpoint", str(tmp_path / "none"), "--tokenizer", "x", "--suite", "ceval"])
    assert rc == 2 and "suite 'ceval' needs --ceval_dir" in capsys.readouterr().err
    rc = main(["--checkpoint", "x", "--tokenizer", "x", "--suite", "ceval", "--ceval_dir", str(tmp_path / "ceval")])
    assert rc == 2 and "law_val.csv:1: expected the C-Eval header" in capsys.readouterr().err
    rc = main(["--checkpoint", "x", "--tokenizer", "x", "--suite", "mmlu,bleu", "--mmlu_dir", str(mmlu_dir)])
    assert rc == 2 and "unknown suite(s) ['bleu']" in capsys.readouterr().err
    rc = main(
        ["--checkpoint", str(tmp_path / "none"), "--tokenizer", "x", "--suite", "mmlu", "--mmlu_dir", str(mmlu_dir)]
    )
    assert rc == 2 and "neither a moss_jax checkpoint" in capsys.readouterr().err


def test_a_checkpoint_of_another_size_is_refused(tmp_path, checkpoint, sp_model, mmlu_dir, capsys):
    other = tmp_path / "other"
    other.mkdir()
    for item in checkpoint.iterdir():
        (other / item.name).symlink_to(item)
    fields = json.loads((checkpoint / CONFIG_NAME).read_text())
    (other / CONFIG_NAME).unlink()
    (other / CONFIG_NAME).write_text(json.dumps({**fields, "n_layers": 3}))
    args = ["--tokenizer", str(sp_model), "--suite", "mmlu", "--mmlu_dir", str(mmlu_dir)]
    assert main(["--checkpoint", str(other), *args]) == 2
    err = capsys.readouterr().err
    assert "['layers']" in err and "(2, " in err and "(3, " in err and "another size" in err

    small = tmp_path / "small"
    config = get_config("debug", vocab_size=512)
    save_params(small, init_params(config, jax.random.key(0)), config)
    assert main(["--checkpoint", str(small), *args]) == 2
    assert "1024 entries but the model's vocabulary has 512 rows" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_report(tmp_path, checkpoint, sp_model, mmlu_dir, capsys):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "en.jsonl").write_text(json.dumps({"text": "The model reads held-out English text."}) + "\n")
    (texts / "code.txt").write_text("def add(a, b):\n    return a + b\n")
    problems = tmp_path / "he.jsonl"
    problem = {
        "task_id": "T/0",
        "prompt": "def inc(x):\n",
        "canonical_solution": "    return x + 1\n",
        "test": "def check(f):\n    assert f(1) == 2\n",
        "entry_point": "inc",
    }
    problems.write_text(json.dumps(problem) + "\n")
    conversations = tmp_path / "conv.jsonl"
    conversations.write_text(json.dumps({"human": "hello"}) + "\n")
    out = tmp_path / "report" / "eval.json"
    rc = main(
        ["--checkpoint", str(checkpoint), "--tokenizer", str(sp_model), "--out", str(out)]
        + ["--suite", "mmlu,bpb,humaneval,format", "--mmlu_dir", str(mmlu_dir), "--text_dir", str(texts)]
        + ["--humaneval", str(problems), "--conversations", str(conversations), "--max_new_tokens", "8"]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["suites"]) == {"mmlu", "bpb", "humaneval", "format"}
    assert report["suites"]["mmlu"]["subjects"]["anatomy"]["total"] == 3
    # A random model's code fails in the sandbox; its replies never end with <eom>.
    assert report["suites"]["humaneval"]["pass@k"] == {"pass@1": 0.0}
    assert report["suites"]["format"]["compliance"] == 0.0
    model = EvalModel.from_checkpoint(checkpoint, sp_model)
    direct = bpb.evaluate(model, bpb.read_texts(texts))
    assert report["suites"]["bpb"]["en"]["bits_per_byte"] == pytest.approx(direct["en"]["bits_per_byte"], rel=1e-6)
    table = capsys.readouterr().out
    assert "mmlu" in table and "en bits/byte" in table and "pass@1" in table and "compliance" in table

    ceval = tmp_path / "ceval" / "test"
    ceval.mkdir(parents=True)
    (ceval / "law_test.csv").write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n1,r,a,b,c,d\n")
    submission = tmp_path / "submission.json"
    rc = main(
        ["--checkpoint", str(checkpoint), "--tokenizer", str(sp_model), "--suite", "ceval"]
        + ["--ceval_dir", str(tmp_path / "ceval"), "--ceval_submission", str(submission)]
    )
    assert rc == 0
    preds = json.loads(submission.read_text())
    assert list(preds) == ["law"] and list(preds["law"]) == ["0", "1"] and set(preds["law"].values()) <= set("ABCD")


def test_tools_suite_is_wired_to_tool_use(tmp_path):
    pytest.importorskip("moss_jax.eval.tool_use")
    from moss_jax.eval.cli import _load_inputs, _run_suite, build_parser

    from .conftest import unigram_model

    questions = tmp_path / "tools.jsonl"
    rows = [{"human": "What is 1+2?", "command": 'Calculate("1+2")'}, {"human": "Hi", "command": "None"}]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = build_parser().parse_args(
        ["--checkpoint", "x", "--tokenizer", "x", "--suite", "tools", "--tool_questions", str(questions)]
    )
    replies = iter([' add<eot>\n<|Commands|>: Calculate("1+2")<eoc>', ' greet<eot>\n<|Commands|>: Search("hi")<eoc>'])
    model = unigram_model("x", generate_fn=lambda ids, n, stops, **kw: [next(replies) for _ in ids])
    report = _run_suite("tools", model, _load_inputs("tools", args), args)
    assert report["exact_match"] == 0.5 and report["n"] == 2
    questions.write_text(json.dumps({"human": "x"}) + "\n")
    with pytest.raises(EvalError, match="tools.jsonl:1"):
        _load_inputs("tools", args)


def test_format_suite_passes_replies_that_end_with_eom(tmp_path, sp_model, capsys):
    """The reviewer's reproduction: a checkpoint designed to answer 'A<eom>' complies through the
    CLI (which stops generation at the <eom> id), and the report records the run's settings."""
    from moss_jax.inference.tokenizer import load_tokenizer

    from .conftest import two_step_params

    tokenizer = load_tokenizer(sp_model)
    config = get_config("debug", vocab_size=1024, max_len=256)
    params = two_step_params(config, init_params(config, jax.random.key(0)), tokenizer.token_id("A"), tokenizer.eom_id)
    ckpt = save_params(tmp_path / "a_eom", params, config)
    conversations = tmp_path / "conv.jsonl"
    conversations.write_text(json.dumps({"human": "hello"}) + "\n")
    out = tmp_path / "eval.json"
    rc = main(
        ["--checkpoint", str(ckpt), "--tokenizer", str(sp_model), "--suite", "format", "--out", str(out)]
        + ["--conversations", str(conversations), "--max_new_tokens", "8", "--limit", "1"]
    )
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["suites"]["format"]["compliance"] == 1.0, report["suites"]["format"]
    settings = report["settings"]
    assert settings["max_new_tokens"] == 8 and settings["limit"] == 1 and settings["suite"] == "format"
    assert settings["split"] is None and settings["shots"] == 0 and settings["method"] == "loglikelihood"
    assert settings["conversations"] == str(conversations) and settings["batch_size"] == 8


def test_generation_budget_too_large_stops_before_any_suite(
    tmp_path, checkpoint, sp_model, mmlu_dir, capsys, monkeypatch
):
    from moss_jax.eval import multiple_choice

    def mmlu_ran(*args, **kwargs):
        raise AssertionError("the mmlu suite ran before the humaneval budget was checked")

    monkeypatch.setattr(multiple_choice, "evaluate", mmlu_ran)
    problems = tmp_path / "he.jsonl"
    problem = {"task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "", "test": "", "entry_point": "f"}
    problems.write_text(json.dumps(problem) + "\n")
    out = tmp_path / "eval.json"
    rc = main(
        ["--checkpoint", str(checkpoint), "--tokenizer", str(sp_model), "--out", str(out)]
        + ["--suite", "mmlu,humaneval", "--mmlu_dir", str(mmlu_dir), "--humaneval", str(problems)]
    )  # default --max_new_tokens 256 = the checkpoint's max_len
    err = capsys.readouterr().err
    assert rc == 2 and "suite 'humaneval' generates up to 256 new tokens" in err and "max_len 256" in err, err
    assert "--max_new_tokens" in err and not out.exists()


def test_pass_at_k_arguments_are_checked_before_the_model_loads(tmp_path, capsys):
    problems = tmp_path / "he.jsonl"
    problem = {"task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "", "test": "", "entry_point": "f"}
    problems.write_text(json.dumps(problem) + "\n")
    base = ["--checkpoint", str(tmp_path / "none"), "--tokenizer", "x", "--suite", "humaneval"]
    base += ["--humaneval", str(problems)]
    assert main([*base, "--k", "2", "--n_samples", "1"]) == 2  # the checkpoint does not exist: not reached
    assert "--k 2: pass@k needs 1 <= k <= --n_samples (1); got k=2" in capsys.readouterr().err
    assert main([*base, "--k", "1,ten"]) == 2
    assert "--k '1,ten': expected comma-separated whole numbers" in capsys.readouterr().err
    assert main([*base, "--n_samples", "0"]) == 2
    assert "--n_samples 0" in capsys.readouterr().err
    assert main([*base, "--max_new_tokens", "0"]) == 2
    assert "--max_new_tokens 0: generation needs at least 1 new token" in capsys.readouterr().err


def test_an_unparsable_expected_tool_command_is_refused(tmp_path, capsys):
    questions = tmp_path / "tools.jsonl"
    rows = [{"human": "x", "command": "None"}, {"human": "x", "command": "Calculate(1+2"}]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(
        ["--checkpoint", str(tmp_path / "none"), "--tokenizer", "x", "--suite", "tools"]
        + ["--tool_questions", str(questions)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "tools.jsonl:2: expected command 'Calculate(1+2' does not parse" in err, err
