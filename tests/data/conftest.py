import pytest

from data_pipelines import corpus as corpus_lib
from data_pipelines.vocab import train_sentencepiece


@pytest.fixture(scope="session")
def corpus():
    return corpus_lib.gather(max_chars=300_000)


@pytest.fixture(scope="session")
def vocab_path(tmp_path_factory, corpus):
    """A small SentencePiece model trained on the embedded corpus (a few seconds)."""
    docs = [d for lang in corpus_lib.LANGUAGES for d in corpus[lang]]
    return train_sentencepiece(docs, tmp_path_factory.mktemp("vocab") / "sp", vocab_size=5000)
