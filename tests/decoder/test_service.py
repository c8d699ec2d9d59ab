"""The decoder gRPC service over real channels on 127.0.0.1, with the dev checkpoint."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import numpy as np
import pytest

from glmv_common import audio as gaudio
from glmv_common.runtime import start_service
from glmv_decoder.checkpoint import load_decoder
from glmv_decoder.devmodel import write_dev_checkpoint
from glmv_decoder.service import DecoderService, DecoderSettings
from glmv_decoder.streaming import DecoderStream, feat_len
from glmvoice.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc

PCM16 = common_pb2.AUDIO_ENCODING_PCM16
F32 = common_pb2.AUDIO_ENCODING_FLOAT32
MULAW = common_pb2.AUDIO_ENCODING_MULAW


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dev_checkpoint(tmp_path_factory.mktemp("decoder") / "dev", seed=0)


@pytest.fixture(scope="module")
def decoder(model_dir: Path):
    return load_decoder(model_dir)


def settings(**kw) -> DecoderSettings:
    base = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "log_format": "text", "finish_grace_s": 0.05}
    return DecoderSettings(**{**base, **kw})


class Server:
    def __init__(self, service: DecoderService, running) -> None:
        self.service, self.running = service, running
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        self.stub = decoder_pb2_grpc.SpeechDecoderStub(self.channel)
        self.jobs: list = []
        opened = service.open

        def spy(start):
            job = opened(start)
            self.jobs.append(job)
            return job

        service.open = spy  # type: ignore[method-assign]

    async def close(self) -> None:
        await self.channel.close()
        await self.running.stop(grace=0)


@pytest.fixture
async def server(decoder):
    service = DecoderService(settings(max_stream_tokens=60), decoder=decoder)
    srv = Server(service, await start_service(service, service.settings))
    yield srv
    await srv.close()


def toks(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(64) for _ in range(n)]


def requests(*msgs: decoder_pb2.SynthesizeRequest):
    async def gen():
        for m in msgs:
            yield m

    return gen()


def start(rate: int = 0, encoding: int = 0, seed: int | None = None, window: int = 0):
    s = decoder_pb2.SynthesizeStart(sample_rate=rate, encoding=encoding, prompt_window_tokens=window)
    if seed is not None:
        s.seed = seed
    return decoder_pb2.SynthesizeRequest(start=s)


def tokens(ids: list[int]):
    return decoder_pb2.SynthesizeRequest(tokens=decoder_pb2.SynthesizeTokens(tokens=ids))


FINISH = decoder_pb2.SynthesizeRequest(finish=decoder_pb2.SynthesizeFinish())


async def collect(stub, *msgs) -> list[decoder_pb2.SynthesizeResponse]:
    return [r async for r in stub.Synthesize(requests(*msgs))]


def local_stream(decoder, chunks: list[list[int]], seed: int = 42, window: int = 50) -> np.ndarray:
    stream = DecoderStream(decoder, seed=seed, prompt_window_tokens=window)
    out = [stream.push(c) for c in chunks[:-1]] + [stream.finish(chunks[-1])]
    return np.concatenate(out)


def check_sequence(responses, rate: int) -> np.ndarray:
    assert [r.seq for r in responses] == list(range(len(responses)))
    assert [r.final for r in responses] == [False] * (len(responses) - 1) + [True]
    pieces, offset = [], 0
    for r in responses:
        assert r.sample_offset == offset and r.audio.sample_rate == rate
        x = gaudio.decode_pcm(r.audio.data, r.audio.encoding, 1)[:, 0]
        offset += len(x)
        pieces.append(x)
    return np.concatenate(pieces)


async def test_stream_pcm16_native_matches_local_streaming(server, decoder) -> None:
    chunks = [toks(10), toks(20, 1), toks(7, 2)]
    responses = await collect(
        server.stub, start(), tokens(chunks[0]), tokens(chunks[1]), tokens(chunks[2]), FINISH
    )
    audio = check_sequence(responses, 22050)
    assert len(responses) == 4 and responses[-1].tokens_consumed == 37
    assert len(audio) == 256 * feat_len(37)
    expected = local_stream(decoder, [*chunks, []])
    assert np.abs(audio - expected).max() <= 1 / 32768 + 1e-6  # PCM16 quantisation only
    assert {t.stage for t in responses[0].timings} == {"flow", "hift"}
    assert server.service.open_streams == 0 and not server.jobs[0].stream.holds_state


async def test_resampled_float32_equals_whole_signal_resampling(server, decoder) -> None:
    chunks = [toks(12), toks(9, 3)]
    responses = await collect(server.stub, start(16000, F32), tokens(chunks[0]), tokens(chunks[1]), FINISH)
    audio = check_sequence(responses, 16000)
    whole = gaudio.resample(local_stream(decoder, [*chunks, []]), 22050, 16000)
    whole = np.clip(whole, -1, 1)  # the random dev vocoder's near-full-scale output rings past ±1
    assert len(audio) == len(whole)
    assert np.abs(audio - whole).max() < 1e-4


async def test_mulaw_8k_and_seed(server, decoder) -> None:
    ids = toks(15)
    a = check_sequence(await collect(server.stub, start(8000, MULAW, seed=7), tokens(ids), FINISH), 8000)
    b = check_sequence(await collect(server.stub, start(8000, MULAW, seed=8), tokens(ids), FINISH), 8000)
    assert len(a) == len(b) == len(gaudio.resample(np.zeros(256 * feat_len(15), np.float32), 22050, 8000))
    assert not np.array_equal(a, b)


async def test_finish_only_releases_withheld_tail(server) -> None:
    responses = await collect(server.stub, start(), tokens(toks(20)), FINISH)
    assert len(responses) == 2
    tail = gaudio.decode_pcm(responses[1].audio.data, PCM16, 1)
    assert len(tail) == 256 * 35  # the 34 withheld frames + the cached frame


async def test_empty_stream_finishes_with_empty_final(server) -> None:
    responses = await collect(server.stub, start(), FINISH)
    assert len(responses) == 1 and responses[0].final and len(responses[0].audio.data) == 0


async def _code(stub, *msgs, match: str = "") -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub, *msgs)
    assert match in info.value.details()
    return info.value.code()


async def test_errors_map_to_status_codes_and_service_keeps_serving(server) -> None:
    s = server.stub
    assert await _code(s, start(), tokens([64]), FINISH) == grpc.StatusCode.INVALID_ARGUMENT
    assert await _code(s, tokens([1, 2]), FINISH, match="before Start") == grpc.StatusCode.FAILED_PRECONDITION
    assert await _code(s, FINISH) == grpc.StatusCode.FAILED_PRECONDITION
    assert await _code(s, start(), start(), FINISH) == grpc.StatusCode.FAILED_PRECONDITION
    after_finish = await _code(s, start(), tokens(toks(8)), FINISH, tokens([1]), match="after Finish")
    assert after_finish == grpc.StatusCode.FAILED_PRECONDITION
    over_cap = await _code(s, start(), tokens(toks(40)), tokens(toks(21)), match="limit of 60")
    assert over_cap == grpc.StatusCode.INVALID_ARGUMENT
    assert await _code(s, start(44100), FINISH) == grpc.StatusCode.INVALID_ARGUMENT
    assert await _code(s, start(0, 9), FINISH) == grpc.StatusCode.INVALID_ARGUMENT
    assert await _code(s, start(window=3), FINISH) == grpc.StatusCode.INVALID_ARGUMENT
    assert await _code(s, start(), tokens(toks(3))) == grpc.StatusCode.FAILED_PRECONDITION  # no Finish
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(s, start(), tokens([70000]), FINISH)
    assert "outside the codebook" in info.value.details()
    # still serving, and nothing leaked
    ok = await collect(s, start(), tokens(toks(10)), FINISH)
    assert ok[-1].final
    assert server.service.open_streams == 0
    assert all(not j.stream.holds_state for j in server.jobs)


async def test_concurrent_streams_do_not_interfere(decoder) -> None:
    service = DecoderService(settings(model_workers=2), decoder=decoder)
    srv = Server(service, await start_service(service, service.settings))
    try:
        plans = [(seed, [toks(8, seed), toks(11, seed + 10)]) for seed in (1, 2, 3, 4)]
        results = await asyncio.gather(
            *[collect(srv.stub, start(seed=seed), tokens(c[0]), tokens(c[1]), FINISH) for seed, c in plans]
        )
        for (seed, chunks), responses in zip(plans, results, strict=True):
            audio = check_sequence(responses, 22050)
            expected = local_stream(decoder, [*chunks, []], seed=seed)
            assert len(audio) == len(expected)
            # Concurrent streams may share batched steps: equal to the unbatched decoding within 2e-3.
            assert np.abs(audio - expected).max() <= 2e-3
        assert service.open_streams == 0
    finally:
        await srv.close()


async def test_cancelled_stream_frees_state(server) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def gen():
        while True:
            item = await queue.get()
            if item is None:
                return
            yield item

    call = server.stub.Synthesize(gen())
    await queue.put(start())
    await queue.put(tokens(toks(10)))
    first = await call.read()
    assert first.seq == 0
    call.cancel()
    for _ in range(100):
        if server.service.open_streams == 0 and not server.jobs[-1].stream.holds_state:
            break
        await asyncio.sleep(0.05)
    assert server.service.open_streams == 0
    assert not server.jobs[-1].stream.holds_state


async def test_get_info(server, decoder) -> None:
    info = await server.stub.GetInfo(common_pb2.GetInfoRequest())
    assert info.component == "decoder"
    assert info.codebook_size == 64
    assert info.token_rate_hz == 12.5
    assert info.output_sample_rate == 22050
    assert info.checkpoint_fingerprint == decoder.fingerprint
    assert info.extra["prompt_window_tokens"] == "50"


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLMV_DECODER_PROMPT_WINDOW_TOKENS", "0")
    monkeypatch.setenv("GLMV_DECODER_MAX_STREAM_TOKENS", "123")
    monkeypatch.setenv("GLMV_DECODER_DEFAULT_SEED", "9")
    s = DecoderSettings()
    assert (s.prompt_window_tokens, s.max_stream_tokens, s.default_seed, s.port) == (0, 123, 9, 50053)
    assert (s.batch_max_streams, s.batch_wait_ms, s.hift_dtype, s.compile) == (16, 5.0, "float32", "off")
    monkeypatch.setenv("GLMV_DECODER_BATCH_MAX_STREAMS", "4")
    monkeypatch.setenv("GLMV_DECODER_BATCH_WAIT_MS", "0")
    monkeypatch.setenv("GLMV_DECODER_COMPILE", "reduce-overhead")
    s = DecoderSettings()
    assert (s.batch_max_streams, s.batch_wait_ms, s.compile) == (4, 0.0, "reduce-overhead")
    monkeypatch.setenv("GLMV_DECODER_BATCH_MAX_STREAMS", "0")
    with pytest.raises(ValueError):
        DecoderSettings()


def test_load_applies_precision_and_compile_settings(model_dir: Path) -> None:
    import torch

    service = DecoderService(settings(model_dir=model_dir, dtype="bfloat16", compile="default"))
    service.load()
    d = service.decoder
    assert d.flow.input_embedding.weight.dtype == torch.bfloat16
    assert next(d.hift.parameters()).dtype == torch.float32  # the vocoder stays float32
    assert d.flow.decoder._compiled is not None and d.flow.pad_frames_to == 64


async def test_missing_model_dir_fails_load(tmp_path: Path) -> None:
    from glmv_common.errors import CheckpointError

    service = DecoderService(settings(model_dir=tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="nope"):
        service.load()
    with pytest.raises(CheckpointError, match="GLMV_DECODER_MODEL_DIR"):
        DecoderService(settings()).load()


async def test_model_calls_do_not_block_the_event_loop(decoder) -> None:
    """While a (slowed) flow call runs, other RPCs on the same server are answered at once."""
    import time
    from types import SimpleNamespace

    class SlowFlow:
        def inference(self, *args, **kwargs):
            time.sleep(2.0)
            return decoder.flow.inference(*args, **kwargs)

    slow = SimpleNamespace(config=decoder.config, flow=SlowFlow(), hift=decoder.hift,
                           fingerprint=decoder.fingerprint, model_id="slow")
    service = DecoderService(settings(), decoder=slow)
    srv = Server(service, await start_service(service, service.settings))
    try:
        synth = asyncio.create_task(collect(srv.stub, start(), tokens(toks(10)), FINISH))
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        info = await srv.stub.GetInfo(common_pb2.GetInfoRequest())
        assert info.model_id == "slow" and time.perf_counter() - t0 < 1.0
        assert not synth.done()
        assert (await synth)[-1].final
    finally:
        await srv.close()


def finish(ids: list[int] | None = None):
    return decoder_pb2.SynthesizeRequest(finish=decoder_pb2.SynthesizeFinish(tokens=ids or []))


async def test_finish_tokens_are_the_final_chunk_in_one_vocoder_call(decoder) -> None:
    """Tokens in Finish are decoded with anything pending as the final chunk: one flow + one vocoder call,
    and the two chunks equal the reference demo's per-chunk decoding (last chunk final) sample for sample."""
    from types import SimpleNamespace

    from .test_batching import CountingHiFT, reference_recipe

    counting = CountingHiFT(decoder.hift)
    dec = SimpleNamespace(config=decoder.config, flow=decoder.flow, hift=counting,
                          fingerprint=decoder.fingerprint, model_id="counting")
    service = DecoderService(settings(), decoder=dec)
    srv = Server(service, await start_service(service, service.settings))
    try:
        chunks = [toks(25, 1), toks(45, 2)]
        ref = reference_recipe(decoder, chunks)
        responses = await collect(srv.stub, start(0, F32), tokens(chunks[0]), finish(chunks[1]))
        audio = check_sequence(responses, 22050)
        assert len(responses) == 2 and counting.calls == 2  # one vocoder call per chunk, none for a tail
        assert responses[-1].tokens_consumed == 70
        got = [gaudio.decode_pcm(r.audio.data, F32, 1)[:, 0] for r in responses]
        assert [len(g) for g in got] == [len(r) for r in ref]
        assert all(np.array_equal(g, r) for g, r in zip(got, ref, strict=True))
        assert len(audio) == 256 * feat_len(70)
        # An old client (tokens only in Tokens messages, empty Finish) still gets the whole utterance.
        old_client = await collect(srv.stub, start(), tokens(chunks[0]), tokens(chunks[1]), FINISH)
        old = check_sequence(old_client, 22050)
        assert len(old) == 256 * feat_len(70)
        # Finish carrying every token of a stream: one final chunk.
        whole = await collect(srv.stub, start(), finish(chunks[0]))
        assert len(whole) == 1 and whole[0].final and whole[0].tokens_consumed == 25
        assert service.open_streams == 0 and all(not j.stream.holds_state for j in srv.jobs)
    finally:
        await srv.close()


async def test_finish_tokens_are_validated(server) -> None:
    assert await _code(server.stub, start(), tokens(toks(10)), finish([64]),
                       match="outside the codebook") == grpc.StatusCode.INVALID_ARGUMENT
    assert server.service.open_streams == 0


async def _gated(service: DecoderService, n_streams: int, *msgs):
    """A request stream that sends Start, waits until ``n_streams`` streams are open on the server (so
    their chunks can meet in one batch), then sends the rest."""
    yield msgs[0]
    for _ in range(1000):
        if service.scheduler.open_streams >= n_streams:
            break
        await asyncio.sleep(0.01)
    for m in msgs[1:]:
        yield m


async def test_concurrent_streams_are_batched_and_equal_unbatched(decoder) -> None:
    service = DecoderService(settings(batch_max_streams=8, batch_wait_ms=500), decoder=decoder)
    srv = Server(service, await start_service(service, service.settings))
    try:
        plans = [
            (1, 50, [toks(10, 1), toks(25, 2), toks(14, 3)]),
            (2, 0, [toks(6, 4), toks(1, 5)]),
            (42, 10, [toks(30, 6), toks(25, 7), toks(25, 8)]),
            (4, 50, [toks(12, 9)]),
            (5, 20, [toks(8, 10), toks(40, 11)]),
        ]

        async def one(seed, window, chunks):
            msgs = [start(0, F32, seed=seed, window=window), *[tokens(c) for c in chunks[:-1]],
                    finish(chunks[-1])]
            return [r async for r in srv.stub.Synthesize(_gated(service, len(plans), *msgs))]

        results = await asyncio.gather(*[one(*p) for p in plans])
        for (seed, window, chunks), responses in zip(plans, results, strict=True):
            audio = check_sequence(responses, 22050)
            expected = local_stream(decoder, chunks, seed=seed, window=window)
            assert len(audio) == len(expected) == 256 * feat_len(sum(map(len, chunks)))
            assert np.abs(audio - expected).max() <= 2e-3
        assert max(service.scheduler.batch_sizes) > 1
        assert max(service.scheduler.batch_sizes) <= 8
        assert service.open_streams == 0 and all(not j.stream.holds_state for j in srv.jobs)
    finally:
        await srv.close()


async def test_lone_stream_never_waits_for_a_batch(decoder) -> None:
    service = DecoderService(settings(batch_max_streams=16, batch_wait_ms=600_000), decoder=decoder)
    srv = Server(service, await start_service(service, service.settings))
    try:
        call = collect(srv.stub, start(), tokens(toks(10)), tokens(toks(10, 1)), finish(toks(5, 2)))
        responses = await asyncio.wait_for(call, timeout=60)  # a wait would last 10 minutes
        assert responses[-1].final and service.scheduler.batch_sizes == [1, 1, 1]
    finally:
        await srv.close()


async def test_batching_off_decodes_each_chunk_alone(decoder) -> None:
    service = DecoderService(settings(batch_max_streams=1), decoder=decoder)
    srv = Server(service, await start_service(service, service.settings))
    try:
        msgs = [(start(seed=s), tokens(toks(10, s)), finish(toks(5, s))) for s in (1, 2, 3)]
        await asyncio.gather(*[collect(srv.stub, *m) for m in msgs])
        assert service.scheduler.batch_sizes == [1] * 6
    finally:
        await srv.close()
