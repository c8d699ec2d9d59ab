"""gRPC ``glmvoice.v1.SpeechDecoder``: Synthesize messages <-> :class:`DecoderStream`, errors <-> codes.

One bidi stream per utterance: ``Start`` (output rate/encoding, seed, conditioning window), ``Tokens``
chunks, ``Finish``. Each ``Tokens`` message is decoded as one chunk (the client — the gateway — chooses the
chunk schedule) and answered with the chunk's audio, resampled to the requested rate with a streaming soxr
resampler (so the concatenated chunks equal resampling the whole utterance at once) and encoded. The last
response carries ``final=True``; the stream then ends.

Model work never runs on the event loop: every push/finish runs in a small thread pool
(``model_workers`` threads, FIFO, so concurrent streams progress chunk by chunk). A stream's state lives in
its handler only and is released on finish, error or cancellation.

Status codes: bad token id, stream over ``max_stream_tokens``, bad sample rate/encoding/window →
INVALID_ARGUMENT; Tokens/Finish before Start, a second Start, anything after Finish → FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from typing import Any, TypeVar

import grpc
import numpy as np
from prometheus_client import Counter, Gauge, Histogram
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from glmv_common import audio as gaudio
from glmv_common.errors import GlmvError, InvalidRequest, missing_checkpoint
from glmv_common.logs import get_logger, kv, log_context
from glmv_common.settings import ServiceSettings, model_version
from glmvoice.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc

from .streaming import DEFAULT_PROMPT_WINDOW_TOKENS, DEFAULT_SEED, ChunkTiming, DecoderStream

log = get_logger(__name__)

try:
    VERSION = metadata.version("glmv-decoder")
except metadata.PackageNotFoundError:  # pragma: no cover - source checkout without install
    VERSION = "0.0.0"

NATIVE_RATE = 22050
OUTPUT_RATES = (8000, 16000, 22050, 24000, 48000)
T = TypeVar("T")
FAILED = grpc.StatusCode.FAILED_PRECONDITION
INVALID = grpc.StatusCode.INVALID_ARGUMENT

CHUNK_SECONDS = Histogram(
    "glmv_decoder_chunk_seconds",
    "Model time per decoded chunk (flow + vocoder)",
    ["stage"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
STREAM_RTF = Histogram(
    "glmv_decoder_rtf",
    "Real-time factor per finished stream: model seconds / audio seconds",
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
)
FIRST_AUDIO_SECONDS = Histogram(
    "glmv_decoder_time_to_first_audio_seconds",
    "From the first Tokens message to the first audio response",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ACTIVE_STREAMS = Gauge("glmv_decoder_active_streams", "Synthesize streams in progress")
AUDIO_SECONDS = Counter("glmv_decoder_audio_seconds_total", "Audio produced (seconds, native rate)")
TOKENS_TOTAL = Counter("glmv_decoder_tokens_total", "Speech tokens decoded")
ERRORS = Counter("glmv_decoder_errors_total", "Synthesize streams ended with an error", ["code"])


class DecoderSettings(ServiceSettings):
    """Settings of the decoder service; env prefix ``GLMV_DECODER_``."""

    model_config = SettingsConfigDict(env_prefix="GLMV_DECODER_", extra="ignore", protected_namespaces=())

    port: int = Field(50053, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    prompt_window_tokens: int = Field(
        DEFAULT_PROMPT_WINDOW_TOKENS, ge=0,
        description="Default conditioning window (past tokens) per chunk; 0 = whole history (reference, "
                    "cost grows with reply length). A stream's Start may override it.",
    )
    max_stream_tokens: int = Field(
        3000, ge=1, description="Most speech tokens one stream may carry (3000 = 4 minutes of speech)."
    )
    default_seed: int = Field(
        DEFAULT_SEED, ge=0, lt=2**64, description="Flow noise seed when Start has none."
    )
    model_workers: int = Field(1, ge=1, description="Threads running model calls (streams share them FIFO).")
    finish_grace_s: float = Field(
        0.05, ge=0, description="After Finish, how long to watch for stray messages before the final reply."
    )


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


_EOF = object()


class _StreamJob:
    """One Synthesize call's state: the decoder stream, the resampler and the response counters."""

    def __init__(self, stream: DecoderStream, rate: int, encoding: gaudio.Encoding) -> None:
        self.stream = stream
        self.rate = rate
        self.encoding = encoding
        self.resampler = gaudio.StreamResampler(NATIVE_RATE, rate)
        self.seq = 0
        self.offset = 0
        self.model_seconds = 0.0
        self.first_tokens_at: float | None = None
        self.first_audio_sent = False
        self.inflight: Future[Any] | None = None

    def response(
        self, native: np.ndarray, final: bool, timings: list[ChunkTiming]
    ) -> decoder_pb2.SynthesizeResponse:
        out = self.resampler.push(native, last=final)
        msg = decoder_pb2.SynthesizeResponse(
            seq=self.seq,
            audio=gaudio.to_audio_chunk(out, self.rate, self.encoding),
            sample_offset=self.offset,
            final=final,
            tokens_consumed=self.stream.tokens_decoded,
            timings=[common_pb2.StageTiming(stage=s, ms=ms) for t in timings
                     for s, ms in (("flow", t.flow_ms), ("hift", t.hift_ms))],
        )
        self.seq += 1
        self.offset += len(out)
        return msg


class DecoderServicer(decoder_pb2_grpc.SpeechDecoderServicer):
    def __init__(self, service: DecoderService) -> None:
        self._service = service

    async def Synthesize(
        self,
        request_iterator: AsyncIterator[decoder_pb2.SynthesizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[decoder_pb2.SynthesizeResponse]:
        svc = self._service
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def read() -> None:
            try:
                async for message in request_iterator:
                    await queue.put(message)
            except Exception as exc:  # the client went away: surface it to the main loop
                await queue.put(exc)
            finally:
                await queue.put(_EOF)

        reader = asyncio.create_task(read())
        job: _StreamJob | None = None
        ACTIVE_STREAMS.inc()
        try:
            while True:
                message = await queue.get()
                if message is _EOF:
                    raise _Abort(FAILED, "the request stream ended without Finish")
                if isinstance(message, Exception):
                    raise message
                kind = message.WhichOneof("msg")
                if kind == "start":
                    if job is not None:
                        raise _Abort(FAILED, "Start sent twice in one stream")
                    job = svc.open(message.start)
                    continue
                if job is None:
                    raise _Abort(FAILED, f"{kind or 'an empty message'} before Start")
                if kind == "tokens":
                    if job.first_tokens_at is None:
                        job.first_tokens_at = time.perf_counter()
                    n_before = len(job.stream.timings)
                    audio = await svc.run(job, job.stream.push, list(message.tokens.tokens))
                    new_timings = job.stream.timings[n_before:]
                    svc.account(job, new_timings)
                    if len(audio):
                        response = job.response(audio, False, new_timings)
                        if len(response.audio.data):
                            if not job.first_audio_sent:
                                job.first_audio_sent = True
                                FIRST_AUDIO_SECONDS.observe(time.perf_counter() - job.first_tokens_at)
                            yield response
                    continue
                if kind == "finish":
                    n_before = len(job.stream.timings)
                    audio = await svc.run(job, job.stream.finish, list(message.finish.tokens))
                    new_timings = job.stream.timings[n_before:]
                    svc.account(job, new_timings)
                    await self._reject_after_finish(queue)
                    yield job.response(audio, True, new_timings)
                    svc.finished(job)
                    return
                raise _Abort(INVALID, "empty SynthesizeRequest (no start/tokens/finish)")
        except _Abort as exc:
            ERRORS.labels(exc.code.name).inc()
            await context.abort(exc.code, str(exc))
        except GlmvError as exc:
            ERRORS.labels("INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except asyncio.CancelledError:
            ERRORS.labels("CANCELLED").inc()
            raise
        finally:
            ACTIVE_STREAMS.dec()
            reader.cancel()
            if job is not None:
                svc.release(job)

    async def _reject_after_finish(self, queue: asyncio.Queue[Any]) -> None:
        """Anything the client sent after Finish is a protocol error (checked within a short grace)."""
        try:
            message = await asyncio.wait_for(queue.get(), timeout=self._service.settings.finish_grace_s)
        except TimeoutError:
            return
        if message is _EOF or isinstance(message, Exception):
            return
        kind = message.WhichOneof("msg") or "a message"
        raise _Abort(FAILED, f"{kind} after Finish")

    async def GetInfo(
        self, request: common_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        return self._service.info()


class DecoderService:
    """The runtime's ``ModelService`` for the speech decoder."""

    component = "decoder"
    service_name = "glmvoice.v1.SpeechDecoder"

    def __init__(self, settings: DecoderSettings | None = None, decoder: Any = None) -> None:
        self.settings = settings or DecoderSettings()
        self._decoder = decoder
        self._executor = ThreadPoolExecutor(self.settings.model_workers, thread_name_prefix="glmv-decoder")
        self.open_streams = 0  # streams holding state right now (tests check it returns to 0)

    @property
    def decoder(self) -> Any:
        if self._decoder is None:
            raise RuntimeError("decoder model is not loaded")
        return self._decoder

    # -- ModelService -----------------------------------------------------------------------------------
    def add_to_server(self, server: grpc.aio.Server) -> None:
        decoder_pb2_grpc.add_SpeechDecoderServicer_to_server(DecoderServicer(self), server)

    def load(self) -> None:
        s = self.settings
        if self._decoder is not None:
            return
        if s.model_dir is None:
            raise missing_checkpoint(
                "(GLMV_DECODER_MODEL_DIR unset)", "decoder model directory",
                "Set GLMV_DECODER_MODEL_DIR to a directory with config.yaml, flow.pt and hift.pt",
            )
        from .checkpoint import load_decoder

        self._decoder = load_decoder(s.model_dir, s.device, s.dtype)
        log.info("decoder loaded", extra=kv(model_id=self._decoder.model_id,
                                            fingerprint=self._decoder.fingerprint))

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- streams ----------------------------------------------------------------------------------------
    def open(self, start: decoder_pb2.SynthesizeStart) -> _StreamJob:
        rate = int(start.sample_rate) or NATIVE_RATE
        if rate not in OUTPUT_RATES:
            raise InvalidRequest(f"sample_rate {rate} is not supported (use one of {list(OUTPUT_RATES)})")
        try:
            encoding = gaudio.Encoding.parse(int(start.encoding) or int(gaudio.Encoding.PCM16))
        except GlmvError as exc:
            raise InvalidRequest(f"encoding {start.encoding}: {exc}") from exc
        except ValueError as exc:
            raise InvalidRequest(f"unsupported encoding {start.encoding}") from exc
        seed = int(start.seed) if start.HasField("seed") else self.settings.default_seed
        window = int(start.prompt_window_tokens) or self.settings.prompt_window_tokens
        stream = DecoderStream(self.decoder, seed=seed, prompt_window_tokens=window,
                               max_tokens=self.settings.max_stream_tokens)
        self.open_streams += 1
        with log_context(request_id=start.request_id or None, session_id=start.session_id or None):
            log.info("stream start", extra=kv(rate=rate, encoding=encoding.name, seed=seed, window=window))
        return _StreamJob(stream, rate, encoding)

    async def run(self, job: _StreamJob, fn: Callable[..., T], *args: Any) -> T:
        """Run a model call for ``job`` in the worker pool; never on the event loop."""
        future = self._executor.submit(fn, *args)
        job.inflight = future
        return await asyncio.wrap_future(future)

    def account(self, job: _StreamJob, timings: list[ChunkTiming]) -> None:
        for t in timings:
            CHUNK_SECONDS.labels("flow").observe(t.flow_ms / 1e3)
            CHUNK_SECONDS.labels("hift").observe(t.hift_ms / 1e3)
            CHUNK_SECONDS.labels("total").observe(t.total_ms / 1e3)
            TOKENS_TOTAL.inc(t.new_tokens)
            AUDIO_SECONDS.inc(t.emitted_samples / NATIVE_RATE)
            job.model_seconds += t.total_ms / 1e3

    def finished(self, job: _StreamJob) -> None:
        audio_s = job.stream.samples_emitted / NATIVE_RATE
        if audio_s > 0:
            STREAM_RTF.observe(job.model_seconds / audio_s)

    def release(self, job: _StreamJob) -> None:
        """Free the stream's tensors now, or as soon as its in-flight model call returns."""
        if job.stream.finished and not job.stream.holds_state:
            pass
        elif job.inflight is not None and not job.inflight.done():
            job.inflight.add_done_callback(lambda _f: job.stream.close())
        else:
            job.stream.close()
        self.open_streams -= 1

    def info(self) -> common_pb2.ModelInfo:
        d = self.decoder
        return common_pb2.ModelInfo(
            component="decoder",
            model_id=str(getattr(d, "model_id", "")),
            version=VERSION,
            checkpoint_fingerprint=str(getattr(d, "fingerprint", "")),
            model_version=model_version(self.settings.model_version, str(getattr(d, "fingerprint", ""))),
            codebook_size=int(d.config.flow.vocab_size),
            token_rate_hz=float(d.config.flow.input_frame_rate),
            output_sample_rate=NATIVE_RATE,
            device=str(getattr(d, "device", "")),
            dtype=str(getattr(d, "dtype", "")).removeprefix("torch."),
            extra={
                "prompt_window_tokens": str(self.settings.prompt_window_tokens),
                "max_stream_tokens": str(self.settings.max_stream_tokens),
                "output_sample_rates": ",".join(str(r) for r in OUTPUT_RATES),
            },
        )
