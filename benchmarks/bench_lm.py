"""LM engine benchmark: decode throughput and time to first token, continuous batching vs batch size 1.

For each model (random weights in the published layout, written to a temporary directory, or a real
checkpoint given with ``--model-dir``) and each concurrency level, N streams are submitted at once
to a :class:`~glmv_lm.engine.GenerationEngine`, once with ``max_batch_size = N`` (batching on) and
once with ``max_batch_size = 1`` (the reference server's one-request-at-a-time behaviour). Stop
tokens are disabled so every stream generates exactly ``--new-tokens`` tokens.

Columns: aggregate decode tokens/s (all tokens / wall time), mean per-stream decode tokens/s (after
the first token), mean and p90 time to first token (queueing included), wall time.

    python benchmarks/bench_lm.py                       # dev + mid sizes on CPU
    python benchmarks/bench_lm.py --sizes mid --device cuda --dtype bfloat16 --streams 1,4,8,16,32
    python benchmarks/bench_lm.py --model-dir /models/glm-4-voice-9b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import common as C  # type: ignore[import-not-found]
import torch

from glmv_lm.devmodel import write_dev_checkpoint
from glmv_lm.engine import DoneEvent, EngineConfig, GenerationEngine, TokenSpec
from glmv_lm.sampling import SamplingParams


@dataclass
class Row:
    model: str
    streams: int
    mode: str
    total_tps: float
    stream_tps: float
    ttft_ms: float
    ttft_p90_ms: float
    wall_s: float


def run_level(
    model: torch.nn.Module,
    spec: TokenSpec,
    decoder_factory,  # type: ignore[no-untyped-def]
    max_context: int,
    streams: int,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    seed: int,
) -> tuple[float, float, list[float], float]:
    engine = GenerationEngine(
        model,
        spec,
        decoder_factory,
        EngineConfig(max_batch_size=batch, max_queue=streams, max_context=max_context),
    )
    engine.start()
    try:
        g = torch.Generator().manual_seed(seed)
        prompts = [
            torch.randint(0, spec.audio_offset, (prompt_len + 3 * i,), generator=g).tolist()
            for i in range(streams)
        ]
        params = SamplingParams(temperature=0.8, top_p=0.8, top_k=50, max_new_tokens=new_tokens, seed=seed)
        dones: list[DoneEvent] = []
        lock = threading.Lock()
        finished = threading.Semaphore(0)

        def sink(event: object) -> None:
            if isinstance(event, DoneEvent):
                with lock:
                    dones.append(event)
                finished.release()

        started = time.perf_counter()
        for p in prompts:
            engine.submit(p, params, sink)
        for _ in prompts:
            finished.acquire()
        wall = time.perf_counter() - started
    finally:
        engine.close()
    total = sum(d.completion_tokens for d in dones)
    return (
        total / wall,
        statistics.mean(d.decode_tokens_per_s for d in dones),
        [d.time_to_first_token_ms for d in dones],
        wall,
    )


def bench_model(name: str, model_dir: Path, args: argparse.Namespace) -> list[Row]:
    loaded, tok, spec = C.load_engine_lm(model_dir, args.device, args.dtype)  # no stop ids
    params_m = loaded.num_parameters / 1e6
    label = f"{name} ({params_m:.1f}M)"
    print(
        f"# {label}: {loaded.config.num_hidden_layers} layers, hidden {loaded.config.hidden_size}, "
        f"vocab {loaded.vocab_size}, {args.device}/{args.dtype}",
        flush=True,
    )
    # warm-up (allocations, kernels)
    run_level(loaded.model, spec, tok.incremental_decoder, loaded.max_context, 2, 2, args.prompt_len, 8, 0)
    rows = []
    for n in args.streams:
        for mode, batch in (("batched", n), ("bs=1", 1)):
            if mode == "bs=1" and n == 1:
                continue
            total, per, ttfts, wall = run_level(
                loaded.model,
                spec,
                tok.incremental_decoder,
                loaded.max_context,
                n,
                batch,
                args.prompt_len,
                args.new_tokens,
                args.seed,
            )
            ttfts.sort()
            rows.append(
                Row(
                    label,
                    n,
                    mode,
                    total,
                    per,
                    statistics.mean(ttfts),
                    ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
                    wall,
                )
            )
            print_row(rows[-1])
    return rows


HEADER = (
    f"{'model':<16} {'streams':>7} {'mode':>8} {'tok/s total':>12} {'tok/s/stream':>13} "
    f"{'TTFT ms':>9} {'TTFT p90':>9} {'wall s':>7}"
)


def print_row(r: Row) -> None:
    print(
        f"{r.model:<16} {r.streams:>7} {r.mode:>8} {r.total_tps:>12.1f} {r.stream_tps:>13.1f} "
        f"{r.ttft_ms:>9.1f} {r.ttft_p90_ms:>9.1f} {r.wall_s:>7.2f}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="dev,mid", help="random checkpoints to write (devmodel sizes)")
    ap.add_argument("--model-dir", type=Path, default=None, help="benchmark this checkpoint instead")
    ap.add_argument("--streams", default="1,4,8,16", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(HEADER)
    rows: list[Row] = []
    if args.model_dir is not None:
        rows += bench_model(args.model_dir.name, args.model_dir, args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for size in args.sizes.split(","):
                out = write_dev_checkpoint(Path(tmp) / size, seed=args.seed, codebook_size=1024, size=size)
                rows += bench_model(size, out, args)
    print("\n" + HEADER)
    for r in rows:
        print_row(r)


if __name__ == "__main__":
    main()
