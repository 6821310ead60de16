import json

import numpy as np
import pytest
import seqio
import tensorflow as tf

from data_pipelines import corpus as corpus_lib
from data_pipelines.conversation import ConversationError
from data_pipelines.feature_converter import WEIGHTS_FEATURE
from data_pipelines.seqio_input import SeqioPipeline
from data_pipelines.tasks import (
    TASK_ID_FEATURE,
    DataFormatError,
    register_pretrain_tasks,
    register_sft_tasks,
)
from data_pipelines.vocab import load_vocabulary
from tests.data.test_conversation import RECORD, TURN1, TURN2, _expected_trained


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    corpus_lib.write_corpus(out, corpus_lib.gather(max_chars=150_000))
    return out


def _token_shares(mixture, length, n):
    ds = mixture.get_dataset({"targets": length, WEIGHTS_FEATURE: length}, shuffle=True, seed=1, num_epochs=None)
    tokens = np.zeros(3)
    for ex in ds.take(n).as_numpy_iterator():
        assert len(ex["targets"]) <= length
        tokens[ex[TASK_ID_FEATURE]] += len(ex["targets"])
    return tokens / tokens.sum()


def test_mixture_token_shares_match_configuration(corpus_dir, vocab_path):
    mixture = register_pretrain_tasks(corpus_dir, vocab_path)
    expected = np.array([360, 100, 220]) / 680
    shares = _token_shares(mixture, 32, 10_000)
    assert np.abs(shares - expected).max() < 0.02, shares


def _write_corpus(out, docs):
    out.mkdir(parents=True, exist_ok=True)
    for lang in corpus_lib.LANGUAGES:
        (out / f"{lang}.jsonl").write_text(
            "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs.get(lang, [])), encoding="utf-8"
        )
    return out


def _synthetic_docs(seed=0):
    """English documents of hundreds of tokens, Chinese of a few, code in between."""
    import random

    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dogs while seven wizards quietly read old books".split()
    return {
        "en": [" ".join(rng.choices(words, k=rng.randint(300, 900))) for _ in range(30)],
        "zh": ["".join(rng.choices("你好世界今天天气很好我们去公园", k=rng.randint(2, 8))) for _ in range(1500)],
        "code": ["".join(f"x{i} = {i}\n" for i in range(rng.randint(10, 40))) for _ in range(150)],
    }


def test_long_documents_are_split_into_chunks_without_losing_a_token(tmp_path, vocab_path):
    from data_pipelines.feature_converter import WeightedLMFeatureConverter

    docs = _synthetic_docs()
    corpus = _write_corpus(tmp_path / "corpus", docs)
    register_pretrain_tasks(corpus, vocab_path)
    vocab = load_vocabulary(vocab_path)
    expected = [list(vocab.encode(d)) + [vocab.eos_id] for d in docs["en"]]  # < 100 documents: all train
    assert max(map(len, expected)) > 10 * 64
    chunks = [
        ex["targets"].tolist()
        for ex in seqio.get_mixture_or_task("moss_pretrain_en")
        .get_dataset({"targets": 64, WEIGHTS_FEATURE: 64}, shuffle=False, num_epochs=1)
        .as_numpy_iterator()
    ]
    assert sum(chunks, []) == sum(expected, [])  # every token, in order
    assert len(chunks) == sum(-(-len(e) // 64) for e in expected)  # full chunks, one shorter tail per document
    assert all(0 < len(c) <= 64 for c in chunks)
    # Through the packing converter too: every token is a trained target, in order.
    ds = seqio.get_dataset(
        "moss_pretrain_en",
        {"targets": 64, WEIGHTS_FEATURE: 64},
        feature_converter=WeightedLMFeatureConverter(pack=True),
        shuffle=False,
        num_epochs=1,
    )
    trained = []
    for row in ds.as_numpy_iterator():
        assert ((row["decoder_segment_ids"] > 0) == (row["decoder_loss_weights"] == 1)).all()
        trained += row["decoder_target_tokens"][row["decoder_loss_weights"] == 1].tolist()
    assert trained == sum(expected, [])


def test_mixture_token_shares_with_very_different_document_lengths(tmp_path, vocab_path, caplog):
    docs = _synthetic_docs(seed=1)
    vocab = load_vocabulary(vocab_path)
    mean = {lang: np.mean([len(vocab.encode(d)) + 1 for d in docs[lang]]) for lang in docs}
    assert mean["en"] > 50 * mean["zh"]  # by examples, Chinese would get almost no tokens
    mixture = register_pretrain_tasks(_write_corpus(tmp_path / "corpus", docs), vocab_path)
    expected = np.array([360, 100, 220]) / 680
    with caplog.at_level("WARNING", logger="data_pipelines.token_mixture"):
        for length in (64, 512):
            shares = _token_shares(mixture, length, 6000)
            assert np.abs(shares - expected).max() < 0.03, (length, shares)
    # The estimate is logged with the rates it gives.
    assert "mixture moss_pretrain at length 64" in caplog.text and "tokens per example" in caplog.text
    # Rates follow the length: at 512 an English chunk holds more tokens, so it is drawn less often.
    en, zh = seqio.get_mixture_or_task("moss_pretrain_en"), seqio.get_mixture_or_task("moss_pretrain_zh")
    assert mixture.tokens_per_example(en, 512) > 4 * mixture.tokens_per_example(en, 64)
    assert mixture.tokens_per_example(zh, 512) == pytest.approx(mixture.tokens_per_example(zh, 64))
    assert mixture.get_rate(en) == 360.0  # get_rate is the configured token weight


def test_trimmed_documents_and_example_rates_as_options(tmp_path, vocab_path, caplog):
    """split_documents=False keeps each document's first L tokens (the kept share is logged);
    rates_by="tokens" still gives the token shares, rates_by="examples" the example shares."""
    docs = _synthetic_docs(seed=2)
    corpus = _write_corpus(tmp_path / "corpus", docs)
    vocab = load_vocabulary(vocab_path)
    mixture = register_pretrain_tasks(corpus, vocab_path, split_documents=False)
    heads = [
        ex["targets"].tolist()
        for ex in seqio.get_mixture_or_task("moss_pretrain_en")
        .get_dataset({"targets": 64, WEIGHTS_FEATURE: 64}, shuffle=False, num_epochs=1)
        .as_numpy_iterator()
    ]
    # One example per document: its first 63 tokens and EOS (seqio's append_eos_after_trim).
    assert heads == [list(vocab.encode(d))[:63] + [vocab.eos_id] for d in docs["en"]]
    with caplog.at_level("WARNING", logger="data_pipelines.token_mixture"):
        shares = _token_shares(mixture, 64, 6000)
    assert np.abs(shares - np.array([360, 100, 220]) / 680).max() < 0.03, shares
    en = seqio.get_mixture_or_task("moss_pretrain_en")
    kept = sum(min(len(vocab.encode(d)) + 1, 64) for d in docs["en"]) / sum(
        len(vocab.encode(d)) + 1 for d in docs["en"]
    )
    assert mixture.kept_fraction(en, 64) == pytest.approx(kept) and kept < 0.3
    assert f"{kept:.1%} of its tokens kept by trimming" in caplog.text

    by_examples = register_pretrain_tasks(corpus, vocab_path, split_documents=False, rates_by="examples")
    ds = by_examples.get_dataset({"targets": 64, WEIGHTS_FEATURE: 64}, shuffle=True, seed=1, num_epochs=None)
    counts = np.bincount([ex[TASK_ID_FEATURE] for ex in ds.take(6000).as_numpy_iterator()], minlength=3)
    assert np.abs(counts / counts.sum() - np.array([360, 100, 220]) / 680).max() < 0.03, counts
    with pytest.raises(ValueError, match="rates_by must be one of"):
        register_pretrain_tasks(corpus, vocab_path, rates_by="bytes")


def test_empty_pretraining_task_is_a_clear_error(tmp_path, vocab_path):
    docs = _synthetic_docs() | {"zh": []}
    mixture = register_pretrain_tasks(_write_corpus(tmp_path / "corpus", docs), vocab_path)
    with pytest.raises(ValueError, match="moss_pretrain_zh has no tokens in its train split"):
        mixture.get_dataset({"targets": 64, WEIGHTS_FEATURE: 64}, shuffle=True, seed=0)


def test_packed_pipeline_is_deterministic_and_resumable(corpus_dir, vocab_path):
    register_pretrain_tasks(corpus_dir, vocab_path)
    a = SeqioPipeline("moss_pretrain", seq_len=64, batch_size=4, seed=3)
    first = [next(a) for _ in range(3)]
    for batch in first:
        assert batch["decoder_input_tokens"].shape == (4, 64)
        seg, pos, w = batch["decoder_segment_ids"], batch["decoder_positions"], batch["decoder_loss_weights"]
        assert not w[seg == 0].any() and w[seg > 0].all()  # pre-training trains every real token
        starts = (np.diff(seg, axis=1) != 0) & (seg[:, 1:] > 0)
        assert (pos[:, 1:][starts] == 0).all()
    state = a.get_state()
    expected = next(a)
    b = SeqioPipeline("moss_pretrain", seq_len=64, batch_size=4, seed=3)
    assert all(
        np.array_equal(x["decoder_target_tokens"], y["decoder_target_tokens"])
        for x, y in zip(first, [next(b) for _ in range(3)], strict=True)
    )
    c = SeqioPipeline("moss_pretrain", seq_len=64, batch_size=4, seed=3)
    c.set_state(state)
    got = next(c)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


def test_sft_task_keeps_the_loss_mask_through_packing(tmp_path, vocab_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(RECORD, ensure_ascii=False) + "\n")
    register_sft_tasks(vocab_path, plugin_files=[path], max_len=1024)
    vocab = load_vocabulary(vocab_path)
    ds = seqio.get_dataset(
        "moss_sft_plugin",
        {"targets": 1024, WEIGHTS_FEATURE: 1024},
        feature_converter=__import__("data_pipelines.feature_converter", fromlist=["x"]).WeightedLMFeatureConverter(
            pack=True
        ),
        shuffle=False,
    )
    row = next(ds.as_numpy_iterator())
    trained = row["decoder_target_tokens"][row["decoder_loss_weights"] == 1]
    assert vocab.decode(trained.tolist()) == _expected_trained(TURN1, False) + _expected_trained(TURN2, False)


def test_malformed_sft_line_is_named_or_counted(tmp_path, vocab_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORD, ensure_ascii=False) + "\n{oops\n")
    register_sft_tasks(vocab_path, sft_files=[path])
    with pytest.raises((DataFormatError, tf.errors.OpError), match=r"bad\.jsonl:2: malformed JSON"):
        list(seqio.get_mixture_or_task("moss_sft").source.get_dataset("train").as_numpy_iterator())
    register_sft_tasks(vocab_path, sft_files=[path], skip_malformed=True)
    examples = list(seqio.get_mixture_or_task("moss_sft").source.get_dataset("train").as_numpy_iterator())
    assert len(examples) == 1


def _task_examples(name):
    return list(seqio.get_mixture_or_task(name).get_dataset({"targets": 2048}, shuffle=False).as_numpy_iterator())


def test_tagged_task_places_masked_tag_after_moss_marker(tmp_path, vocab_path):
    from data_pipelines.specials import QUALITY_TAGS

    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(RECORD, ensure_ascii=False) + "\n")
    tags = tmp_path / "tags.jsonl"
    tags.write_text(
        json.dumps({"conversation_id": 7, "turn": 1, "tag": 2})
        + "\n"
        + json.dumps({"conversation_id": 7, "turn": 2, "tag": 0})
        + "\n"
    )
    (tmp_path / "preference_tags.json").write_text(json.dumps({"num_tags": 3}))  # as the tag stage writes it
    register_sft_tasks(vocab_path, sft_files=[path], tags_file=tags, tag_dropout=0.0)
    vocab = load_vocabulary(vocab_path)
    (ex,) = _task_examples("moss_sft_tagged")
    text = vocab.decode(ex["targets"].tolist())
    assert f"<|MOSS|>:{QUALITY_TAGS[2]} 北京" in text and f"<|MOSS|>:{QUALITY_TAGS[0]} Sunny" in text
    weights = ex[WEIGHTS_FEATURE] - 1
    tag_ids = {vocab.encode(QUALITY_TAGS[2])[0], vocab.encode(QUALITY_TAGS[0])[0]}
    assert all(w == 0 for t, w in zip(ex["targets"], weights, strict=True) if t in tag_ids)
    trained = [t for t, w in zip(ex["targets"].tolist(), weights, strict=True) if w == 1]
    assert vocab.decode(trained) == _expected_trained(TURN1, False) + _expected_trained(TURN2, False)


def test_tag_dropout_rate_and_determinism(tmp_path, vocab_path):
    from data_pipelines.specials import QUALITY_TAGS

    path, tags = tmp_path / "sft.jsonl", tmp_path / "tags.jsonl"
    records = [RECORD | {"conversation_id": i} for i in range(300)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tags.write_text(
        "".join(json.dumps({"conversation_id": i, "turn": t, "tag": 1}) + "\n" for i in range(300) for t in (1, 2))
    )
    vocab = load_vocabulary(vocab_path)
    tag_id = vocab.encode(QUALITY_TAGS[1])[0]
    counts = []
    for _ in range(2):
        register_sft_tasks(vocab_path, sft_files=[path], tags_file=tags, tag_dropout=0.3, tag_seed=5, num_tags=2)
        counts.append([int((ex["targets"] == tag_id).sum()) for ex in _task_examples("moss_sft_tagged")])
    assert counts[0] == counts[1]
    kept = sum(counts[0]) / (2 * len(counts[0]))  # the validation split holds 1 in 100 out
    assert abs(kept - 0.7) < 0.06, kept
    bad = tmp_path / "bad_tags.jsonl"
    bad.write_text('{"conversation_id": 1, "turn": "x", "tag": 1}\n')
    register_sft_tasks(vocab_path, sft_files=[path], tags_file=bad, num_tags=2)
    with pytest.raises((DataFormatError, tf.errors.OpError), match=r"bad_tags\.jsonl:1"):
        _task_examples("moss_sft_tagged")


def test_tags_outside_the_runs_count_are_errors_naming_the_line(tmp_path, vocab_path):
    path, tags = tmp_path / "sft.jsonl", tmp_path / "tags.jsonl"
    path.write_text(json.dumps(RECORD, ensure_ascii=False) + "\n")
    # Tag 3 is a reserved vocabulary tag (<|quality_3|>) but not one of this run's 3 tags.
    tags.write_text(
        json.dumps({"conversation_id": 7, "turn": 1, "tag": 2})
        + "\n"
        + json.dumps({"conversation_id": 7, "turn": 2, "tag": 3})
        + "\n"
    )
    with pytest.raises(FileNotFoundError, match="preference_tags.json .*pass num_tags"):
        register_sft_tasks(vocab_path, sft_files=[path], tags_file=tags)
    (tmp_path / "preference_tags.json").write_text(json.dumps({"num_tags": 3}))
    register_sft_tasks(vocab_path, sft_files=[path], tags_file=tags)
    with pytest.raises((DataFormatError, tf.errors.OpError), match=r"tags\.jsonl:2: tag 3 is outside \[0, 3\)"):
        _task_examples("moss_sft_tagged")
    register_sft_tasks(vocab_path, sft_files=[path], tags_file=tags, num_tags=4)  # an explicit K wins
    assert len(_task_examples("moss_sft_tagged")) == 1
    with pytest.raises(ValueError, match="num_tags"):
        register_sft_tasks(vocab_path, sft_files=[path], tags_file=tags, num_tags=9)


def test_conversation_split_is_stable_when_a_line_is_skipped(tmp_path, vocab_path):
    from data_pipelines.tasks import _encoded_records

    lines = [json.dumps(RECORD | {"conversation_id": i}, ensure_ascii=False) for i in range(250)]
    clean, broken = tmp_path / "clean.jsonl", tmp_path / "broken.jsonl"
    clean.write_text("\n".join(lines) + "\n")
    broken.write_text("\n".join(lines[:4] + ["{oops"] + lines[5:]) + "\n")

    def ids(path, split):
        return list(_encoded_records([str(path)], split, True, lambda r, st, w: r["conversation_id"], "test"))

    # Held out: the records on lines 100 and 200, with or without the malformed line 5.
    assert ids(clean, "validation") == ids(broken, "validation") == [99, 199]
    assert ids(broken, "train") == [i for i in ids(clean, "train") if i != 4]
    assert len(ids(clean, "train")) == 248


def test_sft_and_plugin_mixture_samples_by_conversation_count(tmp_path, vocab_path):
    sft, plugin = tmp_path / "sft.jsonl", tmp_path / "plugin.jsonl"
    plain = RECORD | {"chat": {"turn_1": {"Human": TURN2["Human"], "MOSS": TURN2["MOSS"]}}, "num_turns": 1}
    sft.write_text("".join(json.dumps(plain | {"conversation_id": i}) + "\n" for i in range(60)))
    plugin.write_text(
        "".join(json.dumps(RECORD | {"conversation_id": i}, ensure_ascii=False) + "\n" for i in range(20))
    )
    register_sft_tasks(vocab_path, sft_files=[sft], plugin_files=[plugin], max_len=512)
    mixture = seqio.get_mixture_or_task("moss_sft_and_plugin")
    assert {t.name for t in mixture.tasks} == {"moss_sft", "moss_sft_plugin"}
    ds = mixture.get_dataset({"targets": 512, WEIGHTS_FEATURE: 512}, shuffle=True, seed=0, num_epochs=None)
    ids = [int(ex[TASK_ID_FEATURE]) for ex in ds.take(2000).as_numpy_iterator()]
    assert abs(ids.count(10) / len(ids) - 0.75) < 0.04  # 60 : 20 conversations
    register_sft_tasks(vocab_path, sft_files=[sft])  # one kind only: no mixture of both
    with pytest.raises(ValueError):
        seqio.get_mixture_or_task("moss_sft_and_plugin")


def test_preference_pairs_share_context_and_mask_all_but_the_reply(tmp_path, vocab_path):
    from data_pipelines.feature_converter import PairFeatureConverter
    from data_pipelines.tasks import register_preference_pairs_task

    chosen = "<|MOSS|>: Sunny, 3 to 12 degrees.<eom>\n"
    rejected = "<|MOSS|>: I don't know.<eom>\n"
    last = {k: v for k, v in TURN2.items() if k != "MOSS"}
    record = {
        "conversation_id": 1,
        "meta_instruction": RECORD["meta_instruction"],
        "chat": {"turn_1": TURN1, "turn_2": last},
        "chosen": chosen,
        "rejected": rejected,
    }
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n")
    register_preference_pairs_task(vocab_path, [path], max_len=512)
    vocab = load_vocabulary(vocab_path)
    ds = seqio.get_dataset(
        "moss_preference_pairs",
        {k: 512 for k in PairFeatureConverter.TASK_FEATURES},
        feature_converter=PairFeatureConverter(),
        shuffle=False,
    )
    (ex,) = list(ds.as_numpy_iterator())
    for side, reply in (("chosen", chosen), ("rejected", rejected)):
        targets, weights = ex[f"{side}_decoder_target_tokens"], ex[f"{side}_decoder_loss_weights"]
        assert vocab.decode(targets[weights == 1].tolist()) == reply[len("<|MOSS|>:") :]
        real = ex[f"{side}_decoder_segment_ids"] == 1
        assert not weights[~real].any()
    n = int((ex["chosen_decoder_loss_weights"] == 0).argmin())  # first trained position
    np.testing.assert_array_equal(ex["chosen_decoder_target_tokens"][:n], ex["rejected_decoder_target_tokens"][:n])


def test_seqio_packed_row_logits_equal_each_example_alone(corpus_dir, vocab_path):
    import jax
    import jax.numpy as jnp

    from moss_jax.config import PRESETS
    from moss_jax.model import MossLM, init_params

    register_pretrain_tasks(corpus_dir, vocab_path)
    pipe = SeqioPipeline("moss_pretrain_zh", seq_len=256, batch_size=1, seed=0)
    batch = next(b for b in (next(pipe) for _ in range(20)) if b["decoder_segment_ids"].max() >= 3)
    seg = batch["decoder_segment_ids"][0]
    cfg = PRESETS["debug"].replace(vocab_size=load_vocabulary(vocab_path).vocab_size)
    params = init_params(cfg, jax.random.PRNGKey(0))
    model = MossLM(cfg)
    packed = model.apply(
        {"params": params},
        jnp.asarray(batch["decoder_input_tokens"]),
        positions_BxL=jnp.asarray(batch["decoder_positions"]),
        segment_ids_BxL=jnp.asarray(batch["decoder_segment_ids"]),
    )[0]
    for s in range(1, seg.max() + 1):
        idx = np.flatnonzero(seg == s)
        alone = model.apply({"params": params}, jnp.asarray(batch["decoder_input_tokens"][0, idx])[None])[0]
        np.testing.assert_allclose(packed[idx], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shuffle", [False, True])
def test_repeated_spans_are_two_equal_copies(corpus_dir, vocab_path, shuffle):
    register_pretrain_tasks(corpus_dir, vocab_path, repeat_rate=0.3, repeat_shuffle=shuffle)
    vocab = load_vocabulary(vocab_path)
    texts = [vocab.decode(ex["targets"][:-1].tolist()) for ex in _task_examples("moss_pretrain_repeat")[:50]]
    assert len(texts) == 50
    docs = "".join(d for lang in corpus_lib.LANGUAGES for d in corpus_lib.read_corpus(corpus_dir)[lang])
    verbatim = 0
    for text in texts:
        # The span itself may hold newlines: the two copies are the halves around the middle one.
        half = (len(text) - 1) // 2
        first, sep, second = text[:half], text[half], text[half + 1 :]
        assert (sep, first) == ("\n", second), text
        verbatim += first in docs
    # Spans are corpus text as written; shuffled spans (of more than one word) almost never are.
    assert verbatim == 50 if not shuffle else verbatim < 10


def test_shuffled_units_keep_the_words_and_cjk_spacing():
    import random
    import re

    from data_pipelines.tasks import shuffled_units

    def units(t):
        return sorted(re.findall(r"[\u3400-\u9fff]|[^\s\u3400-\u9fff]+", t))

    text = "我们今天去北京 visit the  Forbidden City, 好吗"
    out = shuffled_units(text, random.Random(0))
    assert out != text and units(out) == units(text)
    # One space between units, except none between two CJK characters.
    assert "  " not in out
    assert not re.search(r"[\u3400-\u9fff] [\u3400-\u9fff]", out)
    for word in ("visit", "the", "Forbidden", "City,"):
        assert re.search(rf"(^| ){re.escape(word)}( |$)", out), (word, out)


def test_copy_task_repeats_uniform_vocabulary_pieces(corpus_dir, vocab_path):
    from data_pipelines.tasks import copy_pieces

    pieces = copy_pieces(vocab_path)
    vocab = load_vocabulary(vocab_path)
    assert pieces and all(p.strip() for p in pieces)
    assert "<eoh>" not in pieces and "\n" not in pieces
    mixture = register_pretrain_tasks(corpus_dir, vocab_path, copy_rate=0.25)
    rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    assert rates["moss_pretrain_copy"] / sum(rates.values()) == pytest.approx(0.25)
    ds = seqio.get_mixture_or_task("moss_pretrain_copy").get_dataset({"targets": 4096}, shuffle=False)
    examples = list(ds.take(40).as_numpy_iterator())
    seen = set()
    for ex in examples:
        ids = ex["targets"][:-1].tolist()  # without EOS
        text = vocab.decode(ids)
        first, second = text.split("\n")
        assert first == second and first
        # The two copies are the same tokens around one newline token: the second is
        # predictable only by copying.
        (newline,) = vocab.encode("\n")
        cut = ids.index(newline)
        assert ids[:cut] == ids[cut + 1 :]
        seen.update(first)
    # Pieces are drawn uniformly: mostly CJK characters (most of the vocabulary), some ASCII.
    assert sum("\u4e00" <= c <= "\u9fff" for c in seen) > 100 and any(c.isascii() for c in seen)
    # Deterministic for a split.
    task = seqio.get_mixture_or_task("moss_pretrain_copy")
    again = list(task.get_dataset({"targets": 4096}, shuffle=False).take(3).as_numpy_iterator())
    assert all((a["targets"] == b["targets"]).all() for a, b in zip(examples, again, strict=False))
    with pytest.raises(ValueError, match="copy_rate"):
        register_pretrain_tasks(corpus_dir, vocab_path, repeat_rate=0.5, copy_rate=0.5)


def test_malformed_line_comes_out_of_the_pipeline_as_its_own_error(tmp_path, vocab_path):
    path = tmp_path / "bad.jsonl"
    no_reply = RECORD | {"chat": {"turn_1": {"Human": TURN1["Human"]}}, "num_turns": 1}
    path.write_text(json.dumps(RECORD, ensure_ascii=False) + "\n" + json.dumps(no_reply, ensure_ascii=False) + "\n")
    register_sft_tasks(vocab_path, sft_files=[path], max_len=1024)
    pipeline = SeqioPipeline("moss_sft", seq_len=1024, batch_size=2)
    with pytest.raises(ConversationError) as caught:
        next(pipeline)
    assert str(caught.value) == f"{path}:2 turn_1: missing field 'MOSS'"
    assert caught.value.__context__ is None  # no tf.data error (holding the iterator) attached
    assert pipeline._it is None  # the tf.data iterator is released


def test_malformed_pretraining_line_comes_out_as_its_own_error(tmp_path, vocab_path):
    docs = _synthetic_docs()
    corpus = _write_corpus(tmp_path / "corpus", docs)
    with open(corpus / "zh.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"txt": "oops"}) + "\n")
    register_pretrain_tasks(corpus, vocab_path)
    with pytest.raises(DataFormatError) as caught:
        SeqioPipeline("moss_pretrain", seq_len=64, batch_size=2)
    assert str(caught.value) == f"{corpus / 'zh.jsonl'}:{len(docs['zh']) + 1}: no string field 'text'"


def test_empty_reply_is_malformed_skipped_and_counted(tmp_path, vocab_path, caplog):
    path = tmp_path / "sft.jsonl"
    empty = RECORD | {"chat": {"turn_1": TURN1, "turn_2": TURN2 | {"MOSS": ""}}}
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in (RECORD, empty, RECORD)))
    register_sft_tasks(vocab_path, sft_files=[path], max_len=2048)
    with pytest.raises((ConversationError, tf.errors.OpError), match=r"sft\.jsonl:2 turn_2: field 'MOSS' is empty"):
        _task_examples("moss_sft")
    register_sft_tasks(vocab_path, sft_files=[path], max_len=2048, skip_malformed=True)
    with caplog.at_level("WARNING", logger="data_pipelines.tasks"):
        assert len(_task_examples("moss_sft")) == 2
    assert any("2 conversations kept" in r.message and "1 malformed skipped" in r.message for r in caplog.records)


def test_task_with_no_examples_is_named_with_its_files_and_seq_len(tmp_path, vocab_path, caplog):
    from data_pipelines.seqio_input import NoExamplesError

    sft, plugin = tmp_path / "sft.jsonl", tmp_path / "plugin.jsonl"
    short = {"chat": {"turn_1": {"Human": "<|Human|>: hi<eoh>\n", "MOSS": "<|MOSS|>: hello<eom>\n"}}}
    sft.write_text((json.dumps(short) + "\n") * 20)
    plugin.write_text((json.dumps(RECORD, ensure_ascii=False) + "\n") * 5)  # each longer than 64 tokens
    register_sft_tasks(vocab_path, sft_files=[sft], plugin_files=[plugin], max_len=64)
    pipeline = SeqioPipeline("moss_sft_and_plugin", seq_len=64, batch_size=2)
    with caplog.at_level("WARNING", logger="data_pipelines.tasks"), pytest.raises(NoExamplesError) as caught:
        for _ in range(100):
            next(pipeline)
    message = str(caught.value)
    assert message.startswith("moss_sft_and_plugin (train split, seq_len 64): no examples after")
    assert f"task moss_sft_plugin ({plugin}) kept none" in message and "5 dropped (longer than max_len" in message
    assert "moss_sft " not in message.split("kept none")[0]  # the SFT task has examples: not named
    reports = [r.message for r in caplog.records if r.message.startswith("task moss_sft_plugin (train split")]
    assert reports and str(plugin) in reports[0] and "0 conversations kept" in reports[0]
    assert pipeline._it is None
