"""The tokenizer's Listen RPC over a real gRPC channel: Silero VAD turn detection on real speech,
streaming tokens per utterance, manual commit / clear, settings changes and errors.

The speech is the committed espeak-ng sample ``samples/question.wav`` ("Hello. ..."), cut at its
one long pause into two phrases and laid out with known silences. Truth for each utterance is the
first / last sample above a small amplitude. Audio goes in 20 ms chunks, as fast as possible.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf

from glmv_common.audio import Encoding, encode_pcm, resample
from glmv_common.runtime import start_service
from glmv_tokenizer import metrics
from glmv_tokenizer.listen import MIN_SPEECH_MS
from glmv_tokenizer.service import TokenizerService, TokenizerSettings
from glmvoice.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "question.wav"
RATE = 16000
LOUD = 0.01  # amplitude that counts as speech for the truth
TOLERANCE_MS = 100
COMMIT = tokenizer_pb2.ListenControl(kind=tokenizer_pb2.ListenControl.KIND_COMMIT)
CLEAR = tokenizer_pb2.ListenControl(kind=tokenizer_pb2.ListenControl.KIND_CLEAR)


def phrases() -> tuple[np.ndarray, np.ndarray]:
    x, rate = sf.read(SAMPLE, dtype="float32")
    assert rate == RATE
    cut = int(0.75 * RATE)  # inside the sample's 0.53-0.97 s pause
    a, b = x[:cut], x[cut:]
    return trim(a), trim(b)


def trim(x: np.ndarray) -> np.ndarray:
    loud = np.nonzero(np.abs(x) > LOUD)[0]
    return x[loud[0] : loud[-1] + 1]


def silence(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * RATE)) * 1e-4).astype(np.float32)


def layout(parts: list[np.ndarray | float]) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Concatenate speech arrays and silences (floats, seconds); returns audio and (start, end) ms truth."""
    out: list[np.ndarray] = []
    truth: list[tuple[float, float]] = []
    pos = 0
    for i, part in enumerate(parts):
        chunk = silence(part, i) if isinstance(part, float) else part
        if not isinstance(part, float):
            truth.append((pos * 1000 / RATE, (pos + len(part)) * 1000 / RATE))
        out.append(chunk)
        pos += len(chunk)
    return np.concatenate(out), truth


def frames(audio: np.ndarray, rate: int, enc: Encoding) -> list[common_pb2.AudioChunk]:
    data = encode_pcm(audio, enc)
    step = rate // 50 * (len(data) // len(audio))  # 20 ms
    return [
        common_pb2.AudioChunk(data=data[i : i + step], encoding=int(enc), sample_rate=rate, channels=1)
        for i in range(0, len(data), step)
    ]


def pcm16(audio: np.ndarray) -> np.ndarray:
    return np.frombuffer(encode_pcm(audio, Encoding.PCM16), "<i2").astype(np.float32) / 32768


def config(**vad) -> tokenizer_pb2.ListenRequest:
    return tokenizer_pb2.ListenRequest(
        config=tokenizer_pb2.ListenConfig(vad=tokenizer_pb2.VadConfig(**vad), session_id="s-listen")
    )


@pytest.fixture
async def server_addr(dev_dir: Path):
    settings = TokenizerSettings(model_dir=dev_dir, port=0, max_audio_seconds=40.0, max_batch_wait_ms=0.0)
    service = TokenizerService(settings)
    running = await start_service(service, settings)
    yield f"127.0.0.1:{running.port}"
    await running.stop(grace=0)


@pytest.fixture
async def server(server_addr: str):
    channel = grpc.aio.insecure_channel(server_addr)
    yield tokenizer_pb2_grpc.SpeechTokenizerStub(channel)
    await channel.close()


async def listen(stub, messages: list[tokenizer_pb2.ListenRequest]) -> list[tokenizer_pb2.ListenEvent]:
    async def requests() -> AsyncIterator[tokenizer_pb2.ListenRequest]:
        for m in messages:
            yield m

    return [event async for event in stub.Listen(requests(), timeout=120)]


async def stream_tokens(stub, audio: np.ndarray) -> list[int]:
    async def requests() -> AsyncIterator[tokenizer_pb2.StreamTokenizeRequest]:
        for f in frames(audio, RATE, Encoding.FLOAT32):
            yield tokenizer_pb2.StreamTokenizeRequest(audio=f)

    return [t async for reply in stub.StreamTokenize(requests(), timeout=120) for t in reply.tokens]


def audio_msgs(chunks: list[common_pb2.AudioChunk]) -> list[tokenizer_pb2.ListenRequest]:
    return [tokenizer_pb2.ListenRequest(audio=c) for c in chunks]


def kinds(events: list[tokenizer_pb2.ListenEvent]) -> list[tuple[str, int]]:
    return [(e.WhichOneof("msg"), getattr(e, e.WhichOneof("msg")).utterance) for e in events]


def check_turns(events, truth, prefix_ms: int) -> list[tuple[float, float]]:
    """Asserts the event sequence and the ±100 ms accuracy; returns the (start, end) errors in ms."""
    expected = []
    for n in range(1, len(truth) + 1):
        expected += [("speech_started", n), ("speech_stopped", n), ("done", n)]
    assert kinds(events) == expected
    errors = []
    for n, (start, end) in enumerate(truth):
        started, stopped, done = (getattr(e, e.WhichOneof("msg")) for e in events[3 * n : 3 * n + 3])
        assert started.audio_start_ms == started.speech_start_ms - prefix_ms
        assert done.audio_start_ms == started.audio_start_ms and done.audio_end_ms == stopped.audio_end_ms
        assert not done.committed and len(done.tokens) > 0 and done.finish_ms >= 0
        errors.append((started.speech_start_ms - start, stopped.audio_end_ms - end))
    assert all(abs(s) <= TOLERANCE_MS and abs(e) <= TOLERANCE_MS for s, e in errors), errors
    return errors


async def test_vad_turns_at_16k_and_tokens_match_stream_tokenize(server) -> None:
    a, b = phrases()
    audio, truth = layout([0.6, a, 1.0, b, 1.5, a, 1.0])
    audio = pcm16(audio)
    events = await listen(
        server, [config(enabled=True), *audio_msgs(frames(audio, RATE, Encoding.PCM16))]
    )
    errors = check_turns(events, truth, prefix_ms=300)
    print("16 kHz pcm16 start/end errors (ms):", errors)
    for n in range(len(truth)):
        done = events[3 * n + 2].done
        span = audio[done.audio_start_ms * 16 : done.audio_end_ms * 16]
        assert list(done.tokens) == await stream_tokens(server, span)


async def test_vad_turns_at_8k_mulaw(server) -> None:
    a, b = phrases()
    audio, truth = layout([0.6, b, 1.5, a, 1.0])
    narrow = resample(audio, RATE, 8000)
    events = await listen(
        server,
        [config(enabled=True, prefix_padding_ms=200), *audio_msgs(frames(narrow, 8000, Encoding.MULAW))],
    )
    errors = check_turns(events, truth, prefix_ms=200)
    print("8 kHz mu-law start/end errors (ms):", errors)


async def test_manual_commit_and_clear(server) -> None:
    a, b = phrases()
    a16 = pcm16(a)
    msgs = [
        *audio_msgs(frames(a16, RATE, Encoding.PCM16)),  # no config: detection off
        tokenizer_pb2.ListenRequest(control=COMMIT),
        tokenizer_pb2.ListenRequest(control=COMMIT),  # nothing since: an empty utterance
        *audio_msgs(frames(pcm16(b), RATE, Encoding.PCM16)),
        tokenizer_pb2.ListenRequest(control=CLEAR),
        *audio_msgs(frames(a16, RATE, Encoding.PCM16)),  # then half-close
    ]
    events = await listen(server, msgs)
    assert kinds(events) == [("done", 1), ("done", 2), ("cleared", 3), ("done", 4)]
    first, empty, last = events[0].done, events[1].done, events[3].done
    expected = await stream_tokens(server, a16)
    assert first.committed and list(first.tokens) == expected
    assert (first.audio_start_ms, first.audio_end_ms) == (0, len(a) // 16)
    assert empty.committed and list(empty.tokens) == []
    assert empty.audio_start_ms == empty.audio_end_ms == first.audio_end_ms
    assert not last.committed and list(last.tokens) == expected
    assert last.audio_start_ms == (len(a) + len(b)) // 16


async def test_settings_change_mid_stream(server) -> None:
    a, b = phrases()
    head, truth = layout([0.6, a, 1.0, b, 1.5])
    head = pcm16(head)
    tail = pcm16(a)
    msgs = [
        config(enabled=True, threshold=0.5, silence_duration_ms=3000),  # the 1 s pause does not split
        *audio_msgs(frames(head[: int(truth[1][0] * 16)], RATE, Encoding.PCM16)),
        config(enabled=True, threshold=0.5, silence_duration_ms=500),  # now the 1.5 s pause does
        *audio_msgs(frames(head[int(truth[1][0] * 16) :], RATE, Encoding.PCM16)),
        config(enabled=False),  # manual from here on
        *audio_msgs(frames(tail, RATE, Encoding.PCM16)),
        tokenizer_pb2.ListenRequest(control=COMMIT),
    ]
    events = await listen(server, msgs)
    assert kinds(events) == [("speech_started", 1), ("speech_stopped", 1), ("done", 1), ("done", 2)]
    stopped, manual = events[1].speech_stopped, events[3].done
    assert abs(stopped.audio_end_ms - truth[1][1]) <= TOLERANCE_MS  # one utterance over both phrases
    assert manual.committed and manual.audio_start_ms == len(head) // 16
    assert list(manual.tokens) == await stream_tokens(server, tail)


async def test_commit_with_vad_ends_the_utterance(server) -> None:
    a, _ = phrases()
    audio, _ = layout([0.5, a])
    audio = pcm16(audio)
    events = await listen(
        server,
        [
            config(enabled=True),
            *audio_msgs(frames(audio, RATE, Encoding.PCM16)),
            tokenizer_pb2.ListenRequest(control=COMMIT),
        ],
    )
    assert kinds(events) == [("speech_started", 1), ("done", 1)]
    done = events[1].done
    assert done.committed and done.audio_end_ms == len(audio) // 16
    span = audio[done.audio_start_ms * 16 :]
    assert list(done.tokens) == await stream_tokens(server, span)


async def test_short_blip_is_ignored(server) -> None:
    a, _ = phrases()
    loud = np.nonzero(np.abs(a) > 0.1)[0][0]
    blip = a[loud : loud + MIN_SPEECH_MS * 16 // 3]  # one VAD window of speech at most
    audio, _ = layout([0.6, blip, 1.0])
    msgs = [config(enabled=True), *audio_msgs(frames(pcm16(audio), RATE, Encoding.PCM16))]
    events = await listen(server, msgs)
    assert events == []


@pytest.mark.parametrize(
    ("vad", "match"),
    [
        ({"enabled": True, "threshold": 1.5}, "threshold"),
        ({"enabled": True, "threshold": 0.0}, "threshold"),
        ({"enabled": True, "silence_duration_ms": 5}, "silence_duration_ms"),
        ({"enabled": True, "prefix_padding_ms": 60_000}, "prefix_padding_ms"),
    ],
)
async def test_bad_config_is_invalid_argument(server, vad, match) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await listen(server, [config(**vad)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in err.value.details()


async def test_bad_audio_is_invalid_argument(server) -> None:
    bad = common_pb2.AudioChunk(data=b"\x00\x00", encoding=0, sample_rate=16000)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await listen(server, [config(enabled=True), tokenizer_pb2.ListenRequest(audio=bad)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "encoding" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await listen(server, [tokenizer_pb2.ListenRequest()])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in err.value.details()


async def test_client_cancel_leaves_no_active_stream(server) -> None:
    a, _ = phrases()
    audio, _ = layout([0.5, a])
    queue: asyncio.Queue[tokenizer_pb2.ListenRequest] = asyncio.Queue()

    async def requests() -> AsyncIterator[tokenizer_pb2.ListenRequest]:
        while True:
            yield await queue.get()

    before = metrics.LISTEN_ACTIVE._value.get()
    call = server.Listen(requests(), timeout=120)
    queue.put_nowait(config(enabled=True))
    for m in audio_msgs(frames(pcm16(audio), RATE, Encoding.PCM16)):
        queue.put_nowait(m)
    first = await call.read()
    assert first.WhichOneof("msg") == "speech_started"
    assert metrics.LISTEN_ACTIVE._value.get() == before + 1
    call.cancel()
    for _ in range(3000):  # up to 30 s for the server to see the cancel
        if metrics.LISTEN_ACTIVE._value.get() == before:
            break
        await asyncio.sleep(0.01)
    assert metrics.LISTEN_ACTIVE._value.get() == before


async def test_gateway_listen_client(server_addr) -> None:
    from glmv_gateway.clients import ComponentError, ServiceClients

    a, b = phrases()
    audio, truth = layout([0.6, a, 1.0, b])  # ends in speech: half-close finishes it
    clients = ServiceClients(server_addr, "127.0.0.1:1", "127.0.0.1:1")
    try:
        stream = clients.listen(
            request_id="r1", session_id="s1", vad=tokenizer_pb2.VadConfig(enabled=True), timeout=120
        )
        for f in frames(pcm16(audio), RATE, Encoding.PCM16):
            await stream.send_audio(f.data, Encoding.PCM16, RATE)
        await stream.close()
        events = [e async for e in stream.events()]
        assert kinds(events) == [
            ("speech_started", 1), ("speech_stopped", 1), ("done", 1),
            ("speech_started", 2), ("speech_stopped", 2), ("done", 2),
        ]  # fmt: skip
        assert events[4].speech_stopped.audio_end_ms == len(audio) // 16
        assert abs(events[3].speech_started.speech_start_ms - truth[1][0]) <= TOLERANCE_MS

        manual = clients.listen(request_id="r2", session_id="s1", vad=None, timeout=120)
        await manual.send_audio(encode_pcm(a, Encoding.PCM16), Encoding.PCM16, RATE)
        await manual.clear()
        await manual.configure(tokenizer_pb2.VadConfig(enabled=True, silence_duration_ms=800))
        await manual.commit()
        await manual.close()
        assert kinds([e async for e in manual.events()]) == [("cleared", 1), ("done", 2)]

        bad = clients.listen(
            request_id="r3", session_id="s1", vad=tokenizer_pb2.VadConfig(enabled=True, threshold=2.0),
            timeout=120,
        )
        with pytest.raises(ComponentError) as err:
            _ = [e async for e in bad.events()]
        assert err.value.component == "tokenizer" and err.value.code == grpc.StatusCode.INVALID_ARGUMENT

        cancelled = clients.listen(request_id="r4", session_id="s1", vad=None, timeout=120)
        await cancelled.send_audio(encode_pcm(a, Encoding.PCM16), Encoding.PCM16, RATE)
        cancelled.cancel()
        assert [e async for e in cancelled.events()] == []
        with pytest.raises(RuntimeError):
            await cancelled.commit()
    finally:
        await clients.close()
