"""Tokenizer service throughput and latency, batching on vs off, over a real gRPC channel.

    .venv/bin/python benchmarks/bench_tokenizer.py                      # dev weights
    .venv/bin/python benchmarks/bench_tokenizer.py --size realsize      # published dimensions
    .venv/bin/python benchmarks/bench_tokenizer.py --model DIR          # any checkpoint directory

For each model, batching mode and client count (1, 4, 16), every client sends utterances of
``--seconds`` back to back; the table shows utterances/s and p50/p95 request latency. Random-weight
checkpoints are written to a temporary directory (``glmv-tokenizer make-dev``) unless --model is given.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from glmv_common.audio import Encoding, encode_pcm
from glmv_common.runtime import start_service
from glmv_tokenizer.checkpoint import synthetic_audio, write_dev_checkpoint
from glmv_tokenizer.service import TokenizerService, TokenizerSettings
from glmv_tokenizer.tokenizer import SpeechTokenizer
from glmvoice.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc


async def run_case(
    tokenizer: SpeechTokenizer, batching: bool, clients: int, requests: int, audio: np.ndarray, wait_ms: float
) -> dict[str, float]:
    settings = TokenizerSettings(
        port=0, batching=batching, max_batch_size=16, max_batch_wait_ms=wait_ms, max_concurrent_streams=256
    )
    service = TokenizerService(settings, tokenizer=tokenizer)
    running = await start_service(service, settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    stub = tokenizer_pb2_grpc.SpeechTokenizerStub(channel)
    chunk = common_pb2.AudioChunk(
        data=encode_pcm(audio, Encoding.PCM16), encoding=int(Encoding.PCM16), sample_rate=16000, channels=1
    )
    request = tokenizer_pb2.TokenizeRequest(audio=chunk)
    await stub.Tokenize(request)  # warm-up
    latencies: list[float] = []
    per_client = max(1, requests // clients)

    async def client() -> None:
        for _ in range(per_client):
            started = time.perf_counter()
            await stub.Tokenize(request)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    stats = service.batcher.stats
    await channel.close()
    await running.stop(grace=0)
    latencies.sort()
    return {
        "utt_s": len(latencies) / elapsed,
        "p50_ms": 1e3 * statistics.median(latencies),
        "p95_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "mean_batch": (stats.items - 1) / max(1, stats.batches - 1),
        "n": len(latencies),
    }


async def main_async(args: argparse.Namespace) -> None:
    tmp = tempfile.TemporaryDirectory(prefix="bench-tok-")
    if args.model:
        model_dirs = {Path(args.model).name: Path(args.model)}
    else:
        sizes = ["dev", "realsize"] if args.size == "both" else [args.size]
        model_dirs = {}
        for size in sizes:
            t0 = time.perf_counter()
            model_dirs[size] = write_dev_checkpoint(Path(tmp.name) / size, seed=0, size=size)
            print(f"wrote {size} checkpoint in {time.perf_counter() - t0:.1f} s")
    audio = synthetic_audio(1, args.seconds)
    rows = []
    for name, model_dir in model_dirs.items():
        t0 = time.perf_counter()
        tokenizer = SpeechTokenizer.from_dir(model_dir, args.device)
        print(f"loaded {name} in {time.perf_counter() - t0:.2f} s ({tokenizer.info.extra['layers']} layers)")
        for batching in (False, True):
            for clients in args.clients:
                requests = max(args.requests if name != "realsize" else args.realsize_requests, clients)
                result = await run_case(tokenizer, batching, clients, requests, audio, args.wait_ms)
                rows.append((name, "on" if batching else "off", clients, result))
                print(f"  {name:8s} batching={'on ' if batching else 'off'} clients={clients:2d}: {result}")
    print(f"\nTokenize of {args.seconds:g} s utterances on {args.device}, gRPC over 127.0.0.1")
    print("| model | batching | clients | requests | utt/s | p50 ms | p95 ms | mean batch |")
    print("|---|---|---|---|---|---|---|---|")
    for name, batching, clients, r in rows:
        print(
            f"| {name} | {batching} | {clients} | {r['n']} | {r['utt_s']:.1f} | {r['p50_ms']:.0f} "
            f"| {r['p95_ms']:.0f} | {r['mean_batch']:.1f} |"
        )
    tmp.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["dev", "realsize", "both"], default="dev")
    parser.add_argument("--model", help="benchmark this checkpoint directory instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=4.0, help="utterance length")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=64, help="requests per case (dev)")
    parser.add_argument("--realsize-requests", type=int, default=16, help="requests per case (realsize)")
    parser.add_argument("--wait-ms", type=float, default=5.0, help="batch collection window")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
