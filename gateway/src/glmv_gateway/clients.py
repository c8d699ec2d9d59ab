"""Typed gRPC clients of the three model services: channels, deadlines, retries, health, compatibility."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from glmv_gateway import metrics
from glmv_gateway.versions import SERVICE_NAMES, VersionRegistry
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

if TYPE_CHECKING:
    from glmv_gateway.settings import GatewaySettings

__all__ = ["SERVICE_NAMES", "ComponentError", "DecoderStream", "ServiceClients", "TokenizerStream"]
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
    """Calls to the model services. Tokenizer and decoder calls go to a version of the registry
    (``version=``, else the session's pinned version as last loaded by this process, else a weighted
    choice); LM calls go to the session's replica (rendezvous hashing on the session id)."""

    def __init__(
        self,
        tokenizer_addr: str,
        lm_addr: str,
        decoder_addr: str,
        retries: int = 2,
        *,
        lm_addrs: list[str] | None = None,
        versions_file: str | None = None,
        registry: VersionRegistry | None = None,
    ) -> None:
        self.addrs = {"tokenizer": tokenizer_addr, "lm": lm_addr, "decoder": decoder_addr}
        self.registry = registry or VersionRegistry(
            self.addrs, lm_addrs=lm_addrs, versions_file=versions_file
        )
        self.retries = retries

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> ServiceClients:
        return cls(
            settings.tokenizer_addr,
            settings.lm_addr,
            settings.decoder_addr,
            lm_addrs=settings.lm_address_list(),
            versions_file=settings.versions_file or None,
        )

    async def start(self, interval_s: float = 1.0) -> None:
        """Probe every version now and keep watching the registry file and the services' health."""
        await self.registry.start(interval_s)

    async def close(self) -> None:
        await self.registry.close()

    def _target(self, component: str, version: str | None, session_id: str) -> tuple[Any, str]:
        """(stub, version id) of a call; counts it."""
        if component == "lm":
            address = self.registry.lm_address(session_id)
            preferred = self.registry.lm_ranking(session_id)[0].address if session_id else address
            metrics.LM_REPLICA_CALLS.labels(
                address, "preferred" if address == preferred else "fallback"
            ).inc()
            return self.registry.channels.stub("lm", address), ""
        vid, address = self.registry.address_for(component, version, session_id)
        metrics.COMPONENT_CALLS.labels(component, vid).inc()
        return self.registry.channels.stub(component, address), vid

    # stubs of the default target (first LM replica, weighted version), for callers that need no choice
    @property
    def tokenizer(self) -> tokenizer_pb2_grpc.SpeechTokenizerStub:
        return self._target("tokenizer", None, "")[0]

    @property
    def lm(self) -> lm_pb2_grpc.LanguageModelStub:
        return self._target("lm", None, "")[0]

    @property
    def decoder(self) -> decoder_pb2_grpc.SpeechDecoderStub:
        return self._target("decoder", None, "")[0]

    async def _retry(self, component: str, call: Callable[[], Awaitable[T]], version: str = "") -> T:
        delay = 0.2
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except grpc.aio.AioRpcError as error:
                if error.code() not in _RETRYABLE or attempt == self.retries:
                    metrics.COMPONENT_ERRORS.labels(component, version, error.code().name).inc()
                    raise ComponentError.from_rpc(component, error) from None
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    # --- health and compatibility ----------------------------------------------------------------

    async def health(self, component: str, timeout: float = 2.0) -> str:
        """SERVING when some replica (LM) or some version taking sessions (tokenizer, decoder) serves."""
        await self.registry.probe(timeout)
        if component == "lm":
            statuses = [e.health for e in self.registry.lm]
        else:
            vs = self.registry.versions[component]
            statuses = [v.health for v in vs if v.eligible] or [v.health for v in vs]
        return "SERVING" if "SERVING" in statuses else statuses[0]

    async def info(
        self, component: str, timeout: float = 5.0, version: str | None = None
    ) -> common_pb2.ModelInfo:
        stub, _ = self._target(component, version, "")
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
        self,
        audio: common_pb2.AudioChunk,
        *,
        request_id: str,
        session_id: str,
        timeout: float,
        version: str | None = None,
    ) -> tokenizer_pb2.TokenizeResponse:
        request = tokenizer_pb2.TokenizeRequest(audio=audio, request_id=request_id)

        def call() -> Awaitable[tokenizer_pb2.TokenizeResponse]:
            stub, _ = self._target("tokenizer", version, session_id)
            return stub.Tokenize(request, timeout=timeout, metadata=_metadata(request_id, session_id))

        vid = version or self.registry.pinned(session_id, "tokenizer") or ""
        return await self._retry("tokenizer", call, vid)

    def stream_tokenize(
        self, *, request_id: str, session_id: str, timeout: float, version: str | None = None
    ) -> TokenizerStream:
        queue: asyncio.Queue[object] = asyncio.Queue()

        async def requests() -> AsyncIterator[tokenizer_pb2.StreamTokenizeRequest]:
            while (msg := await queue.get()) is not None:
                yield msg  # type: ignore[misc]

        stub, _ = self._target("tokenizer", version, session_id)
        call = stub.StreamTokenize(requests(), timeout=timeout, metadata=_metadata(request_id, session_id))
        return TokenizerStream(call, queue)

    def listen(
        self,
        *,
        request_id: str,
        session_id: str,
        vad: tokenizer_pb2.VadConfig | None,
        timeout: float,
        version: str | None = None,
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

        stub, _ = self._target("tokenizer", version, session_id)
        call = stub.Listen(requests(), timeout=timeout, metadata=_metadata(request_id, session_id))
        return ListenStream(call, queue)

    def generate(
        self, request: lm_pb2.GenerateRequest, *, timeout: float, session_id: str | None = None
    ) -> grpc.aio.UnaryStreamCall:
        """``session_id`` (default: the request's) picks the LM replica holding the session's cache."""
        sid = request.session_id if session_id is None else session_id
        stub, _ = self._target("lm", None, sid)
        return stub.Generate(
            request, timeout=timeout, metadata=_metadata(request.request_id, request.session_id)
        )

    def synthesize(
        self, start: decoder_pb2.SynthesizeStart, *, timeout: float, version: str | None = None
    ) -> DecoderStream:
        queue: asyncio.Queue[decoder_pb2.SynthesizeRequest | None] = asyncio.Queue()
        queue.put_nowait(decoder_pb2.SynthesizeRequest(start=start))

        async def requests() -> AsyncIterator[decoder_pb2.SynthesizeRequest]:
            while (msg := await queue.get()) is not None:
                yield msg

        stub, _ = self._target("decoder", version, start.session_id)
        call = stub.Synthesize(
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
