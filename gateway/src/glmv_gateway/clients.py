"""Typed gRPC clients of the three model services: channels, deadlines, retries, health, compatibility."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from glmvoice.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    lm_pb2,
    lm_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

T = TypeVar("T")

SERVICE_NAMES = {
    "tokenizer": "glmvoice.v1.SpeechTokenizer",
    "lm": "glmvoice.v1.LanguageModel",
    "decoder": "glmvoice.v1.SpeechDecoder",
}
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class ComponentError(Exception):
    """A model service failed or refused a call; names the component and the gRPC status."""

    def __init__(self, component: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{component}: {code.name}: {message}")
        self.component, self.code, self.message = component, code, message

    @classmethod
    def from_rpc(cls, component: str, error: grpc.aio.AioRpcError) -> ComponentError:
        return cls(component, error.code(), error.details() or error.code().name)


def _metadata(request_id: str, session_id: str) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id), ("x-session-id", session_id))


@dataclass
class DecoderStream:
    """One bidi Synthesize stream: push token chunks, finish, read PCM chunks."""

    call: grpc.aio.StreamStreamCall
    _requests: asyncio.Queue[decoder_pb2.SynthesizeRequest | None]

    async def send_tokens(self, tokens: list[int]) -> None:
        msg = decoder_pb2.SynthesizeRequest(tokens=decoder_pb2.SynthesizeTokens(tokens=tokens))
        await self._requests.put(msg)

    async def finish(self, tokens: list[int] | None = None) -> None:
        """End the utterance; ``tokens`` (the last ones) are decoded as the final chunk."""
        finish = decoder_pb2.SynthesizeFinish(tokens=tokens or [])
        await self._requests.put(decoder_pb2.SynthesizeRequest(finish=finish))
        await self._requests.put(None)

    def responses(self) -> AsyncIterator[decoder_pb2.SynthesizeResponse]:
        return self.call.__aiter__()

    def cancel(self) -> None:
        self.call.cancel()


class TokenizerStream:
    """One StreamTokenize call: audio goes in as it arrives, tokens of completed encoder blocks come
    back early; :meth:`finish` half-closes and returns every token of the utterance."""

    def __init__(self, call: grpc.aio.StreamStreamCall, requests: asyncio.Queue[object]) -> None:
        self.call = call
        self._requests = requests
        self.tokens: list[int] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for reply in self.call:
            self.tokens.extend(reply.tokens)

    async def send(self, audio: common_pb2.AudioChunk) -> None:
        await self._requests.put(tokenizer_pb2.StreamTokenizeRequest(audio=audio))

    async def finish(self) -> list[int]:
        await self._requests.put(None)
        try:
            await self._reader
        except grpc.aio.AioRpcError as error:
            raise ComponentError.from_rpc("tokenizer", error) from None
        return self.tokens

    def cancel(self) -> None:
        self.call.cancel()
        self._reader.cancel()


class ListenStream:
    """One Listen call: continuous audio in; speech started / stopped and utterance events out.

    Requests are queued, so the sending methods never wait for the service; :meth:`events` yields
    the service's ``ListenEvent`` messages until the stream ends (after :meth:`close` the service
    finishes an utterance in progress first). gRPC failures surface as :class:`ComponentError`.
    """

    def __init__(
        self, call: grpc.aio.StreamStreamCall, requests: asyncio.Queue[tokenizer_pb2.ListenRequest | None]
    ) -> None:
        self.call = call
        self._requests = requests
        self._closed = False
        self._cancelled = False

    async def _put(self, message: tokenizer_pb2.ListenRequest) -> None:
        if self._closed:
            raise RuntimeError("the listen stream is closed")
        await self._requests.put(message)

    async def send_audio(self, data: bytes, encoding: int, sample_rate: int, channels: int = 1) -> None:
        """Raw audio; ``encoding`` is an ``AudioEncoding`` value (the first chunk fixes the format)."""
        chunk = common_pb2.AudioChunk(
            data=data, encoding=int(encoding), sample_rate=sample_rate, channels=channels
        )
        await self._put(tokenizer_pb2.ListenRequest(audio=chunk))

    async def commit(self) -> None:
        await self._put(_control(tokenizer_pb2.ListenControl.KIND_COMMIT))

    async def clear(self) -> None:
        await self._put(_control(tokenizer_pb2.ListenControl.KIND_CLEAR))

    async def configure(self, vad: tokenizer_pb2.VadConfig | None) -> None:
        """New detection settings from the next audio on (``None``: detection off)."""
        config = tokenizer_pb2.ListenConfig(vad=vad or tokenizer_pb2.VadConfig(enabled=False))
        await self._put(tokenizer_pb2.ListenRequest(config=config))

    async def close(self) -> None:
        """Half-close: no more audio; events continue until the service ends the stream."""
        if not self._closed:
            self._closed = True
            await self._requests.put(None)

    def cancel(self) -> None:
        self._cancelled = True
        self._closed = True
        self.call.cancel()

    async def events(self) -> AsyncIterator[tokenizer_pb2.ListenEvent]:
        try:
            async for event in self.call:
                yield event
        except grpc.aio.AioRpcError as error:
            if self._cancelled and error.code() == grpc.StatusCode.CANCELLED:
                return
            raise ComponentError.from_rpc("tokenizer", error) from None
        except asyncio.CancelledError:
            if not self._cancelled:
                raise


def _control(kind: int) -> tokenizer_pb2.ListenRequest:
    return tokenizer_pb2.ListenRequest(control=tokenizer_pb2.ListenControl(kind=kind))  # type: ignore[arg-type]


class ServiceClients:
    def __init__(self, tokenizer_addr: str, lm_addr: str, decoder_addr: str, retries: int = 2) -> None:
        options = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
            # with a dns:/// target of a headless service, spread calls over every ready replica
            ("grpc.lb_policy_name", "round_robin"),
        ]
        self.addrs = {"tokenizer": tokenizer_addr, "lm": lm_addr, "decoder": decoder_addr}
        self.channels = {
            name: grpc.aio.insecure_channel(addr, options=options) for name, addr in self.addrs.items()
        }
        self.tokenizer = tokenizer_pb2_grpc.SpeechTokenizerStub(self.channels["tokenizer"])
        self.lm = lm_pb2_grpc.LanguageModelStub(self.channels["lm"])
        self.decoder = decoder_pb2_grpc.SpeechDecoderStub(self.channels["decoder"])
        self.retries = retries

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self.channels.values()))

    async def _retry(self, component: str, call: Callable[[], Awaitable[T]]) -> T:
        delay = 0.2
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except grpc.aio.AioRpcError as error:
                if error.code() not in _RETRYABLE or attempt == self.retries:
                    raise ComponentError.from_rpc(component, error) from None
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    # --- health and compatibility ----------------------------------------------------------------

    async def health(self, component: str, timeout: float = 2.0) -> str:
        stub = health_pb2_grpc.HealthStub(self.channels[component])
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAMES[component]), timeout=timeout
            )
        except grpc.aio.AioRpcError as error:
            return f"unreachable ({error.code().name})"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def info(self, component: str, timeout: float = 5.0) -> common_pb2.ModelInfo:
        stub = {"tokenizer": self.tokenizer, "lm": self.lm, "decoder": self.decoder}[component]
        try:
            return await stub.GetInfo(common_pb2.GetInfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise ComponentError.from_rpc(component, error) from None

    async def infos(self) -> dict[str, common_pb2.ModelInfo]:
        names = list(self.addrs)
        results = await asyncio.gather(*(self.info(n) for n in names))
        return dict(zip(names, results, strict=True))

    # --- calls -----------------------------------------------------------------------------------

    async def tokenize(
        self, audio: common_pb2.AudioChunk, *, request_id: str, session_id: str, timeout: float
    ) -> tokenizer_pb2.TokenizeResponse:
        request = tokenizer_pb2.TokenizeRequest(audio=audio, request_id=request_id)
        return await self._retry(
            "tokenizer",
            lambda: self.tokenizer.Tokenize(
                request, timeout=timeout, metadata=_metadata(request_id, session_id)
            ),
        )

    def stream_tokenize(self, *, request_id: str, session_id: str, timeout: float) -> TokenizerStream:
        queue: asyncio.Queue[object] = asyncio.Queue()

        async def requests() -> AsyncIterator[tokenizer_pb2.StreamTokenizeRequest]:
            while (msg := await queue.get()) is not None:
                yield msg  # type: ignore[misc]

        call = self.tokenizer.StreamTokenize(
            requests(), timeout=timeout, metadata=_metadata(request_id, session_id)
        )
        return TokenizerStream(call, queue)

    def listen(
        self,
        *,
        request_id: str,
        session_id: str,
        vad: tokenizer_pb2.VadConfig | None,
        timeout: float,
    ) -> ListenStream:
        """Open a Listen stream; ``vad=None`` means manual turns (the caller commits)."""
        queue: asyncio.Queue[tokenizer_pb2.ListenRequest | None] = asyncio.Queue()
        config = tokenizer_pb2.ListenConfig(
            vad=vad or tokenizer_pb2.VadConfig(enabled=False), request_id=request_id, session_id=session_id
        )
        queue.put_nowait(tokenizer_pb2.ListenRequest(config=config))

        async def requests() -> AsyncIterator[tokenizer_pb2.ListenRequest]:
            while (msg := await queue.get()) is not None:
                yield msg

        call = self.tokenizer.Listen(requests(), timeout=timeout, metadata=_metadata(request_id, session_id))
        return ListenStream(call, queue)

    def generate(self, request: lm_pb2.GenerateRequest, *, timeout: float) -> grpc.aio.UnaryStreamCall:
        return self.lm.Generate(
            request, timeout=timeout, metadata=_metadata(request.request_id, request.session_id)
        )

    def synthesize(self, start: decoder_pb2.SynthesizeStart, *, timeout: float) -> DecoderStream:
        queue: asyncio.Queue[decoder_pb2.SynthesizeRequest | None] = asyncio.Queue()
        queue.put_nowait(decoder_pb2.SynthesizeRequest(start=start))

        async def requests() -> AsyncIterator[decoder_pb2.SynthesizeRequest]:
            while (msg := await queue.get()) is not None:
                yield msg

        call = self.decoder.Synthesize(
            requests(), timeout=timeout, metadata=_metadata(start.request_id, start.session_id)
        )
        return DecoderStream(call, queue)


def compatibility_problems(infos: dict[str, common_pb2.ModelInfo]) -> list[str]:
    """Why a set of services cannot serve together (empty when they can)."""
    tok, lm, dec = infos["tokenizer"], infos["lm"], infos["decoder"]

    def name(i: common_pb2.ModelInfo) -> str:
        return f"{i.component} {i.model_id} (version {i.version}, checkpoint {i.checkpoint_fingerprint[:12]})"

    problems = []
    if not tok.codebook_size == lm.audio_token_count == dec.codebook_size:
        problems.append(
            f"speech codebooks differ: {name(tok)} has {tok.codebook_size} codes, {name(lm)} has "
            f"{lm.audio_token_count} audio tokens, {name(dec)} has {dec.codebook_size} codes"
        )
    rates = {tok.token_rate_hz, lm.token_rate_hz or tok.token_rate_hz, dec.token_rate_hz}
    if len(rates) > 1:
        problems.append(
            f"token rates differ: {name(tok)} {tok.token_rate_hz} Hz, {name(dec)} {dec.token_rate_hz} Hz"
        )
    return problems
