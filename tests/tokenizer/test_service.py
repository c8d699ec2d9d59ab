"""The tokenizer gRPC service over a real channel on 127.0.0.1."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from glmv_common.audio import Encoding, encode_pcm
from glmv_common.runtime import start_service
from glmv_tokenizer.service import TokenizerService, TokenizerSettings
from glmv_tokenizer.tokenizer import SpeechTokenizer, prepare_audio
from glmvoice.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

from .conftest import speech


@pytest.fixture
async def server(dev_dir: Path):
    settings = TokenizerSettings(model_dir=dev_dir, port=0, max_audio_seconds=40.0, max_batch_wait_ms=20.0)
    service = TokenizerService(settings)
    running = await start_service(service, settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield tokenizer_pb2_grpc.SpeechTokenizerStub(channel), service
    await channel.close()
    await running.stop(grace=0)


def chunk(x: np.ndarray, rate: int = 16000, enc: Encoding = Encoding.FLOAT32) -> common_pb2.AudioChunk:
    return common_pb2.AudioChunk(data=encode_pcm(x, enc), encoding=int(enc), sample_rate=rate, channels=1)


async def test_tokenize_and_info(server, tokenizer: SpeechTokenizer) -> None:
    stub, _ = server
    audio = speech(50, 3.0)
    reply = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(audio=chunk(audio), request_id="r1"))
    assert list(reply.tokens) == tokenizer.tokenize(audio)
    assert reply.audio_seconds == pytest.approx(3.0)
    assert {t.stage for t in reply.timings} == {"decode", "tokenize"}
    info = await stub.GetInfo(common_pb2.GetInfoRequest())
    assert info.component == "tokenizer" and info.codebook_size == 64
    assert info.token_rate_hz == 12.5 and info.input_sample_rate == 16000
    assert (
        info.checkpoint_fingerprint == tokenizer.info.fingerprint and len(info.checkpoint_fingerprint) == 64
    )


async def test_pcm16_at_8k(server, tokenizer: SpeechTokenizer) -> None:
    stub, _ = server
    audio = 0.5 * speech(51, 2.0)[::2]
    reply = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(audio=chunk(audio, 8000, Encoding.PCM16)))
    pcm = np.frombuffer(encode_pcm(audio, Encoding.PCM16), "<i2").astype(np.float32) / 32768
    assert list(reply.tokens) == tokenizer.tokenize_batch([prepare_audio(pcm, 8000)])[0]


async def test_concurrent_clients_are_batched(server, tokenizer: SpeechTokenizer) -> None:
    stub, service = server
    audios = [speech(60 + i, 0.5 + 0.4 * i) for i in range(8)]
    replies = await asyncio.gather(
        *(stub.Tokenize(tokenizer_pb2.TokenizeRequest(audio=chunk(a))) for a in audios)
    )
    assert [list(r.tokens) for r in replies] == tokenizer.tokenize_batch(audios)
    assert service.batcher.stats.largest > 1


@pytest.mark.parametrize(
    ("audio_chunk", "match"),
    [
        (common_pb2.AudioChunk(data=b"", encoding=2, sample_rate=16000), "empty"),
        (
            common_pb2.AudioChunk(data=np.array([np.nan], "<f4").tobytes(), encoding=2, sample_rate=16000),
            "NaN",
        ),
        (
            common_pb2.AudioChunk(data=np.array([np.inf], "<f4").tobytes(), encoding=2, sample_rate=16000),
            "NaN",
        ),
        (common_pb2.AudioChunk(data=b"\0\0" * 100, encoding=1, sample_rate=4000), "out of range"),
        (common_pb2.AudioChunk(data=b"\0\0" * 100, encoding=1, sample_rate=200000), "out of range"),
        (common_pb2.AudioChunk(data=b"\0\0\0", encoding=2, sample_rate=16000), "whole number"),
        (common_pb2.AudioChunk(data=b"\0\0" * 100, encoding=0, sample_rate=16000), "unspecified"),
        (common_pb2.AudioChunk(data=b"\0\0" * 100, encoding=9, sample_rate=16000), "encoding"),
        (common_pb2.AudioChunk(data=b"\0\0" * 16000 * 41, encoding=1, sample_rate=16000), "maximum"),
    ],
)
async def test_bad_input_is_invalid_argument(server, audio_chunk: common_pb2.AudioChunk, match: str) -> None:
    stub, _ = server
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Tokenize(tokenizer_pb2.TokenizeRequest(audio=audio_chunk))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in err.value.details()


async def test_silence_is_fine(server) -> None:
    stub, _ = server
    reply = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(audio=chunk(np.zeros(16000, np.float32))))
    assert len(reply.tokens) == 13


async def test_stream_tokenize(server, tokenizer: SpeechTokenizer) -> None:
    stub, _ = server
    audio = speech(70, 9.0)

    async def requests():
        for start in range(0, len(audio), 8000):
            first = start == 0
            piece = audio[start : start + 8000]
            yield tokenizer_pb2.StreamTokenizeRequest(
                audio=chunk(piece)
                if first
                else common_pb2.AudioChunk(data=encode_pcm(piece, Encoding.FLOAT32))
            )

    replies = [r async for r in stub.StreamTokenize(requests())]
    assert [len(r.tokens) for r in replies] == [50, 50, 13] and [r.offset for r in replies] == [0, 50, 100]
    assert [r.final for r in replies] == [False, False, True]
    assert [t for r in replies for t in r.tokens] == tokenizer.tokenize_batch([audio])[0]


async def test_stream_resamples(server, tokenizer: SpeechTokenizer) -> None:
    stub, _ = server
    audio = speech(71, 2.0)

    async def requests():
        yield tokenizer_pb2.StreamTokenizeRequest(audio=chunk(audio[:1000], 24000))
        yield tokenizer_pb2.StreamTokenizeRequest(audio=chunk(audio[1000:], 24000))

    replies = [r async for r in stub.StreamTokenize(requests())]
    tokens = [t for r in replies for t in r.tokens]
    assert len(tokens) == tokenizer.expected_tokens(len(prepare_audio(audio, 24000)))


async def test_stream_bad_input(server) -> None:
    stub, _ = server

    async def empty():
        return
        yield

    async def rate_change():
        yield tokenizer_pb2.StreamTokenizeRequest(audio=chunk(np.zeros(100, np.float32)))
        yield tokenizer_pb2.StreamTokenizeRequest(audio=chunk(np.zeros(100, np.float32), 8000))

    for gen, match in [(empty, "empty"), (rate_change, "sample rate changed")]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [r async for r in stub.StreamTokenize(gen())]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert match in err.value.details()


async def test_missing_model_fails_to_load(tmp_path: Path) -> None:
    settings = TokenizerSettings(model_dir=tmp_path / "missing", port=0)
    with pytest.raises(Exception, match="not found"):
        await start_service(TokenizerService(settings), settings)


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLMV_TOKENIZER_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("GLMV_TOKENIZER_BATCHING", "false")
    s = TokenizerSettings()
    assert s.max_batch_size == 3 and s.batching is False and s.max_audio_seconds == 600.0
