"""The model side of evaluation: token log-probabilities and batched generation.

    model = EvalModel.from_checkpoint("ckpt/tiny", "data/vocab/moss_sp.model")
    scores = model.score([[start, *ids]])          # log p(ids[i] | ids[:i]) and greedy flags
    texts = model.generate(["prompt"], max_new_tokens=32, stop_strings=["\\n"])

Every harness (multiple choice, bits per byte, code, conversation checks, the lm-eval
adapter) goes through `score` and `generate`, so a model with designed logits (a plain
`logits_fn`) runs the same code as a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moss_jax.config import MossConfig

# (ids_BxL int32, segment_ids_BxL int32; 0 = padding) -> logits_BxLxV float32
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]

logger = logging.getLogger(__name__)


class EvalError(ValueError):
    """Bad evaluation input: a dataset in the wrong layout, a mismatched checkpoint, ..."""


@dataclasses.dataclass(frozen=True)
class TokenScores:
    """For a sequence t_0..t_n: logprobs[i-1] = log p(t_i | t_<i), greedy[i-1] = t_i is the argmax."""

    logprobs: np.ndarray  # [n] float64
    greedy: np.ndarray  # [n] bool


def bucket_len(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _score_fn(logits_fn: LogitsFn):
    @jax.jit
    def score(ids_BxL, seg_BxL):
        logits_BxLxV = logits_fn(ids_BxL, seg_BxL).astype(jnp.float32)
        logp_BxLxV = jax.nn.log_softmax(logits_BxLxV[:, :-1], axis=-1)
        targets_BxL = ids_BxL[:, 1:]
        logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
        greedy_BxL = jnp.argmax(logits_BxLxV[:, :-1], axis=-1) == targets_BxL
        return logp_BxL, greedy_BxL

    return score


def _last_fn(logits_fn: LogitsFn):
    @jax.jit
    def last(ids_BxL, seg_BxL):
        """log-softmax over the vocabulary after each row's last real token: [B, V]."""
        logits_BxLxV = logits_fn(ids_BxL, seg_BxL).astype(jnp.float32)
        last_B = jnp.sum(seg_BxL != 0, axis=1) - 1
        logits_BxV = jnp.take_along_axis(logits_BxLxV, last_B[:, None, None], axis=1)[:, 0]
        return jax.nn.log_softmax(logits_BxV, axis=-1)

    return last


def moss_logits_fn(config: MossConfig, params: Any) -> LogitsFn:
    from moss_jax.model import MossLM

    model = MossLM(config)

    def logits_fn(ids_BxL, seg_BxL):
        return model.apply({"params": params}, ids_BxL, segment_ids_BxL=seg_BxL)

    return logits_fn


class EvalModel:
    """A language model as the harnesses see it: text <-> ids, token scores, generation.

    Args:
      logits_fn: (ids_BxL, segment_ids_BxL) -> logits_BxLxV; padding has segment id 0.
      vocab_size, max_len: the model's vocabulary and context.
      encode, decode: the tokenizer.
      start_id: scored texts begin with this id so their first token is predicted too
        (our SentencePiece runs start documents from id 0, the t5x decoder start; the released
        MOSS uses `<|endoftext|>`).
      generate_fn: (prompt id lists, max_new_tokens, stop_strings, sampling kwargs) -> texts;
        None for a model that only scores. A `stop_ids` keyword ends a row at any of those
        token ids, and that row's text ends with the token's text (`<eom>`); a row the
        budget cut does not.
      batch_size: rows per forward pass (padded to it, so one compile per length bucket).

    `prompts_cut` counts the prompts `generate` had to cut from the left to leave room for
    `max_new_tokens` (a harness that can cut at better places, such as whole conversation
    turns, should do so before calling it and report this count).
    """

    def __init__(
        self,
        logits_fn: LogitsFn,
        *,
        vocab_size: int,
        max_len: int,
        encode: Callable[[str], list[int]],
        decode: Callable[[Sequence[int]], str],
        start_id: int = 0,
        generate_fn: Callable[..., list[str]] | None = None,
        batch_size: int = 8,
        name: str = "model",
        mesh: Any = None,
    ):
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.encode = encode
        self.decode = decode
        self.start_id = start_id
        self.batch_size = batch_size
        self.name = name
        self._score = _score_fn(logits_fn)
        self._last = _last_fn(logits_fn)
        self._generate = generate_fn
        self.mesh = mesh
        self.prompts_cut = 0

    def _context(self):
        """The mesh and logical-axis rules the jitted functions trace and run in."""
        if self.mesh is None:
            return contextlib.nullcontext()
        from moss_jax.sharding import mesh_rules

        return mesh_rules(self.mesh)

    # Construction ----------------------------------------------------------------------
    @classmethod
    def from_params(
        cls, config: MossConfig, params: Any, tokenizer: Any, *, batch_size: int = 8, mesh: Any = None, **kw
    ) -> EvalModel:
        """A moss_jax model and an `inference.tokenizer.Tokenizer`; checks they belong together.

        With `mesh`, params must already be placed with `moss_jax.model.param_shardings`.
        """
        check_params(config, params)
        if tokenizer.vocab_size > config.vocab_size:
            raise EvalError(
                f"the tokenizer has {tokenizer.vocab_size} entries but the model's vocabulary has "
                f"{config.vocab_size} rows: this tokenizer was not trained for this checkpoint"
            )
        start = kw.pop("start_id", None)
        if start is None:
            start = config.bos_token_id if config.bos_token_id is not None else 0
        generate_fn = functools.partial(_moss_generate, config, params, tokenizer, mesh=mesh)
        return cls(
            moss_logits_fn(config, params),
            vocab_size=config.vocab_size,
            max_len=config.max_len,
            encode=tokenizer.encode,
            decode=tokenizer.decode,
            start_id=start,
            generate_fn=generate_fn,
            batch_size=batch_size,
            mesh=mesh,
            **kw,
        )

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | os.PathLike, tokenizer: str | os.PathLike, tensor_parallel: int = 1, **kw
    ) -> EvalModel:
        """Our params checkpoint or a HF directory, and a SentencePiece model or BPE directory.

        `tensor_parallel` > 1 shards heads, MLP and vocabulary over that many local devices.
        """
        from moss_jax.inference.local import load_model
        from moss_jax.inference.tokenizer import load_tokenizer

        mesh = None
        if tensor_parallel > 1:
            from moss_jax.sharding import make_mesh

            if tensor_parallel > jax.device_count():
                raise EvalError(f"tensor_parallel={tensor_parallel} but only {jax.device_count()} device(s)")
            mesh = make_mesh(data=1, fsdp=1, tensor=tensor_parallel, devices=jax.devices()[:tensor_parallel])
        try:
            config, params = load_model(checkpoint, mesh)
        except (FileNotFoundError, ValueError) as e:
            raise EvalError(f"checkpoint {checkpoint}: {e}") from e
        except Exception as e:  # orbax reports a shape mismatch with its own exception types
            raise EvalError(
                f"checkpoint {checkpoint}: its parameters could not be read for the model its "
                f"moss_config.json describes ({type(e).__name__}: {str(e)[:500]})"
            ) from e
        return cls.from_params(config, params, load_tokenizer(tokenizer), name=str(checkpoint), mesh=mesh, **kw)

    # Scoring ---------------------------------------------------------------------------
    def _batches(self, sequences: Sequence[Sequence[int]], min_len: int):
        """Yields (row indices, ids_BxL, segment_ids_BxL): longest first, padded to buckets."""
        for i, seq in enumerate(sequences):
            if len(seq) < min_len:
                raise EvalError(f"sequence {i} has {len(seq)} token(s); this needs at least {min_len}")
            if len(seq) > self.max_len:
                raise EvalError(f"sequence {i} has {len(seq)} tokens, over the model's max_len {self.max_len}")
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            length = min(bucket_len(max(len(sequences[i]) for i in rows)), self.max_len)
            ids = np.zeros((self.batch_size, length), np.int32)
            seg = np.zeros((self.batch_size, length), np.int32)
            for r, i in enumerate(rows):
                seq = np.asarray(sequences[i], np.int32)
                ids[r, : len(seq)] = seq
                seg[r, : len(seq)] = 1
            yield rows, jnp.asarray(ids), jnp.asarray(seg)

    def score(self, sequences: Sequence[Sequence[int]]) -> list[TokenScores]:
        """Scores every token after the first of each sequence (at most max_len tokens each)."""
        out: list[TokenScores | None] = [None] * len(sequences)
        for rows, ids, seg in self._batches(sequences, 2):
            with self._context():
                logp, greedy = jax.device_get(self._score(ids, seg))
            for r, i in enumerate(rows):
                n = len(sequences[i]) - 1
                out[i] = TokenScores(logp[r, :n].astype(np.float64), greedy[r, :n].astype(bool))
        return out  # type: ignore[return-value]

    def next_token_logprobs(self, contexts: Sequence[Sequence[int]], candidates: Sequence[int]) -> np.ndarray:
        """[N, C] log p(candidate | context): one forward pass per context for single-token choices.

        Contexts too long for the model lose tokens from the left.
        """
        contexts = [(list(c) or [self.start_id])[-self.max_len :] for c in contexts]
        cand = np.asarray(candidates, np.int64)
        out = np.zeros((len(contexts), len(cand)))
        for rows, ids, seg in self._batches(contexts, 1):
            with self._context():
                logp_BxV = np.asarray(jax.device_get(self._last(ids, seg)))
            for r, i in enumerate(rows):
                out[i] = logp_BxV[r, cand]
        return out

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), whether greedy decoding gives the continuation).

        Contexts too long for the model lose tokens from the left; an empty context starts
        from `start_id`.
        """
        seqs, spans = [], []
        for i, (context, continuation) in enumerate(requests):
            if not continuation:
                raise EvalError(f"request {i}: empty continuation")
            context = list(context) or [self.start_id]
            seq = (context + list(continuation))[-self.max_len :]
            if len(seq) <= len(continuation):
                raise EvalError(f"request {i}: continuation of {len(continuation)} tokens does not fit max_len")
            seqs.append(seq)
            spans.append(len(continuation))
        results = []
        for s, n in zip(self.score(seqs), spans, strict=True):
            results.append((float(s.logprobs[-n:].sum()), bool(s.greedy[-n:].all())))
        return results

    def text_logprobs(self, ids: Sequence[int]) -> np.ndarray:
        """log p of every token of a text of any length: start_id then windows of max_len.

        Each window after the first begins with the previous window's last token, so every
        token is scored once, with up to max_len - 1 tokens of context.
        """
        seq = [self.start_id, *ids]
        windows, pos = [], 0
        while pos < len(seq) - 1:
            windows.append(seq[pos : pos + self.max_len])
            pos += self.max_len - 1
        return np.concatenate([s.logprobs for s in self.score(windows)]) if windows else np.zeros((0,))

    # Generation ------------------------------------------------------------------------
    @property
    def can_generate(self) -> bool:
        return self._generate is not None

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, stop_strings: Sequence[str] = (), **sampling
    ) -> list[str]:
        """Greedy by default; each text is cut before the first stop string.

        `stop_ids=[...]` (with the sampling keywords) also ends a text at those token ids; such
        a text ends with the token's own text (`... <eom>`), so a caller can tell it from one
        that ran out of `max_new_tokens`.

        A prompt longer than `max_len - max_new_tokens` tokens loses tokens from the left (as
        lm-eval's own models do); each such prompt is counted in `prompts_cut` and logged.
        """
        if self._generate is None:
            raise EvalError(f"{self.name} scores only; this suite needs generation")
        ids = [self.encode(p) for p in prompts]
        room = self.max_len - max_new_tokens
        cut = [i for i, p in enumerate(ids) if room > 0 and len(p) > room]
        if cut:
            self.prompts_cut += len(cut)
            longest = max(len(ids[i]) for i in cut)
            logger.warning(
                "%s: %d of %d prompt(s) cut from the left to %d tokens (max_len %d - max_new_tokens %d; longest %d)",
                self.name,
                len(cut),
                len(ids),
                room,
                self.max_len,
                max_new_tokens,
                longest,
            )
            ids = [p[-room:] if len(p) > room else p for p in ids]
        texts = self._generate(ids, max_new_tokens, stop_strings, **sampling)
        return [cut_at_stop(t, stop_strings) for t in texts]


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop_strings if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


def _moss_generate(
    config, params, tokenizer, prompts, max_new_tokens, stop_strings, batch_size=8, mesh=None, **sampling
):
    from moss_jax.inference.decoder import bucket
    from moss_jax.inference.generate import decode_rows, get_decoder
    from moss_jax.inference.sampling import SamplingParams
    from moss_jax.inference.streaming import SequenceStream

    stop_ids = sampling.pop("stop_ids", ())
    seed = sampling.pop("seed", 0)
    base = SamplingParams.from_kwargs(
        sampling.pop("temperature", None),
        sampling.pop("top_k", None),
        sampling.pop("top_p", None),
        sampling.pop("repetition_penalty", None),
        seed,
    )
    if sampling:
        raise TypeError(f"unknown sampling argument(s) {sorted(sampling)}")
    if not 0 < max_new_tokens < config.max_len:
        raise EvalError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_len {config.max_len}")
    room = config.max_len - max_new_tokens
    too_long = [i for i, p in enumerate(prompts) if len(p) > room]
    if too_long:  # EvalModel.generate cuts (and counts) first; nothing is cut silently here
        raise EvalError(
            f"prompt {too_long[0]} has {len(prompts[too_long[0]])} tokens; with max_new_tokens={max_new_tokens} "
            f"at most {room} fit max_len {config.max_len}"
        )
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start : start + batch_size]]
        cache_len = bucket(max(len(p) for p in chunk), 16) + bucket(max_new_tokens, 16)
        decoder = get_decoder(config, bucket(len(chunk)), cache_len, mesh, 16)
        streams = [SequenceStream(max_new_tokens, stop_ids, stop_strings, tokenizer.decode) for _ in chunk]
        rows = [dataclasses.replace(base, seed=seed + start + b) for b in range(len(chunk))]
        decode_rows(decoder, params, chunk, streams, rows)
        texts.extend(_reply_text(s, tokenizer.decode) for s in streams)
    return texts


def _reply_text(stream, decode) -> str:
    """The stream's text, plus the text of the stop token that ended it (if one did).

    `SequenceStream.text` never holds stop tokens; a check that must tell a reply that ended on
    `<eom>` from one the token budget cut needs to see it.
    """
    if stream.finish_reason == "stop" and stream.tokens and stream.tokens[-1] in stream.stop_ids:
        return stream.text + decode([stream.tokens[-1]])
    return stream.text


def check_params(config: MossConfig, params: Any) -> None:
    """EvalError naming the first parameter whose shape differs from what `config` describes."""
    import flax.linen as nn

    from moss_jax.model import abstract_params

    want = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(config)))[0]
    have = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, leaf in want:
        name = jax.tree_util.keystr(path)
        if path not in have:
            raise EvalError(f"the parameters lack {name} that the config ({_describe(config)}) needs")
        if tuple(np.shape(have[path])) != tuple(leaf.shape):
            raise EvalError(
                f"parameter {name} has shape {tuple(np.shape(have[path]))} but the config "
                f"({_describe(config)}) needs {tuple(leaf.shape)}: a checkpoint of another size"
            )
    extra = sorted(set(map(jax.tree_util.keystr, have)) - {jax.tree_util.keystr(p) for p, _ in want})
    if extra:
        raise EvalError(f"the parameters have entries the config ({_describe(config)}) does not: {extra[:5]}")


def _describe(config: MossConfig) -> str:
    return f"d_model={config.d_model}, n_layers={config.n_layers}, vocab_size={config.vocab_size}"
