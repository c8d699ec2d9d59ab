"""The session store on a real Redis: ids are validated before any key is named, and a turn whose
gateway died (its lock expired unreleased) is reported by the next turn."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from glmv_gateway import metrics
from glmv_gateway.sessions import SessionBusy, SessionNotFound, SessionStore


@pytest.fixture
async def store(redis_url: str):
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield SessionStore(client, ttl_s=60, lock_ttl_s=1)
    await client.aclose()


BAD_IDS = ["x:turns", "", "*", "../x", "0" * 31, "0" * 33, "A" * 32, "0" * 32 + ":lock"]


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_malformed_ids_name_no_key(store: SessionStore, bad: str) -> None:
    session = await store.create({})
    await store.redis.set(f"glmv:session:{bad}", "someone else's")
    for call in (store.get(bad), store.history(bad), store.delete(bad), store.acquire_turn(bad, "t")):
        with pytest.raises(SessionNotFound):
            await call
    assert await store.redis.get(f"glmv:session:{bad}") == "someone else's"
    assert (await store.get(session.id)).id == session.id


async def test_an_unreleased_lock_is_reported_once_it_expires(store: SessionStore) -> None:
    session = await store.create({})
    assert await store.acquire_turn(session.id, "turn-1") is None
    await store.release_turn(session.id, "turn-1")
    assert await store.acquire_turn(session.id, "turn-2") is None  # released: nothing to report
    with pytest.raises(SessionBusy, match="expires in"):
        await store.acquire_turn(session.id, "turn-3")
    before = metrics.INTERRUPTED_TURNS._value.get()
    await asyncio.sleep(1.2)  # turn-2's gateway "died": its lock expires
    assert await store.acquire_turn(session.id, "turn-4") == "turn-2"
    assert metrics.INTERRUPTED_TURNS._value.get() == before + 1
    await store.release_turn(session.id, "turn-4")
    await store.delete(session.id)
    assert await store.redis.keys(f"glmv:session:{session.id}*") == []
