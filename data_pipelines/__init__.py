"""Data pipelines feeding the training engine (features named as in t5x/seqio)."""
