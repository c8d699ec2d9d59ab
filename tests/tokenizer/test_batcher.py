"""The dynamic batcher: batching, error propagation, batching off, loop never blocked."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from glmv_tokenizer.batcher import DynamicBatcher


async def test_collects_concurrent_items_into_one_call() -> None:
    calls: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        calls.append(items)
        return [i * 10 for i in items]

    batcher = DynamicBatcher(fn, max_batch=8, max_wait_ms=50)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(5))) == [0, 10, 20, 30, 40]
    assert calls == [[0, 1, 2, 3, 4]]
    await batcher.aclose()


async def test_max_batch_one_disables_batching() -> None:
    sizes: list[int] = []
    batcher = DynamicBatcher(lambda items: sizes.append(len(items)) or items, max_batch=1, max_wait_ms=50)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(4))) == [0, 1, 2, 3]
    assert sizes == [1, 1, 1, 1]
    await batcher.aclose()


async def test_errors_reach_every_caller_and_the_loop_survives() -> None:
    def fn(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return items

    batcher = DynamicBatcher(fn, max_batch=4, max_wait_ms=20)
    results = await asyncio.gather(batcher.submit(13), batcher.submit(1), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    assert await batcher.submit(2) == 2
    await batcher.aclose()


async def test_model_call_runs_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []

    def fn(items: list[int]) -> list[int]:
        seen.append(threading.get_ident())
        time.sleep(0.2)
        return items

    batcher = DynamicBatcher(fn, max_batch=2, max_wait_ms=0)
    task = asyncio.create_task(batcher.submit(1))
    ticks = 0
    while not task.done():
        await asyncio.sleep(0.01)
        ticks += 1
    assert await task == 1 and seen[0] != loop_thread and ticks >= 10
    await batcher.aclose()
    with pytest.raises(RuntimeError):
        await batcher.submit(1)
