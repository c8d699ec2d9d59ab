"""gRPC ``glmvoice.v1.SpeechTokenizer``: messages <-> SpeechTokenizer, errors <-> status codes.

Model work never runs on the event loop: every forward goes through the :class:`DynamicBatcher`
(one worker thread; concurrent requests share forwards). Audio decoding and resampling of a
whole utterance run in ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from importlib import metadata

import grpc
import numpy as np
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from glmv_common import audio as gaudio
from glmv_common.errors import AudioError, GlmvError, InvalidRequest
from glmv_common.logs import get_logger, log_context
from glmv_common.settings import ServiceSettings, model_version
from glmvoice.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

from . import metrics
from .batcher import DynamicBatcher
from .features import SAMPLE_RATE
from .listen import ListenSession, VadSettings
from .streaming import StreamPlan, make_plan
from .tokenizer import SpeechTokenizer, WindowRequest, prepare_audio
from .vad import SileroModel

log = get_logger(__name__)

try:
    VERSION = metadata.version("glmv-tokenizer")
except metadata.PackageNotFoundError:  # pragma: no cover - source checkout without install
    VERSION = "0.0.0"


class TokenizerSettings(ServiceSettings):
    """Settings of the tokenizer service; env prefix ``GLMV_TOKENIZER_``."""

    model_config = SettingsConfigDict(env_prefix="GLMV_TOKENIZER_", extra="ignore", protected_namespaces=())

    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    max_audio_seconds: float = Field(
        600.0, gt=0, description="Longest accepted utterance or stream (seconds)."
    )
    batching: bool = Field(True, description="Batch concurrent requests into shared forwards.")
    max_batch_size: int = Field(16, ge=1, description="Most requests per forward when batching.")
    max_batch_wait_ms: float = Field(5.0, ge=0, description="How long the first request waits for company.")
    max_windows_per_forward: int = Field(
        32, ge=1, description="30 s windows per model forward (memory bound)."
    )


def _invalid(exc: Exception) -> tuple[grpc.StatusCode, str]:
    return grpc.StatusCode.INVALID_ARGUMENT, str(exc)


def _audio_seconds(item: np.ndarray | WindowRequest) -> float:
    samples = item.audio if isinstance(item, WindowRequest) else item
    return len(samples) / SAMPLE_RATE


class TokenizerServicer(tokenizer_pb2_grpc.SpeechTokenizerServicer):
    def __init__(self, service: TokenizerService) -> None:
        self._service = service

    async def Tokenize(
        self, request: tokenizer_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.TokenizeResponse:
        svc = self._service
        with log_context(request_id=request.request_id or None):
            started = time.perf_counter()
            try:
                audio16 = await asyncio.to_thread(svc.decode_utterance, request.audio)
            except GlmvError as exc:
                await context.abort(*_invalid(exc))
            decoded = time.perf_counter()
            tokens = await svc.submit(audio16)
            done = time.perf_counter()
            return tokenizer_pb2.TokenizeResponse(
                tokens=tokens,
                audio_seconds=len(audio16) / SAMPLE_RATE,
                timings=[
                    common_pb2.StageTiming(stage="decode", ms=(decoded - started) * 1e3),
                    common_pb2.StageTiming(stage="tokenize", ms=(done - decoded) * 1e3),
                ],
            )

    async def StreamTokenize(
        self,
        request_iterator: AsyncIterator[tokenizer_pb2.StreamTokenizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[tokenizer_pb2.StreamTokenizeResponse]:
        svc = self._service
        plan = svc.new_plan()
        stream = _StreamDecoder()
        offset = 0
        try:
            async for message in request_iterator:
                with log_context(request_id=message.request_id or None):
                    samples = stream.decode(message.audio)
                    for job in plan.push(samples):
                        new = StreamPlan.accept(job, await svc.submit(job.request))
                        if new:
                            yield tokenizer_pb2.StreamTokenizeResponse(tokens=new, offset=offset)
                            offset += len(new)
            if not stream.started:
                raise AudioError("empty stream: no audio messages")
            tail = stream.flush()
            jobs = plan.push(tail) if len(tail) else []
            if plan.total_samples == 0:
                raise AudioError("audio is empty (no samples)")
            jobs += plan.finish()
            new_tokens: list[int] = []
            for job in jobs:
                new_tokens.extend(StreamPlan.accept(job, await svc.submit(job.request)))
            yield tokenizer_pb2.StreamTokenizeResponse(tokens=new_tokens, offset=offset, final=True)
        except GlmvError as exc:
            await context.abort(*_invalid(exc))

    async def Listen(
        self,
        request_iterator: AsyncIterator[tokenizer_pb2.ListenRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        # A coroutine writing through the context rather than an async generator: a cancelled
        # generator suspended at a yield is only closed when it is garbage collected, which would
        # leave the stream counted as open.
        metrics.LISTEN_ACTIVE.inc()
        try:
            async with contextlib.aclosing(self._listen(request_iterator, context)) as events:
                async for event in events:
                    await context.write(event)
        finally:
            metrics.LISTEN_ACTIVE.dec()

    async def _listen(
        self,
        request_iterator: AsyncIterator[tokenizer_pb2.ListenRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[tokenizer_pb2.ListenEvent]:
        svc = self._service
        meta = {k: v for k, v in (context.invocation_metadata() or ())}
        ids = {"request_id": meta.get("x-request-id") or None, "session_id": meta.get("x-session-id") or None}
        session = ListenSession(submit=svc.submit, new_plan=svc.new_plan, vad_model=svc.vad_model)
        stream = _StreamDecoder()
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("msg")
                if kind == "config":
                    cfg = message.config
                    ids["request_id"] = cfg.request_id or ids["request_id"]
                    ids["session_id"] = cfg.session_id or ids["session_id"]
                with log_context(**ids):
                    if kind == "config":
                        session.configure(VadSettings.from_proto(message.config.vad))
                        log.info("listen settings", extra={"vad": repr(session.settings)})
                    elif kind == "audio":
                        async for event in session.audio(stream.decode(message.audio)):
                            yield event
                    elif kind == "control":
                        ctl = message.control.kind
                        if ctl == tokenizer_pb2.ListenControl.KIND_COMMIT:
                            async for event in session.commit():
                                yield event
                        elif ctl == tokenizer_pb2.ListenControl.KIND_CLEAR:
                            yield session.clear()
                        else:
                            raise InvalidRequest("control.kind must be KIND_COMMIT or KIND_CLEAR")
                    else:
                        raise InvalidRequest("empty ListenRequest: set config, audio or control")
            with log_context(**ids):
                async for event in session.close(stream.flush()):
                    yield event
        except GlmvError as exc:
            with log_context(**ids):
                log.info("listen stream refused: %s", exc)
            await context.abort(*_invalid(exc))

    async def GetInfo(
        self, request: common_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        info = self._service.tokenizer.info
        return common_pb2.ModelInfo(
            component="tokenizer",
            model_id=info.model_id,
            version=VERSION,
            checkpoint_fingerprint=info.fingerprint,
            model_version=model_version(self._service.settings.model_version, info.fingerprint),
            codebook_size=info.codebook_size,
            token_rate_hz=info.token_rate_hz,
            input_sample_rate=info.sample_rate,
            device=info.device,
            dtype=info.dtype,
            extra={
                **info.extra,
                "block_tokens": str(info.block_tokens or 0),
                "max_audio_seconds": f"{self._service.settings.max_audio_seconds:g}",
                "batching": str(self._service.settings.batching).lower(),
            },
        )


class _StreamDecoder:
    """Per-stream audio format (fixed by the first message) and incremental resampling to 16 kHz."""

    def __init__(self) -> None:
        self.started = False
        self.encoding = 0
        self.sample_rate = 0
        self.channels = 1
        self._resampler: gaudio.StreamResampler | None = None

    def decode(self, chunk: common_pb2.AudioChunk) -> np.ndarray:
        if not self.started:
            if not chunk.encoding:
                raise AudioError("the first stream message must set the audio encoding")
            self.encoding = int(chunk.encoding)
            self.sample_rate = gaudio.check_sample_rate(int(chunk.sample_rate))
            self.channels = gaudio.check_channels(int(chunk.channels) or 1)
            self._resampler = gaudio.StreamResampler(self.sample_rate, SAMPLE_RATE)
            self.started = True
        else:
            if chunk.encoding and int(chunk.encoding) != self.encoding:
                raise AudioError("audio encoding changed within the stream")
            if chunk.sample_rate and int(chunk.sample_rate) != self.sample_rate:
                raise AudioError("sample rate changed within the stream")
        samples = gaudio.first_channel(gaudio.decode_pcm(bytes(chunk.data), self.encoding, self.channels))
        assert self._resampler is not None
        return self._resampler.push(samples)

    def flush(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        return self._resampler.push(np.zeros(0, dtype=np.float32), last=True)


class TokenizerService:
    """The runtime's ``ModelService`` for the tokenizer."""

    component = "tokenizer"
    service_name = "glmvoice.v1.SpeechTokenizer"

    def __init__(
        self, settings: TokenizerSettings | None = None, tokenizer: SpeechTokenizer | None = None
    ) -> None:
        self.settings = settings or TokenizerSettings()
        self._tokenizer = tokenizer
        self._batcher: DynamicBatcher[np.ndarray | WindowRequest, list[int]] | None = None

    @property
    def tokenizer(self) -> SpeechTokenizer:
        if self._tokenizer is None:
            raise RuntimeError("tokenizer model is not loaded")
        return self._tokenizer

    def add_to_server(self, server: grpc.aio.Server) -> None:
        tokenizer_pb2_grpc.add_SpeechTokenizerServicer_to_server(TokenizerServicer(self), server)

    def load(self) -> None:
        s = self.settings
        if self._tokenizer is None:
            self._tokenizer = SpeechTokenizer.from_dir(
                s.model_dir, s.device, s.dtype, s.max_windows_per_forward
            )
        tok = self._tokenizer
        SileroModel.shared()  # the Listen RPC's VAD, loaded now rather than on the first stream
        self._batcher = DynamicBatcher(
            metrics.measured(tok.tokenize_batch, _audio_seconds),
            max_batch=s.max_batch_size if s.batching else 1,
            max_wait_ms=s.max_batch_wait_ms if s.batching else 0.0,
            name="tokenizer-forward",
        )
        log.info(
            "tokenizer loaded", extra={"model_id": tok.info.model_id, "fingerprint": tok.info.fingerprint}
        )

    @property
    def batcher(self) -> DynamicBatcher[np.ndarray | WindowRequest, list[int]]:
        if self._batcher is None:
            raise RuntimeError("tokenizer model is not loaded")
        return self._batcher

    def decode_utterance(self, chunk: common_pb2.AudioChunk) -> np.ndarray:
        samples, rate = gaudio.from_audio_chunk(chunk)
        if samples.shape[0] == 0:
            raise AudioError("audio is empty (no samples)")
        return prepare_audio(samples, rate, self.settings.max_audio_seconds)

    def vad_model(self) -> SileroModel:
        """The process-wide Silero model, loaded on first use."""
        return SileroModel.shared()

    def new_plan(self) -> StreamPlan:
        return make_plan(self.tokenizer, self.settings.max_audio_seconds)

    async def submit(self, item: np.ndarray | WindowRequest) -> list[int]:
        metrics.QUEUE_DEPTH.inc()
        try:
            return await self.batcher.submit(item)
        finally:
            metrics.QUEUE_DEPTH.dec()

    async def aclose(self) -> None:
        if self._batcher is not None:
            await self._batcher.aclose()


__all__ = ["TokenizerService", "TokenizerServicer", "TokenizerSettings"]
