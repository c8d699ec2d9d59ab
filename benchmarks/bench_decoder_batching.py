"""Decoder cross-stream batching: N concurrent streams decoded batched vs unbatched, interleaved.

    python benchmarks/bench_decoder_batching.py                         # dev size, 1,2,4,8,16 streams
    python benchmarks/bench_decoder_batching.py --size realsize --streams 1,2,4,8 --tokens 45
    python benchmarks/bench_decoder_batching.py --model DIR --device cuda --dtype bfloat16

Each stream is one utterance of ``--tokens`` speech tokens fed in chunks of ``--schedule`` (the last
size repeats; the last chunk goes with Finish, i.e. is decoded as the final chunk) as fast as the decoder
answers (the LM is assumed ahead of the decoder: the situation batching is for). All N streams start
together. Both modes run the service's own ``ChunkScheduler`` in-process (no gRPC): **unbatched** with
``max_batch=1`` (every chunk its own flow + vocoder call, streams served first come first served, as
before batching) and **batched** with ``max_batch=--max-batch`` and ``--wait-ms``. For every N the two
modes run back to back, the order alternating between rounds, on the same tokens and seeds.

Figures per (N, mode): aggregate audio seconds produced per wall second; per-chunk latency (chunk ready
→ its audio back) p50/p95; time to first audio (stream start → first non-empty chunk) p50/p95; mean
batch size; worst stream RTF (the slowest stream's wall time / its audio duration: < 1 means every stream
was decoded faster than real time). The ratio columns are batched / unbatched. "audio s / CPU s" divides by
the CPU time this process used (all its threads): on a machine shared with other work it shows what
batching saves independently of how much CPU the process was given.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decoder import build
from common import machine_info, pct

from glmv_decoder.scheduler import ChunkScheduler
from glmv_decoder.streaming import DecoderStream

RATE = 22050


def chunks_of(n: int, schedule: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    ids = [rng.randrange(vocab) for _ in range(n)]
    out, i, k = [], 0, 0
    while i < n:
        size = schedule[min(k, len(schedule) - 1)]
        out.append(ids[i : i + size])
        i, k = i + size, k + 1
    return out


# One model thread for the whole run, as in the service (CUDA graphs are recorded per thread).
EXECUTOR = ThreadPoolExecutor(1, thread_name_prefix="bench-decoder")


async def run_mode(dec: Any, n_streams: int, batched: bool, args: argparse.Namespace) -> dict[str, float]:
    executor = EXECUTOR
    sched = ChunkScheduler(dec, executor, max_batch=args.max_batch if batched else 1,
                           max_wait_s=args.wait_ms / 1e3)
    vocab = int(dec.config.flow.vocab_size)
    latencies: list[float] = []
    first_audio: list[float] = []
    stream_rtf: list[float] = []
    samples = 0

    async def one(i: int, t_start: float) -> None:
        nonlocal samples
        stream = DecoderStream(dec, seed=42 + i, prompt_window_tokens=args.window)
        sched.register()
        try:
            chunks = chunks_of(args.tokens, args.schedule, vocab, seed=1000 + i)
            got_first = False
            mine = 0
            for k, chunk in enumerate(chunks):
                final = k == len(chunks) - 1
                stream.accept(chunk)
                if not stream.has_chunk(final):
                    continue
                t0 = time.perf_counter()
                audio = await sched.submit(stream, final)
                t1 = time.perf_counter()
                latencies.append(t1 - t0)
                samples += len(audio)
                mine += len(audio)
                if len(audio) and not got_first:
                    got_first = True
                    first_audio.append(t1 - t_start)
            stream_rtf.append((time.perf_counter() - t_start) / (mine / RATE))
        finally:
            sched.unregister(stream)

    t_start = time.perf_counter()
    cpu_start = time.process_time()
    await asyncio.gather(*[one(i, t_start) for i in range(n_streams)])
    wall = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start
    await sched.aclose()
    audio_s = samples / RATE
    return {
        "audio_s": audio_s,
        "wall_s": wall,
        "throughput": audio_s / wall,
        "per_cpu": audio_s / cpu,
        "lat_p50": pct(latencies, 50) * 1e3,
        "lat_p95": pct(latencies, 95) * 1e3,
        "ttfa_p50": pct(first_audio, 50) * 1e3,
        "ttfa_p95": pct(first_audio, 95) * 1e3,
        "batch": statistics.mean(sched.batch_sizes) if sched.batch_sizes else float("nan"),
        "worst_rtf": max(stream_rtf),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["dev", "realsize"], default="dev")
    ap.add_argument("--model", default=None, help="a real decoder checkpoint directory instead")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="flow dtype: float32, bfloat16, float16")
    ap.add_argument("--streams", default="1,2,4,8,16")
    ap.add_argument("--tokens", type=int, default=110, help="speech tokens per stream (12.5 per second)")
    ap.add_argument("--schedule", default="10,25,50", help="chunk sizes, the last repeats")
    ap.add_argument("--window", type=int, default=50, help="prompt_window_tokens")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--wait-ms", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=1, help="rounds per N (modes alternate their order)")
    ap.add_argument("--compile", default="off", help="torch.compile the flow estimator: off, default, "
                    "reduce-overhead (CUDA graphs), max-autotune; frames are then bucketed by 64")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds at N=2 before measuring")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown output (default results/decoder_batching-SIZE.md)")
    args = ap.parse_args()
    args.schedule = [int(x) for x in args.schedule.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    dec = build(args.size, args.model, args.device)
    if args.dtype != "float32":  # the flow only: the vocoder stays float32 (see the decoder README)
        dec.flow.to(getattr(torch, args.dtype))
    if args.compile != "off":
        dec.flow.decoder.compile_estimator(args.compile)
        dec.flow.pad_frames_to = 64
    info = machine_info(args.device)
    print(info, f"torch threads {torch.get_num_threads()}", flush=True)
    for _ in range(args.warmup):
        for batched in (False, True):
            asyncio.run(run_mode(dec, 2, batched, args))
    rows = []
    for n in [int(x) for x in args.streams.split(",")]:
        res: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for r in range(args.rounds):
            order = (False, True) if (r + n) % 2 == 0 else (True, False)
            for batched in order:
                out = asyncio.run(run_mode(dec, n, batched, args))
                res[batched].append(out)
                print(f"N={n:2d} {'batched' if batched else 'unbatched':9s} "
                      + " ".join(f"{k}={v:.2f}" for k, v in out.items()), flush=True)
        agg = {b: {k: statistics.median(x[k] for x in res[b]) for k in res[b][0]} for b in (False, True)}
        rows.append((n, agg))
    load_end = os.getloadavg()[0]
    lines = [
        f"# Decoder batching — {args.model or args.size}, device {args.device}, flow {args.dtype}, "
        f"compile {args.compile}",
        "",
        f"{info}; load avg at end {load_end:.1f}; torch threads {torch.get_num_threads()}.",
        f"Per stream: {args.tokens} tokens ({args.tokens / 12.5:.1f} s of speech), schedule "
        f"{','.join(map(str, args.schedule))} (last repeats; last chunk final), window {args.window}; "
        f"batched: max {args.max_batch} streams, wait ≤ {args.wait_ms:g} ms; rounds {args.rounds}.",
        "Command: `python benchmarks/bench_decoder_batching.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "| streams | mode | audio s / wall s | ratio | audio s / CPU s | ratio | chunk p50 ms | chunk p95 ms "
        "| TTFA p50 ms | TTFA p95 ms | mean batch | worst stream RTF |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, agg in rows:
        base, base_cpu = agg[False]["throughput"], agg[False]["per_cpu"]
        for b in (False, True):
            a = agg[b]
            lines.append(
                f"| {n} | {'batched' if b else 'unbatched'} | {a['throughput']:.2f} | "
                f"{a['throughput'] / base:.2f}× | {a['per_cpu']:.2f} | {a['per_cpu'] / base_cpu:.2f}× | "
                f"{a['lat_p50']:.0f} | {a['lat_p95']:.0f} | "
                f"{a['ttfa_p50']:.0f} | {a['ttfa_p95']:.0f} | {a['batch']:.1f} | {a['worst_rtf']:.2f} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or Path(__file__).resolve().parent / "results" / f"decoder_batching-{args.size}.md"
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
