"""The turn record: what the reply produced, the cut to what was heard, usage, timings, metrics and
the history write.

Cut rule (a barge-in, or a listener that stopped playback): every decoder chunk reports how many
speech tokens it has consumed and where its samples start, so the samples the listener heard map
to a number of audio tokens — all tokens of the chunks heard completely, plus the share of the
partly heard chunk, rounded down. The stored assistant turn keeps the interleaved ids up to and
including the last heard audio token (and the text generated before it); everything after is
dropped and the turn is marked ``truncated`` with the heard duration. The next turn's prompt is
built from the stored ids, so the model is only reminded of what it actually said aloud. See
docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from glmv_common.logs import get_logger, kv
from glmv_gateway import metrics
from glmv_gateway.conversation.admission import Admitted
from glmvoice.v1 import lm_pb2

log = get_logger("glmv.gateway.turn")

END_REASONS = {
    lm_pb2.END_REASON_END_TOKEN: "end_token",
    lm_pb2.END_REASON_EOS: "eos",
    lm_pb2.END_REASON_MAX_TOKENS: "max_tokens",
    lm_pb2.END_REASON_AUDIO_CAP: "audio_cap",
    lm_pb2.END_REASON_CANCELLED: "cancelled",
    lm_pb2.END_REASON_ERROR: "error",
}


@dataclass
class ReplyState:
    """What the LM and the decoder have produced so far for one reply."""

    sample_rate: int
    ids: list[int] = field(default_factory=list)  # interleaved, as generated
    pieces: list[str | None] = field(default_factory=list)  # text of each text id; None for audio ids
    text: list[str] = field(default_factory=list)  # the text deltas sent
    audio_tokens: list[int] = field(default_factory=list)
    chunks: list[tuple[int, int, int]] = field(
        default_factory=list
    )  # (first sample, samples, tokens consumed)
    audio_samples: int = 0
    heard_samples: int | None = None  # reported by the listener's playback; None = assume all sent
    done: lm_pb2.GenerateDone | None = None

    @property
    def text_ids(self) -> int:
        return sum(1 for p in self.pieces if p is not None)

    def add_chunk(self, sample_offset: int, samples: int, tokens_consumed: int) -> None:
        self.chunks.append((sample_offset, samples, tokens_consumed))
        self.audio_samples += samples

    def heard(self) -> int:
        sent = self.audio_samples
        return sent if self.heard_samples is None else max(0, min(self.heard_samples, sent))

    def tokens_heard(self, samples: int) -> int:
        """Audio tokens whose samples were played, given ``samples`` heard (the cut rule above)."""
        tokens_before = 0
        for start, count, consumed in self.chunks:
            if samples >= start + count:
                tokens_before = consumed
                continue
            if samples > start and count:
                share = (samples - start) / count
                tokens_before += int(share * (consumed - tokens_before))
            break
        return min(tokens_before, len(self.audio_tokens))

    def cut(self, audio_tokens: int) -> tuple[list[int], str]:
        """The ids up to and including the ``audio_tokens``-th audio id, and their text."""
        if audio_tokens >= len(self.audio_tokens):
            return list(self.ids), "".join(self.text)
        kept, text, seen = [], [], 0
        for token_id, piece in zip(self.ids, self.pieces, strict=True):
            if seen == audio_tokens:  # the last heard audio token is behind us: stop
                break
            if piece is None:
                seen += 1
            else:
                text.append(piece)
            kept.append(token_id)
        return kept, "".join(text)


def heard_ms(samples: int, sample_rate: int) -> float:
    return round(1000.0 * samples / max(sample_rate, 1), 1)


async def store_turn(
    admitted: Admitted,
    state: ReplyState,
    *,
    end_reason: str,
    partial: bool,
    final_text: str,
    interrupted: bool,
    store: bool = True,
) -> dict[str, Any]:
    """Usage, timings, metrics and the history write. Returns ``summary`` (the ``turn.done`` fields),
    plus ``store_error`` if the history write failed and ``truncated`` details if the turn was cut."""
    total_ms = round((time.perf_counter() - admitted.started) * 1000, 1)
    rate = state.sample_rate
    audio_ms = 1000.0 * state.audio_samples / max(rate, 1)
    t = admitted.timings
    timings = {
        "tokenize_ms": t.get("tokenize_ms"),
        "time_to_first_text_ms": t.get("first_text_ms"),
        "time_to_first_audio_ms": t.get("first_audio_ms"),
        "total_ms": total_ms,
        "audio_ms": round(audio_ms, 1),
        "rtf": round(total_ms / audio_ms, 4) if audio_ms else None,
    }
    if "speech_end_to_first_audio_ms" in t:
        timings["speech_end_to_first_audio_ms"] = t["speech_end_to_first_audio_ms"]
    done = state.done
    usage = {
        "prompt_tokens": done.prompt_tokens if done else None,
        "completion_tokens": len(state.ids),
        "text_tokens": state.text_ids,
        "audio_tokens": len(state.audio_tokens),
        "dropped_turns": done.dropped_turns if done else 0,
        "lm_time_to_first_token_ms": round(done.time_to_first_token_ms, 1) if done else None,
        "lm_tokens_per_s": round(done.decode_tokens_per_s, 1) if done else None,
        "lm_cached_prompt_tokens": done.cached_prompt_tokens if done else None,
    }
    ids, text = list(state.ids), final_text
    truncated: dict[str, Any] | None = None
    if interrupted and state.audio_tokens:
        heard = state.heard()
        kept_tokens = state.tokens_heard(heard)
        if kept_tokens < len(state.audio_tokens):
            ids, text = state.cut(kept_tokens)
            truncated = {"heard_ms": heard_ms(heard, rate), "audio_tokens": kept_tokens, "text": text}
            metrics.TRUNCATIONS.inc()
    summary: dict[str, Any] = {
        "session_id": admitted.session_id,
        "turn_id": admitted.turn_id,
        "text": final_text,
        "end_reason": end_reason,
        "partial": partial,
        "usage": usage,
        "timings": timings,
    }
    if truncated:
        summary["truncated"] = True
        summary["heard_ms"] = truncated["heard_ms"]
    metrics.TURN_SECONDS.observe(total_ms / 1000)
    metrics.TURNS.labels(end_reason).inc()
    if timings["rtf"] is not None:
        metrics.RTF.observe(timings["rtf"])
    if done is not None:
        metrics.STAGE_SECONDS.labels("lm_time_to_first_token").observe(done.time_to_first_token_ms / 1000)
        if done.decode_tokens_per_s:
            metrics.LM_TOKENS_PER_S.observe(done.decode_tokens_per_s)
    if timings["time_to_first_text_ms"] is not None:
        metrics.STAGE_SECONDS.labels("first_text").observe(timings["time_to_first_text_ms"] / 1000)
    record: dict[str, Any] = {"summary": summary, "truncated": truncated}
    if state.ids and store:  # a turn that failed before the LM produced anything leaves history unchanged
        turn = history_entry(
            admitted, ids, text, len(state.audio_tokens), end_reason, partial, usage, timings
        )
        if truncated:
            turn["assistant"].update(
                truncated=True, heard_ms=truncated["heard_ms"], audio_tokens=truncated["audio_tokens"]
            )
        try:
            await asyncio.shield(admitted.store.append_turn(admitted.session_id, turn))
        except Exception as exc:  # the client has the reply; say it is not in the history
            log.error("turn not saved", extra=kv(error=f"{type(exc).__name__}: {exc}"))
            metrics.ERRORS.labels("redis", type(exc).__name__).inc()
            record["store_error"] = (
                f"the reply was not saved to the session history: {type(exc).__name__}: {exc}"
            )
    log.info(
        "turn finished",
        extra=kv(end_reason=end_reason, partial=partial, truncated=bool(truncated), **timings),
    )
    return record


def history_entry(
    admitted: Admitted,
    ids: list[int],
    text: str,
    audio_tokens: int,
    end_reason: str,
    partial: bool,
    usage: dict[str, Any],
    timings: dict[str, Any],
) -> dict[str, Any]:
    return {
        "turn_id": admitted.turn_id,
        "created_at": time.time(),
        "user": admitted.user,
        "assistant": {
            "ids": ids,
            "text": text,
            "audio_tokens": audio_tokens,
            "end_reason": end_reason,
            "partial": partial,
        },
        "usage": usage,
        "timings": timings,
    }


async def truncate_stored(admitted: Admitted, state: ReplyState, heard_samples: int) -> dict[str, Any] | None:
    """Cut an already stored assistant turn to ``heard_samples`` (the listener stopped playback
    after the reply was complete). Returns the cut's details, or None if nothing was cut."""
    heard = max(0, min(heard_samples, state.audio_samples))
    kept_tokens = state.tokens_heard(heard)
    if kept_tokens >= len(state.audio_tokens):
        return None
    ids, text = state.cut(kept_tokens)
    store, session_id, turn_id = admitted.store, admitted.session_id, admitted.turn_id
    stored = next((t for t in await store.history(session_id) if t.get("turn_id") == turn_id), None)
    if stored is None:
        return None
    details = {"heard_ms": heard_ms(heard, state.sample_rate), "audio_tokens": kept_tokens, "text": text}
    stored["assistant"].update(ids=ids, truncated=True, **details)
    if not await store.replace_turn(session_id, turn_id, stored):
        return None
    metrics.TRUNCATIONS.inc()
    return details
