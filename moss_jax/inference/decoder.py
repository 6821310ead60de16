"""The jitted decode engine: a fixed set of batch slots, prompts inserted into free slots, and
a `lax.while_loop` that decodes a chunk of tokens for every live slot per call.

Shapes are fixed per `Decoder` (B slots, S cache slots), so the decode loop compiles once;
prompt insertion compiles once per (rows, prompt length) bucket (powers of two).

Layout in the KV cache: all rows share the write slot `cache.index` (see moss_jax/model.py).
A prompt of bucket length P is written to slots [index - P, index) of its row, left-padded
(segment id 0) and with rotary positions 0.. from the row's own length, so a request can join
a batch that is already decoding as long as index >= P and index + its budget <= S. When no
row is live the host restarts the batch at index = P.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moss_jax.config import MossConfig
from moss_jax.inference.sampling import RowSampling, SamplingParams, select_next
from moss_jax.model import KVCache, MossLM
from moss_jax.sharding import logical_to_sharding, mesh_rules


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum)."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries, one row per batch slot."""

    cache: KVCache
    last_B: jax.Array  # int32: the row's latest token (the next step's input)
    done_B: jax.Array  # bool: finished or free slot
    count_B: jax.Array  # int32: tokens generated so far (the first comes from the prefill)
    budget_B: jax.Array  # int32: max new tokens
    seen_BxV: jax.Array  # bool: ids in the row's context, for the repetition penalty
    stop_ids_BxT: jax.Array  # int32: stop token ids, -1 = unused
    sampling: RowSampling


def _unstacked(params: Any, n_layers: int) -> Any:
    """Per-layer copies of stacked layer weights, made once before the token loop."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    # The barrier keeps XLA from sinking the slices back into the loop body (a copy per token).
    return jax.lax.optimization_barrier(out)


def _is_stop(tokens_B: jax.Array, stop_ids_BxT: jax.Array) -> jax.Array:
    return jnp.any(tokens_B[:, None] == stop_ids_BxT, axis=-1)


class Decoder:
    """Compiled prefill-into-slots and chunked decode for one model.

    Args:
      config: the model configuration.
      batch_size: number of slots B (rows decoded together).
      cache_len: cache slots S (prompt bucket + new tokens must fit).
      mesh: optional mesh; parameters should be placed with `moss_jax.model.param_shardings`
        (tensor parallelism shards heads/mlp/vocab over the `tensor` axis); the KV cache is
        sharded over heads the same way.
      chunk_size: decode steps per device call; the host streams and checks stop strings
        between calls, so smaller means lower streaming latency, larger less host overhead.
      max_stop_ids: stop token ids per row.
      unroll_layers: decode tokens with per-layer weight copies made once per `decode_chunk` call
        (default: on CPU). XLA:CPU copies a layer's slice of the stacked weights before every
        matmul, i.e. all weights once more per token; the copies cost one pass per chunk instead.
      cache_layout: the KV cache layout (`MossConfig.kv_cache_layout`); default "bhsk" on CPU,
        where the decode attention's dots then read the cache without copying it per token, and
        the config's own (the Pallas decode kernels read "bshk") elsewhere.
    """

    def __init__(
        self,
        config: MossConfig,
        *,
        batch_size: int,
        cache_len: int,
        mesh: Mesh | None = None,
        chunk_size: int = 16,
        max_stop_ids: int = 4,
        unroll_layers: bool | None = None,
        cache_layout: str | None = None,
    ):
        if batch_size < 1 or cache_len < 2 or chunk_size < 1:
            raise ValueError(
                "Decoder: need batch_size >= 1, cache_len >= 2, chunk_size >= 1; "
                f"got batch_size={batch_size}, cache_len={cache_len}, chunk_size={chunk_size}"
            )
        on_cpu = jax.default_backend() == "cpu"
        if cache_layout is None:
            cache_layout = "bhsk" if on_cpu else config.kv_cache_layout
        config = config.replace(kv_cache_layout=cache_layout)
        self.config = config
        self.batch_size = batch_size
        self.cache_len = cache_len
        self.mesh = mesh
        self.chunk_size = chunk_size
        self.max_stop_ids = max_stop_ids
        self.model = MossLM(config)
        self.unroll_layers = on_cpu if unroll_layers is None else unroll_layers
        self._unrolled_model = MossLM(config.replace(scan_layers=False))
        self._state_shardings = None if mesh is None else self._shardings(mesh)
        self._insert_fn = jax.jit(self._insert, donate_argnums=(1,), out_shardings=self._out(2))
        self._chunk_fn = jax.jit(self._chunk, donate_argnums=(1,), out_shardings=self._out(2))

    # Sharding ------------------------------------------------------------------------

    def _shardings(self, mesh: Mesh) -> DecodeState:
        def logical(*names):
            return logical_to_sharding(PartitionSpec(*names), mesh)

        rep = NamedSharding(mesh, PartitionSpec())
        if self.config.kv_cache_layout == "bhsk":
            kv = logical("layers", None, "heads", "kv_length", "head_dim")
        else:
            kv = logical("layers", None, "kv_length", "heads", "head_dim")
        return DecodeState(
            cache=KVCache(k=kv, v=kv, segment_ids=rep, lengths=rep, index=rep),
            last_B=rep,
            done_B=rep,
            count_B=rep,
            budget_B=rep,
            seen_BxV=rep,
            stop_ids_BxT=rep,
            sampling=RowSampling(temperature_B=rep, top_k_B=rep, top_p_B=rep, penalty_B=rep, key_B=rep),
        )

    def _out(self, n: int):
        if self._state_shardings is None:
            return None
        return (self._state_shardings,) + (NamedSharding(self.mesh, PartitionSpec()),) * (n - 1)

    def context(self):
        """The mesh/rules context the jitted functions trace and run in."""
        return mesh_rules(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    # State -----------------------------------------------------------------------------

    def init_state(self) -> DecodeState:
        """All slots free."""
        b, v = self.batch_size, self.config.vocab_size
        state = DecodeState(
            cache=KVCache.init(self.config, b, self.cache_len),
            last_B=jnp.zeros((b,), jnp.int32),
            done_B=jnp.ones((b,), bool),
            count_B=jnp.zeros((b,), jnp.int32),
            budget_B=jnp.zeros((b,), jnp.int32),
            seen_BxV=jnp.zeros((b, v), bool),
            stop_ids_BxT=jnp.full((b, self.max_stop_ids), -1, jnp.int32),
            sampling=RowSampling.from_params([SamplingParams()] * b),
        )
        if self._state_shardings is not None:
            state = jax.device_put(state, self._state_shardings)
        return state

    # Jitted bodies -----------------------------------------------------------------------

    def _insert(self, params, state: DecodeState, ids_kxP, seg_kxP, rows_k, index, budget_k, stops_kxT, sampling_k):
        k, p = ids_kxP.shape
        cfg = self.config
        logits_kx1xV, new_cache = self.model.apply(
            {"params": params}, ids_kxP, segment_ids_BxL=seg_kxP, cache=KVCache.init(cfg, k, p), last_logits_only=True
        )
        cache = state.cache
        start = index - p

        def place(big, small, batch_axis, slot_axis):
            # Whole rows are rewritten: slots outside the prompt get segment id 0 (never attended).
            shape = big.shape[:batch_axis] + (k,) + big.shape[batch_axis + 1 :]
            starts = tuple(start if axis == slot_axis else 0 for axis in range(big.ndim))
            rows = jax.lax.dynamic_update_slice(jnp.zeros(shape, big.dtype), small.astype(big.dtype), starts)
            # Padding rows of the k bucket carry row index B and are dropped.
            where = (slice(None),) * batch_axis + (rows_k,)
            return big.at[where].set(rows, mode="drop")

        real_kxP = seg_kxP > 0
        kv_slot_axis = 3 if cfg.kv_cache_layout == "bhsk" else 2
        cache = KVCache(
            k=place(cache.k, new_cache.k, 1, kv_slot_axis),
            v=place(cache.v, new_cache.v, 1, kv_slot_axis),
            segment_ids=place(cache.segment_ids, seg_kxP.astype(jnp.int32), 0, 1),
            lengths=cache.lengths.at[rows_k].set(jnp.sum(real_kxP, axis=1).astype(jnp.int32), mode="drop"),
            index=jnp.asarray(index, jnp.int32),
        )
        rows_idx = jnp.arange(k)[:, None]
        seen_kxV = jnp.zeros((k, cfg.vocab_size), jnp.int8).at[rows_idx, ids_kxP].max(real_kxP.astype(jnp.int8)) > 0
        first_k = select_next(logits_kx1xV[:, 0], seen_kxV, sampling_k, jnp.zeros((k,), jnp.int32))
        seen_kxV = seen_kxV.at[jnp.arange(k), first_k].set(True)
        done_k = _is_stop(first_k, stops_kxT) | (budget_k <= 1)

        def put(big, small):
            return big.at[rows_k].set(small, mode="drop")

        state = DecodeState(
            cache=cache,
            last_B=put(state.last_B, first_k),
            done_B=put(state.done_B, done_k),
            count_B=put(state.count_B, jnp.ones((k,), jnp.int32)),
            budget_B=put(state.budget_B, budget_k),
            seen_BxV=put(state.seen_BxV, seen_kxV),
            stop_ids_BxT=put(state.stop_ids_BxT, stops_kxT),
            sampling=jax.tree.map(put, state.sampling, sampling_k),
        )
        return state, first_k

    def _chunk(self, params, state: DecodeState, finish_B):
        b, c = self.batch_size, self.chunk_size
        state = state.replace(done_B=state.done_B | finish_B)
        rows_B = jnp.arange(b)
        token_model, token_params = self.model, params
        if self.unroll_layers and "layers" in params:
            token_model, token_params = self._unrolled_model, _unstacked(params, self.config.n_layers)

        def cond(carry):
            step, st, _ = carry
            return (step < c) & ~jnp.all(st.done_B) & (st.cache.index < self.cache_len)

        def body(carry):
            step, st, tokens_BxC = carry
            logits_Bx1xV, cache = token_model.apply({"params": token_params}, st.last_B[:, None], cache=st.cache)
            live_B = ~st.done_B
            next_B = select_next(logits_Bx1xV[:, 0], st.seen_BxV, st.sampling, st.count_B)
            next_B = jnp.where(live_B, next_B, st.last_B)
            count_B = st.count_B + live_B.astype(jnp.int32)
            seen_BxV = st.seen_BxV.at[rows_B, next_B].set(st.seen_BxV[rows_B, next_B] | live_B)
            done_B = st.done_B | (live_B & (_is_stop(next_B, st.stop_ids_BxT) | (count_B >= st.budget_B)))
            tokens_BxC = tokens_BxC.at[:, step].set(jnp.where(live_B, next_B, -1))
            st = st.replace(cache=cache, last_B=next_B, count_B=count_B, seen_BxV=seen_BxV, done_B=done_B)
            return step + 1, st, tokens_BxC

        tokens_BxC = jnp.full((b, c), -1, jnp.int32)
        _, state, tokens_BxC = jax.lax.while_loop(cond, body, (jnp.int32(0), state, tokens_BxC))
        return state, tokens_BxC

    # Host-side calls ---------------------------------------------------------------------

    def insert(
        self,
        params: Any,
        state: DecodeState,
        prompts: Sequence[Sequence[int]],
        rows: Sequence[int],
        index: int,
        budgets: Sequence[int],
        stop_ids: Sequence[Sequence[int]],
        sampling: Sequence[SamplingParams],
    ) -> tuple[DecodeState, np.ndarray]:
        """Prefills `prompts` into slots `rows`, their last token at slot index - 1.

        Returns the new state and each prompt's first generated token. The caller guarantees
        index >= the prompt bucket and index + budget <= cache_len (see `prompt_bucket`).
        """
        k = len(prompts)
        if not (k == len(rows) == len(budgets) == len(stop_ids) == len(sampling)) or k == 0:
            raise ValueError("prompts, rows, budgets, stop_ids and sampling must be non-empty and of equal length")
        longest = max(len(x) for x in prompts)
        if longest > self.cache_len:  # prompt_bucket clips to cache_len, so it would not catch this
            raise ValueError(
                f"a prompt of {longest} tokens does not fit the KV cache of {self.cache_len} slots "
                "(cut the prompt or build the Decoder with a larger cache_len)"
            )
        p = self.prompt_bucket(longest)
        if p > index or index > self.cache_len:
            raise ValueError(f"prompt bucket {p} does not fit before slot index {index} (cache {self.cache_len})")
        kb = min(bucket(k), bucket(self.batch_size))
        ids = np.zeros((kb, p), np.int32)
        seg = np.zeros((kb, p), np.int32)
        row_arr = np.full((kb,), self.batch_size, np.int32)
        budget_arr = np.ones((kb,), np.int32)
        stops = np.full((kb, self.max_stop_ids), -1, np.int32)
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError("empty prompt: a prompt needs at least one token")
            ids[i, p - len(prompt) :] = prompt
            seg[i, p - len(prompt) :] = 1
            row_arr[i] = rows[i]
            budget_arr[i] = budgets[i]
            if len(stop_ids[i]) > self.max_stop_ids:
                raise ValueError(f"at most {self.max_stop_ids} stop token ids per request, got {len(stop_ids[i])}")
            stops[i, : len(stop_ids[i])] = stop_ids[i]
        row_sampling = RowSampling.from_params(list(sampling) + [SamplingParams()] * (kb - k))
        with self.context():
            state, first = self._insert_fn(
                params, state, ids, seg, row_arr, np.int32(index), budget_arr, stops, row_sampling
            )
        return state, np.asarray(first)[:k]

    def decode_chunk(self, params: Any, state: DecodeState, finish: np.ndarray | None = None):
        """Decodes up to `chunk_size` tokens for every live slot.

        Args:
          finish: bool [B]; slots to mark done before decoding (stop strings, cancellations).

        Returns:
          (state, tokens [B, chunk_size] with -1 where a slot produced nothing).
        """
        finish = np.zeros((self.batch_size,), bool) if finish is None else np.asarray(finish, bool)
        with self.context():
            state, tokens = self._chunk_fn(params, state, finish)
        return state, np.asarray(tokens)

    def prompt_bucket(self, length: int) -> int:
        """The padded length a prompt of `length` tokens occupies in the cache."""
        return min(bucket(length, 16), self.cache_len)
