"""The LM gRPC service: ``glmvoice.v1.LanguageModel`` over the continuous-batching engine.

``Generate`` renders the structured conversation with the chat template, submits the prompt to the
:class:`~glmv_lm.engine.GenerationEngine` and streams one ``TokenDelta`` per generated token, then a
``GenerateDone``. The servicer never touches tensors: the engine runs in its own thread and hands
events over through a per-request asyncio queue.

Status codes: bad requests (no turns, unknown role, speech token outside the codebook, a last turn
that does not fit the window, out-of-range sampling values) → INVALID_ARGUMENT; a full wait queue →
RESOURCE_EXHAUSTED; engine stopped → UNAVAILABLE; a failed forward pass → a ``GenerateDone`` with
END_REASON_ERROR, then INTERNAL.

Settings (``GLMV_LM_*``) extend :class:`glmv_lm.config.LMSettings` with the queue bound and the
sampling defaults. ``max_audio_tokens`` is both the default and the upper bound of a request's
audio-token cap.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
from typing import Any

import grpc
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from glmv_common.errors import InvalidRequest, missing_checkpoint
from glmv_common.logs import get_logger, kv
from glmv_common.settings import model_version
from glmv_lm import metrics
from glmv_lm.config import LMSettings
from glmv_lm.engine import (
    DoneEvent,
    EndReason,
    EngineClosedError,
    EngineConfig,
    Event,
    GenerationEngine,
    QueueFullError,
    TokenSpec,
)
from glmv_lm.sampling import (
    DEFAULT_MAX_AUDIO_TOKENS,
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    SamplingParams,
)
from glmvoice.v1 import common_pb2, lm_pb2, lm_pb2_grpc

log = get_logger("glmv.lm.service")

TOKEN_RATE_HZ = 12.5
SERVICE_NAME = "glmvoice.v1.LanguageModel"

_END_REASONS = {
    EndReason.END_TOKEN: lm_pb2.END_REASON_END_TOKEN,
    EndReason.EOS: lm_pb2.END_REASON_EOS,
    EndReason.MAX_TOKENS: lm_pb2.END_REASON_MAX_TOKENS,
    EndReason.AUDIO_CAP: lm_pb2.END_REASON_AUDIO_CAP,
    EndReason.CANCELLED: lm_pb2.END_REASON_CANCELLED,
    EndReason.ERROR: lm_pb2.END_REASON_ERROR,
}


class LmSettings(LMSettings):
    """LM service settings (environment prefix ``GLMV_LM_``)."""

    model_config = SettingsConfigDict(env_prefix="GLMV_LM_", extra="ignore", protected_namespaces=())

    max_queue: int = Field(
        64, ge=0, description="Requests waiting for a batch slot beyond which calls get RESOURCE_EXHAUSTED."
    )
    max_audio_tokens: int = Field(  # type: ignore[assignment]
        DEFAULT_MAX_AUDIO_TOKENS, ge=0, description="Default and upper bound of the audio tokens per reply."
    )
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, description="Default temperature (0 = greedy).")
    top_p: float = Field(DEFAULT_TOP_P, gt=0, le=1, description="Default nucleus mass.")
    top_k: int = Field(DEFAULT_TOP_K, ge=0, description="Default top-k (0 = off).")
    repetition_penalty: float = Field(
        DEFAULT_REPETITION_PENALTY, gt=0, description="Default penalty (1 = off)."
    )
    prefill_token_budget: int = Field(
        8192,
        ge=1,
        description="Padded prompt tokens prefilled together in one forward pass (while streams are "
        "decoding, at most PREFILL_CHUNK_TOKENS).",
    )
    prefill_chunk_tokens: int = Field(
        512,
        ge=0,
        description="Longer prompts are prefilled this many tokens per engine step, between decode "
        "steps of the running streams (0 = whole prompt at once).",
    )
    prefix_cache_tokens: int = Field(
        16384,
        ge=0,
        description="Keys/values of finished requests kept (in tokens) so a conversation's next turn "
        "prefills only its new part (0 = off).",
    )
    reply_reserve_tokens: int = Field(
        512, ge=1, description="Room kept for the reply when old turns are dropped to fit the window."
    )
    initial_cache_len: int = Field(512, ge=1, description="KV cache length allocated per slot at start.")


def _version() -> str:
    try:
        return importlib.metadata.version("glmv-lm")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout without install
        return "0.0.0"


def token_spec(tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> TokenSpec:
    """The engine's view of the vocabulary: sampleable range, audio range, stop ids, unassigned ids."""
    limit = min(vocab_size, tokenizer.vocab_size, tokenizer.audio_offset + tokenizer.audio_count)
    masked = frozenset(i for i in range(limit) if not tokenizer.is_valid(i))
    return TokenSpec(
        vocab_limit=limit,
        audio_offset=tokenizer.audio_offset,
        audio_count=tokenizer.audio_count,
        end_token_id=tokenizer.end_token_id,
        eos_ids=frozenset(eos_ids),
        masked_ids=masked,
    )


def event_to_proto(event: Event) -> lm_pb2.GenerateResponse:
    if isinstance(event, DoneEvent):
        return lm_pb2.GenerateResponse(
            done=lm_pb2.GenerateDone(
                end_reason=_END_REASONS[event.end_reason],
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
                text_tokens=event.text_tokens,
                audio_tokens=event.audio_tokens,
                dropped_turns=event.dropped_turns,
                time_to_first_token_ms=event.time_to_first_token_ms,
                decode_tokens_per_s=event.decode_tokens_per_s,
                queue_ms=event.queue_ms,
                timings=[
                    common_pb2.StageTiming(stage="lm_queue", ms=event.queue_ms),
                    common_pb2.StageTiming(stage="lm_prefill", ms=event.prefill_ms),
                    common_pb2.StageTiming(stage="lm_total", ms=event.total_ms),
                ],
                text=event.text,
                cached_prompt_tokens=event.cached_tokens,
            )
        )
    if event.is_audio:
        delta = lm_pb2.TokenDelta(
            kind=lm_pb2.DELTA_KIND_AUDIO, id=event.token_id, audio_token=event.audio_token, index=event.index
        )
    else:
        delta = lm_pb2.TokenDelta(
            kind=lm_pb2.DELTA_KIND_TEXT, id=event.token_id, text=event.text, index=event.index
        )
    return lm_pb2.GenerateResponse(delta=delta)


class LmService(lm_pb2_grpc.LanguageModelServicer):
    """The ``ModelService`` the shared runtime serves for the LM."""

    component = "lm"
    service_name = SERVICE_NAME

    def __init__(self, settings: LmSettings | None = None) -> None:
        self.settings = settings or LmSettings()
        self.loaded: Any = None
        self.tokenizer: Any = None
        self.engine: GenerationEngine | None = None

    # -- ModelService ------------------------------------------------------------------------------
    def add_to_server(self, server: grpc.aio.Server) -> None:
        lm_pb2_grpc.add_LanguageModelServicer_to_server(self, server)

    def load(self) -> None:
        from glmv_lm.checkpoint import load_model
        from glmv_lm.text_tokenizer import GlmTextTokenizer

        s = self.settings
        if s.model_dir is None:
            raise missing_checkpoint(
                "GLMV_LM_MODEL_DIR",
                "LM model directory",
                "Set GLMV_LM_MODEL_DIR to a glm-4-voice-9b directory",
            )
        loaded = load_model(
            s.model_dir,
            device=s.device,
            dtype=s.dtype,
            max_context=s.max_context,
            model_id=s.model_id,
            attn_implementation=s.attn_implementation,
        )
        tokenizer = GlmTextTokenizer.from_dir(s.model_dir)
        spec = token_spec(tokenizer, loaded.vocab_size, loaded.eos_token_ids)
        engine = GenerationEngine(
            loaded.model,
            spec,
            # Text for people: control tokens (<sop>, <|begin_of_audio|>, ...) stay in the ids the
            # history keeps, not in the text deltas.
            functools.partial(tokenizer.incremental_decoder, skip_special_tokens=True),
            EngineConfig(
                max_batch_size=s.max_batch_size,
                max_queue=s.max_queue,
                max_context=loaded.max_context,
                prefill_token_budget=s.prefill_token_budget,
                prefill_chunk=s.prefill_chunk_tokens,
                prefix_cache_tokens=s.prefix_cache_tokens,
                initial_cache_len=s.initial_cache_len,
            ),
        )
        engine.start()
        self.loaded, self.tokenizer, self.engine = loaded, tokenizer, engine
        log.info(
            "lm loaded",
            extra=kv(
                model_id=loaded.model_id,
                params=loaded.num_parameters,
                device=str(loaded.device),
                dtype=str(loaded.dtype),
                max_context=loaded.max_context,
                audio_offset=tokenizer.audio_offset,
                audio_count=tokenizer.audio_count,
            ),
        )

    async def aclose(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await asyncio.to_thread(engine.close)

    # -- helpers -----------------------------------------------------------------------------------
    def sampling_params(self, sp: lm_pb2.SamplingParams) -> SamplingParams:
        s = self.settings
        cap = s.max_audio_tokens
        return SamplingParams(
            temperature=sp.temperature if sp.HasField("temperature") else s.temperature,
            top_p=sp.top_p if sp.HasField("top_p") else s.top_p,
            top_k=sp.top_k if sp.HasField("top_k") else s.top_k,
            repetition_penalty=sp.repetition_penalty
            if sp.HasField("repetition_penalty")
            else s.repetition_penalty,
            seed=sp.seed if sp.HasField("seed") else None,
            max_new_tokens=sp.max_new_tokens if sp.HasField("max_new_tokens") else s.max_new_tokens,
            max_audio_tokens=min(sp.max_audio_tokens, cap) if sp.HasField("max_audio_tokens") else cap,
        ).validated()

    def _max_prompt_tokens(self, params: SamplingParams) -> int:
        window = self.loaded.max_context
        reserve = max(1, min(params.max_new_tokens, self.settings.reply_reserve_tokens, window // 2))
        return window - reserve

    # -- RPCs --------------------------------------------------------------------------------------
    async def GetInfo(
        self, request: common_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        loaded, tok, s = self.loaded, self.tokenizer, self.settings
        if loaded is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the LM is still loading")
        return common_pb2.ModelInfo(
            component=self.component,
            model_id=loaded.model_id,
            version=_version(),
            checkpoint_fingerprint=loaded.fingerprint,
            model_version=model_version(s.model_version, loaded.fingerprint),
            codebook_size=tok.audio_count,
            token_rate_hz=TOKEN_RATE_HZ,
            audio_token_offset=tok.audio_offset,
            audio_token_count=tok.audio_count,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            extra={
                "max_context": str(loaded.max_context),
                "vocab_size": str(loaded.vocab_size),
                "end_token_id": str(tok.end_token_id),
                "eos_token_ids": ",".join(str(i) for i in loaded.eos_token_ids),
                "max_batch_size": str(s.max_batch_size),
                "max_queue": str(s.max_queue),
                "max_audio_tokens": str(s.max_audio_tokens),
                "layout": str(loaded.layout),
            },
        )

    async def Generate(self, request: lm_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> Any:
        from glmv_lm.template import render_prompt

        engine = self.engine
        if engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the LM is not loaded")
        try:
            params = self.sampling_params(request.sampling)
            rendered = render_prompt(
                request, self.tokenizer, max_prompt_tokens=self._max_prompt_tokens(params)
            )
            stream = engine.stream(
                rendered.ids, params, request_id=request.request_id, dropped_turns=rendered.dropped_turns
            )
        except InvalidRequest as exc:
            metrics.ERRORS.labels("invalid_argument").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except QueueFullError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EngineClosedError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        try:
            async for event in stream:
                yield event_to_proto(event)
                if isinstance(event, DoneEvent):
                    log.info(
                        "generated",
                        extra=kv(
                            end_reason=event.end_reason.value,
                            prompt_tokens=event.prompt_tokens,
                            completion_tokens=event.completion_tokens,
                            audio_tokens=event.audio_tokens,
                            dropped_turns=event.dropped_turns,
                            ttft_ms=round(event.time_to_first_token_ms, 1),
                            tokens_per_s=round(event.decode_tokens_per_s, 1),
                            queue_ms=round(event.queue_ms, 1),
                        ),
                    )
                    if event.end_reason is EndReason.ERROR:
                        await context.abort(grpc.StatusCode.INTERNAL, event.error or "generation failed")
        finally:
            stream.cancel()  # a client that went away frees its batch slot at the next step
