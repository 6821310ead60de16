"""Continuous batching for the server: concurrent requests share the jitted decode loop.

One background thread owns the device. Each iteration it (1) drops cancelled requests and
frees their slots, (2) prefills waiting requests into free slots, (3) decodes one chunk for
every live slot and hands each request its new tokens and text. Requests join a batch that is
already decoding when their prompt fits before the shared write slot and their budget fits
after it (see decoder.py); otherwise they wait until the batch drains, first come first served.

Callbacks run on the engine thread and must be quick (the server forwards them to its event loop).
`EngineGenerator` is the blocking `TextGenerator` over the engine that the server's tool loop
(ChatSession, on a worker thread) uses, so its generations join the same batch.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moss_jax.inference.chat_session import Generation
from moss_jax.inference.decoder import Decoder
from moss_jax.inference.sampling import SamplingParams
from moss_jax.inference.streaming import SequenceStream

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Event:
    """New text for a request; `finish_reason` set on its last event ("stop", "length", "cancelled", "error")."""

    text: str
    tokens: list[int]
    finish_reason: str | None = None
    error: str | None = None


class Handle:
    """A submitted request: cancel it, or read its final state after the last event."""

    def __init__(self, request_id: int, request: Request, stream: SequenceStream, on_event: Callable[[Event], None]):
        self.id = request_id
        self.request = request
        self.stream = stream
        self.on_event = on_event
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.finish_reason: str | None = None

    def cancel(self) -> None:
        """Frees the request's slot at the next engine iteration (no-op once finished)."""
        self.cancelled.set()


class BatchEngine:
    """Serves many requests from one `Decoder`.

    Args:
      decoder: fixes the slot count and cache length.
      params: model parameters.
      decode: ids -> text (for stop strings and streamed text).
    """

    def __init__(self, decoder: Decoder, params: Any, decode: Callable[[Sequence[int]], str]):
        self.decoder = decoder
        self.params = params
        self.decode = decode
        self._pending: collections.deque[Handle] = collections.deque()
        self._slots: list[Handle | None] = [None] * decoder.batch_size
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._state = None
        self._index = 0
        self.stats = collections.Counter()

    # Public API ------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Raises ValueError when the request could never be scheduled."""
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if len(request.stop_ids) > self.decoder.max_stop_ids:
            raise ValueError(f"at most {self.decoder.max_stop_ids} stop token ids")
        n, cache_len = len(request.prompt_ids), self.decoder.cache_len
        if n > cache_len:
            raise ValueError(f"{n} prompt tokens do not fit the {cache_len}-slot cache")
        # A prompt occupies its padded bucket (a power of two), not just its own length.
        padded = self.decoder.prompt_bucket(n)
        need = padded + request.max_new_tokens
        if need > cache_len:
            prompt = f"{n} prompt tokens" + (f" (padded to {padded})" if padded != n else "")
            raise ValueError(
                f"{prompt} + {request.max_new_tokens} new tokens need {need} of the {cache_len} cache slots"
            )

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        """Queues a request; `on_event` gets its text as it is generated, then a final event."""
        self.check(request)
        stream = SequenceStream(request.max_new_tokens, request.stop_ids, request.stop_strings, self.decode)
        handle = Handle(next(self._ids), request, stream, on_event)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            self._pending.append(handle)
            self._cond.notify()
        return handle

    def start(self) -> BatchEngine:
        if self._thread is None:
            self._state = self.decoder.init_state()
            self._thread = threading.Thread(target=self._run, name="moss-batch-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"active": sum(s is not None for s in self._slots), "pending": len(self._pending)}

    # Engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._pending and all(s is None for s in self._slots):
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                self._iteration()
            except Exception as e:  # noqa: BLE001 -- fail the requests in flight, keep serving
                logger.exception("engine iteration failed")
                self._fail_all(f"{type(e).__name__}: {e}")
        self._fail_all("server shutting down")

    def _iteration(self) -> None:
        with self._cond:
            for row, h in enumerate(self._slots):
                if h is not None and h.cancelled.is_set():
                    self._slots[row] = None
                    self._finish(h, "cancelled")
            kept = collections.deque(h for h in self._pending if not h.cancelled.is_set())
            for h in self._pending:
                if h.cancelled.is_set():
                    self._finish(h, "cancelled")
            self._pending = kept
            admitted, rows, index = self._admit()
        if admitted:
            self._insert(admitted, rows, index)
        if any(s is not None for s in self._slots):
            self._decode_chunk()

    def _admit(self) -> tuple[list[Handle], list[int], int]:
        """Takes waiting requests that fit, in order; called with the lock held."""
        dec = self.decoder
        free = [r for r, s in enumerate(self._slots) if s is None]
        fresh = len(free) == dec.batch_size
        index = 0 if fresh else self._index
        admitted: list[Handle] = []
        for h in list(self._pending):
            if len(admitted) == len(free):
                break
            p = dec.prompt_bucket(len(h.request.prompt_ids))
            if fresh:
                new_index = max(index, p)
                group = admitted + [h]
                if any(new_index + g.request.max_new_tokens > dec.cache_len for g in group):
                    break
                index = new_index
            elif p > index or index + h.request.max_new_tokens > dec.cache_len:
                break  # first come first served: later requests wait too
            admitted.append(h)
            self._pending.popleft()
        if admitted and not fresh:
            self.stats["joined_running_batch"] += len(admitted)
        rows = free[: len(admitted)]
        for r, h in zip(rows, admitted, strict=True):
            self._slots[r] = h
        return admitted, rows, index

    def _insert(self, admitted: list[Handle], rows: list[int], index: int) -> None:
        self._state, first = self.decoder.insert(
            self.params,
            self._state,
            [h.request.prompt_ids for h in admitted],
            rows,
            index,
            budgets=[h.request.max_new_tokens for h in admitted],
            stop_ids=[list(h.request.stop_ids) for h in admitted],
            sampling=[h.request.sampling for h in admitted],
        )
        self._index = index
        self.stats["admitted"] += len(admitted)
        for row, h, token in zip(rows, admitted, first, strict=True):
            self._deliver(row, h, [int(token)])

    def _decode_chunk(self) -> None:
        finish = np.asarray([s is None for s in self._slots])
        self._state, tokens = self.decoder.decode_chunk(self.params, self._state, finish)
        self._index = int(self._state.cache.index)
        self.stats["chunks"] += 1
        for row, h in enumerate(list(self._slots)):
            if h is not None:
                new = [int(t) for t in tokens[row] if t >= 0]
                if new:
                    self._deliver(row, h, new)

    def _deliver(self, row: int, h: Handle, tokens: list[int]) -> None:
        accepted = h.stream.push_many(tokens)
        text = h.stream.text_delta()
        if h.stream.finished:
            with self._cond:
                self._slots[row] = None
            self._finish(h, h.stream.finish_reason or "length", text, accepted)
        elif text or accepted:
            self._emit(h, Event(text, accepted))

    def _finish(self, h: Handle, reason: str, text: str = "", tokens: Sequence[int] = (), error: str | None = None):
        if h.done.is_set():
            return
        h.finish_reason = reason
        self.stats[f"finished_{reason}"] += 1
        self._emit(h, Event(text, list(tokens), finish_reason=reason, error=error))
        h.done.set()

    def _emit(self, h: Handle, event: Event) -> None:
        try:
            h.on_event(event)
        except Exception:  # noqa: BLE001 -- a broken consumer must not stop the other requests
            logger.exception("request %d: event callback failed; cancelling it", h.id)
            h.cancel()

    def _fail_all(self, message: str) -> None:
        with self._cond:
            handles = [s for s in self._slots if s is not None] + list(self._pending)
            self._slots = [None] * self.decoder.batch_size
            self._pending.clear()
        for h in handles:
            self._finish(h, "error", error=message)
        # The device state may be half-updated: start the next batch from a clean one.
        if self._thread is not None and not self._stopping:
            self._state = self.decoder.init_state()


class GenerationCancelled(RuntimeError):
    """The request was cancelled (its client left) while a generation was running."""


class EngineGenerator:
    """A blocking `TextGenerator` over a started `BatchEngine`, for one request's generations.

    Call from a worker thread, never the engine thread. `cancel()` (from any thread) ends the
    running generation and makes later ones raise `GenerationCancelled`. Token counts of every
    generation are summed in `prompt_tokens` / `completion_tokens`.
    """

    def __init__(self, engine: BatchEngine):
        self.engine = engine
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._cancelled = threading.Event()
        self._handle: Handle | None = None

    def cancel(self) -> None:
        self._cancelled.set()
        handle = self._handle
        if handle is not None:
            handle.cancel()

    def generate_text(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        stop_strings: Sequence[str],
        sampling: SamplingParams,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        if self._cancelled.is_set():
            raise GenerationCancelled("the request was cancelled")
        request = Request(list(prompt_ids), max_new_tokens, sampling, tuple(stop_ids), tuple(stop_strings))
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        handle = self._handle = self.engine.submit(request, events.put)
        if self._cancelled.is_set():  # cancel() ran between the check above and the submit
            handle.cancel()
        while True:
            event = events.get()
            if event.text and on_text is not None:
                on_text(event.text)
            if event.finish_reason is not None:
                break
        if event.finish_reason == "cancelled":
            raise GenerationCancelled("the request was cancelled")
        if event.finish_reason == "error":
            raise RuntimeError(f"generation failed: {event.error}")
        self.prompt_tokens += len(prompt_ids)
        self.completion_tokens += len(handle.stream.tokens)
        return Generation(handle.stream.text, list(handle.stream.tokens), event.finish_reason)
