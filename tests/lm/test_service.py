"""The LM gRPC service over a real channel: GetInfo, concurrent streams, errors, queue bound, cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from glmv_common.runtime import start_service
from glmv_lm.service import LmService, LmSettings
from glmv_lm.text_tokenizer import GlmTextTokenizer
from glmvoice.v1 import common_pb2, lm_pb2, lm_pb2_grpc

CODEBOOK = 64


@pytest.fixture(scope="module")
def model_dir(dev_dir: Path) -> Path:
    """The session's dev checkpoint (tests/lm/conftest.py: seed 0, codebook 64)."""
    return dev_dir


def settings(model_dir: Path, **overrides: object) -> LmSettings:
    base: dict[str, object] = {"model_dir": model_dir, "port": 0, "metrics_port": 0, "log_format": "text"}
    base.update(overrides)
    return LmSettings(**base)  # type: ignore[arg-type]


class Served:
    def __init__(self, service: LmService, running: object, channel: grpc.aio.Channel) -> None:
        self.service = service
        self.running = running
        self.channel = channel
        self.stub = lm_pb2_grpc.LanguageModelStub(channel)


async def serve(model_dir: Path, **overrides: object) -> Served:
    service = LmService(settings(model_dir, **overrides))
    running = await start_service(service, service.settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    return Served(service, running, channel)


async def shutdown(served: Served) -> None:
    await served.channel.close()
    await served.running.stop(grace=1)  # type: ignore[attr-defined]


def text_request(text: str, max_new: int, **sampling: object) -> lm_pb2.GenerateRequest:
    return lm_pb2.GenerateRequest(
        mode=lm_pb2.INPUT_MODE_TEXT,
        turns=[lm_pb2.Turn(role=lm_pb2.Turn.ROLE_USER, text=text)],
        sampling=lm_pb2.SamplingParams(**{"temperature": 0.0, "max_new_tokens": max_new, **sampling}),
    )


def audio_request(tokens: list[int], max_new: int) -> lm_pb2.GenerateRequest:
    return lm_pb2.GenerateRequest(
        mode=lm_pb2.INPUT_MODE_AUDIO,
        turns=[lm_pb2.Turn(role=lm_pb2.Turn.ROLE_USER, audio=lm_pb2.SpeechTokens(tokens=tokens))],
        sampling=lm_pb2.SamplingParams(temperature=0.0, max_new_tokens=max_new),
    )


async def collect(stub: lm_pb2_grpc.LanguageModelStub, request: lm_pb2.GenerateRequest):
    deltas: list[lm_pb2.TokenDelta] = []
    done = None
    async for msg in stub.Generate(request):
        if msg.HasField("delta"):
            assert done is None, "no delta may follow the final message"
            deltas.append(msg.delta)
        else:
            done = msg.done
    assert done is not None
    return deltas, done


@pytest.fixture
async def served(model_dir: Path) -> AsyncIterator[Served]:
    s = await serve(model_dir, max_batch_size=4, max_queue=8)
    try:
        yield s
    finally:
        await shutdown(s)


async def test_get_info(served: Served, model_dir: Path) -> None:
    info = await served.stub.GetInfo(common_pb2.GetInfoRequest())
    tok = GlmTextTokenizer.from_dir(model_dir)
    assert info.component == "lm"
    assert info.audio_token_offset == tok.audio_offset
    assert info.audio_token_count == info.codebook_size == CODEBOOK
    assert info.token_rate_hz == 12.5
    assert len(info.checkpoint_fingerprint) >= 32
    assert info.model_id and info.version and info.dtype == "float32"


async def test_concurrent_streams_match_sequential(served: Served, model_dir: Path) -> None:
    tok = GlmTextTokenizer.from_dir(model_dir)
    requests = [
        text_request("Hello, how are you?", 40),
        text_request("What is the weather like today? It is sunny and warm.", 13),
        audio_request([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], 31),
        text_request("你好，今天天气怎么样？", 22),
        audio_request(list(range(CODEBOOK)), 7),
    ]
    together = await asyncio.gather(*(collect(served.stub, r) for r in requests))
    alone = [await collect(served.stub, r) for r in requests]
    for (deltas, done), (deltas1, done1), req in zip(together, alone, requests, strict=True):
        ids = [d.id for d in deltas]
        assert ids == [d.id for d in deltas1]
        assert [d.index for d in deltas] == list(range(len(deltas)))
        assert done.completion_tokens == len(deltas) == done1.completion_tokens
        assert done.prompt_tokens > 0 and done.dropped_turns == 0
        if done.end_reason == lm_pb2.END_REASON_MAX_TOKENS:
            assert len(deltas) == req.sampling.max_new_tokens
        else:
            assert done.end_reason in (lm_pb2.END_REASON_END_TOKEN, lm_pb2.END_REASON_EOS)
        for d in deltas:
            if d.kind == lm_pb2.DELTA_KIND_AUDIO:
                assert d.audio_token == d.id - tok.audio_offset and 0 <= d.audio_token < CODEBOOK
            else:
                assert d.kind == lm_pb2.DELTA_KIND_TEXT and not tok.is_audio(d.id)
        text_ids = [d.id for d in deltas if d.kind == lm_pb2.DELTA_KIND_TEXT]
        assert done.text == tok.decode(text_ids, skip_special_tokens=True)
        assert done.text.startswith("".join(d.text for d in deltas))
        assert done.text_tokens + done.audio_tokens == done.completion_tokens
        assert done.time_to_first_token_ms > 0


async def test_invalid_requests(served: Served) -> None:
    user = lm_pb2.Turn.ROLE_USER
    bad = [
        lm_pb2.GenerateRequest(),  # no turns
        lm_pb2.GenerateRequest(turns=[lm_pb2.Turn(role=lm_pb2.Turn.ROLE_UNSPECIFIED, text="hi")]),
        lm_pb2.GenerateRequest(
            turns=[lm_pb2.Turn(role=user, audio=lm_pb2.SpeechTokens(tokens=[1, CODEBOOK]))]
        ),
        lm_pb2.GenerateRequest(turns=[lm_pb2.Turn(role=user, text="")]),
        text_request("hi", 5, top_p=0.0),
        text_request("hi", 5, temperature=-1.0),
    ]
    for req in bad:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(served.stub, req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, req
        assert err.value.details()


async def test_turn_over_window_and_dropped_turns(model_dir: Path) -> None:
    s = await serve(model_dir, max_context=160, reply_reserve_tokens=16)
    try:
        long_turn = text_request("The quick brown fox jumps over the lazy dog. " * 40, 5)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(s.stub, long_turn)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "context window" in err.value.details()
        history = []
        for i in range(6):
            history += [
                lm_pb2.Turn(role=lm_pb2.Turn.ROLE_USER, text=f"Question number {i} about the weather today?"),
                lm_pb2.Turn(
                    role=lm_pb2.Turn.ROLE_ASSISTANT, text="It is sunny and warm, thank you very much!"
                ),
            ]
        history.append(lm_pb2.Turn(role=lm_pb2.Turn.ROLE_USER, text="And tomorrow?"))
        req = lm_pb2.GenerateRequest(
            mode=lm_pb2.INPUT_MODE_TEXT,
            turns=history,
            sampling=lm_pb2.SamplingParams(temperature=0.0, max_new_tokens=8),
        )
        _deltas, done = await collect(s.stub, req)
        assert done.dropped_turns > 0 and done.dropped_turns % 2 == 0
        assert done.prompt_tokens + done.completion_tokens <= 160
    finally:
        await shutdown(s)


async def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_queue_bound_and_cancellation_free_capacity(model_dir: Path) -> None:
    s = await serve(model_dir, max_batch_size=1, max_queue=1)
    engine = s.service.engine
    assert engine is not None
    try:
        long = lm_pb2.GenerateRequest(
            mode=lm_pb2.INPUT_MODE_TEXT,
            turns=[lm_pb2.Turn(role=lm_pb2.Turn.ROLE_USER, text="Tell me a long story.")],
            # sampling at a high temperature keeps the tiny model from ending early
            sampling=lm_pb2.SamplingParams(
                temperature=50.0, top_k=0, top_p=1.0, seed=1, max_new_tokens=100000
            ),
        )
        first = s.stub.Generate(long)
        got_first = await first.read()
        assert got_first.HasField("delta")
        second_call = s.stub.Generate(text_request("Hello", 4))
        second = asyncio.create_task(_drain(second_call))
        await wait_for(lambda: engine.waiting == 1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(s.stub, text_request("Hi", 4))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert engine.running == 1
        first.cancel()  # the client goes away: its slot is freed and the queued call runs
        _deltas, done = await asyncio.wait_for(second, 20)
        assert done.end_reason in (
            lm_pb2.END_REASON_MAX_TOKENS,
            lm_pb2.END_REASON_END_TOKEN,
            lm_pb2.END_REASON_EOS,
        )
        await wait_for(lambda: engine.running == 0 and engine.waiting == 0)
    finally:
        await shutdown(s)


async def _drain(call):  # type: ignore[no-untyped-def]
    deltas, done = [], None
    async for msg in call:
        if msg.HasField("delta"):
            deltas.append(msg.delta)
        else:
            done = msg.done
    return deltas, done


async def test_audio_cap_from_request(served: Served) -> None:
    req = audio_request(list(range(20)), 300)
    req.sampling.temperature = 50.0  # near-uniform over the vocabulary: audio tokens come quickly
    req.sampling.top_k = 0
    req.sampling.top_p = 1.0
    req.sampling.seed = 3
    req.sampling.max_audio_tokens = 3
    deltas, done = await collect(served.stub, req)
    audio = [d for d in deltas if d.kind == lm_pb2.DELTA_KIND_AUDIO]
    assert done.end_reason == lm_pb2.END_REASON_AUDIO_CAP  # seeded: deterministic
    assert len(audio) == 3 and deltas[-1].kind == lm_pb2.DELTA_KIND_AUDIO
    assert done.audio_tokens == 3 and done.completion_tokens == len(deltas)
