"""Fixtures shared by every test package."""

from __future__ import annotations

import os

# Two xdist workers on two cores: one torch thread each (oversubscribed BLAS threads make small ops
# orders of magnitude slower). Set before any test module imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

# One Redis server per test run: ``GLMV_TEST_REDIS_PORT`` lets several runs on one machine use
# separate servers (the shared default is 6379).
REDIS_PORT = int(os.environ.get("GLMV_TEST_REDIS_PORT", "6379"))


@pytest.fixture
def redis_url() -> str:
    """A real Redis database for this test, flushed before and after.

    Uses ``GLMV_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/<15 - xdist worker>``) so parallel
    workers never share a database.
    """
    import redis

    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    url = os.environ.get("GLMV_TEST_REDIS_URL", f"redis://127.0.0.1:{REDIS_PORT}/{15 - index % 8}")
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - CI always has Redis
        pytest.fail(f"tests need a Redis server at {url}: {exc}")
    client.flushdb()
    yield url
    client.flushdb()
    client.close()
