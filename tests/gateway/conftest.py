"""The whole stack as real processes (Redis, three gRPC services, the gateway) on dev checkpoints."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from glmv_gateway.client import GatewayClient
from glmv_gateway.stack import LocalStack, make_dev_models

from ..conftest import REDIS_PORT

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK_SECRET = "test-webhook-secret"
SAMPLE = ROOT / "samples" / "question.wav"


def worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker[2:].isdigit() else 0


def stack_db(kind: str) -> int:
    """Redis database of a test stack (its Celery broker takes the next one). Each xdist worker has
    its own: the session stack 2/3 (worker 0), 4/5 (worker 1); a test's own stack 6/7, 8/9."""
    base = {"session": 2, "own": 6}[kind]
    return base + 2 * (worker_index() % 2)


@pytest.fixture(scope="session")
def dev_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_dev_models(tmp_path_factory.getbasetemp() / "models")


def start_stack(
    dev_models: dict[str, Path],
    tmp: Path,
    db: int,
    redis_port: int = REDIS_PORT,
    prefix_cache: bool = True,
    **gateway_env: str,
) -> LocalStack:
    """``redis_port`` other than 6379: the stack starts (and stops) a private redis-server there.
    ``prefix_cache=False``: the LM reuses no keys/values across requests, so a seeded reply does not
    depend on which requests the stack served before (reuse changes float rounding, which can flip
    a sampled token)."""
    env = {
        "GLMV_GATEWAY_LOCK_TTL_S": "5",
        "GLMV_GATEWAY_MAX_UPLOAD_BYTES": str(2 * 1024 * 1024),
        "GLMV_GATEWAY_MAX_AUDIO_SECONDS": "20",
        "GLMV_GATEWAY_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "GLMV_GATEWAY_WEBHOOK_BACKOFF_S": "0.2",
        "GLMV_GATEWAY_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "GLMV_GATEWAY_JOB_VISIBILITY_TIMEOUT_S": "3",
        "GLMV_GATEWAY_JOB_RETRY_BACKOFF_S": "0.5",
        "GLMV_GATEWAY_JOB_MAX_RETRIES": "2",
        **gateway_env,
    }
    stack = LocalStack(
        models=dev_models,
        redis_url=f"redis://127.0.0.1:{redis_port}/{db}",
        log_dir=tmp,
        gateway_env=env,
        extra_env={"OMP_NUM_THREADS": "1", **({} if prefix_cache else {"GLMV_LM_PREFIX_CACHE_TOKENS": "0"})},
        jobs_dir=tmp / "jobs",
    )
    import redis

    if redis_port == REDIS_PORT:  # shared server: start from empty databases
        redis.Redis.from_url(stack.redis_url).flushdb()
        redis.Redis.from_url(stack.broker_url).flushdb()
    return stack.start(timeout=240)


@pytest.fixture(scope="session")
def stack(dev_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    # Shared by many test files in whatever order xdist gives them, and several of them rely on a
    # seeded reply being long (seed 7): without the prefix cache that reply is the same every run.
    running = start_stack(
        dev_models, tmp_path_factory.mktemp("stack-logs"), db=stack_db("session"), prefix_cache=False
    )
    yield running
    running.stop()


@pytest.fixture
def client(stack: LocalStack) -> Iterator[GatewayClient]:
    with GatewayClient(stack.gateway_url, stack.api_key) as c:
        yield c


@pytest.fixture
def sample_wav() -> bytes:
    return SAMPLE.read_bytes()


# Replies short enough for a fast suite, reproducible by seed.
FAST = {"max_new_tokens": 48, "seed": 1234, "temperature": 0.8, "top_p": 1.0}
