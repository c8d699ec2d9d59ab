"""Per-stream chunked token → waveform decoding (no gRPC; one object per utterance).

The algorithm is GLM-4-Voice's streaming ``token2wav`` (flow_inference.py / web_demo.py), with its bugs
fixed. For every chunk of new speech tokens:

1. the flow model generates mel frames for the new tokens, conditioned on the previously decoded tokens
   (``prompt_token``) and their mel frames (``prompt_feat``);
2. the last ``MEL_OVERLAP`` (34) frames of every non-final chunk are withheld; the next chunk's flow call
   regenerates those frame positions (its prompt stops 34 frames short of the history) and the two versions
   are cross-faded with the halves of a 68-point Hamming window (the reference's window; its halves sum to
   1.06–1.08, not 1 — kept for fidelity);
3. the vocoder (HiFT) gets the new frames preceded by the last frame it saw, with the last 256 NSF source
   samples of the previous call (``cache_source``), so the re-synthesised frame continues the excitation;
   the last frame's 256 samples are withheld and re-synthesised by the next call;
4. ``finish`` decodes its tokens (if any) with anything pending as the final chunk, nothing withheld, in one
   flow + one vocoder call; without tokens it vocodes what is still withheld.

Fixes relative to the reference (each also described in services/decoder/README.md and
docs/architecture.md, "Reference deviations: Decoder"):

* **Prompt-mel drift**. The reference appends the mel it *sent to HiFT* to the
  prompt history; from the second chunk on that mel starts with the duplicated cache frame, so the prompt is
  one frame too long per boundary: the conditioning mel is shifted against the tokens, the cross-fade is
  misaligned by a frame and one frame of audio is lost per chunk boundary. Here the history receives only
  the new, cross-faded frames, so the prompt is exactly frames [0, F_prev − 34) and the streamed output has
  exactly the one-shot length ``256 · feat_len(N)``.
* **Lost tail**. The reference only flushes when a final chunk carries tokens; a stream that ends
  without pending tokens never emits the 34 withheld frames + the cached frame (~0.41 s) and leaks its
  per-stream state. ``finish()`` with no pending tokens here vocodes [cache frame + withheld frames] with
  the cached source and releases all state.
* **First chunk too small**. A non-final first chunk must produce more than 34 flow frames
  (≥ ``min_first_tokens`` = 6 tokens), otherwise nothing is left for the vocoder after withholding the
  overlap (the reference would crash). Smaller first pushes are buffered (``push`` returns no audio) until
  enough tokens have arrived or the stream finishes.
* **Unbounded per-chunk cost**. The reference re-encodes the entire history on every chunk, so
  chunk cost grows quadratically with reply length. ``prompt_window_tokens`` (default
  ``DEFAULT_PROMPT_WINDOW_TOKENS``) conditions on the last ≥ W tokens only (window start aligned to the
  encoder's 10-token blocks, so the new tokens see the same block layout as with full history) and on
  their mel frames. The frame count of the windowed prompt is chosen so that the chunk still yields exactly
  ``feat_len(N) − feat_len(N_prev) + 34`` frames, keeping the global length law; the window's local
  token→frame grid differs from the global one by less than one frame. ``prompt_window_tokens=0`` keeps the
  reference's unbounded behaviour.
* **Process-wide RNG**. The reference reseeds torch's global RNG to 42 in every flow call and
  the vocoder then draws from it. Here each stream owns a ``torch.Generator``, reseeded with the stream's
  seed before every flow call and then used by the flow and by HiFT, so with seed 42 chunk k draws exactly
  the numbers the reference draws, and concurrent streams do not disturb each other.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from glmv_common.errors import InvalidRequest
from glmv_decoder.flow import mel_frames

__all__ = [
    "DEFAULT_PROMPT_WINDOW_TOKENS",
    "DEFAULT_SEED",
    "MEL_CACHE",
    "MEL_OVERLAP",
    "SOURCE_CACHE",
    "ChunkPlan",
    "ChunkTiming",
    "DecoderStream",
    "feat_len",
    "one_shot",
    "run_chunks",
]

#: Default conditioning window (tokens, ≈ 4 s of speech). Bounds per-chunk cost to O(window + chunk).
DEFAULT_PROMPT_WINDOW_TOKENS = 50
#: Flow noise seed used by the reference (``torch.manual_seed(42)`` in every flow call).
DEFAULT_SEED = 42
#: Smallest non-zero window: below ~5 tokens the windowed prompt would have no frames left.
MIN_PROMPT_WINDOW_TOKENS = 10
#: Mel frames withheld per chunk and cross-faded with the next one: int(5 tokens / 12.5 Hz · 22050 / 256).
MEL_OVERLAP = 34
#: Mel frames the vocoder re-synthesises at the start of each chunk, and their source samples.
MEL_CACHE = 1
SOURCE_CACHE = 256

# np.hamming(68): first 34 values fade the new chunk in, last 34 fade the withheld frames out (float64).
_FADE = torch.from_numpy(np.hamming(2 * MEL_OVERLAP))
_FADE_IN = _FADE[:MEL_OVERLAP]
_FADE_OUT = _FADE[MEL_OVERLAP:]


def feat_len(n_tokens: int, token_rate: float = 12.5) -> int:
    """Mel frames the flow produces for ``n_tokens`` (prompt + new), with the reference's float32 arithmetic
    (``glmv_decoder.flow.mel_frames``; e.g. N=3392 → 23372 where exact arithmetic gives 23373)."""
    return mel_frames(n_tokens, token_rate) if n_tokens > 0 else 0


class _Flow(Protocol):
    def inference(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                  embedding: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...


class _Decoder(Protocol):
    config: Any
    flow: Any
    hift: Any


@dataclass
class ChunkTiming:
    """What one flow+vocoder call cost (for metrics and the response's StageTiming list)."""

    new_tokens: int
    prompt_tokens: int
    prompt_frames: int
    flow_frames: int
    emitted_samples: int
    flow_ms: float
    hift_ms: float

    @property
    def total_ms(self) -> float:
        return self.flow_ms + self.hift_ms


@dataclass
class _History:
    """Conditioning for the next chunk: decoded tokens and the mel frames [.., F_prev − 34)."""

    tokens: torch.Tensor  # (1, K) long: decoded tokens [token_start, n_decoded)
    token_start: int
    mel: torch.Tensor  # (1, 80, H) float32: frames ending at global frame F_prev − MEL_OVERLAP


@dataclass
class _Carry:
    """What a non-final chunk leaves for the next one."""

    overlap: torch.Tensor  # (1, 80, 34) withheld flow frames
    cache_mel: torch.Tensor  # (1, 80, 1) last frame sent to HiFT (its samples were withheld)
    cache_source: torch.Tensor  # (1, 1, 256) NSF source of that frame


@dataclass(eq=False)
class ChunkPlan:
    """One chunk of one stream on its way through the flow and the vocoder (see ``run_chunks``)."""

    stream: DecoderStream
    final: bool
    new: torch.Tensor | None  # (1, N) new tokens; None: vocode the withheld tail only (no flow call)
    prompt_tokens: torch.Tensor | None  # (1, P)
    prompt_mel: torch.Tensor | None  # (1, T_p, 80)
    expected: int  # flow output frames
    generator: torch.Generator
    vocoder_in: torch.Tensor | None = None  # (1, 80, T) set by ``DecoderStream.vocoder_input``
    cache_source: torch.Tensor | None = None
    keep: torch.Tensor | None = None  # frames that enter the history
    overlap: torch.Tensor | None = None  # frames withheld for the next chunk


@dataclass
class DecoderStream:
    """One utterance: ``push`` token chunks as they arrive, ``finish`` once; audio comes back per call.

    Output is float32 mono at the model rate (22050 Hz). The client decides the chunk sizes; each
    ``push`` that can be decoded runs one flow + one vocoder call and returns that chunk's audio;
    ``finish(tokens)`` decodes the last tokens with everything pending/withheld as the final chunk.

    The object is plain per-stream state (pending tokens, history, carry, generator) with three steps
    that ``push``/``finish`` chain for one stream and that ``run_chunks`` (and the service's scheduler)
    drives for several streams at once: ``plan_chunk`` → model calls → ``vocoder_input`` → vocoder →
    ``finish_chunk``.
    Concatenating every returned array gives ``256 · feat_len(total tokens)`` samples, exactly the length
    of ``one_shot`` on the same tokens.

    Not thread-safe: use one stream from one worker at a time (different streams may run concurrently).
    """

    decoder: _Decoder
    seed: int = DEFAULT_SEED
    prompt_window_tokens: int = DEFAULT_PROMPT_WINDOW_TOKENS
    max_tokens: int | None = None
    timings: list[ChunkTiming] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        cfg = self.decoder.config
        self.codebook_size: int = int(cfg.flow.vocab_size)
        self.token_rate: float = float(cfg.flow.input_frame_rate)
        self.block_size: int = int(cfg.flow.encoder.block_size)
        self.samples_per_frame: int = int(cfg.hift.samples_per_frame)
        if self.samples_per_frame != SOURCE_CACHE * MEL_CACHE:
            raise ValueError(f"streaming needs 256 samples per frame, config gives {self.samples_per_frame}")
        if self.prompt_window_tokens < 0 or 0 < self.prompt_window_tokens < MIN_PROMPT_WINDOW_TOKENS:
            raise InvalidRequest(
                f"prompt_window_tokens must be 0 (unlimited) or >= {MIN_PROMPT_WINDOW_TOKENS}, "
                f"got {self.prompt_window_tokens}"
            )
        if not 0 <= self.seed < 2**64:
            raise InvalidRequest(f"seed must be in [0, 2^64), got {self.seed}")
        self.min_first_tokens: int = next(
            n for n in range(1, 1000) if feat_len(n, self.token_rate) > MEL_OVERLAP
        )
        param = next(self.decoder.hift.parameters())
        self.device: torch.device = param.device
        self._generator: torch.Generator | None = torch.Generator(device=self.device)
        self._pending: list[int] = []
        self._history: _History | None = None
        self._carry: _Carry | None = None
        self.tokens_received = 0
        self.tokens_decoded = 0
        self.frames_decoded = 0  # feat_len(tokens_decoded)
        self.samples_emitted = 0
        self.finished = False

    # -- public -------------------------------------------------------------------------------------------
    @property
    def pending_tokens(self) -> int:
        return len(self._pending)

    def has_chunk(self, final: bool) -> bool:
        """Whether ``plan_chunk(final)`` would decode something now."""
        if self.finished:
            return False
        if final:
            return bool(self._pending) or self._carry is not None
        started = self._carry is not None
        return bool(self._pending) and (started or len(self._pending) >= self.min_first_tokens)

    def push(self, tokens: Iterable[int]) -> np.ndarray:
        """Add speech tokens and decode them now as one chunk (unless the stream has not started and fewer
        than ``min_first_tokens`` are buffered). Returns this call's samples (possibly empty)."""
        self.accept(tokens)
        plan = self.plan_chunk(final=False)
        return _empty() if plan is None else run_chunks(self.decoder, [plan])[0]

    def finish(self, tokens: Iterable[int] = ()) -> np.ndarray:
        """Add the last tokens (if any) and decode them with everything pending and withheld as the final
        chunk, in one flow + one vocoder call. Frees the stream's state."""
        self.accept(tokens)
        try:
            plan = self.plan_chunk(final=True)
            return _empty() if plan is None else run_chunks(self.decoder, [plan])[0]
        finally:
            self.close()

    def close(self) -> None:
        """Drop every tensor the stream holds (idempotent). Later push/finish raise InvalidRequest."""
        self.finished = True
        self._pending = []
        self._history = None
        self._carry = None
        self._generator = None

    @property
    def holds_state(self) -> bool:
        """True while the stream keeps tensors or a generator (False after finish/close)."""
        held = (self._history, self._carry, self._generator)
        return any(x is not None for x in held) or bool(self._pending)

    # -- internals ----------------------------------------------------------------------------------------
    def accept(self, tokens: Iterable[int]) -> None:
        """Validate and queue tokens without decoding them (raises InvalidRequest, queues nothing, on bad
        input or past the token cap)."""
        if self.finished:
            raise InvalidRequest("the stream is already finished")
        new = list(tokens)
        for t in new:
            if isinstance(t, bool) or not isinstance(t, int | np.integer):
                raise InvalidRequest(f"speech tokens must be integers, got {t!r}")
            if not 0 <= t < self.codebook_size:
                raise InvalidRequest(f"speech token {t} outside the codebook [0, {self.codebook_size})")
        if self.max_tokens is not None and self.tokens_received + len(new) > self.max_tokens:
            raise InvalidRequest(
                f"stream exceeds the limit of {self.max_tokens} speech tokens "
                f"({self.tokens_received} received, {len(new)} more sent)"
            )
        self.tokens_received += len(new)
        self._pending.extend(int(t) for t in new)

    def _prompt(self, n_new: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(prompt tokens (1,P), prompt mel (1,T_p,80), expected flow output frames) for the next chunk."""
        n_prev, f_prev = self.tokens_decoded, self.frames_decoded
        n_total = n_prev + n_new
        if self._history is None:
            empty_tok = torch.zeros(1, 0, dtype=torch.long, device=self.device)
            empty_mel = torch.zeros(1, 0, 80, device=self.device)
            return empty_tok, empty_mel, feat_len(n_total, self.token_rate)
        hist = self._history
        w = self.prompt_window_tokens
        start = 0 if (w == 0 or n_prev <= w) else ((n_prev - w) // self.block_size) * self.block_size
        start = max(start, hist.token_start)
        # Frames this chunk must yield: the 34 withheld positions again + the new tokens' frames.
        expected = feat_len(n_total, self.token_rate) - f_prev + MEL_OVERLAP
        n_prompt_frames = feat_len(n_total - start, self.token_rate) - expected
        if start == 0:
            assert n_prompt_frames == f_prev - MEL_OVERLAP
        if not 0 <= n_prompt_frames <= hist.mel.shape[2]:
            raise RuntimeError(  # pragma: no cover - guarded by the history trimming bound
                f"internal: prompt needs {n_prompt_frames} frames, history holds {hist.mel.shape[2]}"
            )
        tokens = hist.tokens[:, start - hist.token_start:]
        mel = hist.mel[:, :, hist.mel.shape[2] - n_prompt_frames:]
        return tokens, mel.transpose(1, 2), expected

    def plan_chunk(self, final: bool) -> ChunkPlan | None:
        """Step 1 of a chunk: take the pending tokens and prepare the flow inputs (None: nothing to decode
        now). ``final`` decodes everything pending and withheld, with no overlap kept."""
        if self.finished or self._generator is None:
            raise InvalidRequest("the stream is already finished")
        if not self._pending:
            if final and self._carry is not None:  # finish() without new tokens: the withheld tail only
                return ChunkPlan(stream=self, final=True, new=None, prompt_tokens=None, prompt_mel=None,
                                 expected=0, generator=self._generator)
            return None
        if not final and self._carry is None and len(self._pending) < self.min_first_tokens:
            return None  # a first chunk this small cannot be streamed; wait for more (see module doc)
        new = torch.tensor([self._pending], dtype=torch.long, device=self.device)
        self._pending = []
        prompt_tokens, prompt_mel, expected = self._prompt(new.shape[1])
        # Reseed before every flow call, as the reference's CFM does with the global RNG: chunk k's noise
        # (and the vocoder's phases/noise drawn right after) equal the reference's for seed 42.
        self._generator.manual_seed(self.seed)
        return ChunkPlan(stream=self, final=final, new=new, prompt_tokens=prompt_tokens,
                         prompt_mel=prompt_mel, expected=expected, generator=self._generator)

    def vocoder_input(self, plan: ChunkPlan, mel: torch.Tensor | None) -> None:
        """Step 2: cross-fade the flow's frames with the withheld ones and set the vocoder's input."""
        carry = self._carry
        if plan.new is None:  # tail only: the cached frame + the 34 withheld frames (lost-tail fix)
            assert carry is not None
            plan.vocoder_in = torch.cat([carry.cache_mel, carry.overlap], dim=2)
            plan.cache_source = carry.cache_source
            return
        assert mel is not None
        mel = mel.detach().to(torch.float32)
        if mel.shape[:2] != (1, 80) or mel.shape[2] != plan.expected:
            raise RuntimeError(f"flow returned {tuple(mel.shape)}, expected (1, 80, {plan.expected})")
        if carry is not None:
            # Cross-fade the regenerated positions with the withheld frames (float64 as the reference).
            head = (mel[:, :, :MEL_OVERLAP].double() * _FADE_IN.to(mel.device)
                    + carry.overlap.double() * _FADE_OUT.to(mel.device)).float()
            mel = torch.cat([head, mel[:, :, MEL_OVERLAP:]], dim=2)
        # Fix for the prompt-mel drift: the history gets the new frames only, never the cache frame.
        plan.keep = mel if plan.final else mel[:, :, :-MEL_OVERLAP]
        vocoder_in = mel if carry is None else torch.cat([carry.cache_mel, mel], dim=2)
        if not plan.final:
            plan.overlap = vocoder_in[:, :, -MEL_OVERLAP:]
            vocoder_in = vocoder_in[:, :, :-MEL_OVERLAP]
        plan.vocoder_in = vocoder_in
        plan.cache_source = None if carry is None else carry.cache_source

    def finish_chunk(self, plan: ChunkPlan, speech: torch.Tensor, source: torch.Tensor,
                     flow_ms: float, hift_ms: float) -> np.ndarray:
        """Step 3: keep what the next chunk needs, record the timing and return this chunk's samples."""
        assert plan.vocoder_in is not None
        if plan.new is None:
            out = speech[0]
            self.timings.append(ChunkTiming(new_tokens=0, prompt_tokens=0, prompt_frames=0, flow_frames=0,
                                            emitted_samples=out.shape[0], flow_ms=0.0, hift_ms=hift_ms))
            return self._emit(out)
        assert plan.prompt_tokens is not None and plan.prompt_mel is not None and plan.keep is not None
        if plan.final:
            out = speech[0]
        else:
            assert plan.overlap is not None
            self._carry = _Carry(
                overlap=plan.overlap.clone(),
                cache_mel=plan.vocoder_in[:, :, -MEL_CACHE:].clone(),
                cache_source=source[:, :, -SOURCE_CACHE:].clone(),
            )
            out = speech[0, :-SOURCE_CACHE]
        self._append_history(plan.new, plan.keep, plan.final)
        self.timings.append(ChunkTiming(
            new_tokens=plan.new.shape[1], prompt_tokens=plan.prompt_tokens.shape[1],
            prompt_frames=plan.prompt_mel.shape[1], flow_frames=plan.expected,
            emitted_samples=out.shape[0], flow_ms=flow_ms, hift_ms=hift_ms,
        ))
        return self._emit(out)

    def _append_history(self, new: torch.Tensor, frames: torch.Tensor, final: bool) -> None:
        self.tokens_decoded += new.shape[1]
        self.frames_decoded = feat_len(self.tokens_decoded, self.token_rate)
        if final:
            self._history = None
            return
        if self._history is None:
            self._history = _History(tokens=new, token_start=0, mel=frames.clone())
        else:
            h = self._history
            self._history = _History(tokens=torch.cat([h.tokens, new], dim=1), token_start=h.token_start,
                                     mel=torch.cat([h.mel, frames], dim=2))
        w = self.prompt_window_tokens
        if w:
            # Keep only what the next windowed prompt can use: ≥ W + block tokens and their frames.
            h = self._history
            first = max(0, self.tokens_decoded - w - self.block_size)
            if first > h.token_start:
                h.tokens = h.tokens[:, first - h.token_start:]
                h.token_start = first
            max_frames = feat_len(w + self.block_size, self.token_rate) + 8
            if h.mel.shape[2] > max_frames:
                h.mel = h.mel[:, :, -max_frames:].clone()
        assert self._history.mel.shape[2] <= self.frames_decoded - MEL_OVERLAP

    def _emit(self, samples: torch.Tensor) -> np.ndarray:
        arr = samples.detach().to("cpu", torch.float32).numpy().copy()
        self.samples_emitted += arr.shape[0]
        return arr


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.float32)


def run_chunks(decoder: _Decoder, plans: Sequence[ChunkPlan]) -> list[np.ndarray]:
    """Decode chunks of several streams together: one flow call for every chunk with new tokens and one
    vocoder call for all of them, then each stream keeps its carry/history. One chunk uses the models'
    batch-1 calls (bit-identical to the reference path); several use their batched calls, whose rows
    equal the batch-1 results up to float rounding and draw noise from each stream's own generator."""
    if not plans:
        return []
    if len({id(p.stream) for p in plans}) != len(plans):
        raise ValueError("run_chunks: at most one chunk per stream per call")
    t0 = time.perf_counter()
    flowing = [p for p in plans if p.new is not None]
    mels: list[torch.Tensor] = []
    with torch.inference_mode():
        if len(flowing) == 1 and not getattr(decoder.flow, "pad_frames_to", 0):
            p = flowing[0]
            mels = [decoder.flow.inference(
                token=p.new, prompt_token=p.prompt_tokens, prompt_feat=p.prompt_mel,
                embedding=torch.zeros(1, 192, device=p.stream.device), generator=p.generator,
            )]
        elif flowing:
            mels = decoder.flow.inference_batch([p.new for p in flowing], [p.prompt_tokens for p in flowing],
                                                [p.prompt_mel for p in flowing],
                                                [p.generator for p in flowing])
    by_plan = {id(p): m for p, m in zip(flowing, mels, strict=True)}
    for p in plans:
        p.stream.vocoder_input(p, by_plan.get(id(p)))
    t1 = time.perf_counter()
    if len(plans) == 1:
        p = plans[0]
        results = [decoder.hift.inference(p.vocoder_in, p.cache_source, p.generator)]
    else:
        results = decoder.hift.inference_batch([p.vocoder_in for p in plans], [p.cache_source for p in plans],
                                               [p.generator for p in plans])
    t2 = time.perf_counter()
    flow_ms, hift_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
    return [p.stream.finish_chunk(p, speech, source, flow_ms if p.new is not None else 0.0, hift_ms)
            for p, (speech, source) in zip(plans, results, strict=True)]


def one_shot(decoder: _Decoder, tokens: Sequence[int], seed: int = DEFAULT_SEED) -> np.ndarray:
    """Decode a whole utterance in one flow + one vocoder call (the reference's ``offline_inference``)."""
    stream = DecoderStream(decoder, seed=seed, prompt_window_tokens=0)
    return stream.finish(tokens)
