"""Batch generation: `generate(params, config, input_ids, max_new_tokens, **sampling)`.

Prefill then the jitted decode loop of `Decoder`, with per-row lengths, stop tokens, stop
strings, a streaming callback per chunk and seeded sampling. Batch and lengths are padded to
power-of-two buckets and the compiled `Decoder` is cached per bucket, so calls with similar
shapes never recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from moss_jax.config import MossConfig
from moss_jax.inference.decoder import Decoder, bucket
from moss_jax.inference.sampling import SamplingParams
from moss_jax.inference.streaming import SequenceStream


@dataclasses.dataclass(frozen=True)
class ChunkUpdate:
    """What one decode chunk added: per row, the new tokens and (with a decoder) text delta."""

    tokens: list[list[int]]
    texts: list[str] | None
    finished: list[bool]


@functools.lru_cache(maxsize=32)
def get_decoder(
    config: MossConfig, batch_size: int, cache_len: int, mesh: Mesh | None = None, chunk_size: int = 16
) -> Decoder:
    """A compiled Decoder per shape bucket, kept so repeated calls reuse its executables."""
    return Decoder(config, batch_size=batch_size, cache_len=cache_len, mesh=mesh, chunk_size=chunk_size)


def decode_rows(
    decoder: Decoder,
    params: Any,
    prompts: Sequence[Sequence[int]],
    streams: Sequence[SequenceStream],
    sampling: Sequence[SamplingParams],
    callback: Callable[[ChunkUpdate], None] | None = None,
) -> list[SequenceStream]:
    """Generates for every prompt (at most `decoder.batch_size`) until each stream finishes."""
    k = len(prompts)
    if k > decoder.batch_size:
        raise ValueError(f"{k} prompts for a decoder with {decoder.batch_size} slots")
    index = decoder.prompt_bucket(max(len(p) for p in prompts))
    for s in streams:
        if index + s.budget > decoder.cache_len:
            raise ValueError(
                f"prompt bucket {index} + {s.budget} new tokens exceeds the decoder's {decoder.cache_len} cache slots"
            )
    state = decoder.init_state()
    state, first = decoder.insert(
        params,
        state,
        prompts,
        rows=list(range(k)),
        index=index,
        budgets=[s.budget for s in streams],
        stop_ids=[sorted(s.stop_ids) for s in streams],
        sampling=sampling,
    )
    new = [s.push_many([int(t)]) for s, t in zip(streams, first, strict=True)]
    _report(callback, streams, new)
    finish = np.zeros((decoder.batch_size,), bool)
    while not all(s.finished for s in streams):
        for i, s in enumerate(streams):
            finish[i] = s.finished  # rows a stop string ended on the host
        state, tokens = decoder.decode_chunk(params, state, finish)
        new = [
            s.push_many([int(t) for t in tokens[i] if t >= 0]) if not s.finished else [] for i, s in enumerate(streams)
        ]
        if not any(new):
            raise RuntimeError("decode loop made no progress (cache full?); this is a bug")
        _report(callback, streams, new)
    return list(streams)


def _report(callback, streams: Sequence[SequenceStream], new: list[list[int]]) -> None:
    if callback is None:
        return
    texts = [s.text_delta() for s in streams] if all(s.decode is not None for s in streams) else None
    callback(ChunkUpdate(tokens=new, texts=texts, finished=[s.finished for s in streams]))


def generate(
    params: Any,
    config: MossConfig,
    input_ids: Any,
    max_new_tokens: int,
    *,
    segment_ids_BxL: Any = None,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    decode_fn: Callable[[list[int]], str] | None = None,
    callback: Callable[[ChunkUpdate], None] | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int = 0,
    mesh: Mesh | None = None,
    chunk_size: int = 16,
    pad_id: int | None = None,
) -> np.ndarray:
    """Generates up to `max_new_tokens` after each row of `input_ids`; greedy by default.

    Args:
      params: MossLM parameters (sharded on `mesh` when one is given).
      config: the model configuration.
      input_ids: [B, L] ints; rows shorter than L are left-padded, marked 0 in `segment_ids_BxL`.
      max_new_tokens: per row.
      segment_ids_BxL: 1 = real token, 0 = padding (an HF attention_mask); default all real.
      stop_token_ids: ids that end a row (kept in the output), e.g. `<eom>`.
      stop_strings: texts that end a row (needs `decode_fn`); the tokens up to the one that
        completes the string are kept.
      decode_fn: ids -> text, for stop strings and for text deltas in `callback`.
      callback: called after the first token and after every decode chunk with a ChunkUpdate.
      temperature, top_k, top_p, repetition_penalty, seed: see SamplingParams; row b uses
        seed + b so rows draw independently.
      mesh: run tensor/data-parallel on this mesh.
      chunk_size: decode steps per device call.
      pad_id: fills each row after it finished (default config.pad_token_id or 0).

    Returns:
      int32 [B, L + n]: the input followed by the generated tokens, n the longest row's count.
    """
    ids_BxL = np.asarray(input_ids)
    if ids_BxL.ndim != 2 or ids_BxL.shape[0] == 0 or ids_BxL.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, length] array, got shape {ids_BxL.shape}")
    if not np.issubdtype(ids_BxL.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got {ids_BxL.dtype}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    seg_BxL = np.ones_like(ids_BxL) if segment_ids_BxL is None else np.asarray(segment_ids_BxL)
    if seg_BxL.shape != ids_BxL.shape:
        raise ValueError(f"segment_ids_BxL shape {seg_BxL.shape} != input_ids shape {ids_BxL.shape}")
    prompts = [[int(t) for t in row[mask != 0]] for row, mask in zip(ids_BxL, seg_BxL, strict=True)]
    for b, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"row {b} of input_ids has no real token")
        bad = [t for t in prompt if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"row {b} of input_ids has id {bad[0]} outside the vocabulary [0, {config.vocab_size})")
        if len(prompt) + max_new_tokens > config.max_len:
            raise ValueError(
                f"row {b}: {len(prompt)} prompt tokens + {max_new_tokens} new tokens exceed max_len {config.max_len}"
            )
    base = SamplingParams.from_kwargs(temperature, top_k, top_p, repetition_penalty, seed)
    sampling = [dataclasses.replace(base, seed=seed + b) for b in range(len(prompts))]
    prompt_len = max(len(p) for p in prompts)
    cache_len = bucket(prompt_len, 16) + bucket(max_new_tokens, 16)
    decoder = get_decoder(config, bucket(len(prompts)), cache_len, mesh, chunk_size)
    streams = [SequenceStream(max_new_tokens, stop_token_ids, stop_strings, decode_fn) for _ in prompts]
    decode_rows(decoder, params, prompts, streams, sampling, callback)
    n = max(len(s.tokens) for s in streams)
    pad = (config.pad_token_id or 0) if pad_id is None else pad_id
    out = np.full((len(prompts), ids_BxL.shape[1] + n), pad, np.int32)
    out[:, : ids_BxL.shape[1]] = ids_BxL
    for b, s in enumerate(streams):
        out[b, ids_BxL.shape[1] : ids_BxL.shape[1] + len(s.tokens)] = s.tokens
    return out
