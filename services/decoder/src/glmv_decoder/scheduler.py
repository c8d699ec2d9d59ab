"""Cross-stream chunk scheduler: the chunks that are ready in several streams share one flow call and one
vocoder call.

Each Synthesize stream, once it has a chunk to decode (a ``Tokens`` message, or ``Finish``), submits it
and awaits its audio. A collector task takes what is queued, up to ``max_batch`` chunks (one per stream),
and runs ``run_chunks`` on them in a model worker thread: one batched flow call (rows padded and masked,
each row's noise drawn from its own stream's generator) and one batched vocoder call. While a batch runs,
newly ready chunks queue up and form the next one, so under load batches fill without any waiting.

Waiting is bounded: when fewer than ``max_batch`` chunks are queued and other open streams have nothing
queued yet, the collector waits at most ``max_wait_s`` for them (a stream answered by the previous batch
usually resubmits within a few milliseconds). A lone stream never waits. ``max_batch=1`` decodes every
chunk on its own (the unbatched behaviour).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import Histogram

from glmv_common.logs import get_logger

from .streaming import ChunkPlan, DecoderStream, run_chunks

__all__ = ["ChunkScheduler"]

log = get_logger(__name__)

BATCH_SIZE = Histogram(
    "glmv_decoder_batch_size", "Chunks decoded together in one flow + vocoder step",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
)
QUEUE_SECONDS = Histogram(
    "glmv_decoder_queue_seconds", "From a chunk being ready to its batch starting",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


@dataclass(eq=False)
class _Item:
    stream: DecoderStream
    final: bool
    future: asyncio.Future[np.ndarray]
    queued_at: float = field(default_factory=time.perf_counter)
    running: bool = False
    done: bool = False
    close_after: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class ChunkScheduler:
    """Batches ready chunks across streams. Use from one event loop; model work runs in ``executor``."""

    def __init__(
        self,
        decoder: Any,
        executor: Executor,
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.005,
        workers: int = 1,
        step: Callable[[Any, list[ChunkPlan]], list[np.ndarray]] = run_chunks,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.decoder = decoder
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_s)
        self._executor = executor
        self._step = step
        self._queue: list[_Item] = []
        self._wake: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._workers = max(1, workers)
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._inflight: dict[int, _Item] = {}  # id(stream) -> item being decoded
        self.open_streams = 0  # streams registered (they may submit); drives the wait policy
        self.batch_sizes: list[int] = []  # recent batch sizes (tests, benchmarks)

    # -- stream lifecycle ---------------------------------------------------------------------------
    def register(self) -> None:
        self.open_streams += 1

    def unregister(self, stream: DecoderStream) -> None:
        """The stream's call ended (any way): free its state now, or when its running chunk returns."""
        self.open_streams -= 1
        self._queue = [it for it in self._queue if it.stream is not stream]
        item = self._inflight.get(id(stream))
        if item is not None:
            with item.lock:
                if item.running and not item.done:
                    item.close_after = True
                    return
        stream.close()

    async def submit(self, stream: DecoderStream, final: bool) -> np.ndarray:
        """Decode what ``stream`` has pending (as its final chunk if ``final``); returns the samples."""
        self._ensure_started()
        assert self._wake is not None
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(stream, final, future))
        self._wake.set()
        return await future

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(RuntimeError("decoder scheduler closed"))
        self._queue = []

    # -- internals ----------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._slots = asyncio.Semaphore(self._workers)
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def _take(self) -> list[_Item]:
        self._queue = [it for it in self._queue if not it.future.done()]
        batch, rest, seen = [], [], set()
        for it in self._queue:
            sid = id(it.stream)
            if len(batch) < self.max_batch and sid not in seen and sid not in self._inflight:
                batch.append(it)
                seen.add(id(it.stream))
            else:
                rest.append(it)
        self._queue = rest
        return batch

    def _ready(self) -> int:
        return len({id(it.stream) for it in self._queue if not it.future.done()})

    async def _loop(self) -> None:
        assert self._wake is not None and self._slots is not None
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._slots.acquire()
            try:
                await self._gather()
                batch = self._take()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                if self._queue:  # only streams with a chunk in flight: wait for one to finish
                    self._wake.clear()
                    await self._wake.wait()
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _gather(self) -> None:
        """Bounded wait for other open streams to join, unless the batch is full or nobody else could."""
        assert self._wake is not None
        if self.max_batch == 1 or self.max_wait_s <= 0:
            return
        deadline = time.perf_counter() + self.max_wait_s
        while True:
            ready = self._ready()
            others = self.open_streams - len(self._inflight)
            if ready >= self.max_batch or ready >= others:
                return
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    async def _run(self, batch: list[_Item]) -> None:
        assert self._slots is not None and self._wake is not None
        now = time.perf_counter()
        for it in batch:
            it.running = True
            self._inflight[id(it.stream)] = it
            QUEUE_SECONDS.observe(now - it.queued_at)
        BATCH_SIZE.observe(len(batch))
        self.batch_sizes.append(len(batch))
        if len(self.batch_sizes) > 10_000:
            del self.batch_sizes[:5_000]
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self._decode, batch)
        except Exception as exc:  # a model failure fails every chunk of the batch
            log.exception("decoder batch failed (%d chunks)", len(batch))
            results = [exc] * len(batch)
        finally:
            for it in batch:
                self._inflight.pop(id(it.stream), None)
            self._slots.release()
            self._wake.set()
        for it, res in zip(batch, results, strict=True):
            if it.future.done():
                continue
            if isinstance(res, BaseException):
                it.future.set_exception(res)
            else:
                it.future.set_result(res)

    def _decode(self, batch: list[_Item]) -> list[np.ndarray | BaseException]:
        """Worker thread: plan each stream's chunk, decode them together, then finish each stream."""
        results: list[np.ndarray | BaseException] = [np.zeros(0, np.float32)] * len(batch)
        plans: list[ChunkPlan] = []
        index: list[int] = []
        for i, it in enumerate(batch):
            try:
                plan = it.stream.plan_chunk(it.final)
            except Exception as exc:  # this stream only (e.g. closed meanwhile)
                results[i] = exc
                continue
            if plan is not None:
                plans.append(plan)
                index.append(i)
        try:
            if plans:
                for i, audio in zip(index, self._step(self.decoder, plans), strict=True):
                    results[i] = audio
        finally:
            for it in batch:
                with it.lock:
                    it.done = True
                    if it.final or it.close_after:
                        it.stream.close()
        return results
