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
