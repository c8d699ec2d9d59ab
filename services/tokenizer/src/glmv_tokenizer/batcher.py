"""Dynamic batching: concurrent requests share one model forward, off the event loop.

Callers ``await batcher.submit(item)``. A single collector task takes the first waiting item,
keeps collecting for up to ``max_wait_ms`` (or until ``max_batch`` items), then runs
``fn(items)`` in a one-thread executor so forwards never overlap and never block the loop, and
hands each caller its own result. While a forward runs, new requests queue up and form the next
batch, so under load batches fill without waiting. ``max_batch=1`` turns batching off.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from glmv_common.logs import get_logger

T = TypeVar("T")
R = TypeVar("R")

log = get_logger(__name__)


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    largest: int = 0
    sizes: list[int] = field(default_factory=list)

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.largest = max(self.largest, size)
        if len(self.sizes) < 10_000:
            self.sizes.append(size)


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._closed = False
        self._last_forward_end = 0.0
        self.stats = BatchStats()

    def _ensure_started(self) -> asyncio.Queue[tuple[T, asyncio.Future[R]]]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        return self._queue

    async def submit(self, item: T) -> R:
        if self._closed:
            raise RuntimeError("batcher is closed")
        queue = self._ensure_started()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await queue.put((item, future))
        return await future

    async def _collect(
        self, queue: asyncio.Queue[tuple[T, asyncio.Future[R]]]
    ) -> list[tuple[T, asyncio.Future[R]]]:
        batch = [await queue.get()]
        if queue.empty() and time.monotonic() - self._last_forward_end > self.max_wait_s:
            # Idle service: nobody is likely to join, so do not make a lone request wait. Under load
            # requests queue up while a forward runs and form the next batch without waiting.
            return [(item, fut) for item, fut in batch if not fut.cancelled()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return [(item, fut) for item, fut in batch if not fut.cancelled()]

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(self._queue)
            if not batch:
                continue
            items = [item for item, _ in batch]
            self.stats.record(len(items))
            try:
                try:
                    results = await loop.run_in_executor(self._executor, self._fn, items)
                finally:
                    self._last_forward_end = time.monotonic()
                if len(results) != len(items):
                    raise RuntimeError(
                        f"batch function returned {len(results)} results for {len(items)} items"
                    )
            except Exception as exc:  # every caller of the batch gets the error
                log.exception("batched call failed (%d items)", len(items))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def aclose(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._queue is not None:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(RuntimeError("batcher closed"))
        self._executor.shutdown(wait=True)
