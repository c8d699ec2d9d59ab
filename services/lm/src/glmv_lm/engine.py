"""The generation engine: continuous batching over one GLM model in a dedicated thread.

Requests join and leave between forward passes:

* :meth:`GenerationEngine.submit` queues a prompt (bounded: beyond ``max_queue`` waiting requests it
  raises :class:`QueueFullError`).
* Each iteration of the engine thread drops cancelled requests, admits waiting ones into free slots
  (up to ``max_batch_size``; their prompts are prefilled together, right-padded, within a token
  budget), then runs one decode step for every running request, sharing a single forward pass.
* A prompt longer than ``prefill_chunk`` tokens is prefilled in chunks of that size, one chunk per
  iteration before the decode step (chunked prefill), so a long conversation joining never stalls the
  running streams for more than one chunk's forward pass. It fills the highest cache slot, which a
  decode step never reads, and moves down to the first free slot when its last chunk is in. While
  streams are decoding, the prompts prefilled together in one step are also held to ``prefill_chunk``
  padded tokens (at least one prompt), so a burst of arrivals joins over a few steps.
* With a prefix cache (``prefix_cache_tokens`` > 0), a finished request's keys and values are kept;
  a new prompt sharing a long prefix with one (the next turn of the same conversation) copies it
  into its slot and prefills only the rest, through the chunked-prefill path (see prefix_cache.py).
* Every sampled token is handed at once to the request's *sink* (a callable run on the engine thread);
  :class:`TokenStream` is the asyncio sink: ``loop.call_soon_threadsafe`` into an unbounded per-request
  queue, so a slow client never stalls the batch and no token is ever dropped or reordered.

Stop rules (docs/architecture.md, "Reference deviations: LM"): ``<|user|>`` ends the turn (END_TOKEN),
any other EOS id of the checkpoint ends it (EOS); neither stop token is streamed. ``max_new_tokens``
(clipped to the context window) gives MAX_TOKENS, the per-reply audio cap gives AUDIO_CAP (the cap-th
audio token is streamed, then the reply ends; with a cap of 0 the first audio token is not streamed).
Ids at or beyond ``TokenSpec.vocab_limit`` (the vocabulary's padding rows) are masked before sampling.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import torch

from glmv_common.errors import GlmvError, InvalidRequest
from glmv_common.logs import get_logger
from glmv_lm import metrics
from glmv_lm.kv_cache import SlotKVCache
from glmv_lm.prefix_cache import PrefixCache
from glmv_lm.sampling import RowSampling, SamplingParams, make_generator, sample_next, vocab_bias

log = get_logger("glmv.lm.engine")


class EndReason(Enum):
    END_TOKEN = "end_token"
    EOS = "eos"
    MAX_TOKENS = "max_tokens"
    AUDIO_CAP = "audio_cap"
    CANCELLED = "cancelled"
    ERROR = "error"


class QueueFullError(GlmvError):
    """The wait queue is full (maps to RESOURCE_EXHAUSTED)."""


class EngineClosedError(GlmvError):
    """The engine is stopped or stopping (maps to UNAVAILABLE)."""


class IncrementalDecoder(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


@dataclass(frozen=True)
class TokenSpec:
    """The ids the engine must know about."""

    vocab_limit: int  # ids >= this are never sampled (padding rows, ids the tokenizer lacks)
    audio_offset: int  # id of <|audio_0|>
    audio_count: int
    end_token_id: int  # <|user|>
    eos_ids: frozenset[int]
    masked_ids: frozenset[int] = frozenset()  # ids below vocab_limit that are no token (reserved gaps)

    def is_audio(self, token_id: int) -> bool:
        return self.audio_offset <= token_id < self.audio_offset + self.audio_count


@dataclass(frozen=True)
class TokenEvent:
    index: int  # position in the completion
    token_id: int
    is_audio: bool
    text: str  # TEXT: the UTF-8-safe piece this token completes (may be empty)
    audio_token: int  # AUDIO: token_id - audio_offset


@dataclass(frozen=True)
class DoneEvent:
    end_reason: EndReason
    prompt_tokens: int
    completion_tokens: int
    text_tokens: int
    audio_tokens: int
    dropped_turns: int
    time_to_first_token_ms: float
    decode_tokens_per_s: float
    queue_ms: float
    prefill_ms: float
    total_ms: float
    text: str
    error: str = ""
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache


Event = TokenEvent | DoneEvent
Sink = Callable[[Event], None]


@dataclass
class EngineConfig:
    max_batch_size: int = 16
    max_queue: int = 64
    max_context: int = 8192
    prefill_token_budget: int = 8192  # padded prompt tokens per prefill forward (>= one prompt)
    prefill_chunk: int = 512  # longer prompts are prefilled this many tokens per iteration (0 = off)
    prefix_cache_tokens: int = 0  # keys/values of finished requests kept for reuse (0 = off)
    initial_cache_len: int = 512


class RequestHandle:
    """The caller's side of a submitted request: cancel it, or check whether it has finished."""

    def __init__(self, engine: GenerationEngine, request_id: str) -> None:
        self._engine = engine
        self.request_id = request_id
        self.cancelled = False
        self.finished = threading.Event()

    def cancel(self) -> None:
        """Stop generating: removed before the next step, its cache slot freed (no-op once finished)."""
        if not self.finished.is_set() and not self.cancelled:
            self.cancelled = True
            self._engine._on_cancel(self)


@dataclass(eq=False)
class _Seq:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    decoder: IncrementalDecoder
    dropped_turns: int
    max_new: int
    t_submit: float
    generator: torch.Generator | None = None
    presence: torch.Tensor | None = None
    position: int = 0  # cache index where the next input token goes (== its position id)
    prefilled: int = 0  # prompt tokens in the cache (chunked prefill)
    reuse: tuple[int, int] | None = None  # (prefix cache entry, tokens) to copy before prefilling
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    ids: list[int] = field(default_factory=list)  # streamed completion ids
    next_input: int = -1
    text_tokens: int = 0
    audio_tokens: int = 0
    text_parts: list[str] = field(default_factory=list)
    t_admit: float = 0.0
    t_prefilled: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0
    end: EndReason | None = None
    error: str = ""

    @property
    def generated(self) -> int:
        return len(self.ids)

    def row(self) -> RowSampling:
        return RowSampling(self.params, self.generator, self.presence)


class GenerationEngine:
    """Continuous-batching generation over a transformers ``GlmForCausalLM`` (sdpa or eager attention)."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: TokenSpec,
        decoder_factory: Callable[[], IncrementalDecoder],
        config: EngineConfig | None = None,
    ) -> None:
        self.model = model
        self.spec = spec
        self.decoder_factory = decoder_factory
        self.config = config or EngineConfig()
        cfg = model.config
        impl = getattr(cfg, "_attn_implementation", None) or "eager"
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"GenerationEngine supports sdpa or eager attention, not {impl!r}")
        self._bool_mask = impl == "sdpa"
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.vocab_size = int(cfg.vocab_size)
        if self.config.max_batch_size < 1 or self.config.max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        if self.config.prefill_chunk < 0:
            raise ValueError("prefill_chunk must be >= 0 (0 = off)")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.cache = SlotKVCache(
            num_layers=cfg.num_hidden_layers,
            max_slots=self.config.max_batch_size,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            max_len=self.config.max_context,
            dtype=self.dtype,
            device=self.device,
            initial_len=self.config.initial_cache_len,
        )
        self._bias = vocab_bias(
            self.vocab_size, min(spec.vocab_limit, self.vocab_size), self.device, spec.masked_ids
        )
        self._lock = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._cancelled: set[RequestHandle] = set()
        self._slots: list[_Seq] = []  # index == cache slot
        self._chunked: _Seq | None = None  # prompt being prefilled chunk by chunk, in the last slot
        self._chunk_slot = self.config.max_batch_size - 1
        budget = self.config.prefix_cache_tokens
        self.prefix = PrefixCache(budget) if budget else None
        self._closing = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode forward passes run (for tests and benchmarks)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="glmv-lm-engine", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the thread."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> int:
        """Requests holding a cache slot (decoding, or being prefilled chunk by chunk)."""
        return len(self._slots) + (self._chunked is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- submission ---------------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        sink: Sink,
        *,
        request_id: str = "",
        dropped_turns: int = 0,
    ) -> RequestHandle:
        """Queue one generation. Raises InvalidRequest, QueueFullError or EngineClosedError."""
        params = params.validated().with_seed()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        if len(prompt) >= self.config.max_context:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} tokens; the context window is {self.config.max_context}"
            )
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(f"prompt id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        handle = RequestHandle(self, request_id)
        seq = _Seq(
            handle=handle,
            prompt=prompt,
            params=params,
            sink=sink,
            decoder=self.decoder_factory(),
            dropped_turns=dropped_turns,
            max_new=min(params.max_new_tokens, self.config.max_context - len(prompt)),
            t_submit=time.perf_counter(),
        )
        with self._lock:
            if self._closing or self._thread is None:
                raise EngineClosedError("the LM engine is not running")
            if len(self._waiting) >= self.config.max_queue:
                metrics.ERRORS.labels("queue_full").inc()
                raise QueueFullError(
                    f"the LM is at capacity ({len(self._slots)} running, {len(self._waiting)} waiting); "
                    "retry later"
                )
            self._waiting.append(seq)
            metrics.QUEUE_DEPTH.set(len(self._waiting))
            self._lock.notify_all()
        return handle

    def stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        request_id: str = "",
        dropped_turns: int = 0,
    ) -> TokenStream:
        """Submit and return an async iterator of events (call from a running event loop)."""
        stream = TokenStream(asyncio.get_running_loop())
        stream.handle = self.submit(
            prompt_ids, params, stream.put, request_id=request_id, dropped_turns=dropped_turns
        )
        return stream

    def _on_cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            for seq in self._waiting:
                if seq.handle is handle:
                    self._waiting.remove(seq)
                    metrics.QUEUE_DEPTH.set(len(self._waiting))
                    break
            else:
                self._cancelled.add(handle)
                self._lock.notify_all()
                return
        seq.end = EndReason.CANCELLED
        self._finish(seq)

    # -- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._closing and not self._waiting and not self.running:
                        self._lock.wait()
                    if self._closing:
                        break
                    cancelled, self._cancelled = self._cancelled, set()
                    admitted = self._admit_locked()
                try:
                    self._iteration(cancelled, admitted)
                except Exception as exc:  # one bad step must not kill the service
                    log.exception("engine step failed")
                    metrics.ERRORS.labels("engine").inc()
                    self._fail_all(admitted, exc)
                if not self.running and not self._waiting:
                    self.cache.shrink()
            self._shutdown()

    def _admit_locked(self) -> list[_Seq]:
        """Take waiting requests in order while slots are free: long prompts become the (single)
        chunked prefill, the others are prefilled together this iteration."""
        admitted: list[_Seq] = []
        longest = 0
        chunk = self.config.prefill_chunk
        budget = self.config.prefill_token_budget
        if chunk and self._slots:  # streams are decoding: bound the work in front of their next token
            budget = min(budget, chunk)
        while self._waiting and self.running + len(admitted) < self.config.max_batch_size:
            seq = self._waiting[0]
            if self.prefix is not None and self._chunked is None:
                entry, reusable = self.prefix.lookup(seq.prompt)
                if reusable:  # prefill only the rest, on the chunked path
                    self._waiting.popleft()
                    seq.reuse = (entry, reusable)
                    self._chunked = seq
                    continue
            if chunk and len(seq.prompt) > chunk:
                if self._chunked is not None:
                    break  # one chunked prefill at a time; the queue keeps its order
                self._waiting.popleft()
                self._chunked = seq
                continue
            width = max(longest, len(seq.prompt))
            if admitted and width * (len(admitted) + 1) > budget:
                break
            self._waiting.popleft()
            admitted.append(seq)
            longest = width
        metrics.QUEUE_DEPTH.set(len(self._waiting))
        return admitted

    def _iteration(self, cancelled: set[RequestHandle], admitted: list[_Seq]) -> None:
        if cancelled:
            for seq in self._slots:
                if seq.handle in cancelled:
                    seq.end = EndReason.CANCELLED
            self._release_finished()
            if self._chunked is not None and self._chunked.handle in cancelled:
                seq, self._chunked = self._chunked, None
                seq.end = EndReason.CANCELLED
                self._finish(seq)
        if admitted:
            self._prefill(admitted)
            self._release_finished()
        if self._chunked is not None:
            self._prefill_chunk(self._chunked)
            self._release_finished()
        if self._slots:
            self._decode()
            self._release_finished()
        metrics.ACTIVE.set(self.running)

    def _start(self, seq: _Seq, now: float) -> None:
        """Per-request sampling state, set up when the request leaves the queue."""
        seq.t_admit = now
        metrics.QUEUE_SECONDS.observe(now - seq.t_submit)
        if not seq.params.greedy:
            seq.generator = make_generator(seq.params.seed or 0)
        if seq.params.repetition_penalty != 1.0:
            seq.presence = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            seq.presence[torch.tensor(seq.prompt, device=self.device)] = True

    def _prefill(self, seqs: list[_Seq]) -> None:
        now = time.perf_counter()
        first = len(self._slots)
        for seq in seqs:
            self._start(seq, now)
        self._slots.extend(seqs)  # slots first..first+len-1
        lengths = [len(s.prompt) for s in seqs]
        width = max(lengths)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : lengths[i]] = torch.tensor(seq.prompt)
        ids = ids.to(self.device)
        pos = torch.arange(width, device=self.device)
        lens = torch.tensor(lengths, device=self.device)
        allowed = (pos[None, None, :] <= pos[None, :, None]) & (pos[None, None, :] < lens[:, None, None])
        self.cache.for_prefill(first, len(seqs), width)
        hidden = self._forward(ids, pos.unsqueeze(0).expand(len(seqs), width), allowed.unsqueeze(1))
        last = hidden[torch.arange(len(seqs), device=self.device), lens - 1]
        logits = self.model.lm_head(last)
        tokens = sample_next(logits, [s.row() for s in seqs], self._bias)
        done = time.perf_counter()
        metrics.STEP_SECONDS.labels("prefill").observe(done - now)
        metrics.PROMPT_TOKENS.inc(sum(lengths))
        for seq, tok in zip(seqs, tokens, strict=True):
            seq.position = len(seq.prompt)
            seq.t_prefilled = done
            self._accept(seq, tok, done)

    def _prefill_chunk(self, seq: _Seq) -> None:
        """Prefill the next chunk of a long prompt into the last cache slot; after the last chunk,
        sample its first token and move it into the first free slot to decode with the others."""
        now = time.perf_counter()
        if seq.prefilled == 0:
            self._start(seq, now)
            if seq.reuse is not None and self.prefix is not None:
                entry, length = seq.reuse
                if self.prefix.load(entry, length, self.cache, self._chunk_slot):
                    seq.prefilled = seq.cached_tokens = length
                    metrics.PREFIX_HITS.inc()
                    metrics.PREFIX_TOKENS.inc(length)
        start = seq.prefilled
        end = min(start + (self.config.prefill_chunk or len(seq.prompt)), len(seq.prompt))
        ids = torch.tensor([seq.prompt[start:end]], device=self.device)
        pos = torch.arange(start, end, device=self.device)
        keys = torch.arange(end, device=self.device)
        allowed = keys[None, :] <= pos[:, None]
        self.cache.for_chunk(self._chunk_slot, start, end)
        hidden = self._forward(ids, pos.unsqueeze(0), allowed[None, None])
        seq.prefilled = end
        metrics.PROMPT_TOKENS.inc(end - start)
        if end < len(seq.prompt):
            metrics.STEP_SECONDS.labels("prefill").observe(time.perf_counter() - now)
            return
        logits = self.model.lm_head(hidden[:, -1])
        tok = sample_next(logits, [seq.row()], self._bias)[0]
        done = time.perf_counter()
        metrics.STEP_SECONDS.labels("prefill").observe(done - now)
        self.cache.move(self._chunk_slot, len(self._slots), end)
        self._slots.append(seq)
        self._chunked = None
        seq.position = end
        seq.t_prefilled = done
        self._accept(seq, tok, done)

    def _decode(self) -> None:
        started = time.perf_counter()
        seqs = self._slots
        n = len(seqs)
        metrics.BATCH_SIZE.observe(n)
        positions = torch.tensor([s.position for s in seqs], device=self.device)
        kv_len = max(s.position for s in seqs) + 1
        ids = torch.tensor([[s.next_input] for s in seqs], device=self.device)
        keys = torch.arange(kv_len, device=self.device)
        allowed = keys[None, :] <= positions[:, None]
        self.cache.for_decode(n, positions, kv_len)
        hidden = self._forward(ids, positions.unsqueeze(1), allowed[:, None, None, :])
        logits = self.model.lm_head(hidden[:, -1])
        tokens = sample_next(logits, [s.row() for s in seqs], self._bias)
        now = time.perf_counter()
        self.steps += 1
        metrics.STEP_SECONDS.labels("decode").observe(now - started)
        for seq, tok in zip(seqs, tokens, strict=True):
            seq.position += 1
            if seq.end is None:  # cancelled meanwhile is handled next iteration
                self._accept(seq, tok, now)

    def _forward(self, ids: torch.Tensor, position_ids: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        if self._bool_mask:
            mask = allowed
        else:
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        out = self.model.model(
            input_ids=ids,
            position_ids=position_ids,
            attention_mask=mask,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.last_hidden_state

    def _accept(self, seq: _Seq, tok: int, now: float) -> None:
        """Route one sampled token: stop, or stream it and decide whether the reply goes on."""
        spec = self.spec
        if tok == spec.end_token_id:
            seq.end = EndReason.END_TOKEN
            return
        if tok in spec.eos_ids:
            seq.end = EndReason.EOS
            return
        is_audio = spec.is_audio(tok)
        if is_audio and seq.audio_tokens >= seq.params.max_audio_tokens:
            seq.end = EndReason.AUDIO_CAP
            return
        index = seq.generated
        seq.ids.append(tok)
        if is_audio:
            seq.audio_tokens += 1
            event = TokenEvent(index, tok, True, "", tok - spec.audio_offset)
            metrics.TOKENS.labels("audio").inc()
        else:
            seq.text_tokens += 1
            piece = seq.decoder.push(tok)
            seq.text_parts.append(piece)
            event = TokenEvent(index, tok, False, piece, 0)
            metrics.TOKENS.labels("text").inc()
        if index == 0:
            seq.t_first = now
            metrics.TTFT.observe(now - seq.t_submit)
        seq.t_last = now
        if seq.presence is not None:
            seq.presence[tok] = True
        seq.next_input = tok
        if not self._deliver(seq, event):
            return
        if seq.generated >= seq.max_new:
            seq.end = EndReason.MAX_TOKENS
        elif is_audio and seq.audio_tokens >= seq.params.max_audio_tokens:
            seq.end = EndReason.AUDIO_CAP

    def _deliver(self, seq: _Seq, event: Event) -> bool:
        try:
            seq.sink(event)
            return True
        except Exception:  # e.g. the client's event loop is gone
            log.warning("dropping request %s: its sink failed", seq.handle.request_id, exc_info=True)
            seq.end = EndReason.CANCELLED
            return False

    def _release_finished(self) -> None:
        """Finish ended requests and compact the slots (the last slot moves into each hole)."""
        ended = [i for i, s in enumerate(self._slots) if s.end is not None]
        for slot in reversed(ended):
            seq = self._slots[slot]
            if self.prefix is not None and seq.end is not EndReason.ERROR:
                # what the slot holds: the prompt and every reply token fed back so far
                self.prefix.store((seq.prompt + seq.ids)[: seq.position], self.cache, slot)
                metrics.PREFIX_CACHED.set(self.prefix.tokens)
            last = len(self._slots) - 1
            if slot != last:
                mover = self._slots[last]
                self.cache.move(last, slot, mover.position)
                self._slots[slot] = mover
            self._slots.pop()
            self._finish(seq)

    def _finish(self, seq: _Seq) -> None:
        if seq.handle.finished.is_set():
            return
        assert seq.end is not None
        now = time.perf_counter()
        tail = seq.decoder.flush() if seq.text_tokens else ""
        if tail:
            seq.text_parts.append(tail)
        decode_s = seq.t_last - seq.t_first
        done = DoneEvent(
            end_reason=seq.end,
            prompt_tokens=len(seq.prompt),
            completion_tokens=seq.generated,
            text_tokens=seq.text_tokens,
            audio_tokens=seq.audio_tokens,
            dropped_turns=seq.dropped_turns,
            time_to_first_token_ms=(seq.t_first - seq.t_submit) * 1e3 if seq.generated else 0.0,
            decode_tokens_per_s=(seq.generated - 1) / decode_s if seq.generated > 1 and decode_s > 0 else 0.0,
            queue_ms=((seq.t_admit or now) - seq.t_submit) * 1e3,
            prefill_ms=(seq.t_prefilled - seq.t_admit) * 1e3 if seq.t_prefilled else 0.0,
            total_ms=(now - seq.t_submit) * 1e3,
            cached_tokens=seq.cached_tokens,
            text="".join(seq.text_parts),
            error=seq.error,
        )
        metrics.REQUESTS.labels(seq.end.value).inc()
        seq.handle.finished.set()
        self._deliver(seq, done)

    def _fail_all(self, admitted: list[_Seq], exc: Exception) -> None:
        victims = list(self._slots) + [s for s in admitted if s not in self._slots]
        if self._chunked is not None:
            victims.append(self._chunked)
            self._chunked = None
        self._slots.clear()
        for seq in victims:
            seq.end = EndReason.ERROR
            seq.error = f"generation failed: {type(exc).__name__}: {exc}"
            self._finish(seq)

    def _shutdown(self) -> None:
        with self._lock:
            pending = list(self._waiting) + self._slots + ([self._chunked] if self._chunked else [])
            self._waiting.clear()
            self._slots = []
            self._chunked = None
        for seq in pending:
            seq.end = EndReason.CANCELLED
            seq.error = "the LM engine is shutting down"
            self._finish(seq)


class TokenStream:
    """Async iterator over one request's events; the engine thread feeds it thread-safely.

    Events go into a deque (thread-safe appends); the event loop is woken at most once per batch of
    events that arrive while it is busy, instead of once per token (``call_soon_threadsafe`` writes
    to the loop's self-pipe on every call).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._done = False
        self.handle: RequestHandle | None = None

    def put(self, event: Event) -> None:
        """Called on the engine thread."""
        self._items.append(event)
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._wake_lock:
            self._wake_pending = False
        self._ready.set()

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        while not self._items:
            self._ready.clear()
            if self._items:
                break
            await self._ready.wait()
        event = self._items.popleft()
        if isinstance(event, DoneEvent):
            self._done = True
        return event

    def cancel(self) -> None:
        """Stop the request if it is still running (safe to call any time)."""
        if self.handle is not None and not self._done:
            self.handle.cancel()
