import json

import pytest
import tensorflow as tf
from tokenizers import ByteLevelBPETokenizer

from data_pipelines.bpe_vocab import MossBPEVocabulary
from data_pipelines.specials import END_TOKENS
from tests.data.test_vocab_corpus import SAMPLES


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, corpus):
    """A small byte-level BPE laid out like the released MOSS tokenizer files."""
    out = tmp_path_factory.mktemp("bpe")
    trainer = ByteLevelBPETokenizer(add_prefix_space=False)
    docs = corpus["en"][:200] + corpus["zh"][:2000] + corpus["code"][:20]
    trainer.train_from_iterator(docs, vocab_size=2000, min_frequency=2, show_progress=False)
    trainer.save_model(str(out))
    base = trainer.get_vocab_size()
    added = {"<|endoftext|>": base}
    added.update({tok: base + 1 + i for i, tok in enumerate(END_TOKENS)})
    (out / "added_tokens.json").write_text(json.dumps(added))
    return out


@pytest.mark.parametrize("text", SAMPLES + ["<|Human|>: 你好<eoh>\n<|Inner Thoughts|>: None<eot>\n"])
def test_round_trip(bpe_dir, text):
    vocab = MossBPEVocabulary(bpe_dir)
    assert vocab.decode(vocab.encode(text)) == text


def test_added_tokens_keep_their_ids(bpe_dir):
    vocab = MossBPEVocabulary(bpe_dir)
    added = json.loads((bpe_dir / "added_tokens.json").read_text())
    for token, token_id in added.items():
        assert vocab.encode(token) == [token_id]
    assert vocab.eos_id == added["<eom>"]
    assert vocab.vocab_size == max(added.values()) + 1
    ids = vocab.encode_tf(tf.constant("x = 1<eom>"))
    assert ids.numpy().tolist() == vocab.encode("x = 1<eom>")
    # seqio decodes up to and including the first eos, dropping what follows.
    assert vocab.decode_tf(ids).numpy().decode() == "x = 1<eom>"
    assert vocab.decode(vocab.encode("a<eom>b")) == "a<eom>"


def test_bad_tokenizer_files(bpe_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        MossBPEVocabulary(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((bpe_dir / name).read_bytes())
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<eom>": 5}))
    with pytest.raises(ValueError, match="'<eom>' should have id 5"):
        MossBPEVocabulary(tmp_path)


def test_decode_tf_drops_what_follows_eos_instead_of_padding_with_id_0(bpe_dir):
    vocab = MossBPEVocabulary(bpe_dir)
    assert vocab.pad_id == 0 and vocab.decode([0]) == "!"  # id 0 is a real token here
    ids = vocab.encode("hi<eom> more text")
    assert vocab.decode_tf(tf.constant(ids)).numpy().decode() == "hi<eom>"
    a, b = vocab.encode("x = 1<eom> tail"), vocab.encode("你好<eom>")
    width = max(len(a), len(b)) + 2
    batch = tf.constant([a + [vocab.eos_id] * (width - len(a)), b + [0] * (width - len(b))])
    assert [t.decode() for t in vocab.decode_tf(batch).numpy()] == ["x = 1<eom>", "你好<eom>"]
    assert vocab.decode_tf(tf.zeros([0], tf.int32)).numpy() == b""


def test_packing_rejects_a_real_token_with_id_0():
    """seqio packing measures lengths by non-zero ids: an id 0 inside an example (the BPE's "!")
    would cut it short and misalign its weights, so the packing converter refuses it."""
    from data_pipelines.feature_converter import WEIGHTS_FEATURE, WeightedLMFeatureConverter

    def dataset(examples):
        return tf.data.Dataset.from_generator(
            lambda: ({"targets": t, WEIGHTS_FEATURE: [2] * len(t)} for t in examples),
            output_signature={k: tf.TensorSpec((None,), tf.int32) for k in ("targets", WEIGHTS_FEATURE)},
        )

    lengths = {"targets": 8, WEIGHTS_FEATURE: 8}
    ok = list(WeightedLMFeatureConverter(pack=True)(dataset([[5, 6, 7], [8, 9]]), lengths).as_numpy_iterator())
    assert ok[0]["decoder_loss_weights"].sum() == 5
    with pytest.raises(tf.errors.InvalidArgumentError, match="a targets id is 0"):
        list(WeightedLMFeatureConverter(pack=True)(dataset([[5, 0, 7]]), lengths).as_numpy_iterator())
    # Without packing, lengths are not read from the ids: an id 0 passes.
    (row,) = list(WeightedLMFeatureConverter(pack=False)(dataset([[5, 0, 7]]), lengths).as_numpy_iterator())
    assert row["decoder_target_tokens"][:3].tolist() == [5, 0, 7]
