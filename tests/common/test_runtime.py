"""The shared gRPC runtime, exercised with a small servicer over real channels on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from glmv_common.runtime import start_service
from glmv_common.settings import ServiceSettings
from glmvoice.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

SERVICE = "glmvoice.v1.SpeechTokenizer"


class CountingTokenizer(tokenizer_pb2_grpc.SpeechTokenizerServicer):
    """A servicer whose model load can be held and whose stream yields slowly, to drive the runtime."""

    component = "tokenizer"
    service_name = SERVICE

    def __init__(self) -> None:
        self.release_load = threading.Event()
        self.closed = False

    def add_to_server(self, server: grpc.aio.Server) -> None:
        tokenizer_pb2_grpc.add_SpeechTokenizerServicer_to_server(self, server)

    def load(self) -> None:
        assert self.release_load.wait(10)

    async def aclose(self) -> None:
        self.closed = True

    async def Tokenize(self, request, context):
        return tokenizer_pb2.TokenizeResponse(tokens=list(request.audio.data))

    async def StreamTokenize(self, request_iterator, context):
        async for request in request_iterator:
            await asyncio.sleep(0.3)
            yield tokenizer_pb2.StreamTokenizeResponse(tokens=list(request.audio.data))
        await asyncio.sleep(0.5)  # still working when a drain starts
        yield tokenizer_pb2.StreamTokenizeResponse(final=True)

    async def GetInfo(self, request, context):
        return common_pb2.ModelInfo(component="tokenizer", codebook_size=16384)


def settings(**overrides) -> ServiceSettings:
    return ServiceSettings(host="127.0.0.1", port=0, log_format="text", **overrides)


async def health_status(channel: grpc.aio.Channel, service: str = SERVICE) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_health_follows_load_and_drain() -> None:
    servicer = CountingTokenizer()
    running = await start_service(servicer, settings(), wait_ready=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = tokenizer_pb2_grpc.SpeechTokenizerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetInfo(common_pb2.GetInfoRequest())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in err.value.details()

        servicer.release_load.set()
        await running.wait_ready()
        assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        assert await health_status(channel, "") == health_pb2.HealthCheckResponse.SERVING
        assert (await stub.GetInfo(common_pb2.GetInfoRequest())).codebook_size == 16384

        # drain: NOT_SERVING is visible while an in-flight stream is still finishing
        call = stub.StreamTokenize(
            iter([tokenizer_pb2.StreamTokenizeRequest(audio=common_pb2.AudioChunk(data=b"\x01\x02"))])
        )
        first = await call.read()
        assert list(first.tokens) == [1, 2]
        stopping = asyncio.create_task(running.stop(grace=5))
        await asyncio.sleep(0.1)
        assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        last = await call.read()
        assert last.final
        await stopping
    assert servicer.closed


async def test_concurrency_bound_returns_resource_exhausted() -> None:
    servicer = CountingTokenizer()
    servicer.release_load.set()
    running = await start_service(servicer, settings(max_concurrent_streams=2))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = tokenizer_pb2_grpc.SpeechTokenizerStub(channel)

            async def slow_stream():
                await asyncio.sleep(0.5)
                yield tokenizer_pb2.StreamTokenizeRequest(audio=common_pb2.AudioChunk(data=b"\x05"))

            calls = [stub.StreamTokenize(slow_stream()) for _ in range(2)]
            for _ in range(50):
                if running.active_calls == 2:
                    break
                await asyncio.sleep(0.02)
            assert running.active_calls == 2
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Tokenize(tokenizer_pb2.TokenizeRequest(audio=common_pb2.AudioChunk(data=b"\x01")))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "capacity" in err.value.details()
            for call in calls:
                replies = [r async for r in call]
                assert [list(r.tokens) for r in replies] == [[5], []]
            # capacity is back once the streams ended
            reply = await stub.Tokenize(
                tokenizer_pb2.TokenizeRequest(audio=common_pb2.AudioChunk(data=b"\x07"))
            )
            assert list(reply.tokens) == [7]
            # health and reflection are never counted against the bound
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await running.stop(grace=1)


async def test_reflection_lists_the_service() -> None:
    servicer = CountingTokenizer()
    servicer.release_load.set()
    running = await start_service(servicer, settings())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = [s.name async for r in responses for s in r.list_services_response.service]
            assert SERVICE in names and "grpc.health.v1.Health" in names
    finally:
        await running.stop(grace=1)


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_metrics_counts_calls(free_port: int) -> None:
    servicer = CountingTokenizer()
    servicer.release_load.set()
    running = await start_service(servicer, settings(metrics_port=free_port))

    async def get_info_count() -> tuple[float, str]:
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics").read().decode()
        )
        wanted = ('component="tokenizer"', 'method="GetInfo"', 'code="OK"')
        lines = [
            ln
            for ln in body.splitlines()
            if ln.startswith("glmv_grpc_requests_total{") and all(w in ln for w in wanted)
        ]
        return (float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0), body

    try:
        before, _ = await get_info_count()  # the registry is per process: other tests count too
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = tokenizer_pb2_grpc.SpeechTokenizerStub(channel)
            for _ in range(3):
                await stub.GetInfo(common_pb2.GetInfoRequest())
        after, body = await get_info_count()
        assert after - before == 3
        assert 'glmv_model_ready{component="tokenizer"} 1.0' in body
    finally:
        await running.stop(grace=1)


SERVER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {tests!r})
    from common.test_runtime import CountingTokenizer, settings
    from glmv_common.runtime import serve
    from glmv_common.settings import ServiceSettings

    servicer = CountingTokenizer()
    servicer.release_load.set()
    asyncio.run(serve(servicer, ServiceSettings(host="127.0.0.1", port={port}, log_format="text",
                                               drain_timeout_s=10)))
    """
)


def test_sigterm_lets_in_flight_stream_finish(free_port: int) -> None:
    tests_dir = os.path.dirname(os.path.dirname(__file__))
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT.format(tests=tests_dir, port=free_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{free_port}")
        grpc.channel_ready_future(channel).result(timeout=20)
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 20
        while health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stub = tokenizer_pb2_grpc.SpeechTokenizerStub(channel)
        requests = [
            tokenizer_pb2.StreamTokenizeRequest(audio=common_pb2.AudioChunk(data=bytes([i])))
            for i in range(3)
        ]
        call = stub.StreamTokenize(iter(requests))
        first = next(call)
        proc.send_signal(signal.SIGTERM)
        rest = list(call)
        assert [list(r.tokens) for r in [first, *rest]] == [[0], [1], [2], []]
        assert rest[-1].final
        assert proc.wait(timeout=20) == 0
        output = proc.stdout.read()
        assert "draining" in output and "stopped" in output
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
