"""Continuous-batching engine: batched == alone, streaming order, stop reasons, cancellation, queue bound.

The model is a tiny random ``GlmForCausalLM`` built directly; the token layout (audio range, end
token, EOS ids, masked padding rows) is a :class:`TokenSpec` chosen per test, so each stop rule can be
driven through the real code path by naming as "end"/"EOS"/"audio" a token the model really emits.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable

import pytest
import torch
from transformers import DynamicCache, GlmConfig, GlmForCausalLM
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from glmv_common.errors import InvalidRequest
from glmv_lm.engine import (
    DoneEvent,
    EndReason,
    EngineConfig,
    GenerationEngine,
    QueueFullError,
    TokenEvent,
    TokenSpec,
)
from glmv_lm.sampling import SamplingParams

VOCAB = 400
LIMIT = 380  # ids >= LIMIT are padding rows: never sampled
BASE_SPEC = TokenSpec(
    vocab_limit=LIMIT, audio_offset=300, audio_count=80, end_token_id=399, eos_ids=frozenset({398})
)
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24, max_audio_tokens=10_000)


class CharDecoder:
    """A stand-in incremental decoder: one ``<id>`` piece per text token."""

    def push(self, token_id: int) -> str:
        return f"<{token_id}>"

    def flush(self) -> str:
        return "|"


def tiny_model(attn: str = "sdpa", seed: int = 0) -> GlmForCausalLM:
    torch.manual_seed(seed)
    cfg = GlmConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        pad_token_id=None,
        eos_token_id=[398],
        attn_implementation=attn,
        # Larger than the default 0.02: attention then depends on the keys (at 0.02 it is nearly
        # uniform), so a key written to the wrong place in the cache changes the output.
        initializer_range=0.3,
    )
    return GlmForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model() -> GlmForCausalLM:
    return tiny_model()


def make_engine(model: GlmForCausalLM, spec: TokenSpec = BASE_SPEC, **cfg: int) -> GenerationEngine:
    config = EngineConfig(**{"max_batch_size": 4, "max_queue": 16, "max_context": 1024, **cfg})
    engine = GenerationEngine(model, spec, CharDecoder, config)
    engine.start()
    return engine


class Collector:
    """A thread-side sink recording every event of one request."""

    def __init__(self) -> None:
        self.tokens: list[TokenEvent] = []
        self.done: DoneEvent | None = None
        self.after_done = 0

    def __call__(self, event: object) -> None:
        if self.done is not None:
            self.after_done += 1
        if isinstance(event, DoneEvent):
            self.done = event
        else:
            assert isinstance(event, TokenEvent)
            self.tokens.append(event)

    @property
    def ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]


def run_all(
    engine: GenerationEngine, prompts: list[list[int]], params: list[SamplingParams]
) -> list[Collector]:
    sinks = [Collector() for _ in prompts]
    handles = [engine.submit(p, sp, s) for p, sp, s in zip(prompts, params, sinks, strict=True)]
    for h in handles:
        assert h.finished.wait(30)
    return sinks


def reference_greedy(
    model: GlmForCausalLM, prompt: list[int], max_new: int, spec: TokenSpec, penalty: float = 1.0
) -> list[int]:
    """Plain one-request greedy loop over transformers' own DynamicCache (no engine code)."""
    cache = DynamicCache(config=model.config)
    seen = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[:, -1]
        for _ in range(max_new):
            logits = logits.float().clone()
            if penalty != 1.0:
                logits = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits)
            logits[:, spec.vocab_limit :] = float("-inf")
            tok = int(logits.argmax(-1))
            if tok == spec.end_token_id or tok in spec.eos_ids:
                break
            out.append(tok)
            seen = torch.cat([seen, torch.tensor([[tok]])], dim=1)
            logits = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[:, -1]
    return out


def random_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_greedy_equals_alone_and_reference(attn: str) -> None:
    model = tiny_model(attn)
    lengths = [5, 17, 3, 40, 9, 12, 1]
    max_new = [20, 7, 33, 15, 25, 10, 18]
    prompts = random_prompts(lengths)
    params = [SamplingParams(temperature=0.0, max_new_tokens=m) for m in max_new]
    engine = make_engine(model, max_batch_size=4)  # 7 requests, 4 slots: later ones join mid-flight
    try:
        batched = run_all(engine, prompts, params)
        alone = [run_all(engine, [p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    finally:
        engine.close()
    for i, (b, a) in enumerate(zip(batched, alone, strict=True)):
        ref = reference_greedy(model, prompts[i], max_new[i], BASE_SPEC)
        assert b.ids == a.ids == ref, f"request {i}"
        assert [t.index for t in b.tokens] == list(range(len(b.tokens)))
        assert b.done is not None and b.after_done == 0
        assert b.done.completion_tokens == len(b.tokens)
        assert b.done.prompt_tokens == lengths[i]
        assert b.done.end_reason in (EndReason.MAX_TOKENS, EndReason.END_TOKEN, EndReason.EOS)
        if b.done.end_reason is EndReason.MAX_TOKENS:
            assert len(b.tokens) == max_new[i]


def test_seeded_sampling_is_batch_independent(model: GlmForCausalLM) -> None:
    prompts = random_prompts([4, 11, 25, 7], seed=3)
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, top_k=40, seed=100 + i, max_new_tokens=30)
        for i in range(len(prompts))
    ]
    engine = make_engine(model)
    try:
        batched = run_all(engine, prompts, params)
        alone = [run_all(engine, [p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
        reseeded = run_all(
            engine,
            [prompts[0]],
            [SamplingParams(temperature=1.0, top_p=0.9, top_k=40, seed=7, max_new_tokens=30)],
        )[0]
    finally:
        engine.close()
    for b, a in zip(batched, alone, strict=True):
        assert b.ids == a.ids
        assert all(t < LIMIT for t in b.ids)
    assert reseeded.ids != batched[0].ids  # the seed matters


def test_padding_rows_are_never_sampled() -> None:
    boosted = tiny_model(seed=0)
    prompt = random_prompts([6])[0]
    with torch.no_grad():  # a padding row aligned with the prompt's last hidden state: it would win
        hidden = boosted.model(torch.tensor([prompt])).last_hidden_state[0, -1]
        boosted.lm_head.weight[LIMIT + 5] = hidden / hidden.norm() * 100.0
    raw = boosted(torch.tensor([prompt])).logits[0, -1]
    engine = make_engine(boosted)
    try:
        out = run_all(
            engine,
            [prompt] * 2,
            [GREEDY, SamplingParams(temperature=5.0, top_k=0, top_p=1.0, seed=1, max_new_tokens=40)],
        )
    finally:
        engine.close()
    assert int(raw.argmax()) >= LIMIT  # unmasked, greedy would pick a padding row
    for c in out:
        assert c.ids and all(t < LIMIT for t in c.ids)


def test_masked_ids_are_never_sampled(model: GlmForCausalLM) -> None:
    prompt = random_prompts([8], seed=5)[0]
    free = reference_greedy(model, prompt, 20, BASE_SPEC)
    banned = frozenset(free[:3])
    engine = make_engine(model, spec_with(masked_ids=banned))
    try:
        c = run_all(engine, [prompt], [SamplingParams(temperature=0.0, max_new_tokens=20)])[0]
    finally:
        engine.close()
    assert len(c.ids) == 20 and not banned & set(c.ids)


def spec_with(**changes: object) -> TokenSpec:
    fields = dict(
        vocab_limit=LIMIT, audio_offset=300, audio_count=80, end_token_id=399, eos_ids=frozenset({398})
    )
    fields.update(changes)
    return TokenSpec(**fields)  # type: ignore[arg-type]


def first_new_token(seq: list[int], min_index: int) -> tuple[int, int]:
    """The first token at index >= min_index that did not occur before it."""
    for i in range(min_index, len(seq)):
        if seq[i] not in seq[:i]:
            return i, seq[i]
    raise AssertionError("no fresh token in the greedy output")


def test_stop_reasons(model: GlmForCausalLM) -> None:
    prompt = random_prompts([8], seed=5)[0]
    free = reference_greedy(model, prompt, 40, BASE_SPEC)
    assert len(free) == 40
    end_at, end_tok = first_new_token(free, 3)
    eos_at, eos_tok = first_new_token(free, 5)

    engine = make_engine(model, spec_with(end_token_id=end_tok, eos_ids=frozenset({398, end_tok})))
    try:
        c = run_all(engine, [prompt], [SamplingParams(temperature=0.0, max_new_tokens=100)])[0]
    finally:
        engine.close()
    assert c.done is not None and c.done.end_reason is EndReason.END_TOKEN
    assert c.ids == free[:end_at]  # the end token itself is not streamed

    engine = make_engine(model, spec_with(eos_ids=frozenset({398, eos_tok})))
    try:
        c = run_all(engine, [prompt], [SamplingParams(temperature=0.0, max_new_tokens=100)])[0]
    finally:
        engine.close()
    assert c.done is not None and c.done.end_reason is EndReason.EOS
    assert c.ids == free[:eos_at]

    # Audio cap: in this spec every sampleable id is an audio token.
    audio_spec = spec_with(audio_offset=0, audio_count=LIMIT)
    engine = make_engine(model, audio_spec)
    try:
        capped, zero, maxed = run_all(
            engine,
            [prompt] * 3,
            [
                SamplingParams(temperature=0.0, max_new_tokens=100, max_audio_tokens=6),
                SamplingParams(temperature=0.0, max_new_tokens=100, max_audio_tokens=0),
                SamplingParams(temperature=0.0, max_new_tokens=9, max_audio_tokens=100),
            ],
        )
    finally:
        engine.close()
    assert capped.done is not None and capped.done.end_reason is EndReason.AUDIO_CAP
    assert capped.ids == free[:6] and capped.done.audio_tokens == 6
    assert [t.audio_token for t in capped.tokens] == free[:6] and all(t.is_audio for t in capped.tokens)
    assert zero.done is not None and zero.done.end_reason is EndReason.AUDIO_CAP and zero.ids == []
    assert maxed.done is not None and maxed.done.end_reason is EndReason.MAX_TOKENS and maxed.ids == free[:9]


def test_text_audio_routing_and_done_fields(model: GlmForCausalLM) -> None:
    prompt = random_prompts([8], seed=5)[0]
    free = reference_greedy(model, prompt, 30, BASE_SPEC)
    split = sorted(set(free))[len(set(free)) // 2]  # about half the distinct ids become audio
    spec = spec_with(audio_offset=split, audio_count=LIMIT - split)
    engine = make_engine(model, spec)
    try:
        c = run_all(engine, [prompt], [SamplingParams(temperature=0.0, max_new_tokens=30)])[0]
    finally:
        engine.close()
    assert c.ids == free
    text = [t for t in c.tokens if not t.is_audio]
    audio = [t for t in c.tokens if t.is_audio]
    assert text and audio
    assert all(t.token_id < split and t.text == f"<{t.token_id}>" for t in text)
    assert all(t.audio_token == t.token_id - split and t.text == "" for t in audio)
    d = c.done
    assert d is not None
    assert (d.text_tokens, d.audio_tokens, d.completion_tokens) == (len(text), len(audio), 30)
    assert d.text == "".join(t.text for t in text) + "|"  # decoded text includes the decoder's flush
    assert d.time_to_first_token_ms > 0 and d.decode_tokens_per_s > 0 and d.queue_ms >= 0


def test_context_window_clips_max_new_tokens(model: GlmForCausalLM) -> None:
    engine = make_engine(model, max_context=64)
    try:
        c = run_all(engine, [random_prompts([60])[0]], [SamplingParams(temperature=0.0, max_new_tokens=100)])[
            0
        ]
        with pytest.raises(InvalidRequest):
            engine.submit(random_prompts([64])[0], GREEDY, Collector())
        with pytest.raises(InvalidRequest):
            engine.submit([], GREEDY, Collector())
        with pytest.raises(InvalidRequest):
            engine.submit([VOCAB], GREEDY, Collector())
        with pytest.raises(InvalidRequest):
            engine.submit([1], SamplingParams(top_p=0.0), Collector())
    finally:
        engine.close()
    assert c.done is not None and c.done.end_reason is EndReason.MAX_TOKENS
    assert len(c.ids) == 4  # 60 prompt + 4 = the 64-token window


def test_repetition_penalty_matches_transformers(model: GlmForCausalLM) -> None:
    prompts = random_prompts([6, 13], seed=9)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.7, max_new_tokens=25)
    engine = make_engine(model)
    try:
        out = run_all(engine, [*prompts, prompts[0]], [params, params, GREEDY])
    finally:
        engine.close()
    for c, p in zip(out[:2], prompts, strict=True):
        assert c.ids == reference_greedy(model, p, 25, BASE_SPEC, penalty=1.7)
    assert out[0].ids != out[2].ids  # the penalty changed something


def test_cancel_frees_capacity(model: GlmForCausalLM) -> None:
    engine = make_engine(model, max_batch_size=1, max_queue=4)
    gate = threading.Event()
    first = Collector()

    def slow_sink(event: object) -> None:
        first(event)
        if len(first.tokens) == 3:
            gate.set()

    try:
        long = SamplingParams(temperature=0.0, max_new_tokens=900, max_audio_tokens=10_000)
        h1 = engine.submit(random_prompts([5])[0], long, slow_sink)
        assert gate.wait(10)
        second = Collector()
        h2 = engine.submit(random_prompts([7])[0], SamplingParams(temperature=0.0, max_new_tokens=5), second)
        h1.cancel()
        assert h1.finished.wait(10) and h2.finished.wait(10)
        # cancelling a queued request finishes it at once without running it
        engine_busy = Collector()
        h3 = engine.submit(random_prompts([5])[0], long, engine_busy)
        queued = Collector()
        h4 = engine.submit(random_prompts([5])[0], long, queued)
        h4.cancel()
        assert h4.finished.is_set()
        h3.cancel()
        assert h3.finished.wait(10)
    finally:
        engine.close()
    assert first.done is not None and first.done.end_reason is EndReason.CANCELLED
    assert 3 <= len(first.tokens) < 900 and first.done.completion_tokens == len(first.tokens)
    assert second.done is not None and second.done.end_reason is EndReason.MAX_TOKENS and len(second.ids) == 5
    assert queued.done is not None and queued.done.end_reason is EndReason.CANCELLED and queued.ids == []
    assert engine.running == 0 and engine.waiting == 0


def test_queue_bound(model: GlmForCausalLM) -> None:
    engine = make_engine(model, max_batch_size=1, max_queue=1)
    entered, release = threading.Event(), threading.Event()

    def blocking(event: object) -> None:
        entered.set()
        release.wait(10)  # holds the engine thread: the batch is full, nothing is admitted

    try:
        h1 = engine.submit([1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=2), blocking)
        assert entered.wait(10)
        waiting = Collector()
        h2 = engine.submit([4, 5], SamplingParams(temperature=0.0, max_new_tokens=2), waiting)
        with pytest.raises(QueueFullError):
            engine.submit([6], GREEDY, Collector())
        release.set()
        assert h1.finished.wait(10) and h2.finished.wait(10)
        engine.submit([6], SamplingParams(temperature=0.0, max_new_tokens=1), Collector())  # room again
    finally:
        release.set()
        engine.close()
    assert waiting.done is not None and len(waiting.ids) == 2


async def test_async_streams_slow_client_does_not_stall_others(model: GlmForCausalLM) -> None:
    engine = make_engine(model, max_batch_size=8)
    prompts = random_prompts([3, 9, 21, 6, 14], seed=11)
    max_new = [40, 12, 30, 25, 8]
    finished_at: dict[int, float] = {}

    async def consume(i: int, delay: float) -> list[int]:
        stream = engine.stream(prompts[i], SamplingParams(temperature=0.0, max_new_tokens=max_new[i]))
        ids: list[int] = []
        indices: list[int] = []
        done = None
        async for ev in stream:
            if isinstance(ev, DoneEvent):
                done = ev
            else:
                ids.append(ev.token_id)
                indices.append(ev.index)
                if delay:
                    await asyncio.sleep(delay)
        assert done is not None and done.completion_tokens == len(ids)
        assert indices == list(range(len(ids)))
        finished_at[i] = time.perf_counter()
        return ids

    try:
        results = await asyncio.gather(consume(0, 0.02), *(consume(i, 0.0) for i in range(1, 5)))
        alone = [
            run_all(engine, [p], [SamplingParams(temperature=0.0, max_new_tokens=m)])[0].ids
            for p, m in zip(prompts, max_new, strict=True)
        ]
    finally:
        engine.close()
    assert results == alone
    assert all(finished_at[i] < finished_at[0] for i in range(1, 5))  # the slow reader holds nobody up


async def test_async_cancel_mid_stream(model: GlmForCausalLM) -> None:
    engine = make_engine(model, max_batch_size=2)
    try:
        stream = engine.stream(
            [1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=900, max_audio_tokens=10_000)
        )
        got = 0
        async for ev in stream:
            assert isinstance(ev, TokenEvent)
            got += 1
            if got == 5:
                stream.cancel()
                break
        assert stream.handle is not None
        rest = [ev async for ev in stream]
        assert isinstance(rest[-1], DoneEvent) and rest[-1].end_reason is EndReason.CANCELLED
        assert rest[-1].completion_tokens == got + len(rest) - 1  # every streamed token arrived
        for _ in range(100):
            if engine.running == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.running == 0
    finally:
        engine.close()


def test_failed_step_ends_requests_with_error_and_engine_recovers(model: GlmForCausalLM) -> None:
    engine = make_engine(model)
    real_forward = engine._forward
    both_submitted = threading.Event()
    state = {"failed": False}

    def flaky(ids: torch.Tensor, *args: object) -> torch.Tensor:
        # Hold the first step until both requests are queued, then fail the first step that
        # carries both of them, so the failure hits a shared batch however threads are scheduled.
        assert both_submitted.wait(30)
        if ids.shape[0] == 2 and not state["failed"]:
            state["failed"] = True
            raise RuntimeError("simulated device failure")
        return real_forward(ids, *args)  # type: ignore[arg-type]

    engine._forward = flaky  # type: ignore[method-assign]
    try:
        sinks = [Collector(), Collector()]
        handles = [engine.submit(p, GREEDY, s) for p, s in zip([[1, 2, 3], [4, 5]], sinks, strict=True)]
        both_submitted.set()
        for h in handles:
            assert h.finished.wait(30)
        failed = sinks
        after = run_all(engine, [[1, 2, 3]], [GREEDY])[0]
    finally:
        engine.close()
    assert state["failed"]
    for c in failed:
        assert c.done is not None and c.done.end_reason is EndReason.ERROR
        assert "simulated device failure" in c.done.error
    assert after.done is not None and after.done.end_reason is EndReason.MAX_TOKENS
    assert after.ids == reference_greedy(model, [1, 2, 3], GREEDY.max_new_tokens, BASE_SPEC)
    assert engine.running == 0


# -- chunked prefill ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_chunked_prefill_matches_the_reference(attn: str) -> None:
    """Prompts longer than the chunk (8) are prefilled over several iterations, one at a time, while
    short ones join and decode; every output still equals plain greedy decoding."""
    model = tiny_model(attn)
    lengths = [30, 5, 57, 8, 9, 41, 2]
    max_new = [12, 20, 9, 15, 11, 14, 25]
    prompts = random_prompts(lengths, seed=5)
    params = [SamplingParams(temperature=0.0, max_new_tokens=m) for m in max_new]
    engine = make_engine(model, max_batch_size=3, prefill_chunk=8)
    try:
        batched = run_all(engine, prompts, params)
        assert engine.running == 0
    finally:
        engine.close()
    for i, b in enumerate(batched):
        assert b.ids == reference_greedy(model, prompts[i], max_new[i], BASE_SPEC), f"request {i}"
        assert b.done is not None and b.done.prompt_tokens == lengths[i]


class Timeline:
    """Records the order in which two requests' tokens are produced (sinks run on the engine thread)."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.sinks = {"short": Collector(), "long": Collector()}

    def sink(self, name: str, on_token: Callable[[int], None] | None = None) -> Callable[[object], None]:
        def record(event: object) -> None:
            self.sinks[name](event)
            if isinstance(event, TokenEvent):
                self.events.append(name)
                if on_token is not None:
                    on_token(event.index)

        return record

    def short_tokens_before_long_starts(self) -> int:
        after_submit = self.events[self.events.index("submitted") + 1 :]
        return after_submit.index("long")


@pytest.mark.parametrize(("chunk", "expected"), [(16, 5), (0, 0)])
def test_long_prompt_does_not_stall_running_streams(model: GlmForCausalLM, chunk: int, expected: int) -> None:
    """A 90-token prompt arriving while another request decodes: with 16-token chunks it takes six
    iterations to prefill and the running stream gets a token in each of the first five; without
    chunking the whole prompt is one forward pass and the running stream waits for it."""
    engine = make_engine(model, max_batch_size=4, prefill_chunk=chunk)
    long_prompt = random_prompts([90], seed=9)[0]
    timeline = Timeline()
    handles: list = []

    def submit_long(index: int) -> None:
        if index == 2:  # on the engine thread, between iterations' work: deterministic
            handles.append(engine.submit(long_prompt, GREEDY, timeline.sink("long")))
            timeline.events.append("submitted")

    try:
        short = engine.submit(
            [1, 2, 3],
            SamplingParams(temperature=0.0, max_new_tokens=60, max_audio_tokens=10_000),
            timeline.sink("short", submit_long),
        )
        assert short.finished.wait(30) and handles and handles[0].finished.wait(30)
    finally:
        engine.close()
    assert timeline.short_tokens_before_long_starts() == expected
    assert timeline.sinks["long"].ids == reference_greedy(
        model, long_prompt, GREEDY.max_new_tokens, BASE_SPEC
    )


def test_cancel_during_chunked_prefill_frees_the_slot(model: GlmForCausalLM) -> None:
    engine = make_engine(model, max_batch_size=2, prefill_chunk=8)
    long_prompt = random_prompts([200], seed=2)[0]
    timeline = Timeline()
    handles: list = []

    def drive(index: int) -> None:
        if index == 1:
            handles.append(engine.submit(long_prompt, GREEDY, timeline.sink("long")))
            timeline.events.append("submitted")
        elif index == 4:  # the long prompt is 3 chunks in (of 25)
            handles[0].cancel()

    try:
        short = engine.submit(
            [4, 5, 6],
            SamplingParams(temperature=0.0, max_new_tokens=30, max_audio_tokens=10_000),
            timeline.sink("short", drive),
        )
        assert short.finished.wait(30) and handles[0].finished.wait(30)
        long_done = timeline.sinks["long"].done
        assert long_done is not None and long_done.end_reason is EndReason.CANCELLED
        assert long_done.completion_tokens == 0
        assert timeline.sinks["short"].done.completion_tokens == 30  # type: ignore[union-attr]
        for _ in range(100):
            if engine.running == 0:
                break
            time.sleep(0.01)
        assert engine.running == 0
        # both slots are usable again, including the one the chunked prefill held
        again = run_all(engine, [long_prompt[:50], [7, 8]], [GREEDY, GREEDY])
    finally:
        engine.close()
    assert again[0].ids == reference_greedy(model, long_prompt[:50], GREEDY.max_new_tokens, BASE_SPEC)
    assert again[1].ids == reference_greedy(model, [7, 8], GREEDY.max_new_tokens, BASE_SPEC)


def test_arrivals_while_decoding_are_prefilled_within_the_chunk_budget(model: GlmForCausalLM) -> None:
    """Three 10-token prompts arrive together while a stream decodes: with a 16-token budget they join
    one per step (2 x 10 > 16), and the running stream gets a token between each; their outputs are
    unaffected."""
    engine = make_engine(model, max_batch_size=4, prefill_chunk=16)
    prompts = random_prompts([10, 10, 10], seed=11)
    events: list[str] = []
    sinks = [Collector() for _ in prompts]
    handles: list = []

    def record(name: str, collector: Collector) -> Callable[[object], None]:
        def sink(event: object) -> None:
            collector(event)
            if isinstance(event, TokenEvent):
                events.append(name)

        return sink

    def on_short(event: object) -> None:
        if isinstance(event, TokenEvent):
            events.append("S")
            if event.index == 2:
                for i, p in enumerate(prompts):
                    handles.append(engine.submit(p, GREEDY, record(f"P{i}", sinks[i])))

    try:
        short = engine.submit(
            [1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=40, max_audio_tokens=10_000), on_short
        )
        assert short.finished.wait(30) and all(h.finished.wait(30) for h in handles)
    finally:
        engine.close()
    firsts = [events.index(f"P{i}") for i in range(3)]
    assert firsts == sorted(firsts)
    for a, b in itertools.pairwise(firsts):
        assert "S" in events[a:b]  # a decode step ran between two admissions
    for p, c in zip(prompts, sinks, strict=True):
        assert c.ids == reference_greedy(model, p, GREEDY.max_new_tokens, BASE_SPEC)


# -- prefix cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, 16])
def test_next_turn_reuses_the_conversation_prefix(model: GlmForCausalLM, chunk: int) -> None:
    """Turn 2's prompt is turn 1's prompt + reply + a new user turn: everything turn 1 fed to the
    model is copied from the prefix cache, only the new part is prefilled, and the reply is the same
    as plain greedy decoding of the whole prompt."""
    engine = make_engine(model, prefill_chunk=chunk, prefix_cache_tokens=10_000)
    first_prompt, new_part, other = random_prompts([80, 20, 90], seed=21)
    try:
        first = run_all(engine, [first_prompt], [GREEDY])[0]
        assert first.done is not None and first.done.end_reason is EndReason.MAX_TOKENS
        second_prompt = first_prompt + first.ids + new_part
        second = run_all(engine, [second_prompt], [GREEDY])[0]
        unrelated = run_all(engine, [other], [GREEDY])[0]
    finally:
        engine.close()
    assert first.done.cached_tokens == 0
    # the last reply token was sampled but never fed back, so its keys/values do not exist
    assert second.done is not None and second.done.cached_tokens == len(first_prompt) + len(first.ids) - 1
    assert second.ids == reference_greedy(model, second_prompt, GREEDY.max_new_tokens, BASE_SPEC)
    assert unrelated.done is not None and unrelated.done.cached_tokens == 0
    assert unrelated.ids == reference_greedy(model, other, GREEDY.max_new_tokens, BASE_SPEC)


def test_prefix_cache_under_concurrency_and_cancellation(model: GlmForCausalLM) -> None:
    """Three conversations' second turns arrive together (one at a time can take the cached path,
    the others prefill in full); a cancelled first turn's partial reply is reused too."""
    engine = make_engine(model, max_batch_size=3, prefix_cache_tokens=10_000)
    prompts = random_prompts([70, 75, 100], seed=31)
    news = random_prompts([9, 12, 15], seed=32)
    try:
        firsts = run_all(engine, prompts, [GREEDY] * 3)
        seconds_prompts = [p + f.ids + n for p, f, n in zip(prompts, firsts, news, strict=True)]
        seconds = run_all(engine, seconds_prompts, [GREEDY] * 3)
        # barge-in: cancel a reply after a few tokens; its next turn still reuses what was fed
        sink = Collector()
        long_reply = SamplingParams(temperature=0.0, max_new_tokens=500)
        handle = engine.submit(prompts[2] + [5, 6, 7], long_reply, sink)
        while len(sink.tokens) < 5 and not handle.finished.is_set():
            time.sleep(0.001)
        handle.cancel()
        assert handle.finished.wait(30)
        follow = prompts[2] + [5, 6, 7] + sink.ids + news[0]
        after_cancel = run_all(engine, [follow], [GREEDY])[0]
    finally:
        engine.close()
    assert sum(1 for s in seconds if s.done and s.done.cached_tokens) >= 1
    for p, s in zip(seconds_prompts, seconds, strict=True):
        assert s.ids == reference_greedy(model, p, GREEDY.max_new_tokens, BASE_SPEC)
    assert after_cancel.done is not None and after_cancel.done.cached_tokens >= len(prompts[2]) + 3
    assert after_cancel.ids == reference_greedy(model, follow, GREEDY.max_new_tokens, BASE_SPEC)


def test_prefix_cache_budget_and_superseded_entries() -> None:
    from glmv_lm.kv_cache import SlotKVCache
    from glmv_lm.prefix_cache import PrefixCache

    cache = SlotKVCache(
        num_layers=1, max_slots=1, num_kv_heads=1, head_dim=2, max_len=512, dtype=torch.float32, device="cpu"
    )
    for layer in range(1):
        cache.keys[layer].copy_(torch.arange(cache.capacity, dtype=torch.float32)[None, None, :, None])
    prefix = PrefixCache(budget_tokens=300, min_tokens=4)
    a = list(range(100))
    prefix.store(a, cache, 0)
    prefix.store(a + [7] * 50, cache, 0)  # the same conversation one turn later replaces it
    assert len(prefix) == 1 and prefix.tokens == 150
    prefix.store(list(range(1000, 1200)), cache, 0)  # 350 > 300: the least recently used goes
    assert len(prefix) == 1 and prefix.tokens == 200
    assert prefix.lookup(a + [7] * 60) == (-1, 0)
    entry, n = prefix.lookup(list(range(1000, 1200)))
    assert n == 199  # one prompt token is always left to prefill
    cache.keys[0].zero_()
    assert prefix.load(entry, n, cache, 0)
    assert torch.equal(cache.keys[0][0, 0, :n, 0], torch.arange(n, dtype=torch.float32))
    assert prefix.lookup([1000, 1001, 1002, 9]) == (-1, 0)  # shorter than min_tokens
