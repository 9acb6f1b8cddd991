"""The batching scheduler: one thread that groups waiting requests into batched generates.

Loop:
1. Wait for a request, then ``window_s`` more for concurrent ones to arrive.
2. Pick a batch: policy ``mixed`` takes the oldest requests first, whatever their adapters (at most
   ``max_batch`` rows and the pool's capacity in distinct adapters); policy ``single`` takes only the
   oldest request's adapter (the one-adapter-at-a-time baseline the benchmark compares against).
3. Resolve each request's adapter *now* (a version promoted while it waited is the one it gets), make
   them loaded (pool.activate), run ``engine.generate``, and stream each row's text to its sink.
Requests are never dropped by a hot swap: the pool only changes between batches.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from fedtune.serve.engine import Row, generate
from fedtune.serve.errors import ServeError, Unavailable
from fedtune.serve.pool import BASE, AdapterPool, AdapterSource
from fedtune.serve.text import ServingTokenizer, TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int
    adapter_version: int | None


@dataclass(frozen=True)
class Failed:
    error: ServeError


Event = Delta | Done | Failed


@dataclass
class GenerationRequest:
    prompt: list[int]
    adapter: str | None  # served adapter name; None = the bare base
    params: SamplingParams
    emit: Callable[[Event], None]  # called from the scheduler thread
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class SchedulerStats:
    batches: int = 0
    rows: int = 0
    tokens: int = 0
    max_rows: int = 0


class Scheduler:
    def __init__(self, pool: AdapterPool, tokenizer: ServingTokenizer, max_batch: int = 32,
                 policy: str = "mixed", window_s: float = 0.005):
        if policy not in ("mixed", "single"):
            raise ValueError(f"policy: expected 'mixed' or 'single', got {policy!r}")
        self.pool, self.tokenizer = pool, tokenizer
        self.max_batch, self.policy, self.window_s = max_batch, policy, window_s
        self.stats = SchedulerStats()
        self._queue: deque[GenerationRequest] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="fedtune-serve-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued or running, then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        with self._cond:
            if self._stopping:
                raise Unavailable("the server is shutting down; retry on another instance")
            self._queue.append(request)
            self._cond.notify()
        return request

    # --- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue and self._stopping:
                    return
            if self.window_s > 0:
                time.sleep(self.window_s)
            batch = self._take_batch()
            try:
                self._run(batch)
            except Exception as err:  # noqa: BLE001 - a failed batch fails its requests, never the server
                log.exception("batch of %d failed", len(batch))
                error = err if isinstance(err, ServeError) else ServeError(f"generation failed: {err}")
                for r in batch:
                    r.emit(Failed(error))

    def _take_batch(self) -> list[GenerationRequest]:
        with self._cond:
            waiting = [r for r in self._queue if not r.cancelled]
            self._queue.clear()
            if self.policy == "single" and waiting:
                waiting = [r for r in waiting if r.adapter == waiting[0].adapter] + \
                          [r for r in waiting if r.adapter != waiting[0].adapter]
            batch, names = [], set()
            for r in waiting:
                fits = len(batch) < self.max_batch and (
                    r.adapter in names or r.adapter is None or len(names) < self.pool.capacity)
                if self.policy == "single" and batch:
                    fits = fits and r.adapter == batch[0].adapter
                if fits:
                    batch.append(r)
                    if r.adapter is not None:
                        names.add(r.adapter)
                else:
                    self._queue.append(r)
            return batch

    def _resolve(self, batch: list[GenerationRequest]) -> tuple[list[GenerationRequest], list[AdapterSource | None]]:
        kept, sources = [], []
        for r in batch:
            src = self.pool.source(r.adapter) if r.adapter is not None else None
            if r.adapter is not None and src is None:
                r.emit(Failed(Unavailable(f"adapter {r.adapter} is no longer served", param="model")))
                continue
            kept.append(r)
            sources.append(src)
        good: dict[str, AdapterSource] = {}
        for s in {s.peft_name: s for s in sources if s is not None}.values():
            try:
                self.pool.activate([*good.values(), s])
                good[s.peft_name] = s
            except ServeError as err:  # this adapter is refused; the rest of the batch still runs
                log.warning("%s", err)
                for r, src in zip(kept, sources):
                    if src is not None and src.peft_name == s.peft_name:
                        r.emit(Failed(err))
        pairs = [(r, s) for r, s in zip(kept, sources) if s is None or s.peft_name in good]
        return [r for r, _ in pairs], [s for _, s in pairs]

    def _run(self, batch: list[GenerationRequest]) -> None:
        batch, sources = self._resolve(batch)
        if not batch:
            return
        model = self.pool.model
        device = next(model.parameters()).device
        rows, streams = [], []
        for r, s in zip(batch, sources):
            p = r.params
            gen = None
            if p.temperature > 0:
                gen = torch.Generator(device=device).manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            rows.append(Row(r.prompt, s.peft_name if s else BASE, p.max_tokens, p.temperature, p.top_p, gen))
            streams.append(TextStream(self.tokenizer, p.stop))
        counts = [0] * len(rows)

        def on_token(i: int, token: int) -> bool:
            counts[i] += 1
            piece, stopped = streams[i].push(token)
            if piece:
                batch[i].emit(Delta(piece))
            return stopped or batch[i].cancelled

        reasons = generate(model, rows, self.tokenizer.pad_token_id, on_token, self.tokenizer.eos_token_ids)
        for i, r in enumerate(batch):
            tail = streams[i].finish()
            if tail:
                r.emit(Delta(tail))
            r.emit(Done(reasons[i], len(r.prompt), counts[i], sources[i].version if sources[i] else None))
        self.stats.batches += 1
        self.stats.rows += len(rows)
        self.stats.tokens += sum(counts)
        self.stats.max_rows = max(self.stats.max_rows, len(rows))
