"""Chunked prefill: how long running streams stall when a long prompt joins the batch.

Call-center sessions accumulate history, so a new turn's prompt can be thousands of tokens. Without
chunking, its prefill is one forward pass over the whole prompt, during which every stream already
decoding gets no token (the listener hears a gap once the decoder's buffer runs dry). With chunked
prefill the prompt is fed ``chunk`` tokens per engine step, between the running streams' decode steps.

Per configuration (chunk off / 512 / 256 / 128, interleaved over ``--repeats`` rounds, same prompts
and seeds), ``--running`` streams decode; once each has produced 16 tokens a ``--long``-token prompt
is submitted. Figures (medians over rounds):

- step ms: the running streams' median inter-token gap before the long prompt arrives;
- stall ms: their longest inter-token gap while the long prompt is prefilled (the figure that matters);
- long TTFT ms: the long prompt's time to first token (chunking trades a little of it for the stall).

    .venv/bin/python benchmarks/bench_prefill_chunk.py                  # LM 'mid' (25 M), CPU
    .venv/bin/python benchmarks/bench_prefill_chunk.py --lm-model /models/glm-4-voice-9b \\
        --device cuda --dtype bfloat16 --long 4096 --running 8
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import threading
import time
from pathlib import Path

import common as C  # type: ignore[import-not-found]
import torch

from glmv_lm.engine import DoneEvent, EngineConfig, GenerationEngine, TokenEvent, TokenSpec
from glmv_lm.sampling import SamplingParams


def one_round(
    loaded, tok, spec: TokenSpec, chunk: int, args: argparse.Namespace
) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    engine = GenerationEngine(
        loaded.model,
        spec,
        tok.incremental_decoder,
        EngineConfig(max_batch_size=args.running + 1, max_context=loaded.max_context, prefill_chunk=chunk),
    )
    engine.start()
    g = torch.Generator().manual_seed(args.seed)
    short_prompts = [
        torch.randint(0, spec.audio_offset, (32,), generator=g).tolist() for _ in range(args.running)
    ]
    long_prompt = torch.randint(0, spec.audio_offset, (args.long,), generator=g).tolist()
    stamps: list[list[float]] = [[] for _ in range(args.running)]
    warm = threading.Semaphore(0)
    long_first = threading.Event()
    t_long: dict[str, float] = {}

    def short_sink(i: int):  # type: ignore[no-untyped-def]
        def sink(event: object) -> None:
            if isinstance(event, TokenEvent):
                stamps[i].append(time.perf_counter())
                if event.index == 15:
                    warm.release()

        return sink

    def long_sink(event: object) -> None:
        if isinstance(event, TokenEvent) and event.index == 0:
            t_long["first"] = time.perf_counter()
            long_first.set()
        elif isinstance(event, DoneEvent) and "first" not in t_long:
            long_first.set()

    params = SamplingParams(temperature=0.8, top_p=0.8, seed=args.seed, max_new_tokens=100_000)
    try:
        handles = [engine.submit(p, params, short_sink(i)) for i, p in enumerate(short_prompts)]
        for _ in handles:
            assert warm.acquire(timeout=120)
        t_long["submit"] = time.perf_counter()
        engine.submit(long_prompt, SamplingParams(temperature=0.0, max_new_tokens=4), long_sink)
        assert long_first.wait(600) and "first" in t_long
        time.sleep(0.05)
        for h in handles:
            h.cancel()
    finally:
        engine.close()
    before = [b - a for s in stamps for a, b in itertools.pairwise(s) if b <= t_long["submit"]]
    t0, t1 = t_long["submit"], t_long["first"]
    during = [b - a for s in stamps for a, b in itertools.pairwise(s) if b > t0 and a < t1]
    return (
        statistics.median(before) * 1e3,
        max(during) * 1e3,
        (t_long["first"] - t_long["submit"]) * 1e3,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_profile_args(ap)  # --lm-model, --device, --dtype, --service-threads (the rest is unused)
    ap.add_argument("--size", default="mid", help="random LM to write (devmodel size) unless --lm-model")
    ap.add_argument("--chunks", default="0,512,256,128", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--long", type=int, default=2048, help="tokens of the joining prompt")
    ap.add_argument("--running", type=int, default=4, help="streams decoding when it joins")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"# bench_prefill_chunk: {C.machine_info(args.device)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        loaded, tok, spec, label = C.engine_lm_from_args(args, Path(tmp), seed=args.seed)
        if args.long + 8 > loaded.max_context:
            raise SystemExit(f"--long {args.long} does not fit the context window {loaded.max_context}")
        one_round(loaded, tok, spec, 0, argparse.Namespace(**{**vars(args), "long": 64}))  # warm-up
        results: dict[int, list[tuple[float, float, float]]] = {c: [] for c in args.chunks}
        for r in range(args.repeats):
            order = args.chunks if r % 2 == 0 else list(reversed(args.chunks))
            for chunk in order:
                results[chunk].append(one_round(loaded, tok, spec, chunk, args))
                step, stall, ttft = results[chunk][-1]
                print(
                    f"  round {r} chunk {chunk}: step {step:.1f} ms, stall {stall:.1f} ms, "
                    f"TTFT {ttft:.1f} ms",
                    flush=True,
                )
    rows = []
    off = statistics.median(x[1] for x in results[0]) if 0 in results else None
    for chunk in args.chunks:
        step, stall, ttft = (statistics.median(x[i] for x in results[chunk]) for i in range(3))
        rows.append([chunk or "off", step, stall, ttft, stall / off if off else "-"])
    C.table(
        f"{label}: {args.running} streams decoding, a {args.long}-token prompt joins "
        f"(median of {args.repeats})",
        ["prefill chunk", "step ms", "stall ms", "long TTFT ms", "stall / off"],
        rows,
        digits=2,
    )


if __name__ == "__main__":
    main()
