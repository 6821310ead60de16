"""Inference: jitted KV-cache generation with MOSS sampling, chat prompts and the tool loop.

    from moss_jax.inference import generate
    out_BxLn = generate(params, config, input_ids_BxL, max_new_tokens=64)              # greedy
    out_BxLn = generate(params, config, ids, 64, temperature=0.7, top_p=0.8, repetition_penalty=1.02, seed=1)

Entry points: `python -m moss_jax.chat` (terminal chat) and `python -m moss_jax.serve`
(OpenAI-compatible HTTP server). docs/inference.md describes the design.
"""

from moss_jax.inference.decoder import Decoder, DecodeState, bucket
from moss_jax.inference.generate import ChunkUpdate, decode_rows, generate, get_decoder
from moss_jax.inference.sampling import MOSS_DEFAULTS, SamplingParams
from moss_jax.inference.streaming import SequenceStream

__all__ = [
    "MOSS_DEFAULTS",
    "ChunkUpdate",
    "DecodeState",
    "Decoder",
    "SamplingParams",
    "SequenceStream",
    "bucket",
    "decode_rows",
    "generate",
    "get_decoder",
]
